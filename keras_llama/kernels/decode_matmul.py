"""Skinny matmuls for decoding (`decode_matmul.cc`): ``x [..., K] @ W [K, N]`` for a few rows,
with W packed into column panels: float32, int8 with one float scale per column, or
block-quantized with one scale (and offset) per column and block of 32 rows: int8 blocks
(GGUF's Q8_0) or 4-bit blocks (GGUF's Q4_0 / Q4_1, Keras's int4 in blocks of 32).

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
BLOCK = 32  # rows per scale of block-quantized weights; `kBlock` in decode_matmul.cc
FFI_NAMES = {
    "float32": "keras_llama_decode_matmul_f32",
    "int8": "keras_llama_decode_matmul_i8",
    "q8_blocks": "keras_llama_decode_matmul_q8_blocks",
    "q4_blocks": "keras_llama_decode_matmul_q4_blocks",
    "q8_blocks_int16_dot": "keras_llama_q8_blocks_int16_dot",
    "q4_blocks_int16_dot": "keras_llama_q4_blocks_int16_dot",
}


@jax.tree_util.register_pytree_node_class
class PackedWeights:
    """A [K, N] weight matrix laid out for `matmul` (a JAX pytree), ``kind`` one of:

    * ``"float32"``: ``panels`` [ceil(N / 32), K, 32] float32 (panel p holds columns
      32p..32p+31, zero-padded past N);
    * ``"int8"``: the same panels in int8 and ``scale`` [32 * panels], one float32 multiplier
      per column;
    * ``"q8_blocks"``: int8 panels and ``scale`` [panels, ceil(K / 32), 32], one multiplier per
      column and block of 32 rows (``w = scale * q``);
    * ``"q4_blocks"``: ``panels`` [panels, K, 16] uint8 (byte j of a row: column j in its low
      nibble, column j + 16 in its high nibble, values 0..15), ``scale`` and ``offset``
      [panels, ceil(K / 32), 32] (``w = scale * q + offset``);
    * ``"q8_blocks_int16_dot"`` and ``"q4_blocks_int16_dot"``: the same matrices multiplied
      in integers: the input is quantized to int16 per block of 32 values (within 2^-16 of
      the block's largest), and each block's integer dot product is scaled once
      (`block_dot.cc`, which describes their layout: ``panels`` [panels, ceil(K / 32), 16,
      64] int8 or [.., 16, 32] uint8).

    ``n`` = N, ``kind`` and ``k`` = K are static."""

    def __init__(self, panels, scale, n, offset=None, kind=None, k=None):
        self.panels = panels
        self.scale = scale
        self.offset = offset
        self.n = n
        self.kind = kind or ("float32" if scale is None else "int8")
        self.k = panels.shape[1] if k is None else k  # the int16-dot layouts hold K in blocks

    def tree_flatten(self):
        return (self.panels, self.scale, self.offset), (self.n, self.kind, self.k)

    @classmethod
    def tree_unflatten(cls, aux, children):
        panels, scale, offset = children
        n, kind, k = aux
        return cls(panels, scale, n, offset, kind, k)

    @property
    def shape(self):
        return (self.k, self.n)

    def __repr__(self):
        return f"PackedWeights(shape={self.shape}, {self.kind})"


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


def _block_panels(values, n):
    # [G, N] -> [panels, G, 32], zero-padded past N.
    count = -(-n // PANEL)
    values = jnp.pad(values, ((0, 0), (0, count * PANEL - n)))
    return values.reshape(values.shape[0], count, PANEL).transpose(1, 0, 2)


def _check_blocks(matrix, scale):
    k, n = matrix.shape
    groups = -(-k // BLOCK)
    if tuple(scale.shape) != (groups, n):
        raise ValueError(
            f"Block scales of a [{k}, {n}] matrix must be [ceil({k} / {BLOCK}), {n}] = "
            f"[{groups}, {n}]. Received: shape={tuple(scale.shape)}"
        )


def pack_q8_blocks(matrix, scale):
    """``matrix`` [K, N] int8 and ``scale`` [ceil(K / 32), N] -> `PackedWeights` computing
    ``x @ (matrix * scale[k // 32])`` (GGUF's Q8_0 layout: one scale per 32 rows)."""
    _check_blocks(matrix, scale)
    n = matrix.shape[1]
    scale = _block_panels(jnp.asarray(scale, jnp.float32), n)
    return PackedWeights(_panels(jnp.asarray(matrix, jnp.int8)), scale, n, None, "q8_blocks")


def pack_q4_blocks(values, scale, offset):
    """``values`` [K, N] integers 0..15, ``scale`` and ``offset`` [ceil(K / 32), N] ->
    `PackedWeights` computing ``x @ (values * scale[k // 32] + offset[k // 32])`` with the
    values stored two per byte (GGUF's Q4_1 math; Q4_0 is ``offset = -8 * scale``)."""
    _check_blocks(values, scale)
    _check_blocks(values, offset)
    n = values.shape[1]
    panels = _panels(jnp.asarray(values, jnp.uint8))  # [P, K, 32]
    nibbles = panels[..., :16] | (panels[..., 16:] << 4)  # column j low, j + 16 high
    return PackedWeights(
        nibbles,
        _block_panels(jnp.asarray(scale, jnp.float32), n),
        n,
        _block_panels(jnp.asarray(offset, jnp.float32), n),
        "q4_blocks",
    )


def _pair_bytes(values, n):
    # [K, N] -> [panels, G, 16, 32 columns, 2 rows], zero-padded past K and N.
    k = values.shape[0]
    groups, count = -(-k // BLOCK), -(-n // PANEL)
    values = jnp.pad(values, ((0, groups * BLOCK - k), (0, count * PANEL - n)))
    values = values.reshape(groups, BLOCK // 2, 2, count, PANEL)
    return values.transpose(3, 0, 1, 4, 2)


def pack_q8_blocks_int16_dot(matrix, scale):
    """As `pack_q8_blocks`, for the integer dot products of `block_dot.cc` (GGUF's Q8_0):
    one pair of rows x 32 columns after another. The scales are kept as float16, as GGUF
    stores them (other values are rounded to float16)."""
    _check_blocks(matrix, scale)
    n = matrix.shape[1]
    pairs = _pair_bytes(jnp.asarray(matrix, jnp.int8), n)  # [P, G, 16, 32, 2]
    panels = pairs.reshape(*pairs.shape[:3], 2 * PANEL)
    scale = _block_panels(jnp.asarray(scale, jnp.float16), n)
    return PackedWeights(panels, scale, n, None, "q8_blocks_int16_dot", matrix.shape[0])


def pack_q4_blocks_int16_dot(values, scale, offset):
    """As `pack_q4_blocks`, for the integer dot products of `block_dot.cc` (GGUF's Q4_0 /
    Q4_1): byte ``c * 2 + r`` of a pair holds column c of row r in its low nibble and column
    c + 16 in its high nibble. Scales and offsets are kept as float16, as GGUF stores them
    (Q4_0's ``-8 * scale`` is exact; other values are rounded to float16)."""
    _check_blocks(values, scale)
    _check_blocks(values, offset)
    n = values.shape[1]
    pairs = _pair_bytes(jnp.asarray(values, jnp.uint8), n)  # [P, G, 16, 32, 2]
    nibbles = pairs[..., :16, :] | (pairs[..., 16:, :] << 4)
    return PackedWeights(
        nibbles.reshape(*pairs.shape[:3], PANEL),
        _block_panels(jnp.asarray(scale, jnp.float16), n),
        n,
        _block_panels(jnp.asarray(offset, jnp.float16), n),
        "q4_blocks_int16_dot",
        values.shape[0],
    )


def matmul(x, packed):
    """``x [..., K]`` (float32) times the matrix of ``packed`` -> [..., N] float32."""
    require_loaded("decode_matmul")
    if x.shape[-1] != packed.k:
        raise ValueError(
            f"The input's last dimension must be the packed matrix's depth {packed.k}. "
            f"Received: x.shape={tuple(x.shape)}"
        )
    lead = x.shape[:-1]
    rows = 1
    for d in lead:
        rows *= d
    x = jnp.reshape(jnp.asarray(x, jnp.float32), (rows, x.shape[-1]))
    out = jax.ShapeDtypeStruct((rows, packed.n), jnp.float32)
    operands = [x, packed.panels] + [a for a in (packed.scale, packed.offset) if a is not None]
    y = jax.ffi.ffi_call(FFI_NAMES[packed.kind], out)(*operands)
    return jnp.reshape(y, (*lead, packed.n))
