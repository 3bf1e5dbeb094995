"""Presets written by KerasHub (tests/data/keras_hub, made by scripts/make_test_presets.py):
same logits and token ids as KerasHub computed; class picking, overrides and bad input."""

import json
import os
import shutil

import keras
import numpy as np
import pytest

from keras_llama.models import (
    Backbone,
    CausalLM,
    Llama3Backbone,
    Llama3CausalLM,
    Llama3Tokenizer,
    LlamaBackbone,
    LlamaCausalLM,
    LlamaCausalLMPreprocessor,
    LlamaTokenizer,
    Preprocessor,
    Tokenizer,
)
from tests.presets.helpers import KERAS_HUB

EXPECTED = np.load(os.path.join(KERAS_HUB, "expected.npz"))
TEXTS = ["the quick brown fox", "a lazy dog jumps over the fox"]


def preset(name):
    return os.path.join(KERAS_HUB, name)


def keras_hub_inputs():
    return {"token_ids": EXPECTED["token_ids"], "padding_mask": EXPECTED["padding_mask"]}


def assert_keras_hub_logits(causal_lm, name, atol=1e-5):
    mask = EXPECTED["padding_mask"].astype(bool)  # padded positions are not compared
    ours = keras.ops.convert_to_numpy(causal_lm(keras_hub_inputs()))
    np.testing.assert_allclose(ours[mask], EXPECTED[f"{name}_logits"][mask], atol=atol, rtol=0)


def assert_int8_preset_logits(causal_lm):
    """KerasHub's int8 presets compute weight-only here ("int8" is weight-only in keras-llama;
    KerasHub's outputs quantize activations per token): transformers in float64 on the
    dequantized int8 weights is the reference, and KerasHub's own outputs stay close."""
    from tests.quantization.dequantized_reference import float64_logits

    mask = EXPECTED["padding_mask"].astype(bool)
    inputs = keras_hub_inputs()
    ours = keras.ops.convert_to_numpy(causal_lm(inputs))
    reference = float64_logits(causal_lm.backbone, inputs["token_ids"], inputs["padding_mask"])
    np.testing.assert_allclose(ours[mask], reference[mask], atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours[mask], EXPECTED["llama_int8_logits"][mask], atol=0.3, rtol=0)


@pytest.mark.parametrize(
    "name, task_cls, tokenizer_cls",
    [
        ("llama", LlamaCausalLM, LlamaTokenizer),
        ("llama_int8", LlamaCausalLM, LlamaTokenizer),
        ("llama3", Llama3CausalLM, Llama3Tokenizer),  # sharded weights
    ],
)
def test_keras_hub_preset_logits_and_tokens(name, task_cls, tokenizer_cls):
    causal_lm = CausalLM.from_preset(preset(name))
    assert type(causal_lm) is task_cls
    assert type(causal_lm.preprocessor.tokenizer) is tokenizer_cls
    assert causal_lm.preprocessor.sequence_length == 16
    if name == "llama_int8":
        assert_int8_preset_logits(causal_lm)
    else:
        assert_keras_hub_logits(causal_lm, name)
    for i, text in enumerate(TEXTS):
        np.testing.assert_array_equal(
            causal_lm.preprocessor.tokenizer(text), EXPECTED[f"{name}_tokens_{i}"]
        )


def test_int8_preset_builds_quantized_layers():
    backbone = Backbone.from_preset(preset("llama_int8"))
    kernel = backbone.transformer_layers[0]._feedforward_gate_dense._kernel
    assert keras.backend.standardize_dtype(kernel.dtype) == "int8"


def test_base_and_concrete_classes_pick_the_subclass():
    assert type(LlamaCausalLM.from_preset(preset("llama3"))) is Llama3CausalLM
    assert type(Backbone.from_preset(preset("llama3"))) is Llama3Backbone
    assert type(LlamaBackbone.from_preset(preset("llama"))) is LlamaBackbone
    assert type(Tokenizer.from_preset(preset("llama3"))) is Llama3Tokenizer
    assert type(Preprocessor.from_preset(preset("llama"))) is LlamaCausalLMPreprocessor
    with pytest.raises(ValueError, match="Llama3CausalLM cannot hold"):
        Llama3CausalLM.from_preset(preset("llama"))


def test_kwargs_override_the_preset():
    causal_lm = CausalLM.from_preset(preset("llama"), sequence_length=5, dtype="bfloat16")
    assert causal_lm.preprocessor.sequence_length == 5
    assert causal_lm.backbone.token_embedding.dtype_policy.name == "bfloat16"
    assert keras.backend.standardize_dtype(causal_lm.backbone.weights[0].dtype) == "bfloat16"
    reference = Backbone.from_preset(preset("llama"))  # the saved float32 weights, rounded
    for ours, ref in zip(causal_lm.backbone.weights, reference.weights):
        ref = keras.ops.convert_to_numpy(keras.ops.cast(ref, "bfloat16"))
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(ours), ref)
    pre = Preprocessor.from_preset(preset("llama"), add_start_token=False)
    assert pre.add_start_token is False and pre.sequence_length == 16


def test_load_weights_false_gives_a_random_model_of_the_architecture():
    loaded = Backbone.from_preset(preset("llama"))
    random = Backbone.from_preset(preset("llama"), load_weights=False)
    assert random.get_config() == loaded.get_config()
    assert [v.shape for v in random.weights] == [v.shape for v in loaded.weights]
    first = keras.ops.convert_to_numpy(random.weights[2])
    assert not np.allclose(first, keras.ops.convert_to_numpy(loaded.weights[2]))


def test_presets_tables():
    names = set(CausalLM.presets)
    spec = {
        "llama2_7b_en", "llama2_7b_en_int8", "llama2_instruct_7b_en",
        "llama2_instruct_7b_en_int8", "vicuna_1.5_7b_en", "llama3_8b_en", "llama3_8b_en_int8",
        "llama3_instruct_8b_en", "llama3_instruct_8b_en_int8",
    }  # fmt: skip
    assert spec | {"llama3.1_8b", "llama3.2_1b", "smollm2_135m_instruct"} <= names
    assert set(Llama3CausalLM.presets) == {n for n in names if n not in spec or "llama3" in n}
    assert "llama2_7b_en" in LlamaTokenizer.presets and "llama3_8b_en" not in LlamaTokenizer.presets
    entry = CausalLM.presets["llama2_7b_en"]
    assert entry["metadata"]["description"] == "7 billion parameter, 32-layer, base LLaMA 2 model."
    assert round(entry["metadata"]["params"] / 1e9, 2) == 6.74
    assert entry["kaggle_handle"] == "kaggle://keras/llama2/keras/llama2_7b_en/3"
    assert round(CausalLM.presets["llama3_8b_en_int8"]["metadata"]["params"] / 1e9, 2) == 8.03


# --- bad input -------------------------------------------------------------------------------
def _copy(name, tmp_path):
    target = tmp_path / name
    shutil.copytree(preset(name), target)
    return target


def test_other_architecture_class_is_refused(tmp_path):
    target = _copy("llama", tmp_path)
    config = json.loads((target / "config.json").read_text())
    config["class_name"], config["registered_name"] = "GemmaBackbone", "keras_hub>GemmaBackbone"
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'GemmaBackbone' model"):
        CausalLM.from_preset(str(target))


def test_truncated_weights(tmp_path):
    target = _copy("llama", tmp_path)
    weights = target / "model.weights.h5"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(ValueError, match="Could not load the weights.*model.weights.h5"):
        CausalLM.from_preset(str(target))


def test_wrong_shape_names_both_shapes(tmp_path):
    target = _copy("llama", tmp_path)
    config = json.loads((target / "config.json").read_text())
    config["config"]["intermediate_dim"] = 48  # the weights have 64
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"\(32, 48\).*\(32, 64\)|\(32, 64\).*\(32, 48\)"):
        CausalLM.from_preset(str(target))


def test_weight_shard_outside_the_folder_is_refused(tmp_path):
    target = _copy("llama3", tmp_path)
    index = json.loads((target / "model.weights.json").read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "../model_00000.weights.h5"
    (target / "model.weights.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="inside its own folder"):
        CausalLM.from_preset(str(target))


def test_tokenizer_config_file_outside_the_folder_is_refused(tmp_path):
    target = _copy("llama", tmp_path)
    config = json.loads((target / "tokenizer.json").read_text())
    config["config"]["config_file"] = "../../../etc/passwd"
    (target / "tokenizer.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="resolves outside"):
        Tokenizer.from_preset(str(target))


def test_dtype_config_must_be_a_keras_dtype_policy(tmp_path):
    target = _copy("llama", tmp_path)
    config = json.loads((target / "config.json").read_text())
    config["config"]["dtype"] = {"module": "os", "class_name": "system", "config": {}}
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="serialized Keras dtype policy"):
        Backbone.from_preset(str(target))
