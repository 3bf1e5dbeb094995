"""Checks of user input shared by the package: each raises with what was expected and what was
received (DESIGN.md rule 9)."""

import math
import numbers
import sys

import numpy as np


def _in(where):
    return f"In {where}: " if where else ""


def check_positive_int(name, value, where=None):
    """Raise a `ValueError` unless ``value`` is an int >= 1 (bools are refused). ``where``
    names the file or object the value came from.

    Example:
        ```python
        check_positive_int("num_layers", 0)  # ValueError: `num_layers` must be a positive integer. Received: num_layers=0
        ```
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{_in(where)}`{name}` must be a positive integer. Received: {name}={value!r}"
        )


def check_positive_number(name, value, where=None):
    """Raise a `ValueError` unless ``value`` is a finite real number > 0 (NaN, infinities,
    bools, strings and None are refused): a zero or NaN ``rope_theta`` or ``rms_norm_eps``
    would otherwise load and give NaN logits.

    Example:
        ```python
        check_positive_number("rope_theta", float("nan"))  # ValueError: `rope_theta` must be a positive finite number. Received: rope_theta=nan
        ```
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(
            f"{_in(where)}`{name}` must be a positive finite number. Received: {name}={value!r}"
        )


def is_tf_dataset(x):
    """Whether ``x`` is a `tf.data.Dataset`. TensorFlow is consulted only if the user already
    imported it: this never imports TensorFlow."""
    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(x, tf.data.Dataset)


def concrete_values(x):
    """``x`` as a NumPy array when its values are known now (NumPy arrays, Python sequences,
    eager JAX/torch/TF tensors); None when they are not (Keras symbolic tensors, JAX tracers
    inside ``jit``, torch meta or compiled-graph tensors, TF graph tensors)."""
    if isinstance(x, (np.ndarray, np.generic, list, tuple, int)):
        return np.asarray(x)
    import keras

    if isinstance(x, keras.KerasTensor):
        return None
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(x, jax.core.Tracer):
        return None
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        if x.device.type == "meta" or torch.compiler.is_compiling():
            return None
        return x.detach().cpu().numpy()
    tf = sys.modules.get("tensorflow")
    if tf is not None and isinstance(x, tf.Tensor) and not hasattr(x, "numpy"):
        return None  # a graph tensor (inside tf.function)
    try:
        return np.asarray(keras.ops.convert_to_numpy(x))
    except Exception:  # any other symbolic value: its values are unknown here
        return None


def check_token_ids(token_ids, vocabulary_size):
    """Raise a `ValueError` naming the first id outside ``[0, vocabulary_size)``: the embedding
    gather would clamp it silently (JAX) or fail with a bare ``IndexError`` (torch). Every
    position is checked, padding included, since every id reaches the gather. Does nothing when
    the values are not concrete (symbolic or traced)."""
    ids = concrete_values(token_ids)
    if ids is None or ids.size == 0:
        return
    bad = (ids < 0) | (ids >= vocabulary_size)
    if bad.any():
        first = int(ids[bad].flat[0])
        raise ValueError(
            f"Token ids must be in [0, {vocabulary_size}) for a vocabulary of size "
            f"{vocabulary_size}. Received: token id {first}"
        )
