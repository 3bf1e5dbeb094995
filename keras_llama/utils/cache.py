"""keras-llama's own cache folder (downloaded wheels, compiled native ops, JAX programs)."""

import os
import platform


def cache_dir():
    """keras-llama's own cache: ``$KERAS_LLAMA_CACHE`` or ``~/.cache/keras_llama``."""
    return os.path.expanduser(os.environ.get("KERAS_LLAMA_CACHE") or "~/.cache/keras_llama")


def cpu_identity():
    """The host CPU's model and instruction-set flags (from ``/proc/cpuinfo``; elsewhere the
    platform's processor and machine names): what is built or compiled for this CPU
    (``-march=native`` kernels, XLA programs) is cached under a key that includes it, since it
    may not run on another CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()
