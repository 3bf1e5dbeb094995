"""TEMPORARY shim (replaced by the kernels branch)."""

from keras_llama.kernels import PackedKernel as PackedWeights  # noqa: F401
from keras_llama.kernels import matmul, pack, pack_int8  # noqa: F401
