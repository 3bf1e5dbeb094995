"""The training loss, its gradients and score() against transformers on the same weights."""

import numpy as np
import pytest
from keras import ops

from tests.hf_reference import make_hf_model, to_keras_llama

# Two rows; the second is right-padded (its last 3 positions are padding).
TOKEN_IDS = np.array([[5, 17, 42, 9, 77, 3, 61, 28, 14], [8, 33, 2, 95, 40, 71, 0, 0, 0]])
PADDING_MASK = np.array([[1] * 9, [1] * 6 + [0] * 3])


@pytest.fixture(scope="module")
def models():
    hf = make_hf_model("gqa", seed=3)
    return hf, to_keras_llama(hf)


def keras_batch():
    """Inputs, next-token labels and their weights as the preprocessor makes them."""
    x = {"token_ids": TOKEN_IDS[:, :-1], "padding_mask": PADDING_MASK[:, :-1]}
    return x, TOKEN_IDS[:, 1:], PADDING_MASK[:, 1:]


def hf_loss_and_grads(hf):
    import torch

    hf.zero_grad()
    # transformers shifts the labels itself (position t is scored against labels[t + 1]);
    # padding gets -100. The last position's logits are not used, as our x drops that token.
    labels = torch.as_tensor(np.where(PADDING_MASK, TOKEN_IDS, -100))
    out = hf(input_ids=torch.as_tensor(TOKEN_IDS), attention_mask=torch.as_tensor(PADDING_MASK),
             labels=labels)  # fmt: skip
    out.loss.backward()
    return out.loss.item(), {k: p.grad.numpy().copy() for k, p in hf.named_parameters()}


def test_loss_equals_transformers_with_padding_masked(models):
    hf, causal_lm = models
    reference, _ = hf_loss_and_grads(hf)
    x, y, sample_weight = keras_batch()
    loss = causal_lm.evaluate(x, y, sample_weight=sample_weight, batch_size=2, verbose=0,
                              return_dict=True)["loss"]  # fmt: skip
    np.testing.assert_allclose(loss, reference, rtol=0, atol=1e-5)
    # 13 of the 16 positions are real: a mean over all 16 (padding counted) would differ.
    assert abs(loss * 13 / 16 - reference) > 0.1


def test_gradients_equal_transformers(models):
    import jax

    hf, causal_lm = models
    _, hf_grads = hf_loss_and_grads(hf)
    x, y, sample_weight = keras_batch()
    trainable = [v.value for v in causal_lm.trainable_variables]
    non_trainable = [v.value for v in causal_lm.non_trainable_variables]

    def loss_fn(values):
        logits, _ = causal_lm.stateless_call(values, non_trainable, x)
        return causal_lm.loss(y, logits, sample_weight=sample_weight)

    grads = jax.grad(loss_fn)(trainable)
    grads = {v.path: np.asarray(g) for v, g in zip(causal_lm.trainable_variables, grads)}
    m, u, v, h = 32, 4, 2, 8
    expected = {
        # ours: [vocab, hidden] embedding, tied=False so the output projection is separate.
        "token_embedding/embeddings": hf_grads["model.embed_tokens.weight"],
        "token_embedding/reverse_embeddings": hf_grads["lm_head.weight"].T,
        # q_proj.weight [u * h, m] -> query kernel [m, u, h]
        "transformer_layer_0/self_attention/query/kernel":
            hf_grads["model.layers.0.self_attn.q_proj.weight"].T.reshape(m, u, h),
        "transformer_layer_1/self_attention/value/kernel":
            hf_grads["model.layers.1.self_attn.v_proj.weight"].T.reshape(m, v, h),
        "transformer_layer_1/self_attention/attention_output/kernel":
            hf_grads["model.layers.1.self_attn.o_proj.weight"].T.reshape(u, h, m),
        "transformer_layer_0/feedforward_gate_dense/kernel":
            hf_grads["model.layers.0.mlp.gate_proj.weight"].T,
        "transformer_layer_1/feedforward_output_dense/kernel":
            hf_grads["model.layers.1.mlp.down_proj.weight"].T,
        "transformer_layer_0/self_attention_layernorm/scale":
            hf_grads["model.layers.0.input_layernorm.weight"],
        "sequence_output_layernorm/scale": hf_grads["model.norm.weight"],
    }  # fmt: skip
    for path, reference in expected.items():
        np.testing.assert_allclose(grads[path], reference, rtol=0, atol=1e-4, err_msg=path)
        assert np.abs(reference).max() > 1e-3, path  # a real gradient, not zeros


def test_score_per_token_loss_equals_transformers_cross_entropy(models):
    import torch

    hf, causal_lm = models
    with torch.no_grad():
        logits = hf(input_ids=torch.as_tensor(TOKEN_IDS),
                    attention_mask=torch.as_tensor(PADDING_MASK)).logits  # fmt: skip
        reference = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), torch.as_tensor(TOKEN_IDS[:, 1:]), reduction="none"
        ).numpy()
    x, y, _ = keras_batch()
    loss = ops.convert_to_numpy(
        causal_lm.score(x["token_ids"], x["padding_mask"], scoring_mode="loss", target_ids=y)
    )
    real = PADDING_MASK[:, 1:].astype(bool)
    np.testing.assert_allclose(loss[real], reference[real], rtol=0, atol=1e-5)
    score_logits = causal_lm.score(x["token_ids"], x["padding_mask"])
    np.testing.assert_allclose(
        ops.convert_to_numpy(score_logits)[real], logits[:, :-1].numpy()[real], atol=1e-4
    )


def test_score_layer_intercept_fn_sees_every_layer(models):
    _, causal_lm = models
    x, _, _ = keras_batch()
    seen = []

    def intercept(hidden, i):
        seen.append(i)
        return hidden * 0 if i == 1 else hidden  # zero the last block's output

    logits = ops.convert_to_numpy(causal_lm.score(x["token_ids"], layer_intercept_fn=intercept))
    assert seen == [-1, 0, 1]
    # RMS norm of zeros is zeros, so every position gets all-zero logits.
    np.testing.assert_allclose(logits, 0, atol=1e-6)


def test_perplexity_is_exp_of_transformers_loss(models):
    hf, causal_lm = models
    reference, _ = hf_loss_and_grads(hf)
    ppl = causal_lm.perplexity(TOKEN_IDS, padding_mask=PADDING_MASK)
    np.testing.assert_allclose(ppl, np.exp(reference), rtol=1e-5)
    per_row = causal_lm.perplexity(TOKEN_IDS, padding_mask=PADDING_MASK, per_sequence=True)
    assert per_row.shape == (2,) and min(per_row) < ppl < max(per_row)


def test_score_errors(models):
    _, causal_lm = models
    with pytest.raises(ValueError, match="scoring_mode"):
        causal_lm.score(TOKEN_IDS, scoring_mode="probs")
    with pytest.raises(ValueError, match="target_ids=None"):
        causal_lm.score(TOKEN_IDS, scoring_mode="loss")
    with pytest.raises(ValueError, match=r"shape \[batch, seq\]"):
        causal_lm.score(TOKEN_IDS[0])
