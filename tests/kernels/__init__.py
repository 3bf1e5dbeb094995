"""Tests of the native CPU kernels (`keras_llama.kernels`)."""

import pytest


def require_native(available, build_error, what):
    """For a ``native`` fixture: returns when the ``what`` kernels are built and loaded
    (``available()``); skips only when there is no C++ compiler to build them (or the user
    opted out with KERAS_LLAMA_KERNELS=0); fails when a compiler exists but the build failed
    (``build_error()`` says why)."""
    from keras_llama import kernels

    if not kernels.enabled():
        pytest.skip("native kernels disabled (KERAS_LLAMA_KERNELS=0 or not JAX on CPU)")
    if available():
        return
    try:
        kernels._compiler()
    except RuntimeError as e:
        pytest.skip(f"no C++ compiler to build the native {what} kernels: {e}")
    pytest.fail(f"a C++ compiler exists but the native {what} kernels failed: {build_error()}")
