"""Random sampling from the whole distribution."""

import keras
from keras import ops, random

from keras_llama.samplers.sampler import Sampler, _check_seed


@keras.saving.register_keras_serializable(package="keras_llama")
class RandomSampler(Sampler):
    """Samples the next token from the full distribution ``softmax(logits / temperature)``.

    Args:
        seed: int or None. The same seed reproduces the same samples (per backend).
        **kwargs: passed to `Sampler`: ``temperature``, a float > 0 (default 1.0).

    Example:
        ```python
        causal_lm.compile(sampler=keras_llama.samplers.RandomSampler(temperature=0.7, seed=1))
        ```
    """

    def __init__(self, seed=None, **kwargs):
        super().__init__(**kwargs)
        _check_seed(seed)
        self.seed = seed
        self.seed_generator = random.SeedGenerator(seed)

    def get_next_token(self, probabilities):
        token = random.categorical(
            ops.log(probabilities), 1, seed=self.seed_generator, dtype="int32"
        )
        return ops.squeeze(token, axis=-1)

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}
