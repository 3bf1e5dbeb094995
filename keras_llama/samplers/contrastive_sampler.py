"""Contrastive search (Su et al., 2022)."""

import keras
from keras import ops

from keras_llama.samplers.sampler import (
    Sampler,
    _check_seed,
    advance,
    feed,
    prompt_width,
    repeat_rows,
    take_rows,
)
from keras_llama.utils.validation import check_positive_int


@keras.saving.register_keras_serializable(package="keras_llama")
class ContrastiveSampler(Sampler):
    """Contrastive search: among the ``k`` most probable tokens, picks the one maximising
    ``(1 - alpha) * probability - alpha * max_cosine_similarity``, where the similarity compares
    the candidate's final hidden state with those of every earlier token. This discourages
    repetition. Deterministic.

    Each step feeds the ``k`` candidates through the model at once (on ``k`` copies of the
    cache) and keeps the winner's cache and next-token logits, so it costs about ``k`` times a
    plain step.

    Loop state: ``state.extra`` holds the final hidden states of the tokens so far,
    [batch, S, m], by cache slot.

    Args:
        k: int >= 1. Number of candidates.
        alpha: float in [0, 1]. Weight of the degeneration penalty; 0 is greedy search.
        seed: int or None. Accepted for a uniform interface; contrastive search is not random.
        **kwargs: passed to `Sampler`: ``temperature``, a float > 0 (default 1.0).

    Example:
        ```python
        causal_lm.compile(sampler=keras_llama.samplers.ContrastiveSampler(k=4, alpha=0.6))
        ```
    """

    def __init__(self, k=5, alpha=0.6, seed=None, **kwargs):
        super().__init__(**kwargs)
        check_positive_int("k", k)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"`alpha` must be a number in [0, 1]. Received: alpha={alpha!r}")
        _check_seed(seed)
        self.k = k
        self.alpha = alpha
        self.seed = seed

    def init_state(self, state, prompt_hidden):
        batch, width, hidden_dim = prompt_hidden.shape
        cache_length = state.cache_mask.shape[1]
        past = ops.zeros((batch, cache_length, hidden_dim), dtype=prompt_hidden.dtype)
        return state._replace(extra=ops.slice_update(past, (0, 0, 0), prompt_hidden))

    def step(self, state, step_fn, stop_token_ids):
        probabilities = self.compute_probabilities(state.logits)
        batch, vocabulary_size = probabilities.shape
        k = min(self.k, vocabulary_size)
        top_probabilities, candidates = ops.top_k(probabilities, k=k, sorted=True)  # [b, k]

        # Feed all candidates at once, each on its own copy of its row's cache.
        repeat = lambda x: repeat_rows(x, k, batch)  # noqa: E731
        rows = (
            keras.tree.map_structure(repeat, state.caches),
            repeat(state.cache_mask),
            repeat(state.offsets),
        )
        flat_candidates = ops.reshape(ops.cast(candidates, "int32"), (-1,))
        logits, hidden, caches = feed(state, flat_candidates, step_fn, rows=rows)

        # Degeneration penalty: max cosine similarity with every earlier token of the row.
        past = state.extra  # [b, S, m]
        slot = prompt_width(state) + state.index
        hidden_k = ops.reshape(ops.cast(hidden, "float32"), (batch, k, -1))
        past32 = ops.cast(past, "float32")
        similarity = ops.einsum("bkm,bsm->bks", hidden_k, past32)
        norms = ops.norm(hidden_k, axis=-1)[:, :, None] * ops.norm(past32, axis=-1)[:, None, :]
        similarity = similarity / ops.maximum(norms, 1e-12)
        earlier = ops.logical_and(state.cache_mask, ops.arange(past.shape[1])[None, :] < slot)
        similarity = ops.where(earlier[:, None, :], similarity, -1.0)
        score = (1 - self.alpha) * top_probabilities - self.alpha * ops.max(similarity, axis=-1)

        best = ops.cast(ops.argmax(score, axis=-1), "int32")  # [b]
        chosen = ops.arange(batch, dtype="int32") * k + best
        take = lambda x: take_rows(x, chosen, batch * k)  # noqa: E731
        token = take(flat_candidates)
        hidden = take(hidden)
        past = ops.slice_update(past, (0, slot, 0), ops.cast(hidden, past.dtype)[:, None, :])
        return advance(
            state,
            token,
            stop_token_ids,
            logits=take(logits),
            hidden=hidden,
            caches=keras.tree.map_structure(take, caches),
            extra=past,
        )

    def get_config(self):
        return {**super().get_config(), "k": self.k, "alpha": self.alpha, "seed": self.seed}
