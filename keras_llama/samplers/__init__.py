"""Samplers: how `CausalLM.generate()` picks each next token (KerasHub's `keras_hub.samplers`)."""

from keras_llama.samplers.beam_sampler import BeamSampler
from keras_llama.samplers.contrastive_sampler import ContrastiveSampler
from keras_llama.samplers.greedy_sampler import GreedySampler
from keras_llama.samplers.random_sampler import RandomSampler
from keras_llama.samplers.sampler import Sampler
from keras_llama.samplers.serialization import deserialize, get, serialize
from keras_llama.samplers.top_k_sampler import TopKSampler
from keras_llama.samplers.top_p_sampler import TopPSampler

__all__ = [
    "BeamSampler",
    "ContrastiveSampler",
    "GreedySampler",
    "RandomSampler",
    "Sampler",
    "TopKSampler",
    "TopPSampler",
    "deserialize",
    "get",
    "serialize",
]
