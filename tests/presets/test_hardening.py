"""Issue 14, items 1-3: crafted files are refused with a ValueError or FileNotFoundError naming
the file and the field, before anything sized by their numbers is allocated or built; invalid
numbers are errors, not NaN logits. The crafted files come from `tests.presets.crafted`
(written with the `gguf` package, `safetensors` and `json`, or by hand with `struct`)."""

import json
import math
import os
import time
import tracemalloc

import numpy as np
import pytest

from keras_llama.models import Backbone, CausalLM, LlamaBackbone, LlamaCausalLM
from keras_llama.models.llama.llama_layers import LlamaLayerNorm, LlamaRotaryEmbedding
from tests.presets import crafted

# Each crafted file -> what its error must say (the field and the value received).
EXPECTED = {
    "gguf_huge_vocabulary": r"tokenizer\.ggml\.tokens.*claims 300000000 entries",
    "gguf_nested_arrays": r"'tokenizer\.ggml\.tokens'.*nests arrays more than 8 deep",
    "gguf_block_count_100000": r"claims 100000 blocks but holds tensors for 2.*block_count=100000",
    "gguf_head_count_0": r"`llama\.attention\.head_count` must be a positive integer"
    r".*head_count=0",
    "gguf_block_count_string": r"`llama\.block_count` must be a positive integer.*='2'",
    "gguf_rope_theta_0": r"`llama\.rope\.freq_base` must be a positive finite number.*=0\.0",
    "gguf_rms_eps_nan": r"layer_norm_rms_epsilon` must be a positive finite.*=nan",
    "hf_num_hidden_layers_100000": r"holds 2 layers.*num_hidden_layers=100000",
    "hf_rope_theta_negative": r"`rope_theta` must be a positive finite number.*rope_theta=-1\.0",
    "hf_rms_norm_eps_0": r"`rms_norm_eps` must be a positive finite number.*rms_norm_eps=0\.0",
    "hf_no_hidden_size": r"config\.json.*required field `hidden_size` is missing",
    "hf_config_is_a_list": r"config\.json.*must hold a JSON object.*Received: list",
    "hf_llama3_rope_without_low_freq_factor": r"`rope_scaling\.low_freq_factor` is missing",
    "hf_index_without_weight_map": r"model\.safetensors\.index\.json.*no `weight_map`",
    "hf_config_malformed_json": r"config\.json.* is not valid JSON",
    "keras_num_layers_100000": r"config\.json .*claims num_layers=100000, but its weights "
    r".*model\.weights\.h5' hold 2 decoder layers",
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return crafted.crafted_files(str(tmp_path_factory.mktemp("crafted")))


def test_every_crafted_file_has_an_expectation(files):
    assert sorted(files) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_crafted_file_is_refused_quickly_and_cheaply(files, name):
    path, _ = files[name]
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises((ValueError, FileNotFoundError), match=EXPECTED[name]) as info:
            Backbone.from_preset(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - start
    # The file is named (the handle given, or the file inside the folder).
    assert os.path.basename(path) in str(info.value)
    assert elapsed < 2.0, elapsed
    assert peak < 50 * 2**20, peak  # 300M-entry vocabulary: 2.4 GB before the fix


def test_valid_tiny_files_load(tmp_path):
    """The crafted files differ from these only in the field under test."""
    gguf = crafted.write_gguf(str(tmp_path / "ok.gguf"))
    hf = crafted.write_hf(str(tmp_path / "hf"))
    for path in (gguf, hf):
        backbone = Backbone.from_preset(path)
        assert backbone.num_layers == 2 and backbone.hidden_dim == 8


def test_keras_preset_without_num_layers(tmp_path):
    backbone = LlamaBackbone(16, 2, 2, 8, 16, 1)
    folder = str(tmp_path / "preset")
    backbone.save_to_preset(folder)
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    del config["config"]["num_layers"]
    with open(path, "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=r"config\.json of the preset .* has no `num_layers`"):
        Backbone.from_preset(folder)
    config["config"]["num_layers"] = "two"
    with open(path, "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=r"config\.json .*num_layers='two'"):
        Backbone.from_preset(folder)


def test_malformed_tokenizer_json_names_the_file(tmp_path):
    folder = crafted.write_hf(str(tmp_path / "hf"))
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        f.write('{"model": {"type": "BPE"')
    with pytest.raises(ValueError, match=r"tokenizer\.json.* is not valid JSON"):
        CausalLM.from_preset(folder)
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        json.dump({"model": {"type": "BPE", "vocab": {}}, "decoder": {"type": "ByteLevel"},
                   "added_tokens": [{"no_id": 1}]}, f)  # fmt: skip
    with pytest.raises(ValueError, match=r"tokenizer\.json.*not a valid tokenizer\.json"):
        CausalLM.from_preset(folder)


# --- item 2: invalid numbers in constructor arguments -----------------------------------------
ARGS = dict(vocabulary_size=16, num_layers=1, num_query_heads=2, hidden_dim=8,
            intermediate_dim=16, num_key_value_heads=1)  # fmt: skip


@pytest.mark.parametrize(
    "field,value",
    [("rope_max_wavelength", 0), ("rope_max_wavelength", -10000.0),
     ("rope_max_wavelength", math.nan), ("layer_norm_epsilon", 0.0),
     ("layer_norm_epsilon", math.nan), ("layer_norm_epsilon", -1e-6),
     ("rope_position_scaling_factor", math.inf)],
)  # fmt: skip
def test_backbone_refuses_invalid_numbers(field, value):
    with pytest.raises(ValueError, match=rf"`{field}` must be a positive finite.*{field}="):
        LlamaBackbone(**ARGS, **{field: value})


def test_layers_refuse_invalid_numbers():
    with pytest.raises(ValueError, match="epsilon=0"):
        LlamaLayerNorm(epsilon=0)
    with pytest.raises(ValueError, match="max_wavelength=nan"):
        LlamaRotaryEmbedding(max_wavelength=math.nan)
    with pytest.raises(ValueError, match="high_freq_factor` > `low_freq_factor"):
        LlamaRotaryEmbedding(10000, 1.0, 8.0, 4.0, 4.0, 8192)


# --- item 1: max_length beyond the model's context ----------------------------------------------
def test_max_length_beyond_the_context_is_refused_before_allocating():
    lm = LlamaCausalLM(LlamaBackbone(**ARGS), preprocessor=None)
    ids = {"token_ids": np.ones((1, 3), "int32"), "padding_mask": np.ones((1, 3), bool)}
    with pytest.raises(ValueError, match=r"max_sequence_length=131072.*max_length=1000000000"):
        lm.generate(ids, max_length=10**9, stop_token_ids=None)
    lm.max_sequence_length = 5
    with pytest.raises(ValueError, match=r"max_sequence_length=5.*Received: max_length=6"):
        lm.generate(ids, max_length=6, stop_token_ids=None)
    out = lm.generate(ids, max_length=5, stop_token_ids=None)
    assert out["token_ids"].shape == (1, 5)


def test_context_length_comes_from_the_checkpoint(tmp_path):
    gguf = crafted.write_gguf(str(tmp_path / "ok.gguf"), context_length=48)
    lm = CausalLM.from_preset(gguf)
    assert lm.max_sequence_length == 48  # llama.context_length as written
    with pytest.raises(ValueError, match=r"max_sequence_length=48.*max_length=49"):
        lm.generate("a b", max_length=49)
    hf = crafted.write_hf(str(tmp_path / "hf"), {"max_position_embeddings": 40})
    assert LlamaCausalLM.from_preset(hf, preprocessor=None).max_sequence_length == 40
    folder = str(tmp_path / "saved")
    lm.save_to_preset(folder)
    assert CausalLM.from_preset(folder).max_sequence_length == 48
