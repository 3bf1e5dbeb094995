"""The executable cache of generate()'s compiled programs (`keras_llama.utils.executable_cache`):
a hit gives the tokens the plain ``jax.jit`` path gives; a change of config, plan, sampler or
shape misses; a corrupt entry is ignored with a warning and replaced; writes are atomic."""

import os
import pickle
import warnings

import numpy as np
import pytest

from keras_llama import samplers
from keras_llama.models import generation_engine
from keras_llama.models.generation_engine import GenerationEngine, Prompts
from keras_llama.models.llama import llama_plan
from keras_llama.utils import executable_cache, keras_compat

pytestmark = pytest.mark.skipif(
    os.environ.get("KERAS_BACKEND") == "torch", reason="compiled JAX programs"
)

from tests.models.test_generate import MERGES, SEQUENCE_LENGTH, SPECIAL, VOCAB  # noqa: E402
from tests.tiny_models import tiny_llama3_lm  # noqa: E402

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12]]


@pytest.fixture(scope="module")
def lm():
    return tiny_llama3_lm(VOCAB, MERGES, SPECIAL, SEQUENCE_LENGTH)


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A fresh cache folder; JAX's own persistent cache stays off, as far as this process
    has not turned it on already (the cache's program names keep the two apart anyway)."""
    monkeypatch.setenv("KERAS_LLAMA_CACHE", str(tmp_path))
    monkeypatch.setenv("KERAS_LLAMA_JAX_CACHE", "0")
    monkeypatch.delenv(executable_cache.ENV, raising=False)
    return tmp_path / "executables"


def _run(lm, sampler=None, plan=None, max_length=20, prompts=PROMPTS):
    """(tokens, engine) of greedy generation with a new engine (nothing compiled in memory)."""
    engine = GenerationEngine(lm, sampler or samplers.get("greedy"), plan=plan)
    result = engine.run(Prompts(rows=[np.array(p, "int32") for p in prompts],
                                max_length=max_length), ())  # fmt: skip
    return result["tokens"], engine


def _plain(lm, monkeypatch, **kwargs):
    """The same generation as plain ``jax.jit`` programs (the cache turned off)."""
    with monkeypatch.context() as m:
        m.setenv(executable_cache.ENV, "0")
        tokens, engine = _run(lm, **kwargs)
    assert _counts(engine) == (0, 0)  # nothing went through the cache
    return tokens


def _functions(engine):
    return [engine._prefill_jit, engine._weights_jit, engine._block_jit, engine._head_jit,
            engine._decode_jit]  # fmt: skip


def _counts(engine):
    """(programs loaded from disk, programs compiled and saved) over the engine's functions."""
    functions = [f for f in _functions(engine) if f._base_key()]
    return sum(f.loads for f in functions), sum(f.compiles for f in functions)


def _entries(folder):
    return sorted(p.name for p in folder.glob("*.xla")) if folder.exists() else []


# --- hits --------------------------------------------------------------------------------------
def test_a_new_engine_loads_every_program_and_generates_the_same_tokens(lm, folder, monkeypatch):
    reference = _plain(lm, monkeypatch)
    first, engine = _run(lm)
    loads, compiles = _counts(engine)
    assert loads == 0 and compiles >= 2  # prefill and decode (and the decode weights' parts)
    assert len(_entries(folder)) == compiles
    second, engine = _run(lm)
    assert _counts(engine) == (compiles, 0)  # all loaded, nothing traced
    np.testing.assert_array_equal(first, reference)
    np.testing.assert_array_equal(second, reference)


def test_other_weights_of_the_same_model_hit_and_give_their_own_tokens(lm, folder, monkeypatch):
    _run(lm)
    other = tiny_llama3_lm(VOCAB, MERGES, SPECIAL, SEQUENCE_LENGTH, seed=1)
    reference = _plain(other, monkeypatch)
    tokens, engine = _run(other)
    assert _counts(engine)[1] == 0  # the weights are arguments, not part of the program
    np.testing.assert_array_equal(tokens, reference)
    assert not np.array_equal(reference, _plain(lm, monkeypatch))  # the weights do matter


# --- misses ------------------------------------------------------------------------------------
def test_a_new_shape_misses(lm, folder, monkeypatch):
    _run(lm, max_length=20)
    before = _entries(folder)
    tokens, engine = _run(lm, max_length=40)  # another buffer width: other programs
    assert _counts(engine)[1] >= 2
    assert len(_entries(folder)) > len(before)
    np.testing.assert_array_equal(tokens, _plain(lm, monkeypatch, max_length=40))


def test_another_sampler_misses(lm, folder, monkeypatch):
    _run(lm)
    sampler = samplers.TopKSampler(k=1)  # picks as greedy does, by another program
    tokens, engine = _run(lm, sampler=sampler)
    assert _counts(engine) == (0, _counts(engine)[1]) and _counts(engine)[1] >= 2
    np.testing.assert_array_equal(tokens, _plain(lm, monkeypatch))


def test_another_execution_plan_misses(lm, folder, monkeypatch):
    _run(lm)
    chosen = lm.execution_plan()
    others = llama_plan.alternatives(lm.backbone, "decode")[1:]
    assert others, "no other decode plan to compare"
    plan = chosen.__class__(chosen.prefill, others[0], chosen.training, chosen.scoring)
    tokens, engine = _run(lm, plan=plan)
    loads, compiles = _counts(engine)
    assert compiles >= 1 and loads <= 1  # at most the unchanged prefill is shared
    np.testing.assert_array_equal(tokens, _plain(lm, monkeypatch, plan=plan))


def test_another_config_misses(lm, folder, monkeypatch):
    _run(lm)
    entries = _entries(folder)
    smaller = tiny_llama3_lm_with_layers(1)
    tokens, engine = _run(smaller)
    assert _counts(engine)[0] == 0
    assert set(entries) < set(_entries(folder))
    np.testing.assert_array_equal(tokens, _plain(smaller, monkeypatch))


def tiny_llama3_lm_with_layers(num_layers):
    from keras_llama.models import LlamaBackbone, LlamaCausalLM

    lm = tiny_llama3_lm(VOCAB, MERGES, SPECIAL, SEQUENCE_LENGTH)
    config = {**lm.backbone.get_config(), "num_layers": num_layers}
    backbone = LlamaBackbone.from_config(config)
    rng = np.random.default_rng(2)
    for v in backbone.weights:
        if len(v.shape) > 1:
            v.assign(rng.normal(0, 0.3, v.shape).astype("float32"))
    other = LlamaCausalLM(backbone, lm.preprocessor)
    other.compile(sampler="greedy")
    return other


def test_a_replaced_method_is_never_cached(lm, folder, monkeypatch):
    original = type(lm).call_with_layer_caches

    def patched(self, *args, **kwargs):
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(lm), "call_with_layer_caches", patched)
    tokens, engine = _run(lm)
    assert _counts(engine) == (0, 0) and _entries(folder) == []
    monkeypatch.undo()
    assert generation_engine.program_fingerprint(lm, engine.sampler, engine.plan, engine.variables)


# --- corrupt entries and writes ----------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncate", "garble", "foreign_pickle"])
def test_a_corrupt_entry_is_ignored_with_a_warning_and_replaced(lm, folder, monkeypatch, damage):
    reference = _plain(lm, monkeypatch)
    _run(lm)
    for path in folder.glob("*.xla"):
        data = path.read_bytes()
        if damage == "truncate":
            path.write_bytes(data[: len(data) // 2])
        elif damage == "garble":
            path.write_bytes(data[:-100] + bytes(100))
        else:  # a well-formed entry whose payload names a class that is not JAX's
            payload = pickle.dumps(warnings.WarningMessage)
            header_end = data.index(b"\n", len(executable_cache.MAGIC))
            header = executable_cache.json.loads(data[len(executable_cache.MAGIC) : header_end])
            header["sha256"] = executable_cache.hashlib.sha256(payload).hexdigest()
            path.write_bytes(executable_cache.MAGIC + executable_cache.json.dumps(header).encode()
                             + b"\n" + payload)  # fmt: skip
    with pytest.warns(UserWarning, match="Ignoring the cached compiled program") as caught:
        tokens, engine = _run(lm)
    assert len(caught) == len(_entries(folder))  # once per entry
    np.testing.assert_array_equal(tokens, reference)
    assert _counts(engine)[1] >= 2  # compiled again and saved again...
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokens, engine = _run(lm)  # ...so the next engine loads them
    assert _counts(engine)[1] == 0
    np.testing.assert_array_equal(tokens, reference)


def test_writes_are_atomic_and_a_failed_write_leaves_nothing(lm, folder, monkeypatch):
    reference = _plain(lm, monkeypatch)
    _run(lm)
    names = _entries(folder)
    assert names and not list(folder.glob("*.tmp"))
    for name in names:  # each entry's path taken by a folder: reading and renaming fail
        (folder / name).unlink()
        (folder / name).mkdir()
    with pytest.warns(UserWarning, match="Ignoring the cached compiled program") as caught:
        tokens, engine = _run(lm)
    assert len(caught) >= len(names)  # each unreadable path (decode's: by both threads)
    np.testing.assert_array_equal(tokens, reference)
    assert not list(folder.glob("*.tmp"))  # the temporary files are gone
    assert all((folder / name).is_dir() for name in names)


def test_an_unwritable_cache_folder_runs_without_saving(lm, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("KERAS_LLAMA_CACHE", str(blocker))  # executables/ cannot be made
    monkeypatch.setenv("KERAS_LLAMA_JAX_CACHE", "0")
    reference = _plain(lm, monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokens, engine = _run(lm)
    np.testing.assert_array_equal(tokens, reference)


# --- pieces ------------------------------------------------------------------------------------
def test_output_trees_round_trip_through_json_and_foreign_types_are_refused(lm, folder):
    import collections

    import jax

    _, engine = _run(lm)
    values = [v.value for v in engine.variables]
    weights = engine._weights_jit.compiled(values).out_tree
    state = engine._prefill_jit.compiled(values, np.zeros((2, 16), "int32"),
                                         np.ones(2, "int32"), np.ones(2, "int32"), 16).out_tree  # fmt: skip
    for tree in (weights, state, jax.tree_util.tree_structure({"a": [1, (2, None)]})):
        as_json = executable_cache.json.loads(
            executable_cache.json.dumps(executable_cache.treedef_to_json(tree))
        )
        assert executable_cache.treedef_from_json(as_json) == tree
    Foreign = collections.namedtuple("Foreign", "x")
    with pytest.raises(TypeError, match="not ours"):
        executable_cache.treedef_to_json(jax.tree_util.tree_structure(Foreign(1)))
    with pytest.raises(ValueError, match="refused"):
        executable_cache.treedef_from_json({"type": "os:system", "aux": None, "children": []})


def test_the_unpickler_refuses_classes_outside_jax_and_numpy():
    import jax

    tree = jax.tree_util.tree_structure(((0,), {}))
    with pytest.raises(pickle.UnpicklingError, match="refused class"):
        keras_compat.load_serialized_executable(pickle.dumps(os.getcwd), tree, tree)


def test_the_folder_keeps_the_most_recently_used_entries_within_its_limit(tmp_path, monkeypatch):
    import jax.numpy as jnp

    monkeypatch.delenv(executable_cache.ENV, raising=False)

    def fun(x):
        return jnp.sin(x) * 2.0

    def cached(max_bytes):
        return executable_cache.CachedFunction(
            "sine", fun, lambda: "sine v1", folder=tmp_path, max_bytes=max_bytes
        )

    for n in (3, 4):
        cached(1 << 30)(np.ones(n, "float32"))
    sizes = {p.name: p.stat().st_size for p in tmp_path.glob("*.xla")}
    assert len(sizes) == 2
    oldest = min(tmp_path.glob("*.xla"), key=lambda p: p.stat().st_mtime)
    os.utime(oldest, (1, 1))  # the shape-3 entry: used long ago
    limit = sum(sizes.values()) + 64  # room for two entries of about this size
    function = cached(limit)
    np.testing.assert_allclose(function(np.ones(5, "float32")), np.sin(1.0) * 2.0, rtol=1e-6)
    left = {p.name for p in tmp_path.glob("*.xla")}
    assert oldest.name not in left and len(left) == 2
    assert function.compiles == 1
    again = cached(limit)
    again(np.ones(5, "float32"))
    assert (again.loads, again.compiles) == (1, 0)
