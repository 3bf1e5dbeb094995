"""Per-row sampling against values worked out by hand (and a sampling-frequency check)."""

import numpy as np
from keras import ops

from keras_llama.samplers.row_sampler import (
    RowSampler,
    RowSettings,
    apply_penalties,
    filter_logits,
    token_logprobs,
    uniform_noise,
)

# Probabilities 0.5, 0.25, 0.15, 0.1 (logits are their logs).
PROBS = np.array([0.5, 0.25, 0.15, 0.1], "float32")
LOGITS = np.log(PROBS)


def kept(top_k=0, top_p=1.0, min_p=0.0):
    out = filter_logits(
        ops.convert_to_tensor(LOGITS[None]),
        np.array([top_k], "int32"),
        np.array([top_p], "float32"),
        np.array([min_p], "float32"),
    )
    return np.isfinite(ops.convert_to_numpy(out)[0]).tolist()


def test_filters_keep_the_sets_worked_out_by_hand():
    assert kept() == [True, True, True, True]
    assert kept(top_k=2) == [True, True, False, False]
    # Nucleus: mass before each token is 0, .5, .75, .9; p = .7 keeps the first two.
    assert kept(top_p=0.7) == [True, True, False, False]
    assert kept(top_p=0.8) == [True, True, True, False]
    assert kept(top_p=0.01) == [True, False, False, False]  # the top token always stays
    # min_p = .4: keep p >= .4 * .5 = .2.
    assert kept(min_p=0.4) == [True, True, False, False]
    assert kept(top_k=3, top_p=0.7, min_p=0.25) == [True, True, False, False]


def test_rows_keep_their_own_settings():
    logits = np.stack([LOGITS, LOGITS[::-1]])
    out = filter_logits(
        ops.convert_to_tensor(logits),
        np.array([1, 0], "int32"),
        np.array([1.0, 0.8], "float32"),
        np.array([0.0, 0.0], "float32"),
    )
    finite = np.isfinite(ops.convert_to_numpy(out))
    assert finite.tolist() == [[True, False, False, False], [False, True, True, True]]


def test_penalties_as_openai_defines_them():
    logits = np.zeros((1, 4), "float32")
    counts = np.array([[0, 1, 3, 0]], "int32")
    out = apply_penalties(logits, counts, np.array([0.5], "float32"), np.array([0.25], "float32"))
    np.testing.assert_allclose(ops.convert_to_numpy(out), [[0.0, -0.75, -1.25, 0.0]])


def test_greedy_rows_take_the_argmax_after_penalties():
    sampler = RowSampler()
    logits = np.array([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0]], "float32")
    counts = np.array([[0, 0, 0], [0, 2, 0]], "int32")
    settings = RowSettings.make([{}, {"frequency_penalty": 1.0}])
    tokens = sampler.next_tokens(logits, counts, settings, np.zeros(2, "int32"))
    assert ops.convert_to_numpy(tokens).tolist() == [1, 2]  # 3 - 2 * 1 < 2


def test_sampling_frequencies_follow_the_distribution_and_seeds_repeat():
    sampler = RowSampler()
    n = 4000
    logits = np.tile(LOGITS, (n, 1))
    settings = RowSettings.make([{"temperature": 1.0, "seed": 7}] * n)
    steps = np.arange(n, dtype="int32")  # one row per step of one seeded stream
    counts = np.zeros((n, 4), "int32")
    tokens = ops.convert_to_numpy(sampler.next_tokens(logits, counts, settings, steps))
    freq = np.bincount(tokens, minlength=4) / n
    # Binomial standard error <= sqrt(.25 / 4000) = .008: 4 sigma.
    np.testing.assert_allclose(freq, PROBS, atol=0.032)
    again = ops.convert_to_numpy(sampler.next_tokens(logits, counts, settings, steps))
    np.testing.assert_array_equal(tokens, again)
    other = RowSettings.make([{"temperature": 1.0, "seed": 8}] * n)
    assert (ops.convert_to_numpy(sampler.next_tokens(logits, counts, other, steps)) != tokens).any()


def test_uniform_noise_is_in_the_open_interval_and_uniform():
    u = ops.convert_to_numpy(uniform_noise(np.arange(8, dtype="int32"), np.zeros(8, "int32"), 5000))
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005


def test_logprobs_of_the_model_distribution():
    chosen, top_ids, top_lps = token_logprobs(LOGITS[None], np.array([2]), k=3)
    np.testing.assert_allclose(ops.convert_to_numpy(chosen), np.log([0.15]), rtol=1e-5)
    assert ops.convert_to_numpy(top_ids).tolist() == [[0, 1, 2]]
    np.testing.assert_allclose(
        ops.convert_to_numpy(top_lps), np.log([[0.5, 0.25, 0.15]]), rtol=1e-5
    )
