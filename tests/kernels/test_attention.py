"""The native attention kernels (`keras_llama.kernels.attention`): forward pass and gradients
against a numpy float64 implementation (grouped-query, any boolean mask, rows that see no
key, sizes off the kernels' blocks), under jit, vmap and grad; the model's logits, loss and
gradients against transformers on the native path; which inputs and layers keep XLA's
attention (and still compute the right thing); and mutations that the comparisons must
catch (planted in a copy of the op built by `make_attention`).

The kernels are built with the system C++ compiler. Without one the native tests skip (saying
so); with one, a failed build fails them."""

import contextlib
import math

import keras
import numpy as np
import pytest

from keras_llama.kernels import attention as attention_op
from keras_llama.kernels.attention import attention, make_attention, supported
from keras_llama.models import LlamaBackbone
from keras_llama.models.llama import llama_plan
from keras_llama.models.llama.llama_attention import LlamaAttention
from keras_llama.models.llama.llama_strategies import ATTENTION, BlockRoute, LayerProjections
from tests.hf_reference import make_hf_model, to_keras_llama
from tests.kernels import require_native

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "jax", reason="the native kernels are a JAX (CPU) fast path"
)

FORWARD_TARGET = "keras_llama_attention_forward"
BACKWARD_TARGET = "keras_llama_attention_backward"


@pytest.fixture(scope="module")
def native():
    """Requires the native attention kernels: skips only when no C++ compiler exists (or the
    user opted out with KERAS_LLAMA_KERNELS=0); a compiler that fails to build them fails the
    test."""
    require_native("attention")


# --- the numpy float64 reference ------------------------------------------------------------
def reference_attention(q, k, v, mask, scale, dout):
    """Masked softmax attention in float64, and its gradients by the textbook formulas.

    ``q`` [B, T, U, H], ``k`` and ``v`` [B, S, V, H] (query head u reads key/value head
    u // (U // V)), ``mask`` bool broadcastable to [B, T, S], ``dout`` [B, T, U, H] the
    gradient of the output. Masked scores are -1e30 before the softmax (a row that sees no key
    attends to every key uniformly; `where` passes no gradient to masked scores).

    Returns ``(values, magnitudes)``: dicts over "out", "dq", "dk", "dv" of the results and of
    the same sums taken over absolute values. Float32 rounding errors scale with the latter: a
    sum whose terms cancel is still accumulated at the size of its terms.
    """
    q, k, v, dout = (np.asarray(x, np.float64) for x in (q, k, v, dout))
    b, t, u, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    g = u // kv_heads
    mask = np.broadcast_to(np.asarray(mask, bool), (b, t, s))[:, None]  # [b, 1, t, s]
    kr, vr = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)  # [b, s, u, h]

    def fold(x):  # [b, s, u, h] -> [b, s, v, h]: sum over the query heads of each kv head
        return x.reshape(b, s, kv_heads, g, h).sum(axis=3)

    scores = np.where(mask, scale * np.einsum("btuh,bsuh->buts", q, kr), -1e30)
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    p = e / e.sum(axis=-1, keepdims=True)  # [b, u, t, s]
    out = np.einsum("buts,bsuh->btuh", p, vr)
    dv = fold(np.einsum("buts,btuh->bsuh", p, dout))  # dV = P^T dO
    dp = np.einsum("btuh,bsuh->buts", dout, vr)  # dP = dO V^T
    rowsum = np.einsum("btuh,btuh->but", dout, out)[..., None]  # rowsum(dO * O)
    ds = np.where(mask, p * (dp - rowsum), 0.0)  # dS = P * (dP - rowsum)
    dq = scale * np.einsum("buts,bsuh->btuh", ds, kr)  # dQ = scale dS K
    dk = fold(scale * np.einsum("buts,btuh->bsuh", ds, q))  # dK = scale dS^T Q

    aq, ak, av, ado = (
        np.abs(q),
        np.repeat(np.abs(k), g, 2),
        np.repeat(np.abs(v), g, 2),
        np.abs(dout),
    )
    ads = np.where(
        mask,
        p * (np.einsum("btuh,bsuh->buts", ado, av)
             + np.einsum("btuh,btuh->but", ado, np.abs(out))[..., None]),
        0.0,
    )  # fmt: skip
    magnitudes = {
        "out": np.einsum("buts,bsuh->btuh", p, av),
        "dq": scale * np.einsum("buts,bsuh->btuh", ads, ak),
        "dk": fold(scale * np.einsum("buts,btuh->bsuh", ads, aq)),
        "dv": fold(np.einsum("buts,btuh->bsuh", p, ado)),
    }
    return {"out": out, "dq": dq, "dk": dk, "dv": dv}, magnitudes


def assert_matches(name, actual, expected, magnitude, rtol=1e-5):
    """``actual`` (float32) equals ``expected`` within ``rtol`` of the magnitude each entry was
    accumulated at (entries of magnitude zero must be exactly zero)."""
    actual = np.asarray(actual)
    assert actual.dtype == np.float32, (name, actual.dtype)
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    assert np.isfinite(actual).all(), name
    error = np.abs(actual.astype(np.float64) - expected)
    worst = (error / (rtol * magnitude + 1e-30)).max()
    assert worst <= 1.0, f"{name}: error up to {worst:.3g}x {rtol:g} of the magnitude"


def make_mask(kind, b, t, s, rng):
    """A boolean mask [b, t, s] (or [1, t, s] for "broadcast"). Queries are the last t of the
    s positions (causal: query i sees keys up to i + s - t)."""
    causal = np.arange(s)[None, :] <= np.arange(t)[:, None] + (s - t)  # [t, s]
    if kind == "full":
        return np.ones((b, t, s), bool)
    if kind == "none":
        return np.zeros((b, t, s), bool)
    if kind == "causal":
        return np.broadcast_to(causal, (b, t, s)).copy()
    if kind == "causal_left_pad":
        # Row i's first (i + 1) * s // (b + 1) keys are padding: the early queries of a row
        # see no key at all (with t == s == 70 and b == 1, the whole first block of 32 rows).
        pads = [(i + 1) * s // (b + 1) for i in range(b)]
        return np.stack([causal & (np.arange(s) >= pad)[None, :] for pad in pads])
    if kind == "random":
        mask = rng.random((b, t, s)) < 0.5
        mask[:, ::4] = False  # every fourth query row sees no key
        mask[:, 1::4] = True  # and the next one sees every key
        return mask
    if kind == "key_holes":
        # No query sees keys 64..127 (a whole block of the dK/dV pass): their gradients are 0.
        return np.broadcast_to(
            causal & ~((np.arange(s) >= 64) & (np.arange(s) < 128)), (b, t, s)
        ).copy()
    if kind == "broadcast":
        return rng.random((1, t, s)) < 0.7
    raise ValueError(kind)


# (batch, queries T, keys S, query heads U, key/value heads V, head_dim H, mask). The kernels
# work on blocks of 32 query rows, 64 keys and 16 lanes: most sizes here are off them.
CASES = {
    "mha_t1_s1": (1, 1, 1, 2, 2, 16, "full"),
    "mha_causal": (1, 5, 5, 2, 2, 16, "causal"),
    "mha_h64_left_padded": (3, 33, 33, 4, 4, 64, "causal_left_pad"),
    "gqa3_h64_longer_prefix": (3, 33, 65, 6, 2, 64, "causal_left_pad"),
    "gqa3_h128_random": (1, 70, 130, 3, 1, 128, "random"),
    "gqa4_h16_empty_row_block": (1, 70, 70, 8, 2, 16, "causal_left_pad"),
    "gqa4_h16_unseen_key_block": (2, 33, 130, 4, 1, 16, "key_holes"),
    "mqa_h128_one_query": (3, 1, 65, 4, 1, 128, "causal_left_pad"),
    "mqa_h16_more_queries_than_keys": (1, 70, 5, 2, 1, 16, "random"),
    "gqa_h16_mask_broadcast": (3, 5, 65, 4, 2, 16, "broadcast"),
    "gqa_h32_no_key_anywhere": (2, 5, 65, 4, 2, 32, "none"),
}


def random_problem(case, seed=0):
    b, t, s, u, v, h, kind = CASES[case]
    rng = np.random.default_rng(seed)
    q = rng.normal(0, 1, (b, t, u, h)).astype("float32")
    k = rng.normal(0, 1, (b, s, v, h)).astype("float32")
    val = rng.normal(0, 1, (b, s, v, h)).astype("float32")
    dout = rng.normal(0, 1, (b, t, u, h)).astype("float32")
    # A scale other than 1/sqrt(H): a kernel that ignored it would show.
    return q, k, val, make_mask(kind, b, t, s, rng), 1.5 / math.sqrt(h), dout


def assert_all(results, expected, magnitudes):
    for name, actual in results.items():
        assert_matches(name, actual, expected[name], magnitudes[name])


# The backward kernel runs one pass per (batch, key/value head) when there are enough of them
# for the threads, else two finer passes: 0 lets it choose, 1 and 2 force each scheme.
@pytest.mark.parametrize("passes", [0, 1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients_match_float64(native, case, passes):
    import jax

    q, k, v, mask, scale, dout = random_problem(case)
    expected, magnitudes = reference_attention(q, k, v, mask, scale, dout)
    out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, mask, scale, passes), q, k, v)
    dq, dk, dv = vjp(dout)
    assert_all({"out": out, "dq": dq, "dk": dk, "dv": dv}, expected, magnitudes)
    # Not vacuous: real gradients (a softmax over one key, or over none, has no gradient).
    scores_matter = k.shape[1] > 1 and CASES[case][-1] != "none"
    for name in ("dq", "dk", "dv") if scores_matter else ("dv",):
        assert np.abs(expected[name]).max() > 1e-2, name


def test_rows_that_see_no_key_attend_uniformly_and_pass_no_gradient_to_scores(native):
    import jax

    # Worked out by hand: with every score masked the softmax is uniform, 1 / S per key; the
    # output is the mean of the values, the scores get no gradient (so neither do queries and
    # keys), and every value gets 1 / S of the output gradient of every query row.
    q, k, v, _, scale, dout = random_problem("gqa_h32_no_key_anywhere")
    b, t, u, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    g = u // kv_heads
    mask = np.zeros((b, t, s), bool)
    out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, mask, scale), q, k, v)
    dq, dk, dv = vjp(dout)
    mean = np.repeat(v.astype(np.float64).mean(axis=1), g, axis=1)  # [b, u, h]
    np.testing.assert_allclose(out, np.broadcast_to(mean[:, None], out.shape), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(dq, 0)
    np.testing.assert_array_equal(dk, 0)
    per_kv_head = dout.astype(np.float64).reshape(b, t, kv_heads, g, h).sum(axis=(1, 3)) / s
    np.testing.assert_allclose(
        dv, np.broadcast_to(per_kv_head[:, None], dv.shape), rtol=0, atol=1e-6
    )

    # Mixed with rows that do see keys (left padding): those rows are unaffected, the empty
    # ones still give the mean of ALL values (padding included).
    q, k, v, mask, scale, _ = random_problem("mha_h64_left_padded")
    empty = ~mask.any(axis=-1)  # [b, t]
    assert empty.any() and (~empty).any()
    out = np.asarray(attention(q, k, v, mask, scale))
    mean = v.astype(np.float64).mean(axis=1)  # [b, v, h]
    for row, col in zip(*np.nonzero(empty)):
        np.testing.assert_allclose(out[row, col], mean[row], rtol=0, atol=1e-6)


def test_under_jit_grad_and_vmap(native):
    import jax

    # One jitted function called at two shapes (each compiled once), then the first again.
    def loss(q, k, v, mask, weights):
        return (attention(q, k, v, mask, 0.3) * weights).sum()

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    for case in ["gqa3_h64_longer_prefix", "gqa4_h16_empty_row_block", "gqa3_h64_longer_prefix"]:
        q, k, v, mask, _, dout = random_problem(case, seed=1)
        expected, magnitudes = reference_attention(q, k, v, mask, 0.3, dout)
        value, (dq, dk, dv) = step(q, k, v, mask, dout)
        # d(sum(out * w))/d(out) = w: the gradients are the vjp of ``dout``.
        np.testing.assert_allclose(value, (expected["out"] * dout).sum(), rtol=1e-5)
        assert_all({"dq": dq, "dk": dk, "dv": dv}, expected, magnitudes)
    assert step._cache_size() == 2

    # vmap (the ffi calls run once per slice): three independent problems stacked on a new
    # leading axis, with batched masks and with one mask shared by all.
    problems = [random_problem("gqa_h16_mask_broadcast", seed=i) for i in range(3)]
    q, k, v, mask, scale, dout = (np.stack(x) for x in zip(*problems))
    scale = float(scale[0])
    shared = problems[0][3]  # [1, T, S]

    def attend(q, k, v, mask):
        return attention(q, k, v, mask, scale)

    def grads(q, k, v, mask, w):
        return jax.grad(lambda q, k, v: (attend(q, k, v, mask) * w).sum(), argnums=(0, 1, 2))(
            q, k, v
        )

    out = jax.vmap(attend)(q, k, v, mask)
    out_shared = jax.jit(jax.vmap(attend, in_axes=(0, 0, 0, None)))(q, k, v, shared)
    dq, dk, dv = jax.vmap(grads)(q, k, v, mask, dout)
    for i in range(3):
        expected, magnitudes = reference_attention(q[i], k[i], v[i], mask[i], scale, dout[i])
        assert_all({"out": out[i], "dq": dq[i], "dk": dk[i], "dv": dv[i]}, expected, magnitudes)
        expected, magnitudes = reference_attention(q[i], k[i], v[i], shared, scale, dout[i])
        assert_matches("out_shared", out_shared[i], expected["out"], magnitudes["out"])


def test_repeated_calls_give_identical_results(native):
    # Work items are shared between XLA's threads and each writes its own part of the
    # results: the same inputs must give the same bits every time.
    import jax

    q, k, v, mask, scale, dout = random_problem("gqa3_h128_random", seed=2)
    step = jax.jit(lambda q, k, v: jax.vjp(lambda *a: attention(*a, mask, scale), q, k, v)[1](dout))
    first = [np.asarray(x) for x in step(q, k, v)]
    for _ in range(10):
        for a, b in zip(step(q, k, v), first):
            np.testing.assert_array_equal(np.asarray(a), b)


def test_backward_passes_must_be_0_1_or_2(native):
    q, k, v, mask, scale, _ = random_problem("mha_causal")
    with pytest.raises(ValueError, match=r"one of \(0, 1, 2\). Received: backward_passes=3"):
        attention(q, k, v, mask, scale, backward_passes=3)


def test_comparisons_catch_a_wrong_kernel(native):
    # The float64 comparisons bite: 1% off in the forward output, or in dK alone, fails them.
    import jax

    def wrong_forward(*args):
        output, lse = attention_op.forward(*args)
        return output * 1.01, lse

    def wrong_backward(*args):
        dq, dk, dv = attention_op.backward(*args)
        return dq, dk * 1.01, dv

    q, k, v, mask, scale, dout = random_problem("gqa3_h64_longer_prefix")
    expected, magnitudes = reference_attention(q, k, v, mask, scale, dout)
    for wrong, name in ((make_attention(forward=wrong_forward), "out"),
                        (make_attention(backward=wrong_backward), "dk")):  # fmt: skip
        out, vjp = jax.vjp(lambda q, k, v, op=wrong: op(q, k, v, mask, scale), q, k, v)
        results = dict(zip(("out", "dq", "dk", "dv"), (out, *vjp(dout))))
        with pytest.raises(AssertionError, match=f"{name}: error up to"):
            assert_all(results, expected, magnitudes)
        if name == "dk":  # the wrong dK alone: the output and the other gradients still pass
            others = {key: value for key, value in results.items() if key != name}
            assert_all(others, expected, magnitudes)


def test_attention_supported():
    import jax.numpy as jnp

    def arrays(q_shape, kv_shape, dtype="float32", v_shape=None, k_dtype=None):
        return (
            jnp.zeros(q_shape, dtype),
            jnp.zeros(kv_shape, k_dtype or dtype),
            jnp.zeros(v_shape or kv_shape, dtype),
        )

    assert supported(*arrays((2, 5, 4, 16), (2, 7, 2, 16)))
    assert supported(*arrays((1, 1, 3, 128), (1, 1, 1, 128)))
    assert supported(*arrays((1, 3, 6, 32), (1, 9, 6, 32)))
    assert not supported(*arrays((2, 5, 4, 16), (2, 7, 2, 16), "bfloat16"))
    assert not supported(*arrays((2, 5, 4, 16), (2, 7, 2, 16), "float16"))
    assert not supported(*arrays((2, 5, 4, 16), (2, 7, 2, 16), k_dtype="bfloat16"))
    assert not supported(*arrays((2, 5, 4, 8), (2, 7, 2, 8)))  # head_dim 8
    assert not supported(*arrays((2, 5, 4, 24), (2, 7, 2, 24)))  # head_dim 24
    assert not supported(*arrays((2, 5, 4, 16), (2, 7, 3, 16)))  # 4 heads over 3
    assert not supported(*arrays((2, 5, 4, 16), (2, 0, 2, 16)))  # no keys
    assert not supported(*arrays((2, 5, 4, 16), (2, 7, 2, 16), v_shape=(2, 6, 2, 16)))
    q, k, v = arrays((2, 5, 4, 16), (2, 7, 2, 16))
    assert not supported(q.reshape(10, 4, 16), k, v)  # not [b, t, heads, h]


# --- LlamaAttention: which layers take the native path, against numpy ------------------------
def reference_layer(layer, x, mask):
    """``LlamaAttention`` in float64 from its weights: projections, rotary embedding (rotate
    half, base 10000, positions 0..T-1), masked softmax attention, output projection."""

    def weight(dense):
        return np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(dense.kernel, "float32")),
                          np.float64)  # fmt: skip

    x = np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(x, "float32")), np.float64)
    q = np.einsum("btm,muh->btuh", x, weight(layer._query_dense))
    k = np.einsum("btm,mvh->btvh", x, weight(layer._key_dense))
    v = np.einsum("btm,mvh->btvh", x, weight(layer._value_dense))
    h = q.shape[-1]
    angles = np.arange(x.shape[1])[:, None] / 10000.0 ** (np.arange(0, h, 2) / h)  # [t, h / 2]
    cos = np.cos(np.concatenate([angles, angles], -1))[None, :, None]
    sin = np.sin(np.concatenate([angles, angles], -1))[None, :, None]

    def rotate(y):
        return y * cos + np.concatenate([-y[..., h // 2 :], y[..., : h // 2]], -1) * sin

    no_gradient = np.zeros_like(q)  # only the output is used
    expected, _ = reference_attention(rotate(q), rotate(k), v, mask, 1 / math.sqrt(h), no_gradient)
    return np.einsum("btuh,uhm->btm", expected["out"], weight(layer._output_dense))


def layer_and_inputs(hidden, heads, kv_heads, dtype="float32", dropout=0, seed=0):
    keras.utils.set_random_seed(seed)
    layer = LlamaAttention(heads, kv_heads, dropout=dropout, dtype=dtype)
    layer.build((None, None, hidden))
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (2, 37, hidden)).astype("float32")
    mask = make_mask("causal_left_pad", 2, 37, 37, rng)  # rows left-padded by 12 and 24
    return layer, keras.ops.cast(x, dtype), mask


def route(attention):
    """The Keras layers' projections and the attention strategy called ``attention``."""
    return BlockRoute(LayerProjections(), ATTENTION[attention]())


def assert_layer(layer, x, mask, rtol, training=None, attention="einsum"):
    import jax

    def call(x):
        return layer(x, attention_mask=mask, training=training, route=route(attention))

    # Under jit (one compilation instead of one per op), except in training: dropout updates
    # its seed, which a jitted stateful call would leave as a tracer.
    actual = np.asarray(call(x) if training else jax.jit(call)(x), np.float32)
    expected = reference_layer(layer, x, mask)
    error = np.abs(actual - expected).max()
    assert error <= rtol * np.abs(expected).max(), (error, np.abs(expected).max())


def test_layer_on_the_native_route_equals_float64(native):
    import jax

    layer, x, mask = layer_and_inputs(hidden=64, heads=4, kv_heads=2)  # head_dim 16
    assert_layer(layer, x, mask, 1e-5, attention="native")
    call = jax.jit(lambda x: layer(x, attention_mask=mask, route=route("native")))
    assert FORWARD_TARGET in call.lower(x).as_text()
    # Dropout only matters in training: inference may take the native op.
    layer, x, mask = layer_and_inputs(hidden=64, heads=4, kv_heads=1, dropout=0.5)
    assert_layer(layer, x, mask, 1e-5, training=False, attention="native")


def plan_for(hidden, heads, kv_heads, dtype="float32", dropout=0):
    """The plan of a one-block model with this attention."""
    backbone = LlamaBackbone(
        vocabulary_size=100,
        num_layers=1,
        num_query_heads=heads,
        hidden_dim=hidden,
        intermediate_dim=32,
        num_key_value_heads=kv_heads,
        dropout=dropout,
        dtype=dtype,
    )
    return llama_plan.make_plan(backbone)


def test_plans_take_the_native_op_for_float32_head_dim_16(native):
    plan = plan_for(hidden=64, heads=4, kv_heads=2)
    assert plan.training.attention == plan.scoring.attention == "native"
    # Dropout only matters in training.
    plan = plan_for(hidden=64, heads=4, kv_heads=1, dropout=0.5)
    assert plan.scoring.attention == "native" and plan.training.attention == "einsum"


FALLBACKS = {
    # name -> (layer_and_inputs kwargs, tolerance relative to the output's scale)
    "bfloat16": (dict(hidden=64, heads=4, kv_heads=2, dtype="bfloat16"), 3e-2),
    "head_dim_8": (dict(hidden=32, heads=4, kv_heads=2), 1e-5),
    # Training with dropout: a rate so small that nothing is dropped (so the result is still
    # exact), yet over 0, which needs the probabilities and thus XLA's attention.
    "training_dropout": (dict(hidden=64, heads=4, kv_heads=2, dropout=1e-9), 1e-5),
    "distribution": (dict(hidden=64, heads=4, kv_heads=2), 1e-5),
}


@pytest.mark.parametrize("name", list(FALLBACKS))
def test_other_models_plan_xla_attention_and_compute_it_right(native, name):
    import jax

    kwargs, rtol = FALLBACKS[name]
    training = name == "training_dropout"
    layer, x, mask = layer_and_inputs(**kwargs)
    scope = contextlib.nullcontext()
    if name == "distribution":  # even over one device: XLA must be free to partition
        scope = keras.distribution.DataParallel(devices=jax.devices()).scope()
    with scope:
        plan = plan_for(**kwargs)
        stage = plan.training if training else plan.scoring
        assert stage.attention in ("dot_product", "einsum"), str(stage)
        assert_layer(layer, x, mask, rtol, training=training, attention=stage.attention)


# --- the model against transformers ---------------------------------------------------------
# Two rows of 40 tokens; the second is left-padded (6 positions): its first query rows see no
# key in the native kernel. 39 model inputs: a block of 32 query rows and a partial one.
TOKEN_IDS = np.random.default_rng(7).integers(1, 100, (2, 40)).astype("int32")
PADDING_MASK = np.ones((2, 40), "int32")
PADDING_MASK[1, :6] = 0
# A position is scored when it and the token before it are real (a padded query's logits are
# undefined in transformers).
SCORED = (PADDING_MASK[:, 1:] * PADDING_MASK[:, :-1]).astype(bool)  # [2, 39]
M, U, V, H = 64, 4, 2, 16


@pytest.fixture(scope="module")
def models():
    hf = make_hf_model("gqa", seed=11, hidden_size=M, intermediate_size=128)
    return hf, to_keras_llama(hf)


@pytest.fixture(scope="module")
def hf_reference(models):
    import torch

    hf, causal_lm = models
    assert causal_lm.backbone.head_dim == H and causal_lm.backbone.num_key_value_heads == V
    hf.zero_grad()
    # transformers shifts the labels itself: labels[t + 1] scores the logits of position t.
    labels = np.where(np.concatenate([[[False], [False]], SCORED], axis=1), TOKEN_IDS, -100)
    out = hf(
        input_ids=torch.as_tensor(TOKEN_IDS).long(),
        attention_mask=torch.as_tensor(PADDING_MASK),
        labels=torch.as_tensor(labels).long(),
    )
    out.loss.backward()
    grads = {name: p.grad.numpy().copy() for name, p in hf.named_parameters()}
    hf.zero_grad()
    layer = "model.layers.0.self_attn."
    return {
        "loss": out.loss.item(),
        "logits": out.logits.detach().numpy()[:, :-1],
        "grads": {
            "query": grads[layer + "q_proj.weight"].T.reshape(M, U, H),
            "key": grads[layer + "k_proj.weight"].T.reshape(M, V, H),
            "value": grads[layer + "v_proj.weight"].T.reshape(M, V, H),
            "attention_output": grads[layer + "o_proj.weight"].T.reshape(U, H, M),
        },
    }


def loss_logits_and_grads(causal_lm):
    """Compiles the training loss and its gradients: ``(HLO text, loss, logits [2, 39, vocab],
    {name: gradient of layer 0's attention kernel})``."""
    import jax

    x = {"token_ids": TOKEN_IDS[:, :-1], "padding_mask": PADDING_MASK[:, :-1]}
    trainable = [v.value for v in causal_lm.trainable_variables]
    non_trainable = [v.value for v in causal_lm.non_trainable_variables]

    def loss_fn(values):
        logits, _ = causal_lm.stateless_call(values, non_trainable, x, training=True)
        return causal_lm.loss(
            TOKEN_IDS[:, 1:], logits, sample_weight=SCORED.astype("float32")
        ), logits

    lowered = jax.jit(jax.value_and_grad(loss_fn, has_aux=True)).lower(trainable)
    (loss, logits), grads = lowered.compile()(trainable)
    prefix = "transformer_layer_0/self_attention/"
    wanted = {prefix + name + "/kernel": name for name in
              ("query", "key", "value", "attention_output")}  # fmt: skip
    grads = {
        wanted[v.path]: np.asarray(g)
        for v, g in zip(causal_lm.trainable_variables, grads)
        if v.path in wanted
    }
    assert len(grads) == 4
    return lowered.as_text(), float(loss), np.asarray(logits), grads


def forward_logits(causal_lm):
    """``(HLO text, logits [2, 39, vocab])`` of the jitted forward pass."""
    import jax

    x = {"token_ids": TOKEN_IDS[:, :-1], "padding_mask": PADDING_MASK[:, :-1]}
    values = [v.value for v in causal_lm.trainable_variables]
    non_trainable = [v.value for v in causal_lm.non_trainable_variables]
    lowered = jax.jit(lambda w: causal_lm.stateless_call(w, non_trainable, x)[0]).lower(values)
    return lowered.as_text(), np.asarray(lowered.compile()(values))


def logits_error(logits, reference):
    return np.abs(logits - reference["logits"])[SCORED].max()


def grad_errors(grads, reference):
    return {name: np.abs(g - reference["grads"][name]).max() for name, g in grads.items()}


@pytest.fixture(scope="module")
def runs(native, models):
    """The loss, logits and gradients on the native path and with KERAS_LLAMA_KERNELS=0."""
    _, causal_lm = models
    native_run = loss_logits_and_grads(causal_lm)
    with pytest.MonkeyPatch.context() as m:
        m.setenv("KERAS_LLAMA_KERNELS", "0")
        xla_run = loss_logits_and_grads(causal_lm)
    return {"native": native_run, "xla": xla_run}


def test_model_logits_loss_and_gradients_equal_transformers_on_the_native_path(runs, hf_reference):
    text, loss, logits, grads = runs["native"]
    assert FORWARD_TARGET in text and BACKWARD_TARGET in text
    assert logits_error(logits, hf_reference) <= 1e-4
    np.testing.assert_allclose(loss, hf_reference["loss"], rtol=0, atol=1e-5)
    for name, error in grad_errors(grads, hf_reference).items():
        assert error <= 1e-4, (name, error)
        assert np.abs(hf_reference["grads"][name]).max() > 1e-2, name  # a real gradient


def test_model_with_kernels_off_keeps_xla_attention_with_equal_results(runs, hf_reference):
    text, loss, logits, grads = runs["xla"]
    assert FORWARD_TARGET not in text and BACKWARD_TARGET not in text
    assert logits_error(logits, hf_reference) <= 1e-4
    np.testing.assert_allclose(loss, hf_reference["loss"], rtol=0, atol=1e-5)
    _, native_loss, native_logits, native_grads = runs["native"]
    np.testing.assert_allclose(loss, native_loss, rtol=1e-6)
    scale = np.abs(native_logits[SCORED]).max()
    assert np.abs(logits - native_logits)[SCORED].max() <= 1e-5 * scale
    for name, g in grads.items():
        scale = np.abs(native_grads[name]).max()
        np.testing.assert_allclose(g, native_grads[name], rtol=0, atol=1e-5 * scale, err_msg=name)


def test_model_comparisons_catch_a_wrong_weight(runs, models, hf_reference):
    # The comparisons above bite (the op's own halves are planted wrong in
    # `test_comparisons_catch_a_wrong_kernel`): 1% off in one attention kernel of the first
    # block moves the logits and the gradients past their tolerances.
    _, causal_lm = models
    variable = causal_lm.backbone.transformer_layers[0]._self_attention_layer._value_dense.kernel
    original = variable.value
    try:
        variable.assign(original * 1.01)
        text, _, logits, grads = loss_logits_and_grads(causal_lm)
    finally:
        variable.assign(original)
    assert FORWARD_TARGET in text and BACKWARD_TARGET in text
    assert logits_error(logits, hf_reference) > 1e-3
    assert max(grad_errors(grads, hf_reference).values()) > 1e-3
