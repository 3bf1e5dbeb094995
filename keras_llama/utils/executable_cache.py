"""Compiled XLA programs kept on disk, so that a later process skips tracing, lowering and
compiling them (`CachedFunction`).

JAX's persistent compilation cache (turned on by `GenerationEngine`) only skips XLA's own
compilation: every new process still traces the Python model into a jaxpr, lowers it to MLIR
and hashes that module to find the entry, about a second for a 30-layer model. This cache keys
a compiled executable by what it is compiled *from* instead, so a hit costs only loading it::

    key = sha256(function name, the caller's fingerprint (model config, sampler, execution plan,
                 variable paths), the arguments' tree, shapes and dtypes, static arguments,
                 the environment: jax / jaxlib / keras / numpy versions, keras_llama's source
                 (its .py, .cc and .h files), XLA_FLAGS and the jax settings that change a
                 program, the device and the CPU's features)

Entries live in ``<keras-llama cache>/executables`` (``KERAS_LLAMA_CACHE``), one file each,
written atomically (temporary file, then rename); past 1 GiB the least recently used go. A file that does not read back (truncated,
from another version, refused) is ignored with a warning and replaced. ``KERAS_LLAMA_EXECUTABLE
_CACHE=0`` turns the cache off; the functions then run as plain ``jax.jit``.

An entry holds native code that XLA runs, as the JAX compilation cache and the native kernels
in the same folder do: only entries this library wrote are read (a checksum, a restricted
unpickler for JAX's own executable wrapper, see `keras_compat.load_serialized_executable`).
"""

import contextlib
import hashlib
import json
import os
import tempfile
import threading
import warnings
from pathlib import Path

from keras_llama.utils import keras_compat
from keras_llama.utils.cache import cache_dir, cpu_identity

ENV = "KERAS_LLAMA_EXECUTABLE_CACHE"
# The folder's size limit: past it, the least recently used entries go (a new keras-llama,
# jax or source edit makes new entries; the old ones are never read again).
MAX_BYTES = 1 << 30
MAGIC = b"keras-llama executable 1\n"
# jax settings that change the program traced from the same Python (XLA_FLAGS too).
JAX_SETTINGS = (
    "jax_enable_x64",
    "jax_default_matmul_precision",
    "jax_default_prng_impl",
    "jax_threefry_partitionable",
    "jax_numpy_rank_promotion",
    "jax_numpy_dtype_promotion",
)
_SOURCE_SUFFIXES = (".py", ".cc", ".h")


def enabled():
    """False when ``KERAS_LLAMA_EXECUTABLE_CACHE`` is 0/false/no, or JAX sees more than one
    device (a program's shardings would then be part of its key too)."""
    if os.environ.get(ENV, "1").lower() in ("0", "false", "no"):
        return False
    import jax

    return jax.device_count() == 1


class CachedFunction:
    """A ``jax.jit`` function whose compiled programs are kept in memory and on disk.

    Calling it runs the program compiled for the arguments' shapes: from memory, else loaded
    from disk, else traced, lowered and compiled (then saved).

    Args:
        name: names the program in the cache files (``prefill``, ``decode``, ...).
        fun: the function to ``jax.jit``.
        fingerprint: a callable returning a string that names everything besides the
            arguments and the environment that changes the program (model config, execution
            plan, ...), or None when the program cannot be named safely (user code the key
            does not cover): it is then compiled as usual and never saved.
        folder: where entries live; default ``<keras-llama cache>/executables``.
        max_bytes: the folder's size limit; after a write, the least recently used entries
            past it are deleted.
        **jit_kwargs: ``static_argnums`` (they key the program and are not passed to it),
            ``donate_argnums``.
    """

    def __init__(self, name, fun, fingerprint, folder=None, max_bytes=MAX_BYTES, **jit_kwargs):
        self.name = name
        self.max_bytes = max_bytes
        self.fun = fun
        self.fingerprint = fingerprint
        self.static_argnums = tuple(jit_kwargs.get("static_argnums", ()))
        self.jit_kwargs = jit_kwargs
        self.folder = Path(folder or Path(cache_dir()) / "executables")
        self.loads = 0  # programs read from disk (for tests and benchmarks)
        self.compiles = 0  # programs traced and compiled
        self._programs = {}  # signature -> compiled program
        self._lock = threading.Lock()
        self._key = None  # of the fingerprint and environment; "" when not cached
        self._jitted = None

    @property
    def jitted(self):
        """The ``jax.jit`` function. Its program is named after the cache key of the
        fingerprint and environment (``jit_prefill_<key>``), so that JAX's own persistent cache
        never hands back a program compiled for another key: XLA:CPU cannot serialize again an
        executable it loaded from that cache (it runs, then fails: "Function ... not found")."""
        if self._jitted is None:
            import jax

            key = self._base_key()

            def fun(*args):
                return self.fun(*args)

            fun.__name__ = f"{self.name}_{key[:12]}" if key else self.name
            self._jitted = jax.jit(fun, **self.jit_kwargs)
        return self._jitted

    def lower(self, *args):
        return self.jitted.lower(*args)

    def __call__(self, *args):
        return self.compiled(*args)(*self._dynamic(args))

    def compiled(self, *args):
        """The program for these arguments (a ``jax.stages.Compiled``), from memory, from disk,
        else compiled now (and saved)."""
        program = self.load(*args)
        if program is None:
            program = self.compile_lowered(self.lower(*args), args)
        return program

    def load(self, *args):
        """The program for these arguments from memory or disk, or None (nothing traced)."""
        signature = _signature(args, self.static_argnums)
        with self._lock:
            program = self._programs.get(signature)
        if program is not None:
            return program
        path = self._path(signature)
        if path is None or not path.exists():
            return None
        program = self._read(path, args)
        release_free_heap()
        if program is not None:
            self.loads += 1
            with contextlib.suppress(OSError):
                os.utime(path)  # recently used: the last to be pruned
            with self._lock:
                program = self._programs.setdefault(signature, program)
        return program

    def cached(self, *args):
        """Whether the program for these arguments is in memory or on disk (nothing read)."""
        signature = _signature(args, self.static_argnums)
        with self._lock:
            if signature in self._programs:
                return True
        path = self._path(signature)
        return path is not None and path.exists()

    def _cache_size(self):
        # Programs in memory (the name of jax.jit's own count, which tests and benchmarks read).
        return len(self._programs)

    def compile_lowered(self, lowered, args):
        """Compiles ``lowered`` (``self.lower(*args)``), keeps and saves the program."""
        hits = _persistent_cache_hits()
        program = lowered.compile()
        release_free_heap()
        self.compiles += 1
        signature = _signature(args, self.static_argnums)
        with self._lock:
            program = self._programs.setdefault(signature, program)
        path = self._path(signature)
        # A program JAX loaded from its own cache does not serialize whole (see `jitted`).
        if path is not None and _persistent_cache_hits() == hits:
            self._write(path, program)
        return program

    # --- files ----------------------------------------------------------------------------------
    def _base_key(self):
        if self._key is None:
            fingerprint = self.fingerprint() if self.fingerprint and enabled() else None
            self._key = (
                _hash(environment_fingerprint(), str(self.folder), self.name, fingerprint)
                if fingerprint
                else ""
            )
        return self._key

    def _path(self, signature):
        base = self._base_key()
        if not base:
            return None
        return self.folder / f"{self.name}-{_hash(base, _signature_text(signature))[:40]}.xla"

    def _read(self, path, args):
        try:
            data = path.read_bytes()
            if not data.startswith(MAGIC):
                raise ValueError("not a keras-llama executable file")
            header_end = data.index(b"\n", len(MAGIC))
            header = json.loads(data[len(MAGIC) : header_end])
            payload = data[header_end + 1 :]
            if hashlib.sha256(payload).hexdigest() != header["sha256"]:
                raise ValueError("checksum mismatch (a truncated or altered file)")
            import jax

            in_tree = jax.tree_util.tree_structure((self._dynamic(args), {}))
            out_tree = treedef_from_json(header["out_tree"])
            return keras_compat.load_serialized_executable(payload, in_tree, out_tree)
        except Exception as error:  # any unreadable entry: compile again and replace it
            warnings.warn(
                f"Ignoring the cached compiled program {path} ({type(error).__name__}: "
                f"{error}); compiling it again.",
                stacklevel=3,
            )
            with contextlib.suppress(OSError):
                path.unlink()  # warned once; the new program takes its place
            return None

    def _write(self, path, program):
        from jax.experimental import serialize_executable

        try:
            payload, _, out_tree = serialize_executable.serialize(program)
            header = {"sha256": hashlib.sha256(payload).hexdigest(),
                      "out_tree": treedef_to_json(out_tree)}  # fmt: skip
        except (ValueError, TypeError, NotImplementedError):
            return  # a program that cannot be saved (constants, an unnamed output type)
        temporary = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
                temporary = f.name
                f.write(MAGIC + json.dumps(header).encode() + b"\n" + payload)
            os.replace(temporary, path)  # atomic: never a half-written entry
            _prune(path.parent, self.max_bytes)
        except OSError:  # a read-only or full cache folder: run without saving
            if temporary is not None:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)

    def _dynamic(self, args):
        return tuple(a for i, a in enumerate(args) if i not in self.static_argnums)


def release_free_heap():
    """Hands the heap memory freed so far back to the OS, where the C library is glibc.

    Loading or compiling a program frees much of what it allocated (XLA's parsed module, its
    passes), but glibc keeps freed memory below the heap's top: ~100 MB of resident memory
    after loading SmolLM2's prefill, that ``malloc_trim`` returns."""
    if not _LIBC:
        import ctypes
        import ctypes.util

        try:
            _LIBC.append(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim)
        except (OSError, AttributeError):  # not glibc: nothing to do
            _LIBC.append(None)
    if _LIBC[0] is not None:
        _LIBC[0](0)


_LIBC = []


def _prune(folder, max_bytes):
    """Deletes the least recently used entries until the folder holds at most ``max_bytes``."""
    entries = []
    for path in folder.glob("*.xla"):
        with contextlib.suppress(OSError):  # another process may delete it meanwhile
            stat = path.stat()
            entries.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries, key=lambda entry: entry[0]):
        if total <= max_bytes:
            break
        with contextlib.suppress(OSError):
            path.unlink()
        total -= size


# --- keys ----------------------------------------------------------------------------------------
def _hash(*parts):
    key = hashlib.sha256()
    for part in parts:
        key.update(part.encode())
        key.update(b"\0")
    return key.hexdigest()


_LOCAL = threading.local()
_LISTENING = []
_LISTENING_LOCK = threading.Lock()


def _persistent_cache_hits():
    """How many programs this thread has loaded from JAX's persistent compilation cache."""
    if not _LISTENING:
        import jax

        def listen(event, **kwargs):
            if event == "/jax/compilation_cache/cache_hits":
                _LOCAL.hits = getattr(_LOCAL, "hits", 0) + 1

        with _LISTENING_LOCK:
            if not _LISTENING:
                jax.monitoring.register_event_listener(listen)
                _LISTENING.append(listen)
    return getattr(_LOCAL, "hits", 0)


def _signature(args, static_argnums):
    """The arguments' tree, each leaf's shape, dtype and weak type, and the static arguments,
    as hashable objects (every call looks its program up by it: ~800 leaves for a model, so
    no string is made here; `_signature_text` is the stable form the file names hash)."""
    import jax

    dynamic = tuple(a for i, a in enumerate(args) if i not in static_argnums)
    leaves, tree = jax.tree_util.tree_flatten(dynamic)
    avals = tuple((x.shape, x.dtype, getattr(x, "weak_type", False)) for x in leaves)
    statics = tuple(repr(args[i]) for i in static_argnums)
    return (tree, avals, statics)


def _signature_text(signature):
    """`_signature` as text that is the same in every process (for the file names)."""
    tree, avals, statics = signature
    return repr((str(tree), tuple((tuple(s), str(d), bool(w)) for s, d, w in avals), statics))


_ENVIRONMENT = []


def environment_fingerprint():
    """Everything outside the caller's code and arguments that changes a compiled program
    (computed once per process: keras_llama's source hash reads its files)."""
    if not _ENVIRONMENT:
        import jax
        import jaxlib
        import keras
        import ml_dtypes
        import numpy

        device = jax.devices()[0]
        parts = [
            jax.__version__,
            jaxlib.__version__,
            keras.__version__,
            numpy.__version__,
            ml_dtypes.__version__,
            keras.config.backend(),
            keras.config.floatx(),
            str(keras.config.dtype_policy().name),
            device.platform,
            device.device_kind,
            device.client.platform_version,
            os.environ.get("XLA_FLAGS", ""),
            *(f"{name}={getattr(jax.config, name, None)}" for name in JAX_SETTINGS),
            cpu_identity(),
            _source_hash(),
        ]
        _ENVIRONMENT.append(hashlib.sha256("\0".join(parts).encode()).hexdigest())
    return _ENVIRONMENT[0]


def _source_hash():
    # keras_llama's own code: any change of it (an upgrade, an edit) may change a program.
    root = Path(__file__).resolve().parents[1]
    key = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in _SOURCE_SUFFIXES):
        key.update(path.relative_to(root).as_posix().encode() + b"\0")
        key.update(path.read_bytes())
    return key.hexdigest()


# --- the output tree, written as JSON (never pickled) --------------------------------------------
_BUILTIN_NODES = {"tuple": tuple, "list": list, "dict": dict, "NoneType": type(None)}


def treedef_to_json(treedef):
    """A JSON value for a ``PyTreeDef`` of builtin containers and keras_llama's own node types
    (named tuples, registered classes such as packed weights); TypeError for anything else."""
    data = treedef.node_data()
    if data is None:
        return "*"  # a leaf
    cls, aux = data
    if cls.__module__ == "builtins" and cls.__name__ in _BUILTIN_NODES:
        name = cls.__name__
    elif cls.__module__.startswith("keras_llama."):
        name = f"{cls.__module__}:{cls.__qualname__}"
    else:
        raise TypeError(f"output node type {cls.__module__}.{cls.__qualname__} is not ours")
    return {"type": name, "aux": _to_json(aux),
            "children": [treedef_to_json(c) for c in treedef.children()]}  # fmt: skip


def treedef_from_json(value):
    """The inverse of `treedef_to_json`; node types only builtin or from keras_llama."""
    import importlib

    import jax

    if value == "*":
        return jax.tree_util.tree_structure(0)
    name = value["type"]
    if name in _BUILTIN_NODES:
        cls = _BUILTIN_NODES[name]
    else:
        module, qualname = name.split(":")
        if not module.startswith("keras_llama."):
            raise ValueError(f"refused output node type {name}")
        cls = importlib.import_module(module)
        for part in qualname.split("."):
            cls = getattr(cls, part)
    children = [treedef_from_json(c) for c in value["children"]]
    return jax.tree_util.PyTreeDef.from_node_data_and_children(
        jax.tree_util.default_registry, (cls, _from_json(value["aux"])), children
    )


def _to_json(aux):
    # Node data: None, numbers, strings, and lists / tuples of them (tuples tagged).
    if aux is None or isinstance(aux, (bool, int, float, str)):
        return aux
    if isinstance(aux, tuple):
        return {"tuple": [_to_json(x) for x in aux]}
    if isinstance(aux, list):
        return [_to_json(x) for x in aux]
    raise TypeError(f"cannot write node data of type {type(aux).__name__}")


def _from_json(value):
    if isinstance(value, dict):
        return tuple(_from_json(x) for x in value["tuple"])
    if isinstance(value, list):
        return [_from_json(x) for x in value]
    return value
