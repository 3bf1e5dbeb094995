"""Sampler identifiers: ``get``, ``serialize``, ``deserialize``."""

import keras

from keras_llama.samplers.beam_sampler import BeamSampler
from keras_llama.samplers.contrastive_sampler import ContrastiveSampler
from keras_llama.samplers.greedy_sampler import GreedySampler
from keras_llama.samplers.random_sampler import RandomSampler
from keras_llama.samplers.sampler import Sampler
from keras_llama.samplers.top_k_sampler import TopKSampler
from keras_llama.samplers.top_p_sampler import TopPSampler

# String identifier -> class (KerasHub's names).
SAMPLERS = {
    "beam": BeamSampler,
    "contrastive": ContrastiveSampler,
    "greedy": GreedySampler,
    "random": RandomSampler,
    "top_k": TopKSampler,
    "top_p": TopPSampler,
}
_BY_CLASS_NAME = {cls.__name__: cls for cls in SAMPLERS.values()}


def serialize(sampler):
    """The Keras config dict of a sampler.

    Args:
        sampler: a `Sampler`.

    Returns:
        dict: ``{"class_name", "config", ...}``, what `deserialize` and ``compile()`` take.

    Example:
        ```python
        config = keras_llama.samplers.serialize(keras_llama.samplers.TopPSampler(p=0.9))
        keras_llama.samplers.deserialize(config)  # TopPSampler(..., p=0.9, ...)
        ```
    """
    return keras.saving.serialize_keras_object(sampler)


def deserialize(config, custom_objects=None):
    """A sampler from a string identifier or a config dict (ours or KerasHub's).

    Args:
        config: a sampler name (``"top_k"``) or a config dict from `serialize` or KerasHub's
            ``keras_hub.samplers.serialize``.
        custom_objects: ``{name: class}`` for samplers defined outside keras-llama.

    Returns:
        Sampler: a new sampler.

    Raises:
        ValueError: when the name or config describes no sampler.

    Example:
        ```python
        keras_llama.samplers.deserialize("greedy")
        keras_llama.samplers.deserialize(
            {"class_name": "TopKSampler", "config": {"k": 10, "seed": 1}})
        ```
    """
    if isinstance(config, str):
        return _from_name(config)
    if isinstance(config, dict) and config.get("class_name") in _BY_CLASS_NAME:
        return _BY_CLASS_NAME[config["class_name"]].from_config(config.get("config") or {})
    sampler = keras.saving.deserialize_keras_object(config, custom_objects=custom_objects)
    if not isinstance(sampler, Sampler):
        raise ValueError(f"The config does not describe a sampler. Received: config={config!r}")
    return sampler


def get(identifier):
    """A `Sampler` from ``identifier``: a name (``"greedy"``, ``"random"``, ``"top_k"``,
    ``"top_p"``, ``"beam"``, ``"contrastive"``), a config dict, a `Sampler` subclass (instantiated
    with its defaults) or a `Sampler` (returned as is). ``None`` gives ``None``.

    Example:
        ```python
        keras_llama.samplers.get("top_k")  # TopKSampler(temperature=1.0, k=5, seed=None)
        ```
    """
    if identifier is None or isinstance(identifier, Sampler):
        return identifier
    if isinstance(identifier, (str, dict)):
        return deserialize(identifier)
    if isinstance(identifier, type) and issubclass(identifier, Sampler):
        return identifier()
    raise ValueError(
        "Could not interpret the sampler identifier: expected a name, a config dict or a "
        f"`Sampler`. Received: sampler={identifier!r}"
    )


def _from_name(name):
    if name not in SAMPLERS:
        raise ValueError(
            f"Unknown sampler {name!r}. Valid names: {', '.join(sorted(SAMPLERS))}. "
            f"Received: sampler={name!r}"
        )
    return SAMPLERS[name]()
