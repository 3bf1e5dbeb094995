"""TEMPORARY shim (replaced by the kernels branch)."""

import collections

from keras_llama import kernels as _k

LibraryStatus = collections.namedtuple("LibraryStatus", "available reason")


class _Shim:
    def __init__(self, name, available, state):
        self.name, self._available, self._state = name, available, state

    def ensure_built(self):
        return self._available()

    def status(self):
        if not _k.enabled():
            return LibraryStatus(False, "disabled")
        loaded, error = self._state.get("loaded"), self._state.get("error")
        if loaded:
            return LibraryStatus(True, "built")
        if error is not None:
            return LibraryStatus(False, str(error))
        return LibraryStatus(None, "not built yet")


LIBRARIES = {
    "decode_matmul": _Shim("decode_matmul", _k.available, _k._state),
    "attention": _Shim("attention", _k.attention_available, _k._attention_state),
    "cross_entropy": _Shim("cross_entropy", _k.cross_entropy_available, _k._cross_entropy_state),
    "swiglu": _Shim("swiglu", _k.swiglu_available, _k._activations_state),
}


def library(name):
    return LIBRARIES[name]


def enabled():
    return _k.enabled()
