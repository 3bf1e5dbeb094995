"""The integer dot products of block-quantized weights (`block_dot.cc`, packed kinds
``q8_blocks_int16_dot`` and ``q4_blocks_int16_dot``): against numpy float64 on the input
quantized to int16 blocks (redone here in numpy), against the exact float64 product within
the bound that quantization allows (worked out below), the layouts by hand, and the portable
build (no VNNI) against the default one."""

import keras
import numpy as np
import pytest

from keras_llama.kernels import decode_matmul
from tests.kernels import require_native

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "jax", reason="the native kernels are a JAX (CPU) fast path"
)

KINDS = ["q8_blocks_int16_dot", "q4_blocks_int16_dot"]


@pytest.fixture(scope="module")
def native():
    require_native("decode_matmul")


def quantized_input(x):
    """``(x_q [M, K] float64, d [M, G])``: ``x`` [M, K] float32 quantized to int16 in blocks
    of 32, in float32 as the kernel does (``d = max|x| / 32767``, ``q = x * (1 / d)`` rounded
    half to even); ``x_q = q * d``."""
    m, k = x.shape
    groups = -(-k // 32)
    padded = np.zeros((m, groups * 32), "float32")
    padded[:, :k] = x
    blocks = padded.reshape(m, groups, 32)
    d = (np.abs(blocks).max(-1) / np.float32(32767)).astype("float32")
    inverse = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), 0).astype("float32")
    q = np.rint((blocks * inverse[..., None]).astype("float32").astype("float64"))
    return (q * d.astype("float64")[..., None]).reshape(m, groups * 32)[:, :k], d


def random_blocks(kind, k, n, rng):
    """``(packed, w [K, N] float64, magnitude [K, N] float64)``: random blocks, their
    dequantized values ``q * d`` (Q8_0) or ``u * d + o`` (Q4_1), and the size of the terms
    the kernel sums (``|d u| + |o|`` for 4 bits, where the two terms partly cancel)."""
    groups = -(-k // 32)
    block = np.arange(k) // 32
    scale = rng.uniform(0.001, 0.02, (groups, n)).astype("float16")  # as GGUF stores them
    d = scale.astype("float64")[block]
    if kind == "q8_blocks_int16_dot":
        q = rng.integers(-127, 128, (k, n)).astype("int8")
        w = q * d
        return decode_matmul.pack_q8_blocks_int16_dot(q, scale), w, np.abs(w)
    u = rng.integers(0, 16, (k, n)).astype("uint8")
    offset = rng.uniform(-0.1, 0.1, (groups, n)).astype("float16")
    o = offset.astype("float64")[block]
    packed = decode_matmul.pack_q4_blocks_int16_dot(u, scale, offset)
    return packed, u * d + o, np.abs(u * d) + np.abs(o)


SHAPES = [(7, 70), (100, 33), (7, 5), (100, 64), (512, 4099), (576, 96)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 8, 9, 17, 40])
def test_products_match_float64_on_the_quantized_inputs(native, kind, k, n, m):
    _check_against_float64(kind, k, n, m)


@pytest.mark.parametrize("kind", KINDS)
def test_many_rows_quantized_by_several_threads_match_float64(native, kind):
    # 300 rows of 520 values: about 600 KB of input, which the kernel quantizes in chunks of
    # at least 64 KB shared with XLA's thread pool (a prefill's rows).
    _check_against_float64(kind, 520, 70, 300)


def _check_against_float64(kind, k, n, m):
    import jax

    rng = np.random.default_rng(k * 1000 + n + m)
    packed, w, magnitude = random_blocks(kind, k, n, rng)
    x = rng.normal(0, 1, (m, k)).astype("float32")
    x[0, : min(k, 32)] = 0.0  # an all-zero block: scale 0, no division by it
    if m > 1 and k >= 32:  # d = 1 exactly: halves are ties, rounded to even
        x[1, :32] = np.resize([32767.0, 2.5, -2.5, 3.5, -0.5, 0.5, 1.5, -1.5], 32)
    x_q, _ = quantized_input(x)
    expected = x_q @ w
    bound = 1e-5 * (np.abs(x_q) @ magnitude) + 1e-30
    for y in (
        decode_matmul.matmul(x, packed),
        jax.jit(decode_matmul.matmul)(x, packed),
        jax.jit(lambda x: decode_matmul.matmul(x, packed))(x),
    ):
        y = np.asarray(y)
        assert y.dtype == np.float32 and y.shape == (m, n)
        worst = (np.abs(y - expected) / bound).max()
        assert worst <= 1.0, f"error up to {worst:.3g}x the float32 bound"


@pytest.mark.parametrize("kind", KINDS)
def test_the_error_against_exact_products_is_what_input_quantization_allows(native, kind):
    # Rounding x to the nearest multiple of its block's d = max|x| / 32767 moves each value by
    # at most d / 2, so |x_q @ w - x @ w| <= sum over blocks of d / 2 * sum |w| in the block.
    rng = np.random.default_rng(5)
    k, n, m = 576, 200, 4
    packed, w, _ = random_blocks(kind, k, n, rng)
    x = rng.normal(0, 1, (m, k)).astype("float32")
    _, d = quantized_input(x)
    block_abs = np.add.reduceat(np.abs(w), np.arange(0, k, 32), axis=0)  # [G, N]
    allowed = (d.astype("float64") / 2) @ block_abs
    y = np.asarray(decode_matmul.matmul(x, packed))
    exact = x.astype("float64") @ w
    error = np.abs(y - exact)
    assert (error <= allowed * (1 + 1e-4) + 1e-6).all()
    # ... and is small: about a part in a million of the magnitude the products sum to.
    assert np.median(error) < 1e-5 * np.median(np.abs(x).astype("float64") @ np.abs(w))


def test_layouts_worked_out_by_hand(native):
    # Q8_0: pair j of block g holds rows 32 g + 2 j and + 1, byte c * 2 + r of it column c
    # (0..31) of row r. 4-bit: column c in the low nibble, c + 16 in the high.
    k, n = 40, 37
    q = ((np.arange(k * n) % 255) - 127).astype("int8").reshape(k, n)
    scale = np.arange(2 * n, dtype="float32").reshape(2, n)
    packed = decode_matmul.pack_q8_blocks_int16_dot(q, scale)
    panels = np.asarray(packed.panels)
    assert packed.kind == "q8_blocks_int16_dot" and packed.shape == (40, 37)
    assert panels.shape == (2, 2, 16, 64) and panels.dtype == np.int8
    # panel 0, block 1, pair 3: rows 38, 39; column 5, row 1 -> row 39.
    assert panels[0, 1, 3, 5 * 2 + 1] == q[39, 5]
    # panel 1, block 0, pair 0, column 3 (= column 35), row 1.
    assert panels[1, 0, 0, 3 * 2 + 1] == q[1, 35]
    # past N (column 37 = panel 1 column 5) and past K (block 1 rows 40..63): zeros.
    assert (panels[1, :, :, 5 * 2 :] == 0).all() and (panels[:, 1, 4:] == 0).all()
    np.testing.assert_array_equal(np.asarray(packed.scale)[1, :, :5], scale[:, 32:])

    u = (np.arange(k * n) % 16).astype("uint8").reshape(k, n)
    packed4 = decode_matmul.pack_q4_blocks_int16_dot(u, scale, -scale)
    nibbles = np.asarray(packed4.panels)
    assert packed4.kind == "q4_blocks_int16_dot" and nibbles.shape == (2, 2, 16, 32)
    byte = nibbles[0, 1, 1, 7 * 2 + 1]  # block 1, pair 1, row 1 -> row 35; columns 7 and 23
    assert byte & 15 == u[35, 7] and byte >> 4 == u[35, 23]
    np.testing.assert_array_equal(np.asarray(packed4.offset)[0], -scale[:, :32])


def test_an_input_of_another_depth_is_refused_naming_both(native):
    packed = decode_matmul.pack_q8_blocks_int16_dot(
        np.ones((40, 8), "int8"), np.ones((2, 8), "float32")
    )
    with pytest.raises(ValueError, match=r"depth 40. Received: x.shape=\(2, 50\)"):
        decode_matmul.matmul(np.ones((2, 50), "float32"), packed)


@pytest.mark.parametrize("kind", KINDS)
def test_results_do_not_depend_on_how_threads_split_the_panels(native, kind):
    import jax

    rng = np.random.default_rng(2)
    packed, _, _ = random_blocks(kind, 512, 4099, rng)
    x = rng.normal(0, 1, (5, 512)).astype("float32")
    f = jax.jit(decode_matmul.matmul)
    first = np.asarray(f(x, packed))
    for _ in range(20):
        np.testing.assert_array_equal(np.asarray(f(x, packed)), first)


@pytest.mark.parametrize(
    "disabled",
    [["-mno-avx512vnni", "-mno-avxvnni"], ["-mno-avx512f", "-mno-avxvnni", "-mno-f16c"]],
    ids=["no-vnni", "no-avx512-no-f16c"],
)
def test_the_portable_build_gives_the_same_products(native, tmp_path, disabled):
    # Built without VNNI (the plain vector code every CPU runs), and without AVX-512 and F16C
    # (float16 scales widened in C++), under fresh FFI names: the integer sums are exact on
    # every path, and float16 -> float32 is exact, so the results are the same bits.
    import jax

    from keras_llama import kernels
    from keras_llama.kernels.library import NativeLibrary

    default = kernels.library("decode_matmul")
    flags = [*default.flags, *disabled]
    tag = str(len(disabled))  # fresh FFI names for each build (a name registers once)
    targets = {
        f"keras_llama_test_q8_int16_dot_{tag}": "KerasLlamaQ8BlocksInt16Dot",
        f"keras_llama_test_q4_int16_dot_{tag}": "KerasLlamaQ4BlocksInt16Dot",
    }
    portable = NativeLibrary(
        f"portable_{tag}", default.sources, targets, cache_folder=tmp_path, flags=flags
    )
    assert portable.ensure_built(), portable.error
    rng = np.random.default_rng(9)
    for kind, name in zip(KINDS, targets):
        packed, _, _ = random_blocks(kind, 100, 70, rng)
        # Subnormal and negative float16 scales too (the widening in C++ handles both).
        scale = np.asarray(packed.scale).copy()
        scale[0, 0, :4] = np.array([6e-8, 3e-5, -2e-7, -0.01], "float16")
        packed.scale = jax.numpy.asarray(scale)
        x = rng.normal(0, 1, (9, 100)).astype("float32")
        operands = [a for a in (packed.panels, packed.scale, packed.offset) if a is not None]
        out = jax.ffi.ffi_call(name, jax.ShapeDtypeStruct((9, 70), "float32"))(x, *operands)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(decode_matmul.matmul(x, packed)))
