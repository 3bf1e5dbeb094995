"""generate() and stream() semantics: input and output forms, max_length, stop tokens (forced by
patching the model step, not by luck), strip_prompt, streaming, compiled-shape reuse, errors."""

import numpy as np
import pytest
from keras import ops

from keras_llama import samplers
from keras_llama.models import LlamaCausalLM
from keras_llama.tokenizers.byte_level_bpe import bytes_to_unicode
from tests.tiny_models import tiny_llama3_lm

# A byte-level BPE vocabulary: Llama 3's special tokens, the 256 bytes, a few merges.
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
BYTE_CHARS = [bytes_to_unicode()[b] for b in range(256)]
MERGES = ["h e", "l l", "Ġ t"]
VOCAB = SPECIAL + BYTE_CHARS + [m.replace(" ", "") for m in MERGES]
BOS, EOS, EOT = 0, 1, 2
SEQUENCE_LENGTH = 24


def byte_id(b):
    """The token id of a single byte."""
    return len(SPECIAL) + b


@pytest.fixture(scope="module")
def lm():
    return tiny_llama3_lm(VOCAB, MERGES, SPECIAL, SEQUENCE_LENGTH)


@pytest.fixture
def forced(lm, monkeypatch):
    """``forced({row: [token, ...]})`` makes greedy generation emit those tokens first, by
    adding a large logit in the model step (rows indexed within the batch)."""

    def force(schedule, lengths):
        original = type(lm).call_with_layer_caches

        def patched(self, token_ids, caches, index, cache_padding_mask=None, positions=None,
                    **kwargs):  # fmt: skip
            logits, hidden, caches = original(
                self, token_ids, caches, index, cache_padding_mask, positions, **kwargs
            )
            # The last position predicts generated token number `position + 1 - prompt_length`.
            generated = positions[:, -1] + 1 - ops.convert_to_tensor(np.array(lengths, "int32"))
            rows = ops.arange(logits.shape[0])
            boost = ops.zeros(logits.shape[::2], "float32")  # [batch, vocab]
            for row, tokens in schedule.items():
                for step, token in enumerate(tokens):
                    hit = ops.logical_and(rows == row, generated == step)
                    onehot = ops.cast(ops.arange(logits.shape[-1]) == token, "float32")
                    boost = boost + ops.cast(hit, "float32")[:, None] * onehot[None, :] * 1e4
            return logits + ops.cast(boost[:, None, :], logits.dtype), hidden, caches

        monkeypatch.setattr(type(lm), "call_with_layer_caches", patched)
        lm.generate_function = None  # re-trace with the patch

    yield force
    lm.generate_function = None


def _ids(rows, width):
    ids = np.zeros((len(rows), width), "int32")
    mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, True
    return {"token_ids": ids, "padding_mask": mask}


# --- output structure per input form ---------------------------------------------------------
def test_string_in_string_out_and_list_in_list_out(lm):
    text = lm.generate("hello", max_length=16, stop_token_ids=None)
    assert isinstance(text, str) and text.startswith("hello") and len(text) > len("hello")
    batch = lm.generate(["hello", "the cat"], max_length=16, stop_token_ids=None)
    assert isinstance(batch, list) and len(batch) == 2
    assert batch[0] == text and batch[1].startswith("the cat")
    # A numpy array of strings is a batch too.
    assert lm.generate(np.array(["hello"]), max_length=16, stop_token_ids=None) == [text]


def test_strip_prompt_returns_only_the_completion(lm):
    full = lm.generate(["hello", "the cat"], max_length=16, stop_token_ids=None)
    new = lm.generate(["hello", "the cat"], max_length=16, stop_token_ids=None, strip_prompt=True)
    assert new == [full[0][len("hello") :], full[1][len("the cat") :]]
    ids = _ids([[5, 6, 7], [8, 9]], 8)
    out = lm.generate(ids, stop_token_ids=None)
    stripped = lm.generate(ids, stop_token_ids=None, strip_prompt=True)
    np.testing.assert_array_equal(stripped["token_ids"][0, :5], out["token_ids"][0, 3:])
    np.testing.assert_array_equal(stripped["token_ids"][1, :6], out["token_ids"][1, 2:])
    assert stripped["padding_mask"].sum(1).tolist() == [5, 6]


def test_dict_inputs_give_dict_outputs_and_max_length_defaults(lm):
    ids = _ids([[5, 6, 7], [8, 9]], 10)
    out = lm.generate(ids, stop_token_ids=None)
    assert set(out) == {"token_ids", "padding_mask"}
    assert out["token_ids"].shape == (2, 10) and out["token_ids"].dtype == np.int32
    assert out["padding_mask"].dtype == bool and out["padding_mask"].all()
    np.testing.assert_array_equal(out["token_ids"][0, :3], [5, 6, 7])
    np.testing.assert_array_equal(out["token_ids"][1, :2], [8, 9])
    # An explicit max_length widens the output; the common part is identical (greedy).
    wider = lm.generate(ids, max_length=14, stop_token_ids=None)
    assert wider["token_ids"].shape == (2, 14)
    np.testing.assert_array_equal(wider["token_ids"][:, :10], out["token_ids"])


def test_text_max_length_defaults_to_sequence_length(lm, monkeypatch):
    seen = []
    postprocess = lm.preprocessor.generate_postprocess

    def record(x):
        seen.append(np.asarray(x["padding_mask"]).sum(axis=1))
        return postprocess(x)

    monkeypatch.setattr(lm.preprocessor, "generate_postprocess", record)
    lm.generate(["he", "hello"], stop_token_ids=None)
    np.testing.assert_array_equal(seen[-1], [SEQUENCE_LENGTH, SEQUENCE_LENGTH])
    lm.generate(["he"], max_length=9, stop_token_ids=None)
    np.testing.assert_array_equal(seen[-1], [9])


def test_iterable_of_batches_is_generated_batch_by_batch(lm):
    first, second = ["hello", "the"], ["cat"]
    expected = lm.generate(first, max_length=12, stop_token_ids=None) + lm.generate(
        second, max_length=12, stop_token_ids=None
    )
    batches = (b for b in [first, second])
    assert lm.generate(batches, max_length=12, stop_token_ids=None) == expected
    a, b = _ids([[5, 6, 7], [8, 9]], 8), _ids([[10, 11]], 8)
    joined = lm.generate([a, b], stop_token_ids=None)
    assert joined["token_ids"].shape == (3, 8)
    np.testing.assert_array_equal(
        joined["token_ids"][2], lm.generate(b, stop_token_ids=None)["token_ids"][0]
    )


def test_beam_sampler_return_all_beams_output_forms(lm):
    lm.compile(sampler=samplers.BeamSampler(num_beams=2, return_all_beams=True))
    try:
        texts = lm.generate(["hello", "the"], max_length=12, stop_token_ids=None)
        assert len(texts) == 2 and all(len(beams) == 2 for beams in texts)
        out = lm.generate(_ids([[5, 6], [7]], 6), stop_token_ids=None)
        assert out["token_ids"].shape == (2, 2, 6) and out["scores"].shape == (2, 2)
    finally:
        lm.compile(sampler="greedy")


# --- stop tokens -----------------------------------------------------------------------------
def test_stop_token_ids_stop_each_row_and_pad_after(lm, forced):
    rows = [[5, 6, 7], [8, 9]]
    forced({0: [40, 41, 7], 1: [42, 43, 44, 45, 9]}, lengths=[3, 2])
    out = lm.generate(_ids(rows, 12), stop_token_ids=(7, 9))
    # Row 0 stops at its 3rd new token (7), row 1 at its 5th (9); both keep the stop token.
    np.testing.assert_array_equal(out["token_ids"][0], [5, 6, 7, 40, 41, 7] + [0] * 6)
    np.testing.assert_array_equal(out["token_ids"][1], [8, 9, 42, 43, 44, 45, 9] + [0] * 5)
    assert out["padding_mask"].sum(1).tolist() == [6, 7]
    # The loop ended as soon as both rows had stopped: after 5 steps, not 10.
    engine = lm.make_generate_function()
    from keras_llama.models.generation import preprocess

    state, steps = engine.prefill(preprocess(lm, _ids(rows, 12), None))
    state = engine.decode(state, steps, (7, 9))
    assert steps == 10 and int(ops.convert_to_numpy(state.index)) == 5
    # Stop ids that appear in the prompt do not stop anything; None generates to max_length.
    out = lm.generate(_ids(rows, 12), stop_token_ids=None)
    assert out["padding_mask"].all()
    np.testing.assert_array_equal(out["token_ids"][0, 3:6], [40, 41, 7])


def test_auto_stop_tokens_are_end_and_eot(lm, forced):
    # "he" is [BOS, "he"] (2 tokens); "hello" is [BOS, "he", "ll", "o"] (4 tokens).
    forced(
        {0: [byte_id(ord("!")), EOT], 1: [byte_id(ord("?")), byte_id(ord("!")), EOS]},
        lengths=[2, 4],
    )
    assert lm.generate(["he", "hello"], max_length=20) == ["he!", "hello?!"]
    assert lm.generate(["he", "hello"], max_length=20, strip_prompt=True) == ["!", "?!"]
    # With stop_token_ids=None the forced end tokens are generated through (and dropped as
    # special tokens from the text), and generation continues.
    longer = lm.generate(["he", "hello"], max_length=20, stop_token_ids=None)
    assert longer[0].startswith("he!") and len(longer[0]) > 3


# --- streaming -------------------------------------------------------------------------------
def test_stream_never_splits_characters(lm, forced):
    text = "é€😀a"
    tokens = [byte_id(b) for b in text.encode("utf-8")] + [EOS]
    forced({0: tokens}, lengths=[2])
    pieces = list(lm.stream("he", max_length=20))
    assert "".join(pieces) == text == lm.generate("he", max_length=20, strip_prompt=True)
    assert all("\ufffd" not in p for p in pieces)
    assert pieces == ["é", "€", "😀", "a"]  # one piece per character, as soon as it is whole


def test_stream_concatenates_to_generate(lm):
    pieces = list(lm.stream("the", max_length=20, stop_token_ids=None))
    assert len(pieces) > 1
    assert "".join(pieces) == lm.generate(
        "the", max_length=20, stop_token_ids=None, strip_prompt=True
    )
    lm.compile(sampler=samplers.BeamSampler(num_beams=2))
    try:  # beam search: the best beam only exists at the end, so one piece
        beam = lm.generate("the", max_length=12, stop_token_ids=None, strip_prompt=True)
        assert list(lm.stream("the", max_length=12, stop_token_ids=None)) == [beam]
    finally:
        lm.compile(sampler="greedy")


# --- compilation ------------------------------------------------------------------------------
def test_similar_prompt_lengths_reuse_the_compiled_functions(lm):
    lm.generate_function = None
    for prompt in ([5, 6, 7, 8, 9], [5, 6, 7], [10, 11, 12, 13, 14, 15, 16]):
        lm.generate(_ids([prompt], 24), stop_token_ids=None)
    engine = lm.make_generate_function()
    if engine.jax:
        assert engine._prefill_jit._cache_size() == 1
        assert engine._decode_jit._cache_size() == 1


def test_compile_with_another_sampler_changes_generation(lm):
    ids = _ids([[5, 6, 7]], 16)
    greedy = lm.generate(ids, stop_token_ids=None)["token_ids"]
    lm.compile(sampler=samplers.RandomSampler(seed=3, temperature=3.0))
    try:
        sampled = lm.generate(ids, stop_token_ids=None)["token_ids"]
        assert (sampled != greedy).any()
        # The seed generator advances between calls; the same seed reproduces from the start.
        assert (lm.generate(ids, stop_token_ids=None)["token_ids"] != sampled).any()
        lm.compile(sampler=samplers.RandomSampler(seed=3, temperature=3.0))
        np.testing.assert_array_equal(lm.generate(ids, stop_token_ids=None)["token_ids"], sampled)
    finally:
        lm.compile(sampler="greedy")
    np.testing.assert_array_equal(lm.generate(ids, stop_token_ids=None)["token_ids"], greedy)


# --- errors -----------------------------------------------------------------------------------
def test_bad_inputs(lm):
    with pytest.raises(ValueError, match=r"at least one prompt. Received: inputs=\[\]"):
        lm.generate([])
    with pytest.raises(
        ValueError, match="longest prompt, which has 3 tokens.*Received: max_length=3"
    ):
        lm.generate(_ids([[5, 6, 7]], 8), max_length=3, stop_token_ids=None)
    with pytest.raises(ValueError, match="longest prompt.*Received: max_length=5"):
        lm.generate("hello world", max_length=5)  # [BOS, he, ll, o, Ġ, w...] is truncated to 5
    with pytest.raises(ValueError, match="Received: max_length=0"):
        lm.generate("hello", max_length=0)
    with pytest.raises(ValueError, match=r"\[0, 262\).*Received: stop_token_ids=\(1, 262\)"):
        lm.generate("hello", stop_token_ids=(1, 262))
    with pytest.raises(ValueError, match=r"Received: stop_token_ids=\(-1,\)"):
        lm.generate("hello", stop_token_ids=(-1,))
    with pytest.raises(ValueError, match="Received: stop_token_ids='eos'"):
        lm.generate("hello", stop_token_ids="eos")
    with pytest.raises(ValueError, match="empty prompt at row 1"):
        lm.generate(_ids([[5], []], 4), stop_token_ids=None)
    with pytest.raises(ValueError, match="Received: token id 999"):
        lm.generate(_ids([[5, 999]], 4), stop_token_ids=None)
    with pytest.raises(ValueError, match="`token_ids`.*Received keys: \\['ids'\\]"):
        lm.generate({"ids": np.ones((1, 3), "int32")}, stop_token_ids=None)
    with pytest.raises(ValueError, match="single prompt string. Received: inputs of type list"):
        lm.stream(["a", "b"])
    with pytest.raises(ValueError, match="Received: inputs of type int"):
        lm.generate(3)


def test_auto_stop_tokens_and_text_need_a_preprocessor(lm):
    bare = LlamaCausalLM(lm.backbone)
    with pytest.raises(ValueError, match='stop_token_ids="auto"` needs a `preprocessor`'):
        bare.generate(_ids([[5, 6]], 6))
    with pytest.raises(ValueError, match="received text, but the model has no `preprocessor`"):
        bare.generate("hello", stop_token_ids=None)
