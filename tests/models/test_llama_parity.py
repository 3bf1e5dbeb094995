"""Logits of LlamaCausalLM against transformers' LlamaForCausalLM on the same random weights."""

import numpy as np
import pytest
from keras.ops import convert_to_numpy

from tests.hf_reference import CONFIGS, hf_logits, make_hf_model, to_keras_llama

ATOL = 1e-4


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
    hf = make_hf_model(request.param)
    return request.param, hf, to_keras_llama(hf)


def _batch(seed=0, batch=2, length=12, vocab=100):
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, size=(batch, length)).astype("int32")


def test_logits_match_transformers(pair):
    name, hf, ours = pair
    ids = _batch(length=40 if name == "llama31_rope" else 12)
    ours_logits = convert_to_numpy(ours({"token_ids": ids, "padding_mask": np.ones_like(ids)}))
    ref = hf_logits(hf, ids)
    assert ours_logits.shape == ref.shape
    np.testing.assert_allclose(ours_logits, ref, atol=ATOL, rtol=0)


def test_right_padding_does_not_change_real_positions(pair):
    _, hf, ours = pair
    ids = _batch(seed=1)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    ours_logits = convert_to_numpy(ours({"token_ids": ids, "padding_mask": mask}))
    ref = hf_logits(hf, ids[1:, :7])
    np.testing.assert_allclose(ours_logits[1, :7], ref[0], atol=ATOL, rtol=0)


def test_cached_decoding_matches_full_forward(pair):
    _, _, ours = pair
    ids = _batch(seed=2, length=9)
    full = convert_to_numpy(ours({"token_ids": ids, "padding_mask": np.ones_like(ids)}))
    cache = ours._build_cache(2, 12)
    # Prefill 4 tokens at once, then one token at a time.
    logits, _, cache = ours.call_with_cache(ids[:, :4], cache, 0)
    steps = [convert_to_numpy(logits)]
    for t in range(4, 9):
        logits, hidden, cache = ours.call_with_cache(ids[:, t : t + 1], cache, t)
        steps.append(convert_to_numpy(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=ATOL, rtol=0)
    assert tuple(hidden.shape) == (2, 1, ours.backbone.hidden_dim)


def test_parameter_count_equals_transformers(pair):
    _, hf, ours = pair
    assert ours.backbone.count_params() == sum(p.numel() for p in hf.parameters())
