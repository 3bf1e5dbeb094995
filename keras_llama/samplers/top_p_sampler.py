"""Top-p (nucleus) sampling."""

import keras
from keras import ops, random

from keras_llama.samplers.sampler import Sampler, _check_seed
from keras_llama.utils.validation import check_positive_int


@keras.saving.register_keras_serializable(package="keras_llama")
class TopPSampler(Sampler):
    """Samples the next token from the smallest set of most probable tokens whose cumulative
    probability reaches ``p`` (the most probable token is always kept, so ``p -> 0`` is greedy).

    Args:
        p: float in (0, 1].
        k: int >= 1 or None. If set, only the ``k`` most probable tokens are sorted and
            considered first (faster on large vocabularies).
        seed: int or None.
        **kwargs: passed to `Sampler`: ``temperature``, a float > 0 (default 1.0).

    Example:
        ```python
        causal_lm.compile(sampler=keras_llama.samplers.TopPSampler(p=0.9, k=100))
        ```
    """

    def __init__(self, p=0.1, k=None, seed=None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"`p` must be a number in (0, 1]. Received: p={p!r}")
        if k is not None:
            check_positive_int("k", k)
        _check_seed(seed)
        self.p = p
        self.k = k
        self.seed = seed
        self.seed_generator = random.SeedGenerator(seed)

    def get_next_token(self, probabilities):
        vocabulary_size = probabilities.shape[-1]
        k = vocabulary_size if self.k is None else min(self.k, vocabulary_size)
        sorted_probabilities, sorted_indices = ops.top_k(probabilities, k=k, sorted=True)
        cumulative = ops.cumsum(sorted_probabilities, axis=-1)
        # Keep a token if the tokens before it sum to less than p (the first one always).
        keep = ops.concatenate(
            [ops.ones_like(cumulative[:, :1], dtype="bool"), cumulative[:, :-1] < self.p], axis=-1
        )
        kept = ops.where(keep, sorted_probabilities, ops.zeros_like(sorted_probabilities))
        choice = random.categorical(ops.log(kept), 1, seed=self.seed_generator, dtype="int32")
        return ops.squeeze(ops.take_along_axis(sorted_indices, choice, axis=-1), axis=-1)

    def get_config(self):
        return {**super().get_config(), "p": self.p, "k": self.k, "seed": self.seed}
