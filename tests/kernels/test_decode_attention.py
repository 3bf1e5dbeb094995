"""The native decoding attention (`decode_attention.cc`) against numpy float64: masked softmax
attention of one query per row in the caches' layout, left padding and a filling cache
(unmasked positions in the middle of the cache), grouped query heads, a row with nothing
unmasked; float32 and float16 caches (float16: against float64 on the float16 values, which
the kernel widens exactly)."""

import keras
import numpy as np
import pytest

from tests.kernels import require_native

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "jax", reason="the native kernels are a JAX (CPU) fast path"
)


@pytest.fixture(scope="module")
def native():
    require_native("attention")


def reference(query, keys, values, mask, scale):
    """float64: query [N, G, H], keys [N, H, S], values [N, S, H], mask [B, S]."""
    n = query.shape[0]
    rows = np.repeat(mask, n // mask.shape[0], axis=0)  # [N, S]
    scores = scale * np.einsum("ngh,nhs->ngs", query.astype("float64"), keys.astype("float64"))
    scores = np.where(rows[:, None, :], scores, -1e30)
    scores -= scores.max(-1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("ngs,nsh->ngh", weights, values.astype("float64"))


# Query groups and head sizes with their own compiled loops (g 1-4, 8 at h 64; g 1, 2, 4, 8 at
# h 128) and others (g 5, h 16 or 32).
@pytest.mark.parametrize("b,v,g,h,s", [(1, 3, 3, 64, 40), (8, 3, 3, 64, 256), (2, 1, 4, 16, 7),
                                       (3, 2, 1, 32, 33), (2, 2, 8, 128, 50), (1, 2, 5, 64, 17),
                                       (2, 1, 2, 128, 16)])  # fmt: skip
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_matches_float64(native, b, v, g, h, s, dtype):
    import jax

    from keras_llama.kernels.attention import decode_attention

    rng = np.random.default_rng(b * 100 + s)
    query = rng.normal(0, 1, (b * v, g, h)).astype("float32")
    keys = rng.normal(0, 1, (b * v, h, s)).astype(dtype)
    values = rng.normal(0, 1, (b * v, s, h)).astype(dtype)
    mask = np.zeros((b, s), bool)
    for row in range(b):  # left padding, then a cache filled up to some position
        start, end = row % 3, max(row % 3 + 1, s - 2 * row)
        mask[row, start:end] = True
    mask[0, min(1, s - 1)] = False if s > 3 else mask[0, min(1, s - 1)]  # a hole inside
    scale = 1 / np.sqrt(h)
    expected = reference(query, keys, values, mask, scale)
    for out in (
        decode_attention(query, keys, values, mask, scale),
        jax.jit(decode_attention, static_argnums=4)(query, keys, values, mask, scale),
    ):
        out = np.asarray(out)
        assert out.dtype == np.float32 and out.shape == query.shape
        np.testing.assert_allclose(out, expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_long_masked_runs_are_skipped_exactly(native, dtype):
    # The serving engine's shared cache: each row's prompt in its own region, its new tokens
    # at the shared write position, the other rows' slots masked between (runs of 16 and more
    # positions the kernel skips without reading). Non-finite keys and values in masked slots
    # must not reach the result (they are never read, or weighted by exactly 0).
    import jax

    from keras_llama.kernels.attention import decode_attention

    b, v, g, h, s = 4, 3, 3, 64, 300
    rng = np.random.default_rng(7)
    query = rng.normal(0, 1, (b * v, g, h)).astype("float32")
    keys = rng.normal(0, 1, (b * v, h, s)).astype("float32")
    values = rng.normal(0, 1, (b * v, s, h)).astype("float32")
    mask = np.zeros((b, s), bool)
    for row in range(b):
        mask[row, 40 * row : 40 * row + 37] = True  # the row's prompt
        mask[row, 200 + row : 280] = True  # its generated tokens
    mask[2, 210:240] = False  # and a hole in them
    rows = np.repeat(mask, v, axis=0)  # [N, S]
    keys, values = keys.astype(dtype), values.astype(dtype)
    expected = reference(query, keys, values, mask, 0.125)
    keys = np.where(rows[:, None, :], keys, np.nan).astype(dtype)
    values = np.where(rows[:, :, None], values, np.inf).astype(dtype)
    out = np.asarray(jax.jit(decode_attention, static_argnums=4)(query, keys, values, mask, 0.125))
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=0)


def test_a_row_with_nothing_unmasked_attends_uniformly(native):
    from keras_llama.kernels.attention import decode_attention

    rng = np.random.default_rng(3)
    query = rng.normal(0, 1, (2, 2, 16)).astype("float32")
    keys = rng.normal(0, 1, (2, 16, 5)).astype("float32")
    values = rng.normal(0, 1, (2, 5, 16)).astype("float32")
    mask = np.array([[False] * 5, [True, True, False, False, False]])
    out = np.asarray(decode_attention(query, keys, values, mask, 0.25))
    np.testing.assert_allclose(out[0], np.broadcast_to(values[0].mean(0), (2, 16)), atol=1e-6)
    np.testing.assert_allclose(out[1], reference(query, keys, values, mask, 0.25)[1], atol=2e-5)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_caches_with_more_rows_than_queries_are_read_in_their_first_rows(native, dtype):
    # The serving engine's step over its leading rows: 2 of 4 batch rows, the whole caches.
    from keras_llama.kernels.attention import decode_attention

    rng = np.random.default_rng(11)
    v, g, h, s = 3, 3, 64, 50
    query = rng.normal(0, 1, (2 * v, g, h)).astype("float32")
    keys = rng.normal(0, 1, (4 * v, h, s)).astype(dtype)
    values = rng.normal(0, 1, (4 * v, s, h)).astype(dtype)
    keys[2 * v :], values[2 * v :] = np.nan, np.nan  # the other rows: never read
    mask = np.zeros((2, s), bool)
    mask[0, 3:40], mask[1, :25] = True, True
    out = np.asarray(decode_attention(query, keys, values, mask, 0.125))
    expected = reference(query, keys[: 2 * v], values[: 2 * v], mask, 0.125)
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize(
    "query,keys,values",
    [
        ((2, 2, 10), (2, 10, 5), (2, 5, 10)),  # H not a multiple of 16
        ((4, 2, 16), (2, 16, 5), (2, 5, 16)),  # fewer cache rows than queries
        ((2, 2, 16), (3, 16, 5), (2, 5, 16)),  # keys and values with different rows
    ],
)
def test_bad_shapes_are_refused(native, query, keys, values):
    from keras_llama.kernels.attention import decode_attention

    with pytest.raises(Exception, match="decode_attention: expected query"):
        np.asarray(
            decode_attention(
                np.ones(query, "float32"),
                np.ones(keys, "float32"),
                np.ones(values, "float32"),
                np.ones((2, 5), bool),
                1.0,
            )
        )


def test_caches_of_different_dtypes_are_refused(native):
    from keras_llama.kernels.attention import decode_attention

    with pytest.raises(
        ValueError,
        match="both be float32 or both float16.*keys.dtype=float16, values.dtype=float32",
    ):
        decode_attention(
            np.ones((2, 2, 16), "float32"),
            np.ones((2, 16, 5), "float16"),
            np.ones((2, 5, 16), "float32"),
            np.ones((2, 5), bool),
            1.0,
        )
