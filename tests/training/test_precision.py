"""Reduced precision: bfloat16/float16 logits within documented tolerances of float32
(transformers), norms/softmax/loss kept in float32, a mixed-precision training step.

Documented tolerances (tiny random model, logits of magnitude ~2): ``bfloat16`` and
``mixed_bfloat16`` (8-bit mantissa) stay within 5% of the largest float32 logit with cosine
>= 0.995; ``float16``/``mixed_float16`` (11-bit mantissa) within 1% and cosine >= 0.9999.
"""

import keras
import numpy as np
import pytest
from keras import ops

from tests.hf_reference import hf_logits, make_hf_model, to_keras_llama

TOKEN_IDS = np.array([[5, 17, 42, 9, 77, 3, 61, 28], [8, 33, 2, 95, 40, 71, 0, 0]], "int32")
PADDING_MASK = np.array([[1] * 8, [1] * 6 + [0] * 2], "int32")
X = {"token_ids": TOKEN_IDS, "padding_mask": PADDING_MASK}
TOLERANCES = {  # dtype -> (max |diff| / max |float32 logit|, min cosine)
    "bfloat16": (0.05, 0.995),
    "mixed_bfloat16": (0.05, 0.995),
    "float16": (0.01, 0.9999),
    "mixed_float16": (0.01, 0.9999),
}


@pytest.fixture(scope="module")
def hf():
    return make_hf_model("gqa", seed=11)


@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_reduced_precision_logits_within_documented_tolerance(hf, dtype):
    causal_lm = to_keras_llama(hf, dtype=dtype)
    variable_dtype = "float32" if dtype.startswith("mixed") else dtype
    assert {v.dtype for v in causal_lm.weights} == {variable_dtype}
    logits = causal_lm(X)
    assert keras.backend.standardize_dtype(logits.dtype) == dtype.replace("mixed_", "")
    ours = ops.convert_to_numpy(ops.cast(logits, "float32"))[PADDING_MASK.astype(bool)]
    reference = hf_logits(hf, TOKEN_IDS, PADDING_MASK)[PADDING_MASK.astype(bool)]
    relative, min_cosine = TOLERANCES[dtype]
    assert np.abs(ours - reference).max() <= relative * np.abs(reference).max()
    cosine = (ours * reference).sum(-1) / np.linalg.norm(ours, axis=-1)
    cosine /= np.linalg.norm(reference, axis=-1)
    assert cosine.min() >= min_cosine


def test_norm_and_loss_run_in_float32_under_mixed_bfloat16(hf):
    causal_lm = to_keras_llama(hf, dtype="mixed_bfloat16")
    # The RMS norm of bf16 inputs is computed in float32: equal to numpy's float32 result
    # rounded once to bfloat16.
    norm = causal_lm.backbone.layer_norm
    x = ops.cast(np.random.default_rng(0).normal(0, 3, (2, 4, 32)), "bfloat16")
    x32 = ops.convert_to_numpy(ops.cast(x, "float32"))
    expected = x32 / np.sqrt((x32**2).mean(-1, keepdims=True) + norm.epsilon)
    expected = ops.cast(ops.cast(expected, "bfloat16"), "float32") * np.asarray(norm.scale)
    np.testing.assert_allclose(ops.convert_to_numpy(ops.cast(norm(x), "float32")),
                               ops.convert_to_numpy(expected), rtol=1e-2)  # fmt: skip
    # The loss is computed in float32 from the bfloat16 logits (upcast, as transformers does).
    logits = causal_lm(X)
    y, w = TOKEN_IDS[:, 1:], PADDING_MASK[:, 1:]
    loss = causal_lm.loss(y, logits[:, :-1], sample_weight=w)
    assert keras.backend.standardize_dtype(loss.dtype) == "float32"
    z = ops.convert_to_numpy(ops.cast(logits[:, :-1], "float32")).astype("float64")
    z = z - z.max(-1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, y[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(loss), (nll * w).sum() / w.sum(), rtol=1e-5)


def test_mixed_bfloat16_training_step_updates_float32_weights(hf):
    causal_lm = to_keras_llama(hf, dtype="mixed_bfloat16")
    causal_lm.compile(optimizer=keras.optimizers.Adam(1e-2))
    before = np.array(causal_lm.backbone.token_embedding.embeddings)
    x = {"token_ids": TOKEN_IDS[:, :-1], "padding_mask": PADDING_MASK[:, :-1]}
    history = causal_lm.fit(x, TOKEN_IDS[:, 1:], sample_weight=PADDING_MASK[:, 1:], epochs=2,
                            batch_size=2, verbose=0)  # fmt: skip
    losses = history.history["loss"]
    assert np.isfinite(losses).all() and losses[1] < losses[0]
    after = causal_lm.backbone.token_embedding.embeddings
    assert after.dtype == "float32" and not np.array_equal(np.array(after), before)
