"""The native decoding matmuls (`keras_llama.kernels.decode_matmul`): products against numpy
float64, the decode loop against transformers, the full forward pass and Keras's own int8
layers, and which models take (and do not take) the native path. (How the library is built
and cached: test_library.py.)

The kernels are built with the system C++ compiler. Without one the native tests skip (saying
so); with one, a failed build fails them."""

import keras
import numpy as np
import pytest

from keras_llama.kernels import decode_matmul
from keras_llama.models.llama import llama_plan
from tests.hf_reference import hf_logits, make_hf_model, to_keras_llama
from tests.kernels import require_native

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "jax", reason="the native kernels are a JAX (CPU) fast path"
)


@pytest.fixture(scope="module")
def native():
    """Requires the native library: skips only when no C++ compiler exists (or the user opted
    out with KERAS_LLAMA_KERNELS=0); a compiler that fails to build it fails the test."""
    require_native("decode_matmul")


# --- products against numpy float64 ---------------------------------------------------------
def random_kernel(dtype, k, n, rng):
    """``(packed, reference [K, N] float64)``: float32 weights, int8 weights with one
    float32 scale per column (the product must be ``x @ (q * scale)``), or block-quantized
    weights with one scale (and offset) per column and block of 32 rows, dequantized here in
    float64 (``q * scale[k // 32]``, ``u * scale[k // 32] + offset[k // 32]``)."""
    if dtype == "float32":
        w = rng.normal(0, 1, (k, n)).astype("float32")
        return decode_matmul.pack(w), w.astype("float64")
    groups = -(-k // 32)
    block = np.arange(k) // 32  # the block of each row
    if dtype == "q8_blocks":
        q = rng.integers(-127, 128, (k, n)).astype("int8")
        scale = rng.uniform(0.001, 0.02, (groups, n)).astype("float32")
        return decode_matmul.pack_q8_blocks(q, scale), q * scale.astype("float64")[block]
    if dtype == "q4_blocks":
        u = rng.integers(0, 16, (k, n)).astype("uint8")
        scale = rng.uniform(0.001, 0.02, (groups, n)).astype("float32")
        offset = rng.uniform(-0.1, 0.1, (groups, n)).astype("float32")
        w = u * scale.astype("float64")[block] + offset.astype("float64")[block]
        return decode_matmul.pack_q4_blocks(u, scale, offset), w
    q = rng.integers(-127, 128, (k, n)).astype("int8")
    scale = rng.uniform(0.001, 0.02, n).astype("float32")
    return decode_matmul.pack_int8(q, scale), q.astype("float64") * scale.astype("float64")


def assert_product(y, x, w):
    """``y`` equals ``x @ w`` (float64) up to float32 rounding of the sums: the error of each
    entry is bounded relative to ``|x| @ |w|``, the magnitude the sum was accumulated at."""
    x = np.asarray(x, "float64")
    y = np.asarray(y)
    assert y.dtype == np.float32 and y.shape == x.shape[:-1] + w.shape[1:]
    error = np.abs(y - x @ w)
    bound = 1e-5 * (np.abs(x) @ np.abs(w)) + 1e-30
    worst = (error / bound).max()
    assert worst <= 1.0, f"error up to {worst:.3g}x the float32 bound"


# (K, N): N a multiple of 32, not one, under 32; K small and odd (block-quantized: a short
# last block, or one short block); (512, 4099) has enough panels to be split between XLA's
# threads.
SHAPES = [(7, 70), (100, 33), (7, 5), (100, 64), (512, 4099)]
DTYPES = ["float32", "int8", "q8_blocks", "q4_blocks"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 8, 9, 17])  # rows; over 8 takes several passes
def test_matmul_matches_float64_in_and_outside_jit(native, dtype, k, n, m):
    import jax

    rng = np.random.default_rng(k * 1000 + n + m)
    packed, w = random_kernel(dtype, k, n, rng)
    x = rng.normal(0, 1, (m, k)).astype("float32")
    assert_product(decode_matmul.matmul(x, packed), x, w)
    # Packed kernels are pytrees: as a jit argument, and as a constant closed over.
    assert_product(jax.jit(decode_matmul.matmul)(x, packed), x, w)
    assert_product(jax.jit(lambda x: decode_matmul.matmul(x, packed))(x), x, w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_keeps_leading_batch_dims(native, dtype):
    import jax

    rng = np.random.default_rng(1)
    packed, w = random_kernel(dtype, 100, 70, rng)
    for lead in [(2, 3), (1, 1), (3, 1), (2, 9), (1, 2, 5)]:  # [b, q, K] and more
        x = rng.normal(0, 1, (*lead, 100)).astype("float32")
        assert_product(decode_matmul.matmul(x, packed), x, w)
        assert_product(jax.jit(decode_matmul.matmul)(x, packed), x, w)


@pytest.mark.parametrize("dtype", ["int8", "q4_blocks"])
def test_matmul_is_deterministic_across_threads(native, dtype):
    # The panels are split between XLA's threads: every call must give the same full result.
    import jax

    rng = np.random.default_rng(2)
    packed, w = random_kernel(dtype, 512, 4099, rng)
    x = rng.normal(0, 1, (5, 512)).astype("float32")
    f = jax.jit(decode_matmul.matmul)
    first = np.asarray(f(x, packed))
    assert_product(first, x, w)
    for _ in range(30):
        np.testing.assert_array_equal(np.asarray(f(x, packed)), first)


def test_packed_layout_is_zero_padded_column_panels(native):
    # Worked out by hand: column j of W is entry j % 32 of panel j // 32; past N, zeros.
    w = np.arange(3 * 37, dtype="float32").reshape(3, 37)
    packed = decode_matmul.pack(w)
    panels = np.asarray(packed.panels)
    assert packed.shape == (3, 37) and packed.n == 37 and packed.scale is None
    assert panels.shape == (2, 3, 32) and panels.dtype == np.float32
    np.testing.assert_array_equal(panels[0], w[:, :32])
    np.testing.assert_array_equal(panels[1, :, :5], w[:, 32:])
    np.testing.assert_array_equal(panels[1, :, 5:], 0)
    packed_int8 = decode_matmul.pack_int8(w.astype("int8"), np.full(37, 0.5, "float32"))
    assert np.asarray(packed_int8.panels).dtype == np.int8
    scale = np.asarray(packed_int8.scale)
    assert scale.shape == (64,) and (scale[:37] == 0.5).all() and (scale[37:] == 0).all()


def test_block_layouts_worked_out_by_hand(native):
    # 4-bit: byte j of a panel row holds column j in its low nibble and column j + 16 in its
    # high nibble; block scales and offsets become [panels, blocks, 32], zero past N.
    u = (np.arange(40 * 37) % 16).astype("uint8").reshape(40, 37)
    scale = np.arange(2 * 37, dtype="float32").reshape(2, 37)
    packed = decode_matmul.pack_q4_blocks(u, scale, -scale)
    panels = np.asarray(packed.panels)
    assert packed.kind == "q4_blocks" and packed.shape == (40, 37)
    assert panels.shape == (2, 40, 16) and panels.dtype == np.uint8
    np.testing.assert_array_equal(panels[0] & 15, u[:, :16])
    np.testing.assert_array_equal(panels[0] >> 4, u[:, 16:32])
    np.testing.assert_array_equal(panels[1, :, :5] & 15, u[:, 32:])
    np.testing.assert_array_equal(panels[1, :, 5:], 0)
    block_scale = np.asarray(packed.scale)
    assert block_scale.shape == (2, 2, 32)
    np.testing.assert_array_equal(block_scale[1, :, :5], scale[:, 32:])
    np.testing.assert_array_equal(block_scale[1, :, 5:], 0)
    np.testing.assert_array_equal(np.asarray(packed.offset)[0], -scale[:, :32])
    q8 = decode_matmul.pack_q8_blocks(u.astype("int8"), scale)
    assert q8.kind == "q8_blocks" and q8.offset is None
    assert np.asarray(q8.panels).dtype == np.int8 and np.asarray(q8.scale).shape == (2, 2, 32)
    with pytest.raises(ValueError, match=r"must be \[ceil\(40 / 32\), 37\] = \[2, 37\]"):
        decode_matmul.pack_q8_blocks(u.astype("int8"), scale[:1])


def test_matmul_rejects_a_kernel_of_another_depth(native):
    packed = decode_matmul.pack(np.ones((7, 40), "float32"))
    with pytest.raises(ValueError, match=r"depth 7. Received: x.shape=\(2, 8\)"):
        decode_matmul.matmul(np.ones((2, 8), "float32"), packed)


# --- the model's decode loop ----------------------------------------------------------------
# "gqa": untied embeddings, 4 query heads over 2 key/value heads; "tied": tied embeddings,
# 4 query heads over 1 key/value head.
VARIANTS = {"gqa": 3, "tied": 4}  # name -> seed


@pytest.fixture(scope="module")
def hf_models():
    return {name: make_hf_model(name, seed=seed) for name, seed in VARIANTS.items()}


@pytest.fixture(scope="module", params=list(VARIANTS))
def float_lm(request, hf_models):
    hf = hf_models[request.param]
    return hf, to_keras_llama(hf)


@pytest.fixture(scope="module", params=list(VARIANTS))
def int8_lm(request, hf_models):
    causal_lm = to_keras_llama(hf_models[request.param])
    causal_lm.quantize("int8_weight_only")
    return causal_lm


# Two prompts of different lengths (left-padded inside generate()), 12 tokens in all.
PROMPT = {
    "token_ids": np.array([[5, 17, 42, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                           [8, 33, 2, 95, 40, 0, 0, 0, 0, 0, 0, 0]], "int32"),
    "padding_mask": np.array([[1] * 3 + [0] * 9, [1] * 5 + [0] * 7], bool),
}  # fmt: skip
PROMPT_LENGTHS = (3, 5)
SEQUENCE = np.array([[5, 17, 42, 9, 77, 3, 61, 28, 50], [8, 33, 2, 95, 40, 71, 50, 11, 6]], "int32")


def is_native(fused):
    """Whether the decode loop's kernels are the native ones: every block's projections and
    the output projection as `PackedWeights`."""
    return (
        isinstance(fused, dict)
        and isinstance(fused["head"], decode_matmul.PackedWeights)
        and all(
            isinstance(layer, dict)
            and set(layer) == {"qkv", "output", "gate_up", "down"}
            and all(isinstance(p, decode_matmul.PackedWeights) for p in layer.values())
            for layer in fused["layers"]
        )
    )


def greedy_generate(causal_lm, prompt=PROMPT):
    """``(token_ids, the weights the decode loop used)`` from a fresh engine."""
    causal_lm.compile(sampler="greedy")  # drops the previous engine
    token_ids = causal_lm.generate(prompt, stop_token_ids=None)["token_ids"]
    return token_ids, causal_lm.generate_function._weights[1]


def decode_weights(causal_lm):
    """The weights the model's decode plan multiplies (packed when native)."""
    return causal_lm.decode_weights(causal_lm.execution_plan().decode)


def assert_greedy(causal_lm, token_ids, prompt_lengths=PROMPT_LENGTHS, tolerance=1e-5):
    """Every generated token is the argmax of the full forward pass over the generated
    sequence (within ``tolerance`` relative to the logits' scale, for near ties)."""
    x = {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}
    logits = np.asarray(keras.ops.convert_to_numpy(causal_lm(x)), "float64")
    for row, length in enumerate(prompt_lengths):
        for t in range(length, token_ids.shape[1]):
            step = logits[row, t - 1]
            gap = step.max() - step[token_ids[row, t]]
            assert gap <= tolerance * np.abs(step).max(), (row, t, gap)


def decode_logits(causal_lm, token_ids, prompt_length, fused):
    """Logits [b, L, vocab] of ``token_ids`` [b, L]: the prompt through the layers' own path,
    then one token per step through ``fused`` (as the decode loop runs)."""
    batch, length = token_ids.shape
    caches = causal_lm._build_layer_caches(batch, length)
    logits, _, caches = causal_lm.call_with_layer_caches(token_ids[:, :prompt_length], caches, 0)
    steps = [logits]
    plan = causal_lm.execution_plan().decode
    for t in range(prompt_length, length):
        logits, _, caches = causal_lm.call_with_layer_caches(
            token_ids[:, t : t + 1], caches, t, stage_plan=plan, weights=fused
        )
        steps.append(logits)
    return np.concatenate([np.asarray(s) for s in steps], axis=1)


def all_at_once_logits(causal_lm, token_ids, fused):
    # The whole sequence in one pass through ``fused``: M = b * L rows per product.
    caches = causal_lm._build_layer_caches(*token_ids.shape)
    # The decode plan's projections with multi-token attention.
    plan = llama_plan.with_choice(causal_lm.execution_plan().decode, "attention", "dot_product")
    logits = causal_lm.call_with_layer_caches(token_ids, caches, 0, stage_plan=plan, weights=fused)
    return np.asarray(logits[0])


def assert_close(actual, expected, rtol):
    scale = np.abs(expected).max()
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


def test_float32_decode_logits_match_transformers_and_the_forward_pass(native, float_lm):
    hf, causal_lm = float_lm
    fused = decode_weights(causal_lm)
    assert is_native(fused)
    assert all(np.asarray(p.panels).dtype == np.float32 for p in fused["layers"][0].values())
    expected = hf_logits(hf, SEQUENCE)
    forward = np.asarray(causal_lm({"token_ids": SEQUENCE, "padding_mask": np.ones_like(SEQUENCE)}))
    assert_close(forward, expected, 1e-4)
    decoded = decode_logits(causal_lm, SEQUENCE, 4, fused)
    assert_close(decoded, expected, 1e-4)
    assert_close(decoded, forward, 1e-5)
    assert_close(all_at_once_logits(causal_lm, SEQUENCE, fused), forward, 1e-5)


def test_int8_weight_only_decode_logits_match_keras_int8_layers(native, int8_lm):
    fused = decode_weights(int8_lm)
    assert is_native(fused)
    assert np.asarray(fused["head"].panels).dtype == np.int8
    assert all(np.asarray(p.panels).dtype == np.int8 for p in fused["layers"][1].values())
    # Keras's own int8 math: the quantized layers in the full forward pass.
    forward = np.asarray(int8_lm({"token_ids": SEQUENCE, "padding_mask": np.ones_like(SEQUENCE)}))
    assert_close(decode_logits(int8_lm, SEQUENCE, 4, fused), forward, 1e-5)
    assert_close(all_at_once_logits(int8_lm, SEQUENCE, fused), forward, 1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_int4_weight_only_decode_logits_match_float64_on_the_dequantized_weights(
    native, hf_models, variant
):
    from tests.quantization.dequantized_reference import float64_logits

    causal_lm = to_keras_llama(hf_models[variant])
    causal_lm.quantize("int4_weight_only")
    fused = decode_weights(causal_lm)
    assert is_native(fused)
    assert fused["head"].kind == "q4_blocks"
    assert all(p.kind == "q4_blocks" for p in fused["layers"][1].values())
    expected = float64_logits(causal_lm.backbone, SEQUENCE)
    assert_close(decode_logits(causal_lm, SEQUENCE, 4, fused), expected, 1e-5)
    assert_close(all_at_once_logits(causal_lm, SEQUENCE, fused), expected, 1e-5)


def test_int8_head_is_packed_per_vocabulary_entry_when_the_embedding_stays_float(native, hf_models):
    causal_lm = to_keras_llama(hf_models["gqa"])
    causal_lm.quantize("int8_weight_only", filters=lambda layer: layer.name != "token_embedding")
    fused = decode_weights(causal_lm)
    assert is_native(fused)
    assert np.asarray(fused["head"].panels).dtype == np.float32  # the float embedding
    assert np.asarray(fused["layers"][0]["qkv"].panels).dtype == np.int8
    forward = np.asarray(causal_lm({"token_ids": SEQUENCE, "padding_mask": np.ones_like(SEQUENCE)}))
    assert_close(decode_logits(causal_lm, SEQUENCE, 4, fused), forward, 1e-5)


def test_generate_with_native_kernels_equals_generate_without(native, float_lm, monkeypatch):
    _, causal_lm = float_lm
    ours, fused = greedy_generate(causal_lm)
    assert is_native(fused)
    assert_greedy(causal_lm, ours)
    with monkeypatch.context() as m:
        m.setenv("KERAS_LLAMA_KERNELS", "0")
        reference, fused = greedy_generate(causal_lm)
    assert not is_native(fused) and fused["head"] is None  # XLA's fused q/k/v, gate/up
    np.testing.assert_array_equal(ours, reference)
    assert len(np.unique(ours[:, 5:])) > 1  # not one repeated token


def test_int8_weight_only_generate_with_and_without_native_kernels(native, int8_lm, monkeypatch):
    ours, fused = greedy_generate(int8_lm)
    assert is_native(fused)
    assert_greedy(int8_lm, ours)
    with monkeypatch.context() as m:
        m.setenv("KERAS_LLAMA_KERNELS", "0")
        reference, fused = greedy_generate(int8_lm)
    assert fused is None  # the quantized layers' own path
    np.testing.assert_array_equal(ours, reference)


# --- models that keep XLA's path ------------------------------------------------------------
def quantized(hf, mode, **kwargs):
    causal_lm = to_keras_llama(hf)
    causal_lm.quantize(mode, **kwargs)
    return causal_lm


def with_lora(causal_lm):
    causal_lm.backbone.enable_lora(2)
    rng = np.random.default_rng(0)
    for v in causal_lm.backbone.weights:
        if v.path.endswith("lora_kernel_b"):  # zeros by default: make the adapters count
            v.assign(rng.normal(0, 0.2, v.shape).astype(v.dtype))
    return causal_lm


FALLBACKS = {
    # name -> (model from a transformers model, greedy tolerance for near ties)
    "int8_w8a8": (lambda hf: quantized(hf, "int8", quantize_activations=True), 1e-2),
    "int4": (lambda hf: quantized(hf, "int4"), 1e-5),
    # LoRA over int8 weight-only weights (QLoRA), which would otherwise be native.
    "int8_weight_only_lora": (lambda hf: with_lora(quantized(hf, "int8_weight_only")), 1e-5),
    "bfloat16": (lambda hf: to_keras_llama(hf, dtype="bfloat16"), 5e-2),
}


@pytest.mark.parametrize("name", list(FALLBACKS))
def test_other_models_keep_xla_and_generate_greedily(native, hf_models, name):
    make, tolerance = FALLBACKS[name]
    causal_lm = make(hf_models["gqa"])
    token_ids, fused = greedy_generate(causal_lm)
    assert not is_native(fused)
    if name == "bfloat16":  # XLA's fused q/k/v and gate/up kernels, in bfloat16
        assert causal_lm.generate_function.plan.decode.projections == "fused"
        assert fused["head"] is None and all("qkv" in x for x in fused["layers"])
    else:  # quantized otherwise, or LoRA: the layers' own path
        assert causal_lm.generate_function.plan.decode.projections == "layers"
        assert fused is None
    assert_greedy(causal_lm, token_ids, tolerance=tolerance)
