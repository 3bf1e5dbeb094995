"""The one loader of native libraries, and the one table of them.

A `NativeLibrary` is one C++ source (or a few) in this folder compiled into one shared library,
whose exported XLA FFI handlers are registered with XLA under their FFI names. It is compiled once
per machine (``-march=native``) with the system C++ compiler, against the XLA FFI headers that
jaxlib ships, and cached under ``<keras-llama cache>/kernels``, keyed by the source, the shared
headers, the flags, the compiler's version, jaxlib's version and the CPU::

    source.cc --compile--> <cache>/kernels/<stem>-<key>.so --ctypes--> XLA FFI targets

`NativeLibrary.ensure_built` builds (or finds) and loads a library, at most once per process;
it never raises: a failure logs one warning with the reason and the caller keeps XLA's path.
The ops (`decode_matmul.matmul`, `attention.attention`, ...) never build anything: they expect
their library loaded beforehand and raise a `RuntimeError` saying so otherwise.
"""

import dataclasses
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from keras_llama.utils.cache import cache_dir, cpu_identity

HERE = Path(__file__).parent  # the sources, and cpu_common.h that they share
# Warnings on: a new warning fails tests/kernels/test_library.py (built there with -Werror).
# -Wno-psabi: without AVX-512, GCC notes that 64-byte vector arguments would pass differently
# across a call boundary; the vector helpers are inline within one source, so no ABI is at stake.
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC",
         "-Wall", "-Wextra", "-Wno-psabi")  # fmt: skip
COMPILERS = ("c++", "g++", "clang++")  # tried in this order after $CXX

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LibraryStatus:
    """Whether a library is usable: ``available`` True (loaded), False (disabled, or its build
    failed) or None (not tried yet in this process), and ``reason`` in words."""

    available: object  # bool or None
    reason: str


def disabled_reason():
    """Why native ops are off in this process (a string), or None when they may run:
    ``KERAS_LLAMA_KERNELS=0`` (also false/no/off), a backend other than JAX, or a JAX default
    backend other than the CPU."""
    value = os.environ.get("KERAS_LLAMA_KERNELS", "1")
    if value.lower() in ("0", "false", "no", "off"):
        return f"disabled by KERAS_LLAMA_KERNELS={value}"
    import keras

    if keras.config.backend() != "jax":
        return f"backend is {keras.config.backend()}"
    import jax

    if jax.default_backend() != "cpu":
        return f"JAX default backend is {jax.default_backend()}"
    return None


def enabled():
    """True unless the user opted out with ``KERAS_LLAMA_KERNELS=0`` or the backend is not JAX
    on CPU (see `disabled_reason`)."""
    return disabled_reason() is None


class NativeLibrary:
    """C++ sources -> one shared library, with its FFI targets.

    Args:
        name: the library's name in `LIBRARIES` and in messages.
        source: path of the C++ source, or a sequence of paths compiled together.
        targets: ``{ffi_name: exported_symbol}``: each exported handler is registered with XLA
            (platform "cpu") under its FFI name, which the ops pass to `jax.ffi.ffi_call`.
        cache_folder: where built libraries are kept. Defaults to
            ``<keras_llama.utils.cache.cache_dir()>/kernels`` (read when building).
        compiler: the C++ compiler (a path or a name on ``PATH``). Defaults to ``$CXX``, else
            the first of ``c++``, ``g++``, ``clang++`` found (read when building).
        flags: the compiler flags (`FLAGS`; tests build other instruction sets with others).
    """

    def __init__(self, name, source, targets, cache_folder=None, compiler=None, flags=FLAGS):
        self.name = name
        # One source, or several compiled into one library (the first names its file).
        sources = source if isinstance(source, (list, tuple)) else [source]
        self.sources = tuple(Path(x) for x in sources)
        self.source = self.sources[0]
        self.flags = tuple(flags)
        self.targets = dict(targets)
        self.cache_folder = cache_folder
        self.compiler = compiler
        self._lock = threading.Lock()
        self._loaded = None  # None: not tried in this process; then True or False
        self._error = None
        self._thread = None
        self._handle = None  # the ctypes library, kept so that it stays loaded

    def __repr__(self):
        return f"NativeLibrary({self.name!r}, {self.source.name!r}, {self.status()})"

    @property
    def error(self):
        """Why the build or load failed (an exception), or None."""
        return self._error

    @property
    def loaded(self):
        """True when this process has loaded the library and registered its targets."""
        return self._loaded is True

    def status(self):
        """A `LibraryStatus`; never builds anything."""
        reason = disabled_reason()
        if reason is not None:
            return LibraryStatus(False, reason)
        if self._loaded:
            return LibraryStatus(True, "built and loaded")
        if self._loaded is False:
            return LibraryStatus(False, f"build failed: {self._error}")
        if self._thread is not None:
            return LibraryStatus(None, "building in the background")
        return LibraryStatus(None, "not built yet")

    def ensure_built(self):
        """Builds the library (once per machine; cached), loads it and registers its targets
        with XLA, at most once per process; joins a build running in the background. Returns
        whether the library is loaded. Never raises: a failure logs one warning with the reason
        and returns False (see `error`). Thread-safe."""
        if not enabled():
            return False
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._lock:
            if self._loaded is None:
                try:
                    self._load(self.build())
                    self._loaded = True
                except Exception as e:  # noqa: BLE001 - any failure means "use XLA's path"
                    self._error = e
                    self._loaded = False
                    logger.warning(
                        "keras-llama: native %s ops unavailable, using XLA's: %s", self.name, e
                    )
            return self._loaded

    def build_in_background(self):
        """Starts `ensure_built` on a thread (so that the compiler runs while XLA compiles a
        model); a later `ensure_built` waits for it."""
        _start_builds([self])

    def build(self):
        """Compiles the source into the cache folder, unless a library built from the same
        inputs is there already; returns its path. Raises on failure (see `ensure_built`)."""
        import jaxlib

        compiler = self._find_compiler()
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=30
        ).stdout
        key = hashlib.sha256()
        headers = [h.read_bytes() for h in sorted(HERE.glob("*.h"))]
        sources = [x.read_bytes() for x in self.sources]
        for part in (*sources, *headers, version, " ".join(self.flags),
                     jaxlib.__version__, cpu_identity()):  # fmt: skip
            key.update(part if isinstance(part, bytes) else part.encode())
        folder = Path(self.cache_folder or Path(cache_dir()) / "kernels")
        library = folder / f"{self.source.stem}-{key.hexdigest()[:16]}.so"
        if library.exists():
            return library
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            output = Path(tmp) / library.name
            command = self.command(output, compiler)
            result = subprocess.run(command, capture_output=True, text=True, timeout=300)
            if result.returncode != 0:
                raise RuntimeError(
                    f"compiling {self.source.name} failed ({' '.join(command)}):\n"
                    f"{result.stderr[-2000:]}"
                )
            os.replace(output, library)  # atomic: never a half-written library
        return library

    def command(self, output, compiler=None):
        """The compiler command line that builds the library into ``output``."""
        import jax

        # The XLA headers are system headers: their own warnings are not ours to fix.
        includes = ["-I", str(HERE), "-isystem", jax.ffi.include_dir()]
        compiler = compiler or self._find_compiler()
        sources = [str(x) for x in self.sources]
        return [compiler, *self.flags, *includes, *sources, "-o", str(output)]

    def _find_compiler(self):
        if self.compiler is not None:
            if shutil.which(self.compiler):
                return shutil.which(self.compiler)
            raise RuntimeError(f"C++ compiler not found: {self.compiler!r}")
        for name in (os.environ.get("CXX"), *COMPILERS):
            if name and shutil.which(name):
                return shutil.which(name)
        raise RuntimeError("no C++ compiler found (set CXX, or install g++ or clang++)")

    def _load(self, path):
        import ctypes

        import jax

        handle = ctypes.cdll.LoadLibrary(str(path))
        for ffi_name, symbol in self.targets.items():
            capsule = jax.ffi.pycapsule(getattr(handle, symbol))
            jax.ffi.register_ffi_target(ffi_name, capsule, platform="cpu")
        self._handle = handle


def _forward_and_backward(prefix, op):
    return {
        f"keras_llama_{prefix}_forward": f"KerasLlama{op}Forward",
        f"keras_llama_{prefix}_backward": f"KerasLlama{op}Backward",
    }


LIBRARIES = {
    "decode_matmul": NativeLibrary(
        "decode_matmul",
        (HERE / "decode_matmul.cc", HERE / "block_dot.cc"),
        {
            "keras_llama_decode_matmul_f32": "KerasLlamaDecodeMatmulF32",
            "keras_llama_decode_matmul_i8": "KerasLlamaDecodeMatmulI8",
            "keras_llama_decode_matmul_q8_blocks": "KerasLlamaDecodeMatmulQ8Blocks",
            "keras_llama_decode_matmul_q4_blocks": "KerasLlamaDecodeMatmulQ4Blocks",
            "keras_llama_q8_blocks_int16_dot": "KerasLlamaQ8BlocksInt16Dot",
            "keras_llama_q4_blocks_int16_dot": "KerasLlamaQ4BlocksInt16Dot",
        },
    ),
    "attention": NativeLibrary(
        "attention",
        (HERE / "attention.cc", HERE / "decode_attention.cc"),
        {
            **_forward_and_backward("attention", "Attention"),
            "keras_llama_decode_attention": "KerasLlamaDecodeAttention",
            "keras_llama_decode_attention_f16": "KerasLlamaDecodeAttentionF16",
        },
    ),
    "cross_entropy": NativeLibrary(
        "cross_entropy",
        HERE / "cross_entropy.cc",
        _forward_and_backward("cross_entropy", "CrossEntropy"),
    ),
    "swiglu": NativeLibrary(
        "swiglu", HERE / "activations.cc", _forward_and_backward("swiglu", "Swiglu")
    ),
}


def library(name):
    """The `NativeLibrary` called ``name`` in `LIBRARIES`."""
    if name not in LIBRARIES:
        raise ValueError(
            f"Unknown native library. Expected one of {sorted(LIBRARIES)}. Received: name={name!r}"
        )
    return LIBRARIES[name]


def build_in_background(*names):
    """Starts one thread that runs `NativeLibrary.ensure_built` for each named library in
    turn (`CausalLM.compile` starts the training libraries this way)."""
    _start_builds([library(name) for name in names])


def _start_builds(libraries):
    # One thread, one compiler at a time (a compile is CPU-bound, and so is XLA's). Libraries
    # already tried or being built are skipped; nothing starts when native ops are disabled.
    if not enabled():
        return
    libraries = [x for x in libraries if x._loaded is None and x._thread is None]
    if not libraries:
        return

    def build():
        for x in libraries:
            x.ensure_built()

    thread = threading.Thread(target=build, daemon=True)
    for x in libraries:
        x._thread = thread
    thread.start()


def require_loaded(name):
    """Raises a `RuntimeError` unless library ``name`` is loaded: ops never build (a build
    inside tracing would stall it), the caller makes the library available beforehand."""
    if not library(name).loaded:
        raise RuntimeError(
            f"The native {name!r} library is not loaded: {library(name).status().reason}. "
            f"Call `keras_llama.kernels.library({name!r}).ensure_built()` (True when it "
            "loaded) before calling its ops."
        )


def applies(name, *arrays):
    """Whether native library ``name`` takes ``arrays``: all float32, no active
    `keras.distribution` (XLA cannot partition a custom call: sharded models keep XLA's path),
    and the library loaded. Never builds (it is called while tracing): the caller's plan built
    it beforehand (`CausalLM.make_train_function`)."""
    import keras

    if any(x.dtype != "float32" for x in arrays):
        return False
    return keras.distribution.distribution() is None and enabled() and library(name).loaded
