"""keras_llama.losses.SparseCategoricalCrossentropy against Keras's own loss (values, reductions,
gradients) and hand-worked values."""

import math

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from keras_llama import losses
from keras_llama.models import LlamaBackbone, LlamaCausalLM


def _data(seed=0, shape=(2, 5), vocab=13):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((*shape, vocab)).astype("float32") * 3
    labels = rng.integers(0, vocab, shape).astype("int32")
    weights = (rng.random(shape) > 0.3).astype("float32")
    return logits, labels, weights


def test_hand_worked_value():
    loss = losses.SparseCategoricalCrossentropy(from_logits=True)
    assert float(loss(np.array([1]), np.array([[0.0, 0.0]]))) == pytest.approx(
        math.log(2), rel=1e-6
    )
    # logits (0, log 3): p(label 1) = 3/4
    assert float(loss(np.array([1]), np.array([[0.0, math.log(3)]]))) == pytest.approx(
        -math.log(0.75), rel=1e-6
    )


@pytest.mark.parametrize(
    "reduction", ["sum_over_batch_size", "mean_with_sample_weight", "sum", None]
)
def test_values_and_reductions_equal_keras(reduction):
    logits, labels, weights = _data()
    ours = losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction)
    ref = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction)
    for sample_weight in (None, weights):
        np.testing.assert_allclose(
            np.asarray(ours(labels, logits, sample_weight=sample_weight)),
            np.asarray(ref(labels, logits, sample_weight=sample_weight)),
            rtol=1e-5,
            atol=1e-6,
        )
    # Labels with a trailing axis of 1, as Keras accepts them.
    np.testing.assert_allclose(
        np.asarray(ours(labels[..., None], logits)), np.asarray(ref(labels[..., None], logits)),
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip


def test_gradient_equals_keras_and_softmax_minus_one_hot():
    logits, labels, weights = _data(1)
    ours = losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")
    ref = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")
    g_ours = jax.grad(lambda z: ours(labels, z, sample_weight=weights))(jnp.asarray(logits))
    g_ref = jax.grad(lambda z: ref(labels, z, sample_weight=weights))(jnp.asarray(logits))
    np.testing.assert_allclose(np.asarray(g_ours), np.asarray(g_ref), rtol=1e-5, atol=1e-6)
    # By hand: (softmax - one_hot) * weight.
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    p[np.arange(2)[:, None], np.arange(5)[None], labels] -= 1
    np.testing.assert_allclose(np.asarray(g_ours), p * weights[..., None], rtol=1e-5, atol=1e-6)


def test_other_settings_fall_back_to_keras():
    logits, labels, _ = _data(2)
    probs = np.asarray(keras.ops.softmax(logits))
    for kwargs, y_pred in [({"from_logits": False}, probs), ({"ignore_class": 3, "from_logits": True}, logits)]:  # fmt: skip
        ours = losses.SparseCategoricalCrossentropy(**kwargs)
        ref = keras.losses.SparseCategoricalCrossentropy(**kwargs)
        np.testing.assert_allclose(
            np.asarray(ours(labels, y_pred)), np.asarray(ref(labels, y_pred)), rtol=1e-5
        )


def test_serialization_round_trip():
    loss = losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum", name="x")
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(restored) is losses.SparseCategoricalCrossentropy
    assert restored.get_config() == loss.get_config()


def test_compile_swaps_keras_loss_for_the_equivalent():
    backbone = LlamaBackbone(
        vocabulary_size=50, num_layers=1, num_query_heads=2, num_key_value_heads=1,
        hidden_dim=16, intermediate_dim=32,
    )  # fmt: skip
    causal_lm = LlamaCausalLM(backbone)
    keras_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")
    causal_lm.compile(loss=keras_loss)
    assert type(causal_lm.loss) is losses.SparseCategoricalCrossentropy
    assert causal_lm.loss.get_config() == keras_loss.get_config()
    causal_lm.compile()  # "auto"
    assert type(causal_lm.loss) is losses.SparseCategoricalCrossentropy
    assert causal_lm.loss.reduction == "mean_with_sample_weight"
    other = keras.losses.MeanSquaredError()
    causal_lm.compile(loss=other)
    assert causal_lm.loss is other
