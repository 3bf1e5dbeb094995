"""TEMPORARY shim (replaced by the kernels branch)."""

from keras_llama.kernels import swiglu  # noqa: F401
