"""quantize(): the int8 scheme (weight-only) against weights rounded by hand in numpy and against
transformers in float64 on the dequantized weights, W8A8 (``quantize_activations=True``) and
int4 within documented tolerances, memory, presets (KerasHub's layout), generation, QLoRA,
errors."""

import json

import keras
import numpy as np
import pytest
from keras import ops

from keras_llama.models import CausalLM, LlamaCausalLM
from tests.hf_reference import hf_logits, make_hf_model, to_keras_llama
from tests.quantization.dequantized_reference import dequantized, float64_logits

TOKEN_IDS = np.array([[5, 17, 42, 9, 77, 3, 61, 28], [8, 33, 2, 95, 40, 71, 50, 11]], "int32")
X = {"token_ids": TOKEN_IDS, "padding_mask": np.ones_like(TOKEN_IDS)}


@pytest.fixture(scope="module")
def hf():
    return make_hf_model("gqa", seed=5)


def quantized(hf, mode):
    causal_lm = to_keras_llama(hf)
    causal_lm.quantize(mode)
    return causal_lm


# Quantizing is slow-ish (eager JAX ops per layer shape): one model per scheme, shared.
@pytest.fixture(scope="module")
def weight_only(hf):
    return quantized(hf, "int8")


@pytest.fixture(scope="module")
def w8a8(hf):
    causal_lm = to_keras_llama(hf)
    causal_lm.quantize("int8", quantize_activations=True)
    return causal_lm


@pytest.fixture(scope="module")
def hand_rounded(hf):
    return hand_rounded_float_model(hf)


def logits(causal_lm):
    return ops.convert_to_numpy(causal_lm(X))


def cosine(a, b):
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def round_per_channel(w, reduced_axes):
    """int8 abs-max rounding with one scale per output channel, done by hand:
    ``round(w * 127 / max|w|) * max|w| / 127`` (max over the input axes)."""
    scale = 127.0 / (np.abs(w).max(axis=reduced_axes, keepdims=True) + 1e-7)
    return np.clip(np.round(w * scale), -127, 127) / scale


def hand_rounded_float_model(hf):
    """A float model whose weights are rounded to int8 per output channel in numpy."""
    reference = to_keras_llama(hf)
    for v in reference.backbone.weights:
        w = np.asarray(v)
        if v.path.endswith("token_embedding/embeddings"):
            v.assign(round_per_channel(w, (1,)))  # one scale per vocabulary row
        elif v.path.endswith("reverse_embeddings"):
            v.assign(round_per_channel(w, (0,)))  # [hidden, vocab]: one per vocabulary entry
        elif v.path.endswith("attention_output/kernel"):
            v.assign(round_per_channel(w, (0, 1)))  # [heads, head_dim, hidden]
        elif v.path.endswith("kernel"):
            v.assign(round_per_channel(w, (0,)))  # [hidden, ...] or [in, out]
    return reference


def test_int8_is_weight_only_by_default_and_matches_float64_on_the_dequantized_weights(
    hf, weight_only, hand_rounded
):
    kernels = [v for v in weight_only.backbone.weights if v.path.endswith(("kernel", "embeddings"))]
    assert len(kernels) == 2 + 2 * 7
    assert all(keras.backend.standardize_dtype(v.dtype) == "int8" for v in kernels)
    ours = logits(weight_only)
    # transformers in float64 on the same int8 weights: only float32 rounding apart.
    reference = float64_logits(weight_only.backbone, TOKEN_IDS)
    np.testing.assert_allclose(ours, reference, atol=2e-4, rtol=0)
    # Same logits as float32 on the hand-rounded weights: only the weights are rounded.
    np.testing.assert_allclose(ours, logits(hand_rounded), atol=2e-4, rtol=0)
    assert cosine(ours, hf_logits(hf, TOKEN_IDS)).min() > 0.995
    assert weight_only.backbone.quantization_scheme == "int8"


def test_int8_weight_only_is_the_same_scheme_under_its_earlier_name(hf, weight_only):
    causal_lm = quantized(hf, "int8_weight_only")
    assert causal_lm.backbone.quantization_scheme == "int8"
    assert causal_lm.backbone.get_config()["dtype"] == weight_only.backbone.get_config()["dtype"]
    np.testing.assert_array_equal(logits(causal_lm), logits(weight_only))


def test_int4_weight_only_is_keras_int4_in_blocks_of_32_and_matches_float64(hf, tmp_path):
    causal_lm = quantized(hf, "int4_weight_only")
    backbone = causal_lm.backbone
    assert backbone.quantization_scheme == "int4_weight_only"
    variables = {v.path: v for v in backbone.weights}
    # hidden 32, intermediate 64: one block per column of most kernels, two for the down one.
    assert tuple(variables["transformer_layer_0/feedforward_output_dense/kernel_scale"].shape) == (
        2, 32
    )  # fmt: skip
    assert keras.backend.standardize_dtype(variables["token_embedding/embeddings"].dtype) == "int8"
    ours = logits(causal_lm)
    reference = float64_logits(backbone, TOKEN_IDS)
    np.testing.assert_allclose(ours, reference, atol=2e-4, rtol=0)
    assert cosine(ours, hf_logits(hf, TOKEN_IDS)).min() > 0.9
    # Saved with Keras's own int4 policy in blocks of 32; loads to the same logits.
    causal_lm.save_to_preset(str(tmp_path / "preset"))
    with open(tmp_path / "preset" / "config.json") as f:
        policies = json.load(f)["config"]["dtype"]["config"]["policy_map"]
    assert {(p["class_name"], p["config"]["mode"]) for p in policies.values()} == {
        ("Int4DTypePolicy", "int4/32")
    }  # fmt: skip
    reloaded = CausalLM.from_preset(str(tmp_path / "preset"))
    assert reloaded.backbone.quantization_scheme == "int4_weight_only"
    assert reloaded.backbone.token_embedding.inputs_quantizer is None  # float activations
    np.testing.assert_array_equal(logits(reloaded), ours)


def test_int8_in_blocks_of_32_is_ggufs_q8_0_and_matches_float64(hf, tmp_path):
    import gguf

    float_lm = to_keras_llama(hf)
    up = float_lm.backbone.transformer_layers[0]._feedforward_intermediate_dense
    kernel = np.asarray(up.kernel)  # [32, 64]
    causal_lm = to_keras_llama(hf)
    causal_lm.quantize("int8_weight_only", block_size=32)
    backbone = causal_lm.backbone
    assert backbone.quantization_scheme == "q8_0"
    # The blocks are ggml's reference Q8_0 of each output row (the gguf package's quantizer).
    raw = gguf.quants.quantize(kernel.T, gguf.GGMLQuantizationType.Q8_0)  # [64, 34]
    variables = {v.path: np.asarray(v) for v in backbone.weights}
    path = "transformer_layer_0/feedforward_intermediate_dense/kernel"
    np.testing.assert_array_equal(variables[path].view(np.uint8), raw[:, 2:])
    np.testing.assert_array_equal(variables[path + "_scale"].view(np.uint8), raw[:, :2])
    ours = logits(causal_lm)
    np.testing.assert_allclose(ours, float64_logits(backbone, TOKEN_IDS), atol=2e-4, rtol=0)
    assert cosine(ours, hf_logits(hf, TOKEN_IDS)).min() > 0.995
    causal_lm.save_to_preset(str(tmp_path / "preset"))
    reloaded = CausalLM.from_preset(str(tmp_path / "preset"))
    assert reloaded.backbone.quantization_scheme == "q8_0"
    np.testing.assert_array_equal(logits(reloaded), ours)
    with pytest.raises(ValueError, match="must be 32"):
        to_keras_llama(hf).quantize("int8", block_size=64)


def test_w8a8_matches_float64_with_activations_rounded_per_token_by_hand(hf, w8a8):
    """W8A8 by hand: each projection's input rounded to int8 with one abs-max scale per token,
    then the float64 product with the dequantized weights. Checked on the first layer's gate
    projection (the same rule holds for every layer)."""
    layer = w8a8.backbone.transformer_layers[0]._feedforward_gate_dense
    x = np.random.default_rng(0).normal(0, 1, (3, 32)).astype("float32")
    scale = 127.0 / np.abs(x).max(-1, keepdims=True)
    x_rounded = np.clip(np.round(x * scale), -127, 127) / scale
    w = dequantized(w8a8.backbone, layer.path + "/kernel")
    expected = x_rounded.astype("float64") @ w
    ours = ops.convert_to_numpy(layer(x))
    silu = expected / (1 + np.exp(-expected))  # the gate layer applies SiLU itself
    np.testing.assert_allclose(ours, silu, atol=1e-4, rtol=1e-4)
    assert w8a8.backbone.quantization_scheme == "int8_w8a8"


def test_w8a8_quantizes_activations_too_and_int4_is_looser(hf, w8a8, hand_rounded):
    reference = hf_logits(hf, TOKEN_IDS)
    ours = logits(w8a8)
    # Per-token int8 activations move the logits off the weight-only result...
    assert np.abs(ours - logits(hand_rounded)).max() > 1e-3
    assert cosine(ours, reference).min() > 0.99
    # ...and int4 (blocks of 128 -> one block per row here) is looser: documented >= 0.9.
    assert 0.9 < cosine(logits(quantized(hf, "int4")), reference).min() < 0.999


def weight_bytes(model):
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in model.weights)


def test_int8_weight_memory_counted_by_hand_and_filters_keep_float_layers(hf, weight_only):
    # vocab 100, hidden 32, 4 query / 2 kv heads of 8, intermediate 64, 2 layers, untied.
    v, m, f, layers = 100, 32, 64, 2
    kernels = 2 * v * m + layers * (m * 32 + 2 * m * 16 + 32 * m + 3 * m * f)
    scales = 2 * v + layers * (32 + 16 + 16 + m + f + f + m)  # one per output channel
    norms = (2 * layers + 1) * m
    float_bytes = 4 * (kernels + norms)
    assert weight_bytes(to_keras_llama(hf).backbone) == float_bytes
    assert weight_bytes(weight_only.backbone) == kernels + 4 * scales + 4 * norms
    # 0.283x here; scales and norms weigh less in bigger models (SmolLM2-135M: 0.252x).
    assert weight_bytes(weight_only.backbone) / float_bytes < 0.29
    causal_lm = to_keras_llama(hf)
    causal_lm.quantize("int8", filters=lambda layer: layer.name != "token_embedding")
    embedding = causal_lm.backbone.token_embedding
    assert keras.backend.standardize_dtype(embedding.embeddings.dtype) == "float32"
    assert weight_bytes(causal_lm.backbone) == weight_bytes(weight_only.backbone) + 2 * (
        3 * v * m - 4 * v
    )  # two float32 v x m tables instead of int8 ones and their scales


@pytest.mark.parametrize("mode", ["int8", "int8_w8a8"])
def test_quantized_presets_and_keras_files_load_identical(request, tmp_path, mode):
    causal_lm = request.getfixturevalue({"int8": "weight_only", "int8_w8a8": "w8a8"}[mode])
    expected = logits(causal_lm)
    causal_lm.save_to_preset(str(tmp_path / "preset"))
    with open(tmp_path / "preset" / "config.json") as f:
        policies = json.load(f)["config"]["dtype"]["config"]["policy_map"]
    # Weight-only int8 is written with Keras's own int8 policy (KerasHub's int8 presets).
    expected_class = {"int8": "QuantizedDTypePolicy", "int8_w8a8": "Int8ActivationsDTypePolicy"}
    assert {p["class_name"] for p in policies.values()} == {expected_class[mode]}
    reloaded = CausalLM.from_preset(str(tmp_path / "preset"))
    assert reloaded.backbone.quantization_scheme == mode
    np.testing.assert_array_equal(logits(reloaded), expected)
    causal_lm.save(str(tmp_path / "model.keras"))
    loaded = keras.saving.load_model(str(tmp_path / "model.keras"))
    np.testing.assert_array_equal(logits(loaded), expected)


def test_generation_on_a_quantized_model_matches_the_hand_rounded_float_model(
    weight_only, hand_rounded
):
    prompt = {"token_ids": np.pad(TOKEN_IDS[:1, :4], ((0, 0), (0, 8))),
              "padding_mask": np.pad(np.ones((1, 4), "int32"), ((0, 0), (0, 8)))}  # fmt: skip
    for model in (weight_only, hand_rounded):
        model.compile(sampler="greedy")
    ours = weight_only.generate(prompt, stop_token_ids=None)["token_ids"]
    reference = hand_rounded.generate(prompt, stop_token_ids=None)["token_ids"]
    np.testing.assert_array_equal(ours, reference)


def test_qlora_trains_adapters_over_frozen_int8_weights(hf):
    causal_lm = to_keras_llama(hf)
    causal_lm.quantize("int8")
    causal_lm.backbone.enable_lora(2)
    int8_before = [np.array(v) for v in causal_lm.weights if "lora" not in v.path]
    assert {v.path.rsplit("/", 1)[-1] for v in causal_lm.trainable_weights} == {
        "lora_kernel_a", "lora_kernel_b"
    }  # fmt: skip
    causal_lm.compile(optimizer=keras.optimizers.Adam(1e-2))
    x = {"token_ids": TOKEN_IDS[:, :-1], "padding_mask": np.ones_like(TOKEN_IDS[:, :-1])}
    history = causal_lm.fit(x, TOKEN_IDS[:, 1:], epochs=3, batch_size=2, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    int8_after = [np.array(v) for v in causal_lm.weights if "lora" not in v.path]
    for before, after in zip(int8_before, int8_after):
        np.testing.assert_array_equal(before, after)


def test_quantize_errors(hand_rounded, w8a8):
    with pytest.raises(ValueError, match=r"Unknown quantization mode.*Received: mode='int3'"):
        hand_rounded.quantize("int3")
    with pytest.raises(ValueError, match="cannot be combined"):
        hand_rounded.quantize(
            "int8", config=keras.quantizers.Int8QuantizationConfig(), quantize_activations=True
        )
    with pytest.raises(ValueError, match=r"mode='int8' only. Received: mode='int4'"):
        hand_rounded.quantize("int4", quantize_activations=True)
    assert hand_rounded.backbone.quantization_scheme is None  # nothing was changed
    with pytest.raises(
        ValueError, match=r"already quantized \(mode='int8_w8a8'\).*Received: mode='int4'"
    ):
        w8a8.quantize("int4")
    with pytest.raises(ValueError, match="already quantized"):
        w8a8.backbone.quantize("int8_weight_only")
    assert isinstance(w8a8, LlamaCausalLM)
