"""Greedy search: always the most probable token."""

import keras
from keras import ops

from keras_llama.samplers.sampler import Sampler


@keras.saving.register_keras_serializable(package="keras_llama")
class GreedySampler(Sampler):
    """Picks the most probable next token (``argmax``), deterministically.

    Args:
        temperature: float > 0. Accepted for a uniform interface; it does not change the argmax.

    Example:
        ```python
        causal_lm.compile(sampler="greedy")
        causal_lm.compile(sampler=keras_llama.samplers.GreedySampler())
        ```
    """

    def get_next_token(self, probabilities):
        return ops.argmax(probabilities, axis=-1)
