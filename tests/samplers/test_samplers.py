"""Samplers on fixed distributions, against probabilities worked out by hand."""

import numpy as np
import pytest
from keras import ops

from keras_llama import samplers

# A fixed next-token distribution over 6 tokens (no ties, so top-k/top-p sets are unambiguous).
PROBS = np.array([0.04, 0.08, 0.13, 0.2, 0.25, 0.3])
LOGITS = np.log(PROBS)
N = 20000  # samples per goodness-of-fit test
# Chi-square critical values at significance 0.001 by degrees of freedom (statistical tables).
CHI2_CRIT_0001 = {1: 10.828, 2: 13.816, 5: 20.515}


def _draw(sampler, logits=LOGITS, n=N):
    """``n`` draws from ``sampler`` on the same distribution (one batched call)."""
    probabilities = sampler.compute_probabilities(np.tile(logits, (n, 1)).astype("float32"))
    return np.asarray(ops.convert_to_numpy(sampler.get_next_token(probabilities)))


def _assert_fits(samples, expected):
    """Chi-square goodness of fit of ``samples`` to ``expected`` probabilities (zeros must
    never be drawn)."""
    counts = np.bincount(samples, minlength=len(expected))
    support = expected > 0
    assert counts[~support].sum() == 0, counts
    observed, want = counts[support], expected[support] * len(samples)
    chi2 = ((observed - want) ** 2 / want).sum()
    assert chi2 < CHI2_CRIT_0001[support.sum() - 1], (chi2, counts)


def test_random_sampler_frequencies_fit_softmax():
    _assert_fits(_draw(samplers.RandomSampler(seed=1)), PROBS)


def test_goodness_of_fit_detects_a_wrong_distribution():
    # The check is not vacuous: uniform draws fail it.
    uniform = np.random.default_rng(0).integers(0, 6, N)
    with pytest.raises(AssertionError):
        _assert_fits(uniform, PROBS)


def test_temperature_scales_logits():
    # softmax(log(p) / T) is p ** (1 / T), renormalised.
    for temperature in (0.5, 2.0):
        expected = PROBS ** (1 / temperature)
        expected /= expected.sum()
        sampler = samplers.RandomSampler(seed=2, temperature=temperature)
        _assert_fits(_draw(sampler), expected)
    # Worked example: logits [0, ln 2] give [1/3, 2/3]; at T=0.5, [1/5, 4/5].
    logits = np.array([[0.0, np.log(2.0)]], "float32")
    np.testing.assert_allclose(
        ops.convert_to_numpy(samplers.GreedySampler().compute_probabilities(logits)),
        [[1 / 3, 2 / 3]],
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(samplers.GreedySampler(temperature=0.5).compute_probabilities(logits)),
        [[1 / 5, 4 / 5]],
        rtol=1e-6,
    )


def test_top_k_samples_the_renormalised_top_k():
    expected = np.where(PROBS >= 0.2, PROBS, 0.0)  # the 3 most probable: 0.2, 0.25, 0.3
    _assert_fits(_draw(samplers.TopKSampler(k=3, seed=3)), expected / expected.sum())


def test_top_p_samples_the_smallest_set_reaching_p():
    # Sorted: 0.3, 0.25, 0.2, ... Cumulative before each: 0, 0.3, 0.55: p=0.5 keeps two.
    expected = np.where(PROBS >= 0.25, PROBS, 0.0)
    _assert_fits(_draw(samplers.TopPSampler(p=0.5, seed=4)), expected / expected.sum())
    # With k=2 first, p=1 keeps exactly those two.
    _assert_fits(_draw(samplers.TopPSampler(p=1.0, k=2, seed=5)), expected / expected.sum())


def test_degenerate_settings_are_greedy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 50)).astype("float32")
    argmax = logits.argmax(-1)
    for sampler in (
        samplers.GreedySampler(),
        samplers.TopKSampler(k=1, seed=0),
        samplers.TopPSampler(p=1e-9, seed=0),
        samplers.RandomSampler(seed=0, temperature=1e-4),
    ):
        picked = ops.convert_to_numpy(sampler.get_next_token(sampler.compute_probabilities(logits)))
        np.testing.assert_array_equal(picked, argmax, err_msg=repr(sampler))


def test_same_seed_reproduces_and_state_advances():
    a = _draw(samplers.TopKSampler(k=4, seed=11), n=200)
    b = _draw(samplers.TopKSampler(k=4, seed=11), n=200)
    np.testing.assert_array_equal(a, b)
    assert (a != _draw(samplers.TopKSampler(k=4, seed=12), n=200)).any()
    sampler = samplers.RandomSampler(seed=11)
    first, second = _draw(sampler, n=200), _draw(sampler, n=200)
    assert (first != second).any()  # the seed generator moves on between calls


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: samplers.TopKSampler(k=0), r"`k` must be a positive integer. Received: k=0"),
        (lambda: samplers.TopKSampler(k=2.5), r"Received: k=2.5"),
        (lambda: samplers.TopPSampler(p=0), r"`p` must be a number in \(0, 1\]. Received: p=0"),
        (lambda: samplers.TopPSampler(p=1.5), r"Received: p=1.5"),
        (lambda: samplers.TopPSampler(k=0), r"Received: k=0"),
        (lambda: samplers.GreedySampler(temperature=0), r"Received: temperature=0"),
        (lambda: samplers.RandomSampler(temperature=-1.0), r"Received: temperature=-1.0"),
        (lambda: samplers.BeamSampler(num_beams=0), r"Received: num_beams=0"),
        (lambda: samplers.ContrastiveSampler(alpha=1.5), r"Received: alpha=1.5"),
        (lambda: samplers.ContrastiveSampler(k=0), r"Received: k=0"),
        (lambda: samplers.RandomSampler(seed="x"), r"Received: seed='x'"),
    ],
)
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_get_by_name_and_unknown_name():
    expected = {
        "greedy": samplers.GreedySampler,
        "random": samplers.RandomSampler,
        "top_k": samplers.TopKSampler,
        "top_p": samplers.TopPSampler,
        "beam": samplers.BeamSampler,
        "contrastive": samplers.ContrastiveSampler,
    }
    for name, cls in expected.items():
        assert type(samplers.get(name)) is cls
    with pytest.raises(
        ValueError,
        match="Unknown sampler 'topk'. Valid names: beam, contrastive, greedy, random, top_k, top_p",
    ):
        samplers.get("topk")
    with pytest.raises(ValueError, match="Could not interpret"):
        samplers.get(3)
    sampler = samplers.TopKSampler(k=2)
    assert samplers.get(sampler) is sampler and samplers.get(None) is None
    assert type(samplers.get(samplers.BeamSampler)) is samplers.BeamSampler


def test_defaults_match_keras_hub():
    assert samplers.TopKSampler().get_config() == {"temperature": 1.0, "k": 5, "seed": None}
    assert samplers.TopPSampler().get_config() == {
        "temperature": 1.0,
        "p": 0.1,
        "k": None,
        "seed": None,
    }
    assert samplers.BeamSampler().get_config() == {
        "temperature": 1.0,
        "num_beams": 5,
        "return_all_beams": False,
    }
    assert samplers.ContrastiveSampler().get_config() == {
        "temperature": 1.0,
        "k": 5,
        "alpha": 0.6,
        "seed": None,
    }


@pytest.mark.parametrize(
    "sampler",
    [
        samplers.GreedySampler(temperature=0.7),
        samplers.RandomSampler(seed=3),
        samplers.TopKSampler(k=7, seed=1, temperature=0.9),
        samplers.TopPSampler(p=0.8, k=20),
        samplers.BeamSampler(num_beams=3, return_all_beams=True),
        samplers.ContrastiveSampler(k=3, alpha=0.4),
    ],
    ids=lambda s: type(s).__name__,
)
def test_serialize_round_trip(sampler):
    config = samplers.serialize(sampler)
    restored = samplers.deserialize(config)
    assert type(restored) is type(sampler) and restored.get_config() == sampler.get_config()
    assert samplers.get(config).get_config() == sampler.get_config()


def test_deserialize_keras_hub_config():
    # What `keras_hub.samplers.serialize(TopKSampler(k=3))` writes.
    config = {
        "module": "keras_hub.samplers",
        "class_name": "TopKSampler",
        "config": {"temperature": 1.0, "k": 3, "seed": None},
        "registered_name": "keras_hub>TopKSampler",
    }
    sampler = samplers.deserialize(config)
    assert isinstance(sampler, samplers.TopKSampler) and sampler.k == 3
