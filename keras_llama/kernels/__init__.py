"""Native CPU ops for the JAX backend, one module per op, and the one loader of their libraries.

* `decode_matmul`: skinny matmuls for decoding over packed float32 or int8 weights
  (`PackedWeights`, made from Keras layers by `packing`);
* `attention`: masked softmax attention for training and scoring (flash-style, grouped-query);
* `cross_entropy`: per-row softmax cross-entropy with a one-pass gradient;
* `swiglu`: ``silu(gate) * up`` with one pass each way;
* `training_matmul`: matmuls with written-out gradients (pure JAX, no native code).

Each native op has its C++ source in this folder, compiled into one shared library per source
(`library.LIBRARIES`, loaded by `library.NativeLibrary`) with the system C++ compiler (``$CXX``,
else ``c++``, ``g++`` or ``clang++``), once per machine, and cached under
``<keras-llama cache>/kernels`` (``$KERAS_LLAMA_CACHE``, default ``~/.cache/keras_llama``).
The ops never build: ``library(name).ensure_built()`` does, before a computation is traced, and
says whether the library loaded. Without a compiler, with ``KERAS_LLAMA_KERNELS=0``, or off JAX
on CPU, `enabled()` or ``ensure_built()`` is False and models keep XLA's ops: same results,
slower. `CausalLM.compile` starts the training libraries' build in the background
(`build_in_background`).
"""

from keras_llama.kernels.library import LIBRARIES, build_in_background, enabled, library

__all__ = ["LIBRARIES", "build_in_background", "enabled", "library"]
