"""Native CPU kernels for decoding on the JAX backend.

Decoding a token at batch size 1-8 reads every weight once and does little arithmetic with it:
its speed is the speed at which the weights stream from memory. XLA:CPU's matrix-vector
products reach about 29 GB/s on the 2-core machine this was tuned on; `decode_matmul.cc` (in
this folder) streams pre-packed weights at about 36 GB/s at batch 1 and keeps that speed up to
batch 8, where XLA's small-batch products take twice as long. It also reads int8 weights
directly (XLA converts them to float first), which is what makes int8 decoding faster than
float32.

The C++ source is compiled at first use with the system's C++ compiler (``$CXX``, else ``c++``,
``g++`` or ``clang++``) for this machine's CPU (``-march=native``), against the XLA FFI headers
that jaxlib ships, and cached under ``<keras-llama cache>/kernels`` (keyed by the source, the
compiler, jaxlib's version and the CPU). Without a compiler, or with ``KERAS_LLAMA_KERNELS=0``,
`available()` is False and the model keeps XLA's own matmuls: same results, slower decoding.

API (all JAX):

* `available()` / `ensure_built_in_background()`;
* `pack(kernel)` / `pack_int8(kernel, column_scale)`: a [K, N] kernel as a `PackedKernel`;
* `matmul(x, packed)`: ``x [..., K] @ kernel`` -> [..., N] in float32.
"""

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

PANEL = 32  # columns per panel; `kPanel` in decode_matmul.cc
SOURCE = Path(__file__).with_name("decode_matmul.cc")
TARGETS = {"float32": "KerasLlamaDecodeMatmulF32", "int8": "KerasLlamaDecodeMatmulI8"}
FFI_NAMES = {"float32": "keras_llama_decode_matmul_f32", "int8": "keras_llama_decode_matmul_i8"}

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_state = {"loaded": None, "error": None, "thread": None}


def enabled():
    """False when the user opted out with ``KERAS_LLAMA_KERNELS=0`` (or the backend is not
    JAX on CPU)."""
    if os.environ.get("KERAS_LLAMA_KERNELS", "1").lower() in ("0", "false", "no", "off"):
        return False
    import keras

    if keras.config.backend() != "jax":
        return False
    import jax

    return jax.default_backend() == "cpu"


def available():
    """True when the native kernels are built, loaded and registered with XLA (building them
    now, once per machine, if needed). Never raises: a failed build logs why and returns
    False, and the caller keeps XLA's matmuls."""
    if not enabled():
        return False
    thread = _state["thread"]
    if thread is not None and thread is not threading.current_thread():
        thread.join()
    return _build_and_load()


def _build_and_load():
    with _lock:
        if _state["loaded"] is None and _state["error"] is None:
            try:
                _load(_build())
                _state["loaded"] = True
            except Exception as e:  # noqa: BLE001 - any failure means "use XLA's matmuls"
                _state["error"] = e
                logger.warning(
                    "keras-llama: native decoding kernels unavailable, using XLA's matmuls "
                    "(slower decoding): %s",
                    e,
                )
        return bool(_state["loaded"])


def ensure_built_in_background():
    """Starts building (and loading) the kernels on a thread, so that a first `generate()`
    compiles them while XLA compiles the model; `available()` waits for it."""
    if not enabled() or _state["loaded"] or _state["error"] or _state["thread"]:
        return
    thread = threading.Thread(target=_build_and_load, daemon=True)
    _state["thread"] = thread
    thread.start()


def build_error():
    """Why the kernels are unavailable (an exception), or None."""
    return _state["error"]


# --- building -----------------------------------------------------------------------------------
def _compiler():
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise RuntimeError("no C++ compiler found (set CXX, or install g++ or clang++)")


def _cpu_identity():
    # The build targets this CPU (-march=native): key the cached library by its features.
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _build():
    import jax
    import jaxlib

    from keras_llama.presets.handles import cache_dir

    compiler = _compiler()
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, timeout=30
    ).stdout
    flags = ["-O3", "-march=native", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC",
             "-w"]  # fmt: skip
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), version.encode(), " ".join(flags).encode(),
                 jaxlib.__version__.encode(), _cpu_identity().encode()):  # fmt: skip
        key.update(part)
    folder = Path(cache_dir()) / "kernels"
    library = folder / f"decode_matmul-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        output = Path(tmp) / library.name
        command = [compiler, *flags, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", str(output)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(
                f"compiling {SOURCE.name} failed ({' '.join(command)}):\n{result.stderr[-2000:]}"
            )
        os.replace(output, library)  # atomic: never a half-written library
    return library


def _load(library):
    import ctypes

    import jax

    lib = ctypes.cdll.LoadLibrary(str(library))
    for dtype, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(
            FFI_NAMES[dtype], jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu"
        )
    _state["library"] = lib  # keep it loaded


# --- packing and calling ----------------------------------------------------------------------
def _pytree_class(cls):
    import jax

    return jax.tree_util.register_pytree_node_class(cls)


class PackedKernel:
    """A [K, N] kernel laid out for `matmul`: ``panels`` [ceil(N / 32), K, 32] (float32 or
    int8; panel p holds columns 32p..32p+31, zero-padded past N), ``scale`` [32 * panels]
    (float32 multiplier per column, int8 only, else None) and ``n`` = N (static)."""

    def __init__(self, panels, scale, n):
        self.panels = panels
        self.scale = scale
        self.n = n

    def tree_flatten(self):
        return (self.panels, self.scale), self.n

    @classmethod
    def tree_unflatten(cls, n, children):
        return cls(*children, n)

    @property
    def shape(self):
        return (self.panels.shape[1], self.n)


PackedKernel = _pytree_class(PackedKernel)


def _panels(kernel):
    import jax.numpy as jnp

    k, n = kernel.shape
    count = -(-n // PANEL)
    kernel = jnp.pad(kernel, ((0, 0), (0, count * PANEL - n)))
    return kernel.reshape(k, count, PANEL).transpose(1, 0, 2)


def pack(kernel):
    """``kernel`` [K, N] float -> `PackedKernel` (float32)."""
    import jax.numpy as jnp

    return PackedKernel(_panels(jnp.asarray(kernel, jnp.float32)), None, kernel.shape[1])


def pack_int8(kernel, column_scale):
    """``kernel`` [K, N] int8 and ``column_scale`` [N] -> `PackedKernel` computing
    ``x @ (kernel * column_scale)``."""
    import jax.numpy as jnp

    n = kernel.shape[1]
    count = -(-n // PANEL)
    scale = jnp.pad(jnp.asarray(column_scale, jnp.float32).reshape(n), (0, count * PANEL - n))
    return PackedKernel(_panels(jnp.asarray(kernel, jnp.int8)), scale, n)


def matmul(x, packed):
    """``x [..., K]`` (float32) times the kernel of ``packed`` -> [..., N] float32."""
    import jax
    import jax.numpy as jnp

    lead = x.shape[:-1]
    rows = 1
    for d in lead:
        rows *= d
    x = jnp.reshape(jnp.asarray(x, jnp.float32), (rows, x.shape[-1]))
    out = jax.ShapeDtypeStruct((rows, packed.n), jnp.float32)
    if packed.scale is None:
        y = jax.ffi.ffi_call(FFI_NAMES["float32"], out)(x, packed.panels)
    else:
        y = jax.ffi.ffi_call(FFI_NAMES["int8"], out)(x, packed.panels, packed.scale)
    return jnp.reshape(y, (*lead, packed.n))
