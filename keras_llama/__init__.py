"""keras-llama: Llama causal language models on Keras 3 with the KerasHub API.

JAX is the default backend. Set ``KERAS_BACKEND=torch`` before importing to use PyTorch.
"""

import os

# Keras picks its backend at import time and defaults to TensorFlow, which we do not depend on.
if "keras" not in __import__("sys").modules:
    os.environ.setdefault("KERAS_BACKEND", "jax")

from keras_llama import models, samplers, tokenizers  # noqa: E402
from keras_llama.version import __version__  # noqa: E402

__all__ = ["models", "samplers", "tokenizers", "__version__"]
