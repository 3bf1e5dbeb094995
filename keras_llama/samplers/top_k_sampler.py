"""Top-k sampling: sample among the k most probable tokens."""

import keras
from keras import ops, random

from keras_llama.samplers.sampler import Sampler, _check_seed
from keras_llama.utils.validation import check_positive_int


@keras.saving.register_keras_serializable(package="keras_llama")
class TopKSampler(Sampler):
    """Samples the next token among the ``k`` most probable ones, in proportion to their
    probabilities. ``k=1`` is greedy search.

    Args:
        k: int >= 1. Values larger than the vocabulary keep the whole vocabulary.
        seed: int or None.
        **kwargs: passed to `Sampler`: ``temperature``, a float > 0 (default 1.0).

    Example:
        ```python
        causal_lm.compile(sampler=keras_llama.samplers.TopKSampler(k=5, temperature=0.7))
        ```
    """

    def __init__(self, k=5, seed=None, **kwargs):
        super().__init__(**kwargs)
        check_positive_int("k", k)
        _check_seed(seed)
        self.k = k
        self.seed = seed
        self.seed_generator = random.SeedGenerator(seed)

    def get_next_token(self, probabilities):
        k = min(self.k, probabilities.shape[-1])
        top_probabilities, top_indices = ops.top_k(probabilities, k=k, sorted=True)  # [b, k]
        choice = random.categorical(
            ops.log(top_probabilities), 1, seed=self.seed_generator, dtype="int32"
        )
        return ops.squeeze(ops.take_along_axis(top_indices, choice, axis=-1), axis=-1)

    def get_config(self):
        return {**super().get_config(), "k": self.k, "seed": self.seed}
