"""Skinny matmuls for decoding (`decode_matmul.cc`): ``x [..., K] @ W [K, N]`` for a few rows,
with W packed into column panels, float32 or int8 with one float scale per column.

Decoding a token at batch size 1-8 reads every weight once and does little arithmetic with it:
its speed is the speed at which the weights stream from memory. XLA:CPU's matrix-vector
products reach about 29 GB/s on the 2-core machine this was tuned on; the native kernels stream
packed weights at about 36 GB/s at batch 1 and keep that speed up to batch 8, where XLA's
small-batch products take twice as long. They also read int8 weights directly (XLA converts
them to float first), which is what makes int8 decoding faster than float32.

Needs ``library("decode_matmul").ensure_built()`` before `matmul` is traced.
"""

import jax
import jax.numpy as jnp

from keras_llama.kernels.library import require_loaded

PANEL = 32  # columns per panel; `kPanel` in decode_matmul.cc
FFI_NAMES = {"float32": "keras_llama_decode_matmul_f32", "int8": "keras_llama_decode_matmul_i8"}


@jax.tree_util.register_pytree_node_class
class PackedWeights:
    """A [K, N] weight matrix laid out for `matmul` (a JAX pytree): ``panels``
    [ceil(N / 32), K, 32] (float32 or int8; panel p holds columns 32p..32p+31, zero-padded past
    N), ``scale`` [32 * panels] (float32 multiplier per column, int8 only, else None) and
    ``n`` = N (static)."""

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

    def __repr__(self):
        dtype = "float32" if self.scale is None else "int8"
        return f"PackedWeights(shape={self.shape}, {dtype})"


def _panels(matrix):

    k, n = matrix.shape
    count = -(-n // PANEL)
    matrix = jnp.pad(matrix, ((0, 0), (0, count * PANEL - n)))
    return matrix.reshape(k, count, PANEL).transpose(1, 0, 2)


def pack(matrix):
    """``matrix`` [K, N] float -> `PackedWeights` (float32)."""
    return PackedWeights(_panels(jnp.asarray(matrix, jnp.float32)), None, matrix.shape[1])


def pack_int8(matrix, column_scale):
    """``matrix`` [K, N] int8 and ``column_scale`` [N] -> `PackedWeights` computing
    ``x @ (matrix * column_scale)``."""
    n = matrix.shape[1]
    count = -(-n // PANEL)
    scale = jnp.pad(jnp.asarray(column_scale, jnp.float32).reshape(n), (0, count * PANEL - n))
    return PackedWeights(_panels(jnp.asarray(matrix, jnp.int8)), scale, n)


def matmul(x, packed):
    """``x [..., K]`` (float32) times the matrix of ``packed`` -> [..., N] float32."""
    require_loaded("decode_matmul")
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
