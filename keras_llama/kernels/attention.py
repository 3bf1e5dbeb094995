"""TEMPORARY shim (replaced by the kernels branch)."""

from keras_llama.kernels import attention as _attention
from keras_llama.kernels import attention_supported as supported  # noqa: F401


def attention(query, key, value, mask, scale, backward_passes=0):
    return _attention(query, key, value, mask, scale)
