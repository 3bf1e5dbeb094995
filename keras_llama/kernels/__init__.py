"""Native CPU kernels for the JAX backend: decoding matmuls and multi-token attention.

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

Training and scoring spend about a fifth of their time in attention, which XLA:CPU runs as
many small batched matmuls around full [batch, heads, q, s] score tensors with layout copies
between them. `attention.cc` computes it a block of query rows at a time with the scores in a
thread-local buffer (flash-attention style: forward keeps one log-sum-exp per row, backward
recomputes the probabilities), reading grouped-query operands in their own layout: about 3x
faster than XLA for fwd+bwd at the SmolLM2-135M training shape, and no score tensors in memory.

API (all JAX):

* `available()` / `ensure_built_in_background()`: the decoding kernels;
* `pack(kernel)` / `pack_int8(kernel, column_scale)`: a [K, N] kernel as a `PackedKernel`;
* `matmul(x, packed)`: ``x [..., K] @ kernel`` -> [..., N] in float32;
* `attention_available()` / `attention(query, key, value, mask, scale)`: differentiable
  masked softmax attention, float32;
* `cross_entropy_available()` / `cross_entropy(logits, labels)`: differentiable per-row
  softmax cross-entropy from float32 logits (`cross_entropy.cc`: 16-wide exponentials, the
  gradient written over the logits; 2.5x faster than XLA's and one [tokens, vocabulary] buffer
  less);
* `swiglu_available()` / `swiglu(gate, up)`: differentiable ``silu(gate) * up``, float32
  (`activations.cc`: one pass each way with 16-wide exponentials, where XLA makes three to
  five);
* `ensure_training_kernels_built_in_background()`: called by `compile()`.

Each source builds into its own library, on first use: the attention and cross-entropy kernels
when a model trains or scores, the decoding kernels when it generates.
"""

import functools
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
HEADERS_DIR = Path(__file__).parent  # cpu_common.h, shared by the sources
TARGETS = {"float32": "KerasLlamaDecodeMatmulF32", "int8": "KerasLlamaDecodeMatmulI8"}
FFI_NAMES = {"float32": "keras_llama_decode_matmul_f32", "int8": "keras_llama_decode_matmul_i8"}
ATTENTION_SOURCE = Path(__file__).with_name("attention.cc")
ATTENTION_TARGETS = {
    "forward": "KerasLlamaAttentionForward",
    "backward": "KerasLlamaAttentionBackward",
}
ATTENTION_FFI_NAMES = {
    "forward": "keras_llama_attention_forward",
    "backward": "keras_llama_attention_backward",
}
ACTIVATIONS_SOURCE = Path(__file__).with_name("activations.cc")
ACTIVATIONS_TARGETS = {"forward": "KerasLlamaSwigluForward", "backward": "KerasLlamaSwigluBackward"}
ACTIVATIONS_FFI_NAMES = {
    "forward": "keras_llama_swiglu_forward",
    "backward": "keras_llama_swiglu_backward",
}
CROSS_ENTROPY_SOURCE = Path(__file__).with_name("cross_entropy.cc")
CROSS_ENTROPY_TARGETS = {
    "forward": "KerasLlamaCrossEntropyForward",
    "backward": "KerasLlamaCrossEntropyBackward",
}
CROSS_ENTROPY_FFI_NAMES = {
    "forward": "keras_llama_cross_entropy_forward",
    "backward": "keras_llama_cross_entropy_backward",
}

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_state = {"loaded": None, "error": None, "thread": None}
_attention_state = {"loaded": None, "error": None}
_cross_entropy_state = {"loaded": None, "error": None}
_activations_state = {"loaded": None, "error": None}
_training_state = {"thread": None}


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
    return _library_available(
        "decoding", SOURCE, TARGETS, FFI_NAMES, _state, fallback="XLA's matmuls (slower decoding)"
    )


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


def _build(source=None):
    """Compiles ``source`` (default `SOURCE`) into a cached shared library; returns its path."""
    import jax
    import jaxlib

    from keras_llama.presets.handles import cache_dir

    source = Path(SOURCE if source is None else source)
    compiler = _compiler()
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, timeout=30
    ).stdout
    flags = ["-O3", "-march=native", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC",
             "-w"]  # fmt: skip
    key = hashlib.sha256()
    headers = [h.read_bytes() for h in sorted(HEADERS_DIR.glob("*.h"))]  # cpu_common.h
    for part in (source.read_bytes(), *headers, version.encode(), " ".join(flags).encode(),
                 jaxlib.__version__.encode(), _cpu_identity().encode()):  # fmt: skip
        key.update(part)
    folder = Path(cache_dir()) / "kernels"
    library = folder / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        output = Path(tmp) / library.name
        includes = ["-I", str(HEADERS_DIR), "-I", jax.ffi.include_dir()]
        command = [compiler, *flags, *includes, str(source), "-o", str(output)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(
                f"compiling {source.name} failed ({' '.join(command)}):\n{result.stderr[-2000:]}"
            )
        os.replace(output, library)  # atomic: never a half-written library
    return library


def _load(library, targets, ffi_names, state):
    # Registers each of ``targets`` (name -> exported symbol) under ``ffi_names[name]``.
    import ctypes

    import jax

    lib = ctypes.cdll.LoadLibrary(str(library))
    for name, symbol in targets.items():
        jax.ffi.register_ffi_target(
            ffi_names[name], jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu"
        )
    state["library"] = lib  # keep it loaded


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


# --- training kernels (attention, cross-entropy) -----------------------------------------------
def _library_available(
    what, source, targets, ffi_names, state, fallback="XLA's (slower training and scoring)"
):
    # Builds (once per machine), loads and registers one kernel library; never raises: a
    # failed build logs why and returns False, and the caller keeps XLA's path.
    if not enabled():
        return False
    with _lock:
        if state["loaded"] is None and state["error"] is None:
            try:
                _load(_build(source), targets, ffi_names, state)
                state["loaded"] = True
            except Exception as e:  # noqa: BLE001 - any failure means "use XLA's path"
                state["error"] = e
                logger.warning(
                    "keras-llama: native %s kernels unavailable, using %s: %s", what, fallback, e
                )
        return bool(state["loaded"])


def attention_available():
    """True when the native attention kernels are built, loaded and registered (building them
    now, once per machine, if needed). Never raises: a failed build logs why and returns False,
    and the caller keeps XLA's attention."""
    return _library_available(
        "attention", ATTENTION_SOURCE, ATTENTION_TARGETS, ATTENTION_FFI_NAMES, _attention_state
    )


def ensure_training_kernels_built_in_background():
    """Starts building (and loading) the attention, cross-entropy and SwiGLU kernels on a
    thread, so that a first `fit()` compiles them while Keras builds the optimizer and XLA
    compiles the step; `attention_available()` and the others wait for it (their lock)."""
    if not enabled() or _training_state["thread"] is not None:
        return

    # The libraries as they are now (a test that later swaps a source or a state in is not
    # raced by this thread).
    libraries = [
        ("attention", ATTENTION_SOURCE, ATTENTION_TARGETS, ATTENTION_FFI_NAMES, _attention_state),
        ("cross-entropy", CROSS_ENTROPY_SOURCE, CROSS_ENTROPY_TARGETS, CROSS_ENTROPY_FFI_NAMES,
         _cross_entropy_state),
        ("SwiGLU", ACTIVATIONS_SOURCE, ACTIVATIONS_TARGETS, ACTIVATIONS_FFI_NAMES,
         _activations_state),
    ]  # fmt: skip

    def build():
        for library in libraries:
            _library_available(*library)

    thread = threading.Thread(target=build, daemon=True)
    _training_state["thread"] = thread
    thread.start()


def attention_build_error():
    """Why the attention kernels are unavailable (an exception), or None."""
    return _attention_state["error"]


def cross_entropy_available():
    """True when the native cross-entropy kernels are built, loaded and registered (building
    them now, once per machine, if needed). Never raises, like `attention_available`."""
    return _library_available(
        "cross-entropy",
        CROSS_ENTROPY_SOURCE,
        CROSS_ENTROPY_TARGETS,
        CROSS_ENTROPY_FFI_NAMES,
        _cross_entropy_state,
    )


def swiglu_available():
    """True when the native SwiGLU kernels are built, loaded and registered (building them
    now, once per machine, if needed). Never raises, like `attention_available`."""
    return _library_available(
        "SwiGLU",
        ACTIVATIONS_SOURCE,
        ACTIVATIONS_TARGETS,
        ACTIVATIONS_FFI_NAMES,
        _activations_state,
    )


def swiglu_build_error():
    """Why the SwiGLU kernels are unavailable (an exception), or None."""
    return _activations_state["error"]


def cross_entropy_build_error():
    """Why the cross-entropy kernels are unavailable (an exception), or None."""
    return _cross_entropy_state["error"]


def applies(available, *arrays):
    """Whether a native training kernel takes ``arrays``: all float32, no active
    `keras.distribution` (XLA cannot partition a custom call: sharded models keep XLA's path),
    and its library ``available()`` (checked last: it may build the library)."""
    import keras

    if any(x.dtype != "float32" for x in arrays):
        return False
    return keras.distribution.distribution() is None and available()


def attention_supported(query, key, value):
    """Whether `attention` takes these operands: float32, head size a multiple of 16, query
    heads a multiple of key/value heads, at least one key."""
    import jax.numpy as jnp

    if not (query.ndim == key.ndim == value.ndim == 4):
        return False
    if any(x.dtype != jnp.float32 for x in (query, key, value)):
        return False
    head_dim, heads, kv_heads = query.shape[3], query.shape[2], key.shape[2]
    return (
        head_dim % 16 == 0
        and kv_heads > 0
        and heads % kv_heads == 0
        and key.shape[1] > 0
        and key.shape == value.shape
    )


def _attention_forward(query, key, value, mask, scale):
    import jax
    import jax.numpy as jnp
    import numpy as np

    b, t, u, _ = query.shape
    out = (
        jax.ShapeDtypeStruct(query.shape, jnp.float32),
        jax.ShapeDtypeStruct((b, u, t), jnp.float32),
    )
    call = jax.ffi.ffi_call(ATTENTION_FFI_NAMES["forward"], out, vmap_method="sequential")
    return call(query, key, value, mask, scale=np.float32(scale))


def _attention_backward(query, key, value, mask, output, lse, grad, scale):
    import jax
    import jax.numpy as jnp
    import numpy as np

    out = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (query, key, value))
    call = jax.ffi.ffi_call(ATTENTION_FFI_NAMES["backward"], out, vmap_method="sequential")
    passes = np.int32(ATTENTION_BACKWARD_PASSES)
    return call(query, key, value, mask, output, lse, grad, scale=np.float32(scale), passes=passes)


@functools.cache
def _make_attention():
    import jax

    @functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
    def attention(query, key, value, mask, scale):
        return _attention_forward(query, key, value, mask, scale)[0]

    def forward(query, key, value, mask, scale):
        output, lse = _attention_forward(query, key, value, mask, scale)
        return output, (query, key, value, mask, output, lse)

    def backward(scale, residuals, grad):
        query, key, value, mask, output, lse = residuals
        grads = _attention_backward(query, key, value, mask, output, lse, grad, scale)
        return (*grads, None)

    attention.defvjp(forward, backward)
    return attention


# The attention backward pass: 0 lets the kernel choose (one pass per (batch, key/value head)
# when there are at least 4 per thread, else two finer-grained passes); 1 or 2 force one (for
# tests; read when a computation is traced).
ATTENTION_BACKWARD_PASSES = 0


def attention(query, key, value, mask, scale):
    """Masked softmax attention, differentiable (JAX, float32; needs `attention_available()`).

    ``softmax(where(mask, scale * q.k, -inf)) @ v`` for ``query`` [B, T, U, H] over ``key`` and
    ``value`` [B, S, V, H] (query head u reads key/value head u // (U // V)), ``mask`` bool
    [B, T, S] (broadcastable). A row whose mask is all False attends to every key uniformly
    and passes no gradient to its scores (as a very negative masking constant does).
    Returns [B, T, U, H] float32.
    """
    import jax.numpy as jnp

    b, t = query.shape[0], query.shape[1]
    mask = jnp.broadcast_to(jnp.asarray(mask, bool), (b, t, key.shape[1]))
    return _make_attention()(query, key, value, mask, float(scale))


# --- cross-entropy -------------------------------------------------------------------------------
def _cross_entropy_forward(logits, labels):
    import jax
    import jax.numpy as jnp

    rows = jax.ShapeDtypeStruct(labels.shape, jnp.float32)
    call = jax.ffi.ffi_call(
        CROSS_ENTROPY_FFI_NAMES["forward"], (rows, rows), vmap_method="sequential"
    )
    return call(logits, labels)


def _cross_entropy_backward(logits, labels, lse, grad):
    import jax
    import jax.numpy as jnp

    out = jax.ShapeDtypeStruct(logits.shape, jnp.float32)
    # The gradient overwrites the logits when XLA can give their buffer up (they are dead
    # after this in a training step): no second [tokens, vocabulary] buffer.
    call = jax.ffi.ffi_call(
        CROSS_ENTROPY_FFI_NAMES["backward"],
        out,
        vmap_method="sequential",
        input_output_aliases={0: 0},
    )
    return call(logits, labels, lse, grad)


@functools.cache
def _make_cross_entropy():
    import jax

    @jax.custom_vjp
    def cross_entropy(logits, labels):
        return _cross_entropy_forward(logits, labels)[0]

    def forward(logits, labels):
        loss, lse = _cross_entropy_forward(logits, labels)
        return loss, (logits, labels, lse)

    def backward(residuals, grad):
        logits, labels, lse = residuals
        return _cross_entropy_backward(logits, labels, lse, grad), None

    cross_entropy.defvjp(forward, backward)
    return cross_entropy


def cross_entropy(logits, labels):
    """Per-row softmax cross-entropy ``logsumexp(logits) - logits[label]`` (JAX, float32
    ``logits`` [..., V], int ``labels`` [...]; needs `cross_entropy_available()`), with the
    gradient ``softmax(logits) - one_hot(label)`` in one pass. A label outside [0, V) gives
    loss 0 and gradient 0 (Keras's one-hot semantics). Returns [...] float32."""
    import jax.numpy as jnp

    lead = tuple(labels.shape)
    vocab = logits.shape[-1]
    flat_logits = jnp.reshape(logits, (-1, vocab))
    flat_labels = jnp.reshape(jnp.asarray(labels, jnp.int32), (-1,))
    return jnp.reshape(_make_cross_entropy()(flat_logits, flat_labels), lead)


# --- SwiGLU --------------------------------------------------------------------------------------
def _swiglu_forward(gate, up):
    import jax
    import jax.numpy as jnp

    out = jax.ShapeDtypeStruct(gate.shape, jnp.float32)
    call = jax.ffi.ffi_call(ACTIVATIONS_FFI_NAMES["forward"], out, vmap_method="sequential")
    return call(gate, up)


def _swiglu_backward(gate, up, grad):
    import jax
    import jax.numpy as jnp

    out = (jax.ShapeDtypeStruct(gate.shape, jnp.float32),) * 2
    call = jax.ffi.ffi_call(ACTIVATIONS_FFI_NAMES["backward"], out, vmap_method="sequential")
    return call(gate, up, grad)


@functools.cache
def _make_swiglu():
    import jax

    @jax.custom_vjp
    def swiglu(gate, up):
        return _swiglu_forward(gate, up)

    def forward(gate, up):
        return _swiglu_forward(gate, up), (gate, up)

    def backward(residuals, grad):
        gate, up = residuals
        return _swiglu_backward(gate, up, grad)

    swiglu.defvjp(forward, backward)
    return swiglu


def swiglu(gate, up):
    """``silu(gate) * up`` (``silu(g) = g * sigmoid(g)``), differentiable (JAX, float32 arrays
    of one shape; needs `swiglu_available()`). Returns float32 of that shape."""
    import jax.numpy as jnp

    if gate.shape != up.shape:
        raise ValueError(
            f"`gate` and `up` must have the same shape. Received: gate.shape={gate.shape}, "
            f"up.shape={up.shape}"
        )
    return _make_swiglu()(jnp.asarray(gate, jnp.float32), jnp.asarray(up, jnp.float32))


# TEMPORARY shim (replaced by the kernels branch)
def build_in_background(*names):
    ensure_training_kernels_built_in_background()


import importlib as _importlib  # noqa: E402

from keras_llama.kernels import attention as _attention_module  # noqa: E402, F401
from keras_llama.kernels import swiglu as _swiglu_module  # noqa: E402, F401
from keras_llama.kernels.library import LIBRARIES, library  # noqa: E402, F401

_importlib.import_module("keras_llama.kernels.attention")
_importlib.import_module("keras_llama.kernels.swiglu")
