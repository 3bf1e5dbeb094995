"""keras-llama's own cache folder (downloaded wheels, compiled native ops, JAX programs)."""

import os


def cache_dir():
    """keras-llama's own cache: ``$KERAS_LLAMA_CACHE`` or ``~/.cache/keras_llama``."""
    return os.path.expanduser(os.environ.get("KERAS_LLAMA_CACHE") or "~/.cache/keras_llama")
