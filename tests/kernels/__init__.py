"""Tests of the native CPU ops (`keras_llama.kernels`)."""

import pytest


def require_native(name):
    """For a ``native`` fixture: returns when native library ``name`` is built and loaded;
    skips only when there is no C++ compiler to build it (or the user opted out with
    KERAS_LLAMA_KERNELS=0, or the backend is not JAX on CPU); fails when a compiler exists but
    the build failed (saying why)."""
    from keras_llama import kernels

    library = kernels.library(name)
    if not kernels.enabled():
        pytest.skip(f"native ops disabled: {library.status().reason}")
    if library.ensure_built():
        return
    if "no C++ compiler found" in str(library.error):
        pytest.skip(f"no C++ compiler to build the native {name} library: {library.error}")
    pytest.fail(f"a C++ compiler exists but the native {name} library failed: {library.error}")
