"""Generation against independent references on the same random weights: transformers'
greedy and beam-search ``generate()``, uncached decoding (the full sequence recomputed each
step), and contrastive search written out over transformers' forward pass.

Backend-sensitive: CI runs this file on the torch backend too (`.ci/run`).
"""

import keras
import numpy as np
import pytest

from keras_llama import samplers
from tests.hf_reference import make_hf_model, to_keras_llama

# Ragged prompts (the longest decides max_length); token ids avoid 0, our padding id.
PROMPT_LENGTHS = [5, 9, 2, 7]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def pair():
    hf = make_hf_model("gqa")
    hf.generation_config.eos_token_id = None  # run every row to the length limit
    hf.generation_config.pad_token_id = 0
    return hf, to_keras_llama(hf)


def _prompts(lengths=PROMPT_LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 100, size=n).astype("int32") for n in lengths]


def _right_padded(prompts, width):
    ids = np.zeros((len(prompts), width), "int32")
    mask = np.zeros((len(prompts), width), bool)
    for i, p in enumerate(prompts):
        ids[i, : len(p)], mask[i, : len(p)] = p, True
    return {"token_ids": ids, "padding_mask": mask}


def _hf_generate(hf, prompts, **kwargs):
    """transformers' generate() on left-padded prompts: the new tokens, [batch, new]."""
    import torch

    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.as_tensor(p)
        mask[i, width - len(p) :] = 1
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, **kwargs)
    return out[:, width:].numpy()


def _new_tokens(out, prompts, n):
    return np.stack([out["token_ids"][i, len(p) : len(p) + n] for i, p in enumerate(prompts)])


def _generate(lm, sampler, inputs, **kwargs):
    lm.compile(sampler=sampler)
    return lm.generate(inputs, stop_token_ids=None, **kwargs)


def test_greedy_matches_transformers_on_ragged_batch(pair):
    hf, lm = pair
    prompts = _prompts()
    width = max(PROMPT_LENGTHS) + NEW_TOKENS
    out = _generate(lm, "greedy", _right_padded(prompts, width))
    expected = _hf_generate(hf, prompts, max_new_tokens=NEW_TOKENS, do_sample=False)
    np.testing.assert_array_equal(_new_tokens(out, prompts, NEW_TOKENS), expected)
    # Shorter prompts keep generating up to max_length; nothing is padding.
    assert out["padding_mask"].all() and out["token_ids"].shape == (4, width)
    for i, p in enumerate(prompts):
        np.testing.assert_array_equal(out["token_ids"][i, : len(p)], p)


def test_each_row_equals_generating_it_alone(pair):
    _, lm = pair
    prompts = _prompts(seed=1)
    width = max(PROMPT_LENGTHS) + 12
    batch = _generate(lm, "greedy", _right_padded(prompts, width))
    for i, p in enumerate(prompts):
        alone = lm.generate(_right_padded([p], width), stop_token_ids=None)
        np.testing.assert_array_equal(batch["token_ids"][i], alone["token_ids"][0])


@pytest.mark.parametrize(
    "make_sampler",
    [
        lambda: samplers.GreedySampler(),
        lambda: samplers.RandomSampler(seed=5),
        lambda: samplers.TopKSampler(k=5, seed=6),
        lambda: samplers.TopPSampler(p=0.9, seed=7, temperature=0.8),
    ],
    ids=["greedy", "random", "top_k", "top_p"],
)
def test_cached_equals_uncached(pair, make_sampler):
    _, lm = pair
    prompts = _prompts([6, 6, 6], seed=2)
    new = 12
    out = _generate(lm, make_sampler(), _right_padded(prompts, 6 + new))
    # Uncached: the whole sequence through the model at every step (one fixed width: causal
    # attention makes the positions after the last real token irrelevant), and a fresh sampler
    # with the same seed picking from the last real position.
    reference = make_sampler()
    ids = _right_padded(prompts, 6 + new)["token_ids"]
    for t in range(6, 6 + new):
        logits = lm({"token_ids": ids, "padding_mask": np.ones_like(ids)})[:, t - 1]
        probabilities = reference.compute_probabilities(logits)
        ids[:, t] = keras.ops.convert_to_numpy(reference.get_next_token(probabilities))
    np.testing.assert_array_equal(out["token_ids"], ids)


def _hf_log_prob(hf, prompt, completion):
    """Total log-probability of ``completion`` after ``prompt`` under transformers."""
    import torch

    ids = torch.as_tensor(np.concatenate([prompt, completion]))[None].long()
    with torch.no_grad():
        log_probs = torch.log_softmax(hf(input_ids=ids).logits[0].double(), -1).numpy()
    positions = np.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
    return log_probs[positions, completion].sum()


def test_beam_search_with_one_beam_is_greedy(pair):
    _, lm = pair
    inputs = _right_padded(_prompts(seed=3), max(PROMPT_LENGTHS) + 10)
    greedy = _generate(lm, "greedy", inputs)
    beam = _generate(lm, samplers.BeamSampler(num_beams=1), inputs)
    np.testing.assert_array_equal(beam["token_ids"], greedy["token_ids"])


def test_beam_search_matches_transformers(pair):
    hf, lm = pair
    prompts = _prompts([5, 3], seed=4)
    new = 10
    inputs = _right_padded(prompts, 5 + new)
    lm.compile(sampler=samplers.BeamSampler(num_beams=3, return_all_beams=True))
    out = lm.generate(inputs, stop_token_ids=None)
    assert out["token_ids"].shape == (2, 3, 5 + new) and out["scores"].shape == (2, 3)
    # transformers' beam search without length normalisation and without an end token.
    expected = _hf_generate(
        hf, prompts, max_new_tokens=new, do_sample=False, num_beams=3, length_penalty=0.0
    )
    best = _generate(lm, samplers.BeamSampler(num_beams=3), inputs)
    greedy = _generate(lm, "greedy", inputs)
    for i, p in enumerate(prompts):
        generated = out["token_ids"][i, :, len(p) :]  # up to max_length: 5 + new - len(p)
        if len(p) == 5:  # the longest prompt generates exactly `new` tokens, as transformers
            np.testing.assert_array_equal(generated[0], expected[i])
        np.testing.assert_array_equal(best["token_ids"][i], out["token_ids"][i, 0])
        # Each beam's score is its log-probability, best first, and at least greedy's.
        scores = [_hf_log_prob(hf, p, generated[b]) for b in range(3)]
        np.testing.assert_allclose(out["scores"][i], scores, atol=1e-3)
        assert list(out["scores"][i]) == sorted(out["scores"][i], reverse=True)
        assert scores[0] >= _hf_log_prob(hf, p, greedy["token_ids"][i, len(p) :]) - 1e-4


def _hf_contrastive(hf, prompt, new, k, alpha):
    """Contrastive search written out over transformers' forward pass, without a cache."""
    import torch

    ids = list(prompt)
    for _ in range(new):
        with torch.no_grad():
            context = hf.model(input_ids=torch.as_tensor([ids])).last_hidden_state[0]
            probs = torch.softmax(hf.lm_head(context[-1]), -1)
            top_p, top_ids = torch.topk(probs, k)
            scores = []
            for p, c in zip(top_p.tolist(), top_ids.tolist()):
                h = hf.model(input_ids=torch.as_tensor([ids + [c]])).last_hidden_state[0, -1]
                similarity = torch.nn.functional.cosine_similarity(context, h[None], dim=-1)
                scores.append((1 - alpha) * p - alpha * similarity.max().item())
        ids.append(top_ids[int(np.argmax(scores))].item())
    return np.array(ids[len(prompt) :])


def test_contrastive_search_matches_reference(pair):
    hf, lm = pair
    prompts = _prompts([6, 3], seed=5)
    new = 8
    out = _generate(
        lm, samplers.ContrastiveSampler(k=3, alpha=0.6), _right_padded(prompts, 6 + new)
    )
    for i, p in enumerate(prompts):
        expected = _hf_contrastive(hf, p, new, k=3, alpha=0.6)
        np.testing.assert_array_equal(out["token_ids"][i, len(p) : len(p) + new], expected)
    # alpha = 0 is greedy search.
    inputs = _right_padded(prompts, 6 + new)
    greedy = _generate(lm, "greedy", inputs)
    plain = _generate(lm, samplers.ContrastiveSampler(k=3, alpha=0.0), inputs)
    np.testing.assert_array_equal(plain["token_ids"], greedy["token_ids"])
