"""The training fast paths on JAX CPU: the native cross-entropy kernels
(`keras_llama.kernels.cross_entropy`) and the JAX custom VJP they fall back to, against numpy
float64 (loss and gradient, vocabularies off the kernels' 16 lanes, out-of-range labels,
extreme logits, jit, vmap, the gradient written over the logits' buffer); the loss class
against Keras's own; the written-out matmul VJPs (`keras_llama.kernels.training_matmul`)
against numpy; a training step of the whole model against transformers (loss and every
gradient, tied and untied embeddings), `fit()`, LoRA; the `ReversibleEmbedding` subclass
against Keras's own layer (quantized, LoRA, weight-file names); the native SwiGLU; and
mutations that the comparisons must catch (planted in copies of the ops built by
`make_cross_entropy` / `make_swiglu`).

The kernels are built with the system C++ compiler. Without one the native tests skip (saying
so); with one, a failed build fails them."""

import h5py
import keras
import numpy as np
import pytest

from keras_llama import kernels, losses
from keras_llama.kernels import cross_entropy as cross_entropy_op
from keras_llama.kernels import swiglu as swiglu_op
from keras_llama.kernels import training_matmul
from keras_llama.kernels.cross_entropy import make_cross_entropy
from keras_llama.kernels.swiglu import make_swiglu
from keras_llama.models import LlamaBackbone
from keras_llama.models.execution_plan import Choice, StagePlan
from keras_llama.models.llama import llama_layers, llama_plan, llama_strategies
from tests.hf_reference import hf_loss_and_gradients, make_hf_model, to_keras_llama
from tests.kernels import require_native

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "jax", reason="the native kernels are a JAX (CPU) fast path"
)

FORWARD_TARGET = "keras_llama_cross_entropy_forward"
BACKWARD_TARGET = "keras_llama_cross_entropy_backward"
SWIGLU_TARGETS = ("keras_llama_swiglu_forward", "keras_llama_swiglu_backward")
INT32 = np.iinfo(np.int32)


@pytest.fixture(scope="module")
def native():
    """Requires the native cross-entropy kernels: skips only when no C++ compiler exists (or
    the user opted out with KERAS_LLAMA_KERNELS=0); a compiler that fails to build them fails
    the test."""
    require_native("cross_entropy")


def implementation(name):
    """The per-row cross-entropy under test: the native kernels or the JAX custom VJP."""
    if name == "native":
        return cross_entropy_op.cross_entropy
    return cross_entropy_op.jax_cross_entropy


@pytest.fixture(params=["native", "jax"])
def cross_entropy(request):
    if request.param == "native":
        request.getfixturevalue("native")
    return implementation(request.param)


# --- the numpy float64 reference ------------------------------------------------------------
def reference_cross_entropy(logits, labels, grad):
    """Softmax cross-entropy in float64 by hand: ``(loss [...], dlogits [..., V], scale [...])``
    for ``logits`` [..., V], int ``labels`` [...] and the loss's cotangent ``grad`` [...].

    ``loss = logsumexp(x) - x[label]`` and ``dlogits = (softmax(x) - one_hot(label)) * grad``;
    a label outside [0, V) has an all-zero one-hot row (Keras): loss 0, gradient 0. ``scale``
    is the size the row's float32 arithmetic works at (its largest finite |logit|, at least 1):
    rounding errors are bounded relative to it."""
    x = np.asarray(logits, np.float64)
    labels = np.asarray(labels, np.int64)
    grad = np.asarray(grad, np.float64)
    vocab = x.shape[-1]
    valid = (labels >= 0) & (labels < vocab)
    top = x.max(axis=-1, keepdims=True)
    lse = top[..., 0] + np.log(np.exp(x - top).sum(axis=-1))
    picked = np.take_along_axis(x, np.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    loss = np.where(valid, lse - picked, 0.0)
    one_hot = np.arange(vocab) == labels[..., None]
    dlogits = (np.exp(x - lse[..., None]) - one_hot) * np.where(valid, grad, 0.0)[..., None]
    scale = np.maximum(np.where(np.isfinite(x), np.abs(x), 0).max(axis=-1), 1.0)
    return loss, dlogits, scale


def assert_cross_entropy(loss, dlogits, logits, labels, grad, rtol=1e-6):
    """``loss`` and ``dlogits`` (float32) equal the float64 reference: within ``rtol`` of each
    row's scale (times |grad| for the gradient); rows with an out-of-range label exactly 0."""
    expected_loss, expected_grad, scale = reference_cross_entropy(logits, labels, grad)
    loss, dlogits = np.asarray(loss), np.asarray(dlogits)
    assert loss.dtype == dlogits.dtype == np.float32
    assert loss.shape == expected_loss.shape and dlogits.shape == expected_grad.shape
    labels = np.asarray(labels)
    invalid = (labels < 0) | (labels >= logits.shape[-1])
    np.testing.assert_array_equal(loss[invalid], 0.0)
    np.testing.assert_array_equal(dlogits[invalid], 0.0)
    finite = np.isfinite(expected_loss)
    np.testing.assert_array_equal(loss[~finite], expected_loss[~finite])
    loss_error = np.abs(loss[finite] - expected_loss[finite]) / scale[finite]
    assert loss_error.max(initial=0) <= rtol, f"loss error {loss_error.max():.3g} x scale"
    assert np.isfinite(dlogits).all()
    bound = rtol * (scale * np.abs(np.asarray(grad, np.float64)))[..., None] + 1e-30
    grad_error = (np.abs(dlogits - expected_grad) / bound).max(initial=0)
    assert grad_error <= 1.0, f"gradient error {grad_error:.3g} x {rtol:g} of the row's scale"


def loss_and_gradient(cross_entropy, logits, labels, grad):
    """``(loss, dlogits)``: the jitted forward pass and its vjp of ``grad``."""
    import jax

    def fn(x, labels, grad):
        loss, vjp = jax.vjp(lambda x: cross_entropy(x, labels), x)
        return loss, vjp(grad)[0]

    return jax.jit(fn)(logits, labels, grad)


def random_labels(lead, vocab, rng, out_of_range=True):
    """Labels [lead] in [0, V), with a few out of range (-1, V, large, int32 min and max)."""
    labels = rng.integers(0, vocab, lead).astype("int32")
    if out_of_range:
        flat = labels.reshape(-1)
        bad = [-1, vocab, 10**6, INT32.min, INT32.max]
        positions = rng.choice(flat.size, min(len(bad), flat.size // 3), replace=False)
        flat[positions] = bad[: len(positions)]
    return labels


# (leading dims, vocabulary). Rows go to threads 8 at a time, exponentials 16 lanes at a time:
# sizes off both, a vocabulary of one, exactly one vector, a vector and one.
CASES = {
    "n1_v1": ((1,), 1),
    "n3_v7": ((3,), 7),
    "n5_v16": ((5,), 16),
    "n9_v17": ((9,), 17),
    "n67_v100": ((67,), 100),
    "n1_v1000": ((1,), 1000),
    "b2_t33_v1000": ((2, 33), 1000),
    "b3_t1_v100": ((3, 1), 100),
}


def random_problem(case, seed=0, scale=3.0):
    lead, vocab = CASES[case]
    rng = np.random.default_rng(seed)
    logits = (scale * rng.normal(0, 1, (*lead, vocab))).astype("float32")
    labels = random_labels(lead, vocab, rng, out_of_range=np.prod(lead) >= 3)
    grad = rng.normal(0, 1, lead).astype("float32")
    return logits, labels, grad


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradient_match_float64(cross_entropy, case):
    logits, labels, grad = random_problem(case)
    loss, dlogits = loss_and_gradient(cross_entropy, logits, labels, grad)
    assert_cross_entropy(loss, dlogits, logits, labels, grad)
    valid = (labels >= 0) & (labels < logits.shape[-1])
    if logits.shape[-1] > 1:  # not vacuous: real losses and gradients on the valid rows
        assert (np.asarray(loss)[valid] > 1e-3).all()
        assert np.abs(np.asarray(dlogits)[valid]).max() > 1e-2
    if labels.size >= 3:
        assert (~valid).sum() >= 1


def test_extreme_logits(cross_entropy):
    # V = 37: two 16-wide vectors and a tail of 5; -inf entries in a vector and in the tail.
    vocab = 37
    rng = np.random.default_rng(3)
    rows, labels = [], []

    def row(values, label):
        rows.append(np.asarray(values, np.float32))
        labels.append(label)

    big = np.full(vocab, 80.0)
    row(np.where(np.arange(vocab) == 5, -80.0, big), 5)  # the label 160 below the rest
    row(np.where(np.arange(vocab) == 36, 80.0, -big), 36)  # the label 160 above: loss ~ 0
    row(-big, 17)  # all equal and tiny: log(V)
    row(big, 0)  # all equal and large: log(V)
    with_inf = rng.normal(0, 3, vocab)
    with_inf[[3, 35]] = -np.inf
    row(with_inf, 4)  # -inf entries (masked logits) elsewhere: they count 0
    row(with_inf, 35)  # the label's logit is -inf: loss +inf, gradient still finite
    row(with_inf, -1)  # out of range: 0 and 0 even with -inf entries
    row(1e4 * rng.normal(0, 1, vocab), 9)  # huge spread: one entry dominates
    row(rng.normal(0, 1, vocab) + 1e3, 30)  # large offset, ordinary spread
    logits, labels = np.stack(rows), np.asarray(labels, "int32")
    grad = rng.normal(0, 1, len(rows)).astype("float32")

    loss, dlogits = loss_and_gradient(cross_entropy, logits, labels, grad)
    assert_cross_entropy(loss, dlogits, logits, labels, grad)
    loss = np.asarray(loss)
    # Worked out by hand.
    np.testing.assert_allclose(loss[0], 160 + np.log(36 + np.exp(-160.0)), rtol=1e-6)
    assert 0.0 <= loss[1] < 1e-30
    np.testing.assert_allclose(loss[2:4], np.log(vocab), rtol=1e-6)
    assert loss[5] == np.inf
    np.testing.assert_allclose(np.asarray(dlogits)[5, 35], -grad[5], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(dlogits)[4, [3, 35]], 0.0)
    np.testing.assert_array_equal(np.asarray(dlogits)[5, 3], 0.0)


def test_ignored_rows_give_zero_even_with_nan_logits(cross_entropy):
    # A label outside [0, V) ignores its row: loss 0 and gradient exactly 0, whatever the
    # logits hold (NaN from an upstream overflow, +inf), on both paths; other rows unaffected.
    vocab = 37
    rng = np.random.default_rng(12)
    logits = rng.normal(0, 1, (4, vocab)).astype("float32")
    logits[0, [2, 20, 36]] = np.nan
    logits[1, 7] = np.inf
    labels = np.array([-1, vocab, 3, 36], "int32")
    grad = rng.normal(0, 1, 4).astype("float32")
    loss, dlogits = loss_and_gradient(cross_entropy, logits, labels, grad)
    loss, dlogits = np.asarray(loss), np.asarray(dlogits)
    np.testing.assert_array_equal(loss[:2], 0.0)
    np.testing.assert_array_equal(dlogits[:2], 0.0)
    expected_loss, expected_grad, _ = reference_cross_entropy(logits[2:], labels[2:], grad[2:])
    np.testing.assert_allclose(loss[2:], expected_loss, rtol=1e-6)
    np.testing.assert_allclose(dlogits[2:], expected_grad, rtol=0, atol=1e-6)


def test_empty_batch(native):
    import jax

    logits = np.zeros((0, 10), np.float32)
    labels = np.zeros((0,), np.int32)
    loss, vjp = jax.vjp(lambda x: cross_entropy_op.cross_entropy(x, labels), logits)
    assert loss.shape == (0,) and vjp(np.zeros((0,), np.float32))[0].shape == (0, 10)


def test_under_jit_grad_and_vmap(native):
    import jax

    # One jitted function at two shapes (each compiled once), then the first again.
    def weighted(x, labels, w):
        return (cross_entropy_op.cross_entropy(x, labels) * w).sum()

    step = jax.jit(jax.value_and_grad(weighted))
    for case in ["b2_t33_v1000", "n9_v17", "b2_t33_v1000"]:
        logits, labels, grad = random_problem(case, seed=1)
        value, dlogits = step(logits, labels, grad)
        # d(sum(loss * w))/d(loss) = w: the gradient is the vjp of ``grad``.
        expected, _, _ = reference_cross_entropy(logits, labels, grad)
        np.testing.assert_allclose(value, (expected * grad).sum(), rtol=1e-5)
        assert_cross_entropy(np.asarray(expected, np.float32), dlogits, logits, labels, grad)
    assert step._cache_size() == 2

    # The logits made inside the jitted function in another layout: transposed.
    logits, labels, grad = random_problem("n67_v100", seed=2)
    value, dlogits = jax.jit(jax.value_and_grad(lambda xt: weighted(xt.T, labels, grad)))(
        np.ascontiguousarray(logits.T)
    )
    expected, _, _ = reference_cross_entropy(logits, labels, grad)
    np.testing.assert_allclose(value, (expected * grad).sum(), rtol=1e-5)
    assert_cross_entropy(expected.astype("float32"), np.asarray(dlogits).T, logits, labels, grad)

    # vmap (the ffi calls run once per slice): three problems stacked on a new leading axis,
    # with their own labels and with one set of labels shared by all.
    problems = [random_problem("b3_t1_v100", seed=i) for i in range(3)]
    logits, labels, grad = (np.stack(x) for x in zip(*problems))

    def grads(x, labels, w):
        return jax.grad(weighted)(x, labels, w)

    loss = jax.vmap(cross_entropy_op.cross_entropy)(logits, labels)
    shared = jax.jit(jax.vmap(cross_entropy_op.cross_entropy, in_axes=(0, None)))(logits, labels[0])
    dlogits = jax.vmap(grads)(logits, labels, grad)
    shared_grads = jax.jit(jax.vmap(grads, in_axes=(0, None, 0)))(logits, labels[0], grad)
    for i in range(3):
        assert_cross_entropy(loss[i], dlogits[i], logits[i], labels[i], grad[i])
        assert_cross_entropy(shared[i], shared_grads[i], logits[i], labels[0], grad[i])


def test_repeated_calls_give_identical_results(native):
    # Rows are shared between XLA's threads and each writes its own: the same inputs must give
    # the same bits every time.
    import jax

    logits, labels, grad = random_problem("b2_t33_v1000", seed=4)
    step = jax.jit(
        jax.value_and_grad(lambda x: (cross_entropy_op.cross_entropy(x, labels) * grad).sum())
    )
    first = [np.asarray(x) for x in step(logits)]
    for _ in range(5):
        for a, b in zip(step(logits), first):
            np.testing.assert_array_equal(np.asarray(a), b)


# --- the gradient written over the logits -----------------------------------------------------
def test_gradient_over_the_logits_buffer_never_clobbers_live_logits(native):
    """The backward kernel aliases its output to the logits (`input_output_aliases`). Where the
    logits die with the loss XLA may reuse their buffer; where anything still reads them after
    the backward pass (a returned value, another term of the loss, its own backward pass, the
    caller's array) they must keep their values."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(5)
    n, m, vocab = 37, 24, 100
    h = rng.normal(0, 1, (n, m)).astype("float32")
    w = rng.normal(0, 0.5, (m, vocab)).astype("float32")
    labels = random_labels((n,), vocab, rng)
    c = rng.normal(0, 1, (n, vocab)).astype("float32")
    logits64 = h.astype(np.float64) @ w
    logits = logits64.astype("float32")
    ones = np.ones(n, np.float32)
    expected_loss, expected_dlogits, _ = reference_cross_entropy(logits64, labels, ones)

    def ce(x):
        return cross_entropy_op.cross_entropy(x, labels)

    def close(actual, expected, rtol=2e-5, name=""):
        actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
        error = np.abs(actual - expected).max()
        assert error <= rtol * np.abs(expected).max(), (name, error)

    # 1. The logits are dead after the loss: the gradient may take their buffer (it is asked
    # to: the compiled custom call aliases operand 0).
    dead = jax.jit(jax.value_and_grad(lambda w: ce(h @ w).sum()))
    assert "output_to_operand_aliasing" in dead.lower(w).compile().as_text()
    value, dw = dead(w)
    close(value, expected_loss.sum(), name="dead loss")
    close(dw, h.T.astype(np.float64) @ expected_dlogits, name="dead dw")

    # 2. The logits are returned next to the gradient.
    def loss_and_logits(w):
        x = h @ w
        return ce(x).sum(), x

    (value, returned), dw = jax.jit(jax.value_and_grad(loss_and_logits, has_aux=True))(w)
    close(returned, logits64, rtol=1e-5, name="returned logits")
    close(dw, h.T.astype(np.float64) @ expected_dlogits, name="returned dw")

    # 3. The logits also feed another term of the loss, linear (its gradient needs no logits)
    # and non-linear (its backward pass reads the logits, possibly after the kernel's).
    def two_terms(x):
        return ce(x).sum() + (x * c).sum() + jnp.sin(x).sum()

    value, dlogits = jax.jit(jax.value_and_grad(two_terms))(logits)
    x64 = logits.astype(np.float64)
    close(value, expected_loss.sum() + (x64 * c).sum() + np.sin(x64).sum(), 1e-5, "sum value")
    expected = reference_cross_entropy(logits, labels, ones)[1] + c + np.cos(x64)
    close(dlogits, expected, 1e-5, "sum gradient")
    value, dw = jax.jit(jax.value_and_grad(lambda w: two_terms(h @ w)))(w)
    expected = reference_cross_entropy(logits64, labels, ones)[1] + c + np.cos(logits64)
    close(dw, h.T.astype(np.float64) @ expected, 1e-4, "sum dw")

    # 4. The caller's arrays (a device array, not donated) keep their values, jitted or not,
    # and the vjp can be pulled twice.
    device_logits = jnp.asarray(logits)
    for fn in (jax.grad(lambda x: ce(x).sum()), jax.jit(jax.grad(lambda x: ce(x).sum()))):
        close(fn(device_logits), expected_dlogits, name="device grad")
        np.testing.assert_array_equal(np.asarray(device_logits), logits)
    _, vjp = jax.vjp(ce, device_logits)
    first = np.asarray(vjp(ones)[0])
    np.testing.assert_array_equal(np.asarray(vjp(ones)[0]), first)
    np.testing.assert_array_equal(np.asarray(device_logits), logits)

    # 5. Logits XLA must not write to: a constant of the compiled function (called twice),
    # and a loop invariant that every iteration differentiates at again.
    constant = jax.jit(lambda g: jax.vjp(ce, logits)[1](g)[0])
    for _ in range(2):
        close(constant(ones), expected_dlogits, name="constant logits")

    def loop(x):
        def body(i, total):
            return total + jax.grad(lambda y: ce(y).sum())(x)

        return jax.lax.fori_loop(0, 3, body, jnp.zeros_like(x))

    close(jax.jit(loop)(logits), 3 * expected_dlogits, name="loop invariant")


# --- the loss class against Keras's own -------------------------------------------------------
def keras_problem(seed=6):
    rng = np.random.default_rng(seed)
    b, t, vocab = 2, 9, 37
    logits = rng.normal(0, 3, (b, t, vocab)).astype("float32")
    labels = rng.integers(0, vocab, (b, t)).astype("int32")
    labels[0, 2], labels[1, 7] = -1, vocab  # out of range: Keras's one-hot row is all zeros
    sample_weight = rng.uniform(0, 2, (b, t)).astype("float32")
    sample_weight[1, 0] = 0.0
    return logits, labels, sample_weight


def loss_value_grad_and_hlo(loss, logits, labels, sample_weight):
    """``(value, dlogits, HLO text of the jitted value and gradient)`` of ``loss``."""
    import jax

    def fn(x):
        value = loss(labels, x, sample_weight=sample_weight)
        return value.sum(), value  # reduction "none" gives a value per position

    lowered = jax.jit(jax.value_and_grad(fn, has_aux=True)).lower(logits)
    (_, value), dlogits = lowered.compile()(logits)
    return np.asarray(value), np.asarray(dlogits), lowered.as_text()


REDUCTIONS = ["sum", "sum_over_batch_size", "none", "mean_with_sample_weight"]


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_loss_class_equals_keras_on_the_native_path(native, monkeypatch, reduction):
    logits, labels, sample_weight = keras_problem()
    keras_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction)
    ours = losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction)
    expected, expected_grad, _ = loss_value_grad_and_hlo(keras_loss, logits, labels, sample_weight)
    value, dlogits, text = loss_value_grad_and_hlo(ours, logits, labels, sample_weight)
    assert FORWARD_TARGET in text and BACKWARD_TARGET in text
    np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dlogits, expected_grad, rtol=0, atol=1e-6)
    assert np.abs(expected_grad).max() > 1e-2
    # The out-of-range positions count zero in both.
    np.testing.assert_array_equal(dlogits[0, 2], 0.0)
    np.testing.assert_array_equal(dlogits[1, 7], 0.0)

    monkeypatch.setenv("KERAS_LLAMA_KERNELS", "0")
    assert not kernels.library("cross_entropy").ensure_built()
    off, off_grad, text = loss_value_grad_and_hlo(ours, logits, labels, sample_weight)
    assert FORWARD_TARGET not in text and BACKWARD_TARGET not in text
    np.testing.assert_allclose(off, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(off_grad, expected_grad, rtol=0, atol=1e-6)


def test_other_inputs_take_the_jax_path(native):
    import jax

    logits, labels, _ = keras_problem(seed=7)
    ones = np.ones(labels.shape, np.float32)

    def value_grad_text(fn, x):
        lowered = jax.jit(jax.value_and_grad(lambda x: fn(x).sum())).lower(x)
        value, grad = lowered.compile()(x)
        return value, grad, lowered.as_text()

    def ours(x):
        return losses.sparse_categorical_crossentropy(labels, x, from_logits=True)

    # bfloat16 logits: the JAX custom VJP, in bfloat16.
    bf16 = keras.ops.cast(logits, "bfloat16")
    value, grad, text = value_grad_text(ours, bf16)
    assert FORWARD_TARGET not in text and BACKWARD_TARGET not in text
    rounded = np.asarray(bf16.astype("float32"))
    expected_loss, expected_grad, scale = reference_cross_entropy(rounded, labels, ones)
    assert grad.dtype == bf16.dtype
    np.testing.assert_allclose(float(value), expected_loss.sum(), rtol=2e-2)
    assert np.abs(np.asarray(grad, np.float32) - expected_grad).max() <= 2e-2

    # Under a Keras distribution (even over one device), XLA must be free to partition.
    with keras.distribution.DataParallel(devices=jax.devices()).scope():
        value, grad, text = value_grad_text(ours, logits)
    assert FORWARD_TARGET not in text and BACKWARD_TARGET not in text
    expected_loss, expected_grad, _ = reference_cross_entropy(logits, labels, ones)
    np.testing.assert_allclose(value, expected_loss.sum(), rtol=1e-6)
    np.testing.assert_allclose(grad, expected_grad, rtol=0, atol=1e-6)

    # Labels [..., 1] as Keras accepts them: the native path, same values.
    value, grad, text = value_grad_text(
        lambda x: losses.sparse_categorical_crossentropy(labels[..., None], x, from_logits=True),
        logits,
    )
    assert FORWARD_TARGET in text
    np.testing.assert_allclose(value, expected_loss.sum(), rtol=1e-6)
    np.testing.assert_allclose(grad, expected_grad, rtol=0, atol=1e-6)


# (labels shape, logits shape) that Keras refuses: the leading dimensions differ.
MISMATCHED_SHAPES = [((2, 9), (18, 37)), ((2, 1), (2, 9, 37)), ((2, 8), (2, 9, 37))]


@pytest.mark.parametrize("path", ["native", "jax"])
def test_mismatched_label_and_logit_shapes_raise_like_keras(native, monkeypatch, path):
    # `keras.losses.sparse_categorical_crossentropy` raises a ValueError naming both shapes
    # when the labels' shape is not the logits' leading shape; ours promises Keras's
    # arguments and values, so it must refuse them too, on either path, not compute a loss of
    # some other shape or fail later inside XLA.
    if path == "jax":
        monkeypatch.setenv("KERAS_LLAMA_KERNELS", "0")
    rng = np.random.default_rng(11)
    problems = []
    for label_shape, logit_shape in MISMATCHED_SHAPES:
        labels = rng.integers(0, logit_shape[-1], label_shape).astype("int32")
        logits = rng.normal(0, 1, logit_shape).astype("float32")
        with pytest.raises(ValueError, match="shape"):  # the reference
            keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        try:
            result = losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
            result = np.asarray(result)  # errors inside XLA surface when the value is read
        except ValueError as e:
            if str(label_shape) not in str(e) or str(logit_shape) not in str(e):
                problems.append(f"{label_shape} vs {logit_shape}: unclear ValueError: {e}")
            continue
        except Exception as e:  # noqa: BLE001 - the wrong kind of error is the finding
            problems.append(
                f"{label_shape} vs {logit_shape}: {type(e).__name__} instead of a ValueError "
                f"naming the shapes: {str(e)[:120]}"
            )
            continue
        problems.append(f"{label_shape} vs {logit_shape}: no error, a loss of shape {result.shape}")
    assert not problems, "\n".join(problems)


# --- the written-out matmul VJPs ----------------------------------------------------------------
@pytest.mark.parametrize("lead", [(5,), (2, 3)], ids=["2d", "3d"])
def test_training_matmuls_equal_plain_products(lead):
    import jax

    rng = np.random.default_rng(8)
    k, n = 7, 11
    x = rng.normal(0, 1, (*lead, k)).astype("float32")
    kernel = rng.normal(0, 1, (k, n)).astype("float32")
    table = rng.normal(0, 1, (n, k)).astype("float32")
    dy = rng.normal(0, 1, (*lead, n)).astype("float32")
    x64, dy64 = x.astype(np.float64).reshape(-1, k), dy.astype(np.float64).reshape(-1, n)

    def check(fn, weight, expected_y, expected_dx, expected_dw):
        for f in (fn, jax.jit(fn)):
            y, vjp = jax.vjp(f, x, weight)
            dx, dw = vjp(dy)
            assert y.shape == (*lead, n) and dx.shape == x.shape and dw.shape == weight.shape
            for actual, expected in ((y, expected_y), (dx, expected_dx), (dw, expected_dw)):
                np.testing.assert_allclose(
                    np.asarray(actual).reshape(expected.shape), expected, rtol=0, atol=1e-5
                )

    w64 = kernel.astype(np.float64)
    check(training_matmul.matmul, kernel, x64 @ w64, dy64 @ w64.T, x64.T @ dy64)
    t64 = table.astype(np.float64)
    check(training_matmul.matmul_transposed, table, x64 @ t64.T, dy64 @ t64, dy64.T @ x64)


# --- the model against transformers -----------------------------------------------------------
# Two rows of 24 tokens; the second is left-padded (5 positions).
TOKEN_IDS = np.random.default_rng(9).integers(1, 100, (2, 24)).astype("int32")
PADDING_MASK = np.ones((2, 24), "int32")
PADDING_MASK[1, :5] = 0
# A position is scored when it and the token before it are real.
SCORED = (PADDING_MASK[:, 1:] * PADDING_MASK[:, :-1]).astype(bool)  # [2, 23]
INPUTS = {"token_ids": TOKEN_IDS[:, :-1], "padding_mask": PADDING_MASK[:, :-1]}
M, F, U, V, H, LAYERS = 64, 128, 4, 2, 16, 2


@pytest.fixture(scope="module", params=["untied", "tied"])
def models(request):
    """``(tied, transformers model, our LlamaCausalLM, reference)``: ``reference`` holds the
    transformers loss (``labels=``, padding -100) and the gradient of every parameter (torch
    autograd) in our variables' layouts, by path."""

    tied = request.param == "tied"
    hf = make_hf_model("gqa", seed=12, hidden_size=M, intermediate_size=F, tie_word_embeddings=tied)
    causal_lm = to_keras_llama(hf)
    assert causal_lm.backbone.token_embedding.tie_weights == tied
    loss, grads = hf_loss_and_gradients(hf, causal_lm, TOKEN_IDS, PADDING_MASK, SCORED)
    reference = {"loss": loss, "grads": grads}
    return tied, hf, causal_lm, reference


def training_step(causal_lm, loss=None):
    """Compiles the training loss and its gradients (``stateless_call(training=True)`` and the
    model's loss, or ``loss``, as `fit()` does): ``(HLO text, loss, {path: gradient})``."""
    import jax

    loss = causal_lm.loss if loss is None else loss

    trainable = [v.value for v in causal_lm.trainable_variables]
    non_trainable = [v.value for v in causal_lm.non_trainable_variables]

    def loss_fn(values):
        logits, _ = causal_lm.stateless_call(values, non_trainable, INPUTS, training=True)
        return loss(TOKEN_IDS[:, 1:], logits, sample_weight=SCORED.astype("float32"))

    lowered = jax.jit(jax.value_and_grad(loss_fn)).lower(trainable)
    loss, grads = lowered.compile()(trainable)
    paths = [v.path for v in causal_lm.trainable_variables]
    return lowered.as_text(), float(loss), {p: np.asarray(g) for p, g in zip(paths, grads)}


def grad_errors(grads, reference):
    return {p: np.abs(g - reference["grads"][p]).max() for p, g in grads.items()}


@pytest.fixture(scope="module")
def step(native, models):
    _, _, causal_lm, _ = models
    return training_step(causal_lm)


def test_training_step_equals_transformers(models, step):
    tied, _, causal_lm, reference = models
    text, loss, grads = step
    assert isinstance(causal_lm.loss, losses.SparseCategoricalCrossentropy)
    assert FORWARD_TARGET in text and BACKWARD_TARGET in text
    assert SWIGLU_TARGETS[0] in text and SWIGLU_TARGETS[1] in text
    # Every projection and the vocabulary head take the written-out VJPs.
    plan = causal_lm.execution_plan().training
    assert (plan.projections, plan.activation, plan.head) == (
        "training_matmuls",
        "native_swiglu",
        "training_matmuls",
    ), str(plan)

    np.testing.assert_allclose(loss, reference["loss"], rtol=0, atol=1e-5)
    assert len(grads) == 9 * LAYERS + (1 if tied else 2) + 1  # blocks, embeddings, final norm
    for path, error in grad_errors(grads, reference).items():
        size = np.abs(reference["grads"][path]).max()
        assert error <= 1e-4 and error <= 1e-4 * size, (path, error, size)
        assert size > 1e-2, path  # a real gradient


def test_model_comparison_catches_a_wrong_cross_entropy_gradient(models, step):
    # The comparison above bites: 1% off in the native backward kernel leaves the loss as it
    # was, not the gradients. (The model's loss, "mean_with_sample_weight", over a wrong copy.)
    _, _, causal_lm, reference = models
    wrong = make_cross_entropy(backward=lambda *args: cross_entropy_op.backward(*args) * 1.01)

    def wrong_loss(labels, logits, sample_weight):
        return (wrong(logits, labels) * sample_weight).sum() / sample_weight.sum()

    text, loss, grads = training_step(causal_lm, wrong_loss)
    assert BACKWARD_TARGET in text
    np.testing.assert_allclose(loss, reference["loss"], rtol=0, atol=1e-5)
    errors = grad_errors(grads, reference)
    assert min(errors.values()) > 1e-4, errors


def test_model_comparison_catches_a_wrong_weight(models, step):
    # The comparisons above bite (the ops' own halves are planted wrong at the kernel level):
    # 1% off in the first block's gate kernel moves the gradients past their tolerances.
    _, _, causal_lm, reference = models
    variable = causal_lm.backbone.transformer_layers[0]._feedforward_gate_dense.kernel
    original = variable.value
    try:
        variable.assign(original * 1.01)
        _, _, grads = training_step(causal_lm)
    finally:
        variable.assign(original)
    errors = grad_errors(grads, reference)
    gate = [p for p in errors if "feedforward_gate_dense" in p]
    assert gate and all(errors[p] > 1e-3 * np.abs(reference["grads"][p]).max() for p in gate)


# --- SwiGLU --------------------------------------------------------------------------------------
def reference_swiglu(gate, up, dout):
    """``silu(gate) * up`` and its gradients, in float64, by hand."""
    g, u, d = (np.asarray(a, "float64") for a in (gate, up, dout))
    s = 1.0 / (1.0 + np.exp(-g))
    return g * s * u, d * u * s * (1.0 + g * (1.0 - s)), d * g * s


@pytest.fixture(scope="module")
def native_swiglu():
    require_native("swiglu")


# Sizes around the kernel's 16 lanes and 16384-element work blocks.
@pytest.mark.parametrize("shape", [(1,), (15,), (17,), (3, 33), (2, 7, 96), (16384 + 17,)])
def test_swiglu_matches_float64(native_swiglu, shape):
    import jax

    rng = np.random.default_rng(sum(shape))
    gate = (rng.normal(0, 3, shape)).astype("float32")
    gate.flat[: min(3, gate.size)] = [-100.0, 100.0, 0.0][: min(3, gate.size)]  # saturation
    up, dout = (rng.normal(0, 1, shape).astype("float32") for _ in range(2))
    out, vjp = jax.jit(lambda g, u: jax.vjp(swiglu_op.swiglu, g, u))(gate, up)
    dgate, dup = vjp(dout)
    for actual, expected in zip((out, dgate, dup), reference_swiglu(gate, up, dout)):
        actual = np.asarray(actual)
        assert actual.dtype == np.float32 and actual.shape == shape
        scale = max(np.abs(expected).max(), 1e-30)
        np.testing.assert_allclose(actual, expected, rtol=0, atol=2e-6 * scale)


def test_swiglu_rejects_mismatched_shapes(native_swiglu):
    with pytest.raises(ValueError, match=r"gate.shape=\(2, 3\), up.shape=\(3, 2\)"):
        swiglu_op.swiglu(np.zeros((2, 3), "float32"), np.zeros((3, 2), "float32"))


def training_plan(**kwargs):
    backbone = LlamaBackbone(
        vocabulary_size=100, num_layers=1, num_query_heads=2, hidden_dim=16,
        intermediate_dim=8, num_key_value_heads=1, **kwargs,
    )  # fmt: skip
    return backbone, llama_plan.make_plan(backbone).training


def test_other_activations_and_dtypes_keep_keras_math(native_swiglu):
    import jax

    rng = np.random.default_rng(3)
    gate, up = (rng.normal(0, 2, (2, 5, 8)).astype("float32") for _ in range(2))
    backbone, plan = training_plan()
    assert plan.activation == "native_swiglu", str(plan)
    backbone, plan = training_plan(dtype="bfloat16")
    assert plan.activation == "layers" and "bfloat16" in str(plan), str(plan)
    block = backbone.transformer_layers[0]
    half = llama_strategies.gated_activation(block)(jax.numpy.asarray(gate, "bfloat16"), up)
    expected = reference_swiglu(gate, up, up)[0]
    np.testing.assert_allclose(np.asarray(half, "float32"), expected, rtol=2e-2, atol=2e-2)
    block.activation = keras.activations.relu  # a block whose activation is not SiLU
    relu = llama_strategies.gated_activation(block)
    np.testing.assert_allclose(relu(gate, up), np.maximum(gate, 0) * up, rtol=1e-6)


# --- fit() and LoRA on the training path ---------------------------------------------------------
def fit(causal_lm, epochs, learning_rate):
    causal_lm.compile(optimizer=keras.optimizers.Adam(learning_rate))
    history = causal_lm.fit(
        INPUTS,
        TOKEN_IDS[:, 1:],
        sample_weight=SCORED.astype("float32"),
        batch_size=2,
        epochs=epochs,
        shuffle=False,
        verbose=0,
    )
    return history.history["loss"]


def test_fit_runs_on_the_training_path_and_decreases_the_loss(native, models):
    tied, hf, _, reference = models
    causal_lm = to_keras_llama(hf)
    history = fit(causal_lm, epochs=4, learning_rate=3e-3)
    # The training step's plan takes the written-out VJPs for every projection; its loss is
    # ours, whose native path `test_training_step_equals_transformers` checks in the
    # compiled step.
    assert isinstance(causal_lm.loss, losses.SparseCategoricalCrossentropy)
    plan = causal_lm.execution_plan(build=False).training
    assert plan.projections == plan.head == "training_matmuls", str(plan)
    # One batch per epoch: the first epoch's loss is the loss before any update.
    np.testing.assert_allclose(history[0], reference["loss"], rtol=0, atol=1e-5)
    assert all(b < a for a, b in zip(history, history[1:])), history
    assert history[-1] < history[0] - 0.1, history


def test_lora_fit_keeps_frozen_weights(native, models):
    tied, hf, _, reference = models
    causal_lm = to_keras_llama(hf)
    causal_lm.backbone.enable_lora(2)
    frozen = {v.path: np.array(v) for v in causal_lm.non_trainable_variables}
    adapters = {v.path: np.array(v) for v in causal_lm.trainable_variables}
    assert adapters and all("lora" in path for path in adapters)
    history = fit(causal_lm, epochs=2, learning_rate=1e-2)
    # The adapted projections keep their layers (LoRA), so do the blocks' other projections
    # (a block runs one way); the frozen float vocabulary head keeps the fast path.
    plan = causal_lm.execution_plan(build=False).training
    assert plan.projections == "layers" and "LoRA" in str(plan), str(plan)
    assert plan.head == "training_matmuls", str(plan)
    np.testing.assert_allclose(history[0], reference["loss"], rtol=0, atol=1e-5)  # B = 0
    assert history[1] < history[0]
    for v in causal_lm.non_trainable_variables:
        np.testing.assert_array_equal(np.array(v), frozen[v.path], err_msg=v.path)
    changed = [p for p, v in adapters.items() if p.endswith("lora_kernel_b")]
    assert changed
    for v in causal_lm.trainable_variables:
        if v.path in changed:
            assert np.abs(np.array(v)).max() > 0, v.path


# --- the ReversibleEmbedding subclass against Keras's own layer -----------------------------------
def keras_quantization(mode):
    """Keras's own ``(mode, config)`` for one of our modes: int8 weights with float
    activations for "int8" and "int8_weight_only", int4 in blocks of 128 for "int4"."""
    if mode == "int4":
        return "int4", keras.quantizers.Int4QuantizationConfig(block_size=128)
    return "int8", keras.quantizers.Int8QuantizationConfig(activation_quantizer=None)


def plain_copy(embedding):
    """A `keras.layers.ReversibleEmbedding` with ``embedding``'s configuration and weights."""
    plain = keras.layers.ReversibleEmbedding(
        embedding.input_dim, embedding.output_dim, tie_weights=embedding.tie_weights
    )
    plain.build()
    plain.set_weights(embedding.get_weights())
    return plain


def hidden_and_logits(causal_lm):
    """``(hidden [2, 23, m], {training: logits [2, 23, vocab]})`` for the backbone's output
    and the model's logits in inference and in training, compiled together (one compilation
    instead of one per op)."""
    import jax

    trainable = [v.value for v in causal_lm.trainable_variables]
    non_trainable = [v.value for v in causal_lm.non_trainable_variables]
    backbone = causal_lm.backbone
    backbone_values = [
        [v.value for v in variables]
        for variables in (backbone.trainable_variables, backbone.non_trainable_variables)
    ]

    def call(trainable, non_trainable, backbone_values):
        hidden, _ = backbone.stateless_call(*backbone_values, INPUTS)
        logits = {}
        for training in (False, True):
            out, _ = causal_lm.stateless_call(trainable, non_trainable, INPUTS, training=training)
            logits[training] = out
        return hidden, logits

    return jax.jit(call)(trainable, non_trainable, backbone_values)


@pytest.mark.parametrize("mode", ["int8", "int8_weight_only", "int4"])
def test_quantized_embedding_equals_keras_layer(models, mode):
    tied, hf, _, _ = models
    causal_lm = to_keras_llama(hf)
    embedding = causal_lm.backbone.token_embedding
    assert isinstance(embedding, keras.layers.ReversibleEmbedding)
    assert type(embedding) is not keras.layers.ReversibleEmbedding
    plain = plain_copy(embedding)
    keras_mode, config = keras_quantization(mode)
    causal_lm.quantize(mode)
    plain.quantize(keras_mode, config=config)
    assert embedding.quantization_mode == plain.quantization_mode == keras_mode
    assert embedding.inputs_quantizer is None and plain.inputs_quantizer is None
    assert [v.path.split("/")[-1] for v in embedding.weights] == [
        v.path.split("/")[-1] for v in plain.weights
    ]
    for ours, theirs in zip(embedding.weights, plain.weights):
        np.testing.assert_array_equal(np.array(ours), np.array(theirs), err_msg=ours.path)

    hidden, logits = hidden_and_logits(causal_lm)
    expected = np.asarray(plain(hidden, reverse=True))
    assert np.abs(expected).max() > 1.0
    for training, actual in logits.items():
        np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-5, err_msg=str(training))
    np.testing.assert_array_equal(
        np.asarray(embedding(TOKEN_IDS, training=True)), np.asarray(plain(TOKEN_IDS))
    )


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_training_head_equals_keras_layer(tied):
    # The training plan's vocabulary head (`training_matmuls`: written-out VJPs) against
    # Keras's own ReversibleEmbedding: value, weight and input gradients.
    import jax

    keras.utils.set_random_seed(0)
    ours = llama_layers.ReversibleEmbedding(
        37, 16, embeddings_initializer="normal", tie_weights=tied
    )
    ours.build()
    theirs = keras.layers.ReversibleEmbedding(37, 16, tie_weights=tied)
    theirs.build()
    theirs.set_weights(ours.get_weights())
    x = np.random.default_rng(1).normal(0, 1, (2, 3, 16)).astype("float32")
    head = StagePlan("training", (Choice("head", "training_matmuls", "under test"),))

    def loss_and_grads(layer, project):
        def fn(values, x):
            with keras.StatelessScope(state_mapping=list(zip(layer.trainable_variables, values))):
                logits = project(x)
            return (logits * np.arange(37, dtype="float32")).sum() / 100

        values = [v.value for v in layer.trainable_variables]
        return jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(values, x)

    value, (grads, dx) = loss_and_grads(
        ours, lambda h: llama_plan.project_to_vocabulary(head, ours, h)
    )
    expected, (expected_grads, expected_dx) = loss_and_grads(
        theirs, lambda h: theirs(h, reverse=True)
    )
    np.testing.assert_allclose(value, expected, rtol=1e-6)
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-6, atol=1e-6)
    assert len(grads) == len(expected_grads) == (1 if tied else 2)
    for g, e in zip(grads, expected_grads):
        np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-6)


def test_weights_file_names_the_embedding_as_keras_does(models, tmp_path):
    # Keras names a layer's entries in .weights.h5 after its class: KerasHub's files name the
    # embedding "reversible_embedding", and ours must too.
    tied, _, causal_lm, _ = models
    path = tmp_path / "backbone.weights.h5"
    causal_lm.backbone.save_weights(path)
    embedding = causal_lm.backbone.token_embedding
    with h5py.File(path, "r") as f:
        group = f["layers/reversible_embedding/vars"]
        assert sorted(group) == (["0"] if tied else ["0", "1"])
        np.testing.assert_array_equal(group["0"][()], np.array(embedding.embeddings))
        if not tied:
            np.testing.assert_array_equal(group["1"][()], np.array(embedding.reverse_embeddings))


# --- mutations at the kernel level, opting out, compile() -----------------------------------------
def test_comparisons_catch_a_wrong_cross_entropy_or_swiglu_kernel(native, native_swiglu):
    # The float64 comparisons bite: 1% off in a forward or backward kernel fails them.
    import jax

    logits, labels, grad = random_problem("n67_v100")
    wrong = {
        "forward": make_cross_entropy(
            forward=lambda *a: (
                cross_entropy_op.forward(*a)[0] * 1.01,
                cross_entropy_op.forward(*a)[1],
            )
        ),
        "backward": make_cross_entropy(backward=lambda *a: cross_entropy_op.backward(*a) * 1.01),
    }
    for name, op in wrong.items():
        loss, dlogits = loss_and_gradient(op, logits, labels, grad)
        with pytest.raises(AssertionError, match="loss error" if name == "forward" else "gradient"):
            assert_cross_entropy(loss, dlogits, logits, labels, grad)

    gate, up, dout = (
        np.random.default_rng(i).normal(0, 2, (3, 33)).astype("float32") for i in range(3)
    )
    expected = reference_swiglu(gate, up, dout)
    op = make_swiglu(
        backward=lambda *a: (swiglu_op.backward(*a)[0], swiglu_op.backward(*a)[1] * 1.01)
    )
    out, vjp = jax.vjp(op, gate, up)
    dgate, dup = vjp(dout)
    np.testing.assert_allclose(out, expected[0], rtol=0, atol=2e-6 * np.abs(expected[0]).max())
    np.testing.assert_allclose(dgate, expected[1], rtol=0, atol=2e-6 * np.abs(expected[1]).max())
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(dup, expected[2], rtol=0, atol=2e-6 * np.abs(expected[2]).max())


def test_opting_out_plans_keras_math(native_swiglu, monkeypatch):
    monkeypatch.setenv("KERAS_LLAMA_KERNELS", "0")
    _, plan = training_plan()
    assert plan.activation == "layers" and plan.attention != "native", str(plan)
    assert "KERAS_LLAMA_KERNELS=0" in str(plan)


TRAINING_LIBRARIES = ("attention", "cross_entropy", "swiglu")


def test_compile_builds_the_training_libraries_in_the_background(monkeypatch):
    # `compile()` starts the build of the attention, cross-entropy and SwiGLU libraries (or
    # finds them loaded): none is left "not built yet"; an opted-out process builds nothing.
    causal_lm = to_keras_llama(make_hf_model("gqa"))
    with monkeypatch.context() as m:
        m.setenv("KERAS_LLAMA_KERNELS", "0")
        causal_lm.compile()
        for name in TRAINING_LIBRARIES:
            assert "disabled by KERAS_LLAMA_KERNELS=0" in kernels.library(name).status().reason
    causal_lm.compile()
    for name in TRAINING_LIBRARIES:
        status = kernels.library(name).status()
        assert status.reason in ("built and loaded", "building in the background"), (name, status)
    for name in TRAINING_LIBRARIES:
        require_native(name)  # joins the background build
        assert kernels.library(name).status().available is True
