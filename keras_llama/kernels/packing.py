"""Keras layers -> `decode_matmul.PackedWeights`: the one place that knows how a Keras Dense,
EinsumDense or ReversibleEmbedding stores its weights: float, int8 weight-only, or int4 in
blocks of 32 (``quantize("int4_weight_only")``).

Keras dequantizes an int8 kernel with ``kernel / scale``, one scale per output channel; packed
int8 weights carry the reciprocal as their column scale (``x @ (kernel * column_scale)``).
Keras's int4 in blocks stores values q in -8..7 two per byte, with a scale s and a zero point
z per block of input rows and output column: ``w = (q - z) * s``. Packed 4-bit blocks hold
``u = q + 8`` (0..15) with ``w = s * u + offset``, ``offset = -s * (z + 8)``.
GGUF's blocks (`keras_llama.models.block_layers`: values [out, in ...] with float16 scales
[out, in / 32]) pack as they are: Q8_0 into int8 blocks (``w = d * q``), Q4_0 and Q4_1 into
4-bit blocks with ``offset = -8 * d`` and ``offset = m`` (exact in float32), in the layouts of
the integer dot products that multiply them (`block_dot.cc`).
"""

import math

import keras
from keras import ops

from keras_llama.kernels import decode_matmul
from keras_llama.quantization import block_format_of, int4_block_size, is_int8_weight_only
from keras_llama.utils import keras_compat

# A GGUF layer's block format -> the packed kind its blocks become: multiplied in integers
# against the input quantized to int16 blocks (`block_dot.cc`).
_BLOCK_KINDS = {
    "q8_0": "q8_blocks_int16_dot",
    "q4_0": "q4_blocks_int16_dot",
    "q4_1": "q4_blocks_int16_dot",
}
_PACK_BLOCKS = {
    "q8_blocks": decode_matmul.pack_q8_blocks,
    "q4_blocks": decode_matmul.pack_q4_blocks,
    "q8_blocks_int16_dot": decode_matmul.pack_q8_blocks_int16_dot,
    "q4_blocks_int16_dot": decode_matmul.pack_q4_blocks_int16_dot,
}


def is_plain(*layers):
    """True when every layer holds plain float weights: no quantization, no LoRA."""
    return all(
        x.quantization_mode is None and not getattr(x, "lora_enabled", False) for x in layers
    )


def dense_matrix(layer, input_dims):
    """A plain Dense/EinsumDense layer's kernel as a [K, N] matrix in its compute dtype (K =
    the product of its first ``input_dims`` dims)."""
    return _as_matrix(ops.cast(layer.kernel, layer.compute_dtype), input_dims)


def packable_mode(layers):
    """How `pack_dense` packs ``layers``: ``"float32"`` when every layer computes in float32
    from a float kernel, ``"int8"`` when every layer is int8 weight-only
    (``quantize("int8")``), ``"q4_blocks"`` when every layer is Keras's int4 in blocks of 32,
    ``"q4_blocks_int16_dot"`` / ``"q8_blocks_int16_dot"`` when every layer holds GGUF Q4_0 / Q4_1
    or Q8_0 blocks (multiplied in integers, with the input in int16 blocks); None
    for anything else (LoRA, W8A8, int4 in other blocks, other dtypes, a mix)."""
    modes = {_mode(layer) for layer in layers}
    return modes.pop() if len(modes) == 1 and None not in modes else None


def packable_embedding_mode(embedding):
    """How `pack_reverse_embedding` packs ``embedding`` (``"float32"``, ``"int8"``,
    ``"q4_blocks"``, ``"q4_blocks_int16_dot"``, ``"q8_blocks_int16_dot"``), or None."""
    if embedding.logit_soft_cap is not None:
        return None
    if getattr(embedding, "reverse_dtype", None) not in (None, "float32"):
        return None
    mode = _mode(embedding)
    if mode == "int8":  # one scale per vocabulary entry
        tied = embedding.tie_weights
        scale = embedding.embeddings_scale if tied else embedding.reverse_embeddings_scale
        if math.prod(scale.shape) != embedding.input_dim:
            return None
    return mode


def _mode(layer):
    if getattr(layer, "lora_enabled", False) or layer.compute_dtype != "float32":
        return None
    if layer.quantization_mode is None:
        return "float32"
    if isinstance(layer, keras.layers.EinsumDense):  # a Keras without it: the layer's own path
        if not keras_compat.has_einsum_dequantization_scale(layer):
            return None
    if block_format_of(layer) is not None:
        return _BLOCK_KINDS[block_format_of(layer)]
    if int4_block_size(layer) == decode_matmul.BLOCK:
        return "q4_blocks"
    return "int8" if is_int8_weight_only(layer) else None


def pack_dense(layers, input_dims):
    """The kernels of Dense/EinsumDense ``layers`` (all reading the same input), each as a
    [K, N] matrix (K = the product of its first ``input_dims`` dims), concatenated along N
    into one `PackedWeights` (see `packable_mode`); None when they do not pack."""
    mode = packable_mode(layers)
    if mode is None:
        return None
    if mode == "float32":
        matrices = [_as_matrix(ops.convert_to_tensor(x.kernel), input_dims) for x in layers]
        return decode_matmul.pack(ops.concatenate(matrices, axis=1))
    if mode in _PACK_BLOCKS:
        parts = [_blocks(x, "kernel") for x in layers]
        joined = [ops.concatenate([p[i] for p in parts], axis=1) for i in range(len(parts[0]))]
        return _PACK_BLOCKS[mode](*joined)
    matrices, scales = [], []
    for layer in layers:
        kernel = ops.convert_to_tensor(keras_compat.int8_kernel(layer))
        scale = ops.cast(ops.convert_to_tensor(layer.kernel_scale), "float32")
        if isinstance(layer, keras.layers.EinsumDense):
            scale = keras_compat.einsum_dequantization_scale(layer, scale)
        scale = ops.broadcast_to(scale, kernel.shape)
        matrices.append(_as_matrix(kernel, input_dims))
        scales.append(1.0 / _as_matrix(scale, input_dims)[0])
    return decode_matmul.pack_int8(
        ops.concatenate(matrices, axis=1), ops.concatenate(scales, axis=0)
    )


def pack_reverse_embedding(embedding):
    """A `keras.layers.ReversibleEmbedding`'s reverse projection [hidden, vocab] as
    `PackedWeights` (float32, or int8 weight-only with one scale per vocabulary entry); None
    when it computes otherwise (soft cap, another dtype, other quantization)."""
    mode = packable_embedding_mode(embedding)
    if mode is None:
        return None
    if mode == "float32":
        if embedding.tie_weights:
            matrix = ops.transpose(ops.convert_to_tensor(embedding.embeddings))
        else:
            matrix = ops.convert_to_tensor(embedding.reverse_embeddings)
        return decode_matmul.pack(matrix)
    if block_format_of(embedding) is not None:
        name = "embeddings" if embedding.tie_weights else "reverse_embeddings"
        return _PACK_BLOCKS[mode](*_blocks(embedding, name))
    if mode == "q4_blocks":
        hidden = embedding.output_dim
        if embedding.tie_weights:  # [vocab, hidden / 2] packed along hidden; scale [vocab, G]
            table = keras_compat.int8_embeddings(embedding)
            values = ops.transpose(keras.quantizers.unpack_int4(table, hidden, axis=-1))
            scale = ops.transpose(embedding.embeddings_scale)
            zero = ops.transpose(embedding.embeddings_zero)
        else:  # [hidden / 2, vocab] packed along hidden; scale [G, vocab]
            values = keras.quantizers.unpack_int4(embedding.reverse_embeddings, hidden, axis=0)
            scale, zero = embedding.reverse_embeddings_scale, embedding.reverse_embeddings_zero
        return decode_matmul.pack_q4_blocks(*_unsigned_blocks(values, scale, zero))
    if embedding.tie_weights:
        matrix = ops.transpose(ops.convert_to_tensor(keras_compat.int8_embeddings(embedding)))
        scale = ops.convert_to_tensor(embedding.embeddings_scale)
    else:
        matrix = ops.convert_to_tensor(embedding.reverse_embeddings)
        scale = ops.convert_to_tensor(embedding.reverse_embeddings_scale)
    return decode_matmul.pack_int8(matrix, 1.0 / ops.reshape(ops.cast(scale, "float32"), (-1,)))


def _blocks(layer, name):
    """A block-quantized matrix as `decode_matmul.pack_q4_blocks` / `pack_q8_blocks` take it:
    ``(u [K, N], scale [G, N], offset [G, N])`` or ``(q [K, N], scale [G, N])``."""
    block_format = block_format_of(layer)
    if block_format is None:
        return _int4_blocks(layer)
    stored = getattr(layer, "_" + name)  # [N, K] int8, or [N, K / 2] uint8 (two per byte)
    scale = ops.transpose(ops.cast(getattr(layer, name + "_scale"), "float32"))  # [G, N]
    if block_format == "q8_0":
        return ops.transpose(stored), scale
    rows, groups = ops.shape(stored)[0], ops.shape(scale)[0]
    b = ops.reshape(ops.cast(stored, "int32"), (rows, groups, 16))
    values = ops.concatenate([ops.bitwise_and(b, 15), ops.right_shift(b, 4)], axis=-1)
    values = ops.transpose(ops.cast(ops.reshape(values, (rows, groups * 32)), "uint8"))
    if block_format == "q4_0":
        return values, scale, -8.0 * scale
    return values, scale, ops.transpose(ops.cast(getattr(layer, name + "_min"), "float32"))


def _int4_blocks(layer):
    """A Keras int4 Dense/EinsumDense in blocks -> ``(u [K, N] 0..15, scale [G, N], offset
    [G, N])``. Keras keeps the kernel as [K, ceil(N / 2)] (an EinsumDense's flattened to
    [reduced dims, other dims]) packed along N, scales and zero points [G, N]."""
    scale = ops.convert_to_tensor(layer.kernel_scale)
    values = keras.quantizers.unpack_int4(keras_compat.int8_kernel(layer), scale.shape[-1], axis=-1)
    return _unsigned_blocks(values, scale, layer.kernel_zero)


def _unsigned_blocks(values, scale, zero):
    # (q - z) * s = s * (q + 8) - s * (z + 8)
    scale = ops.cast(ops.convert_to_tensor(scale), "float32")
    zero = ops.cast(ops.convert_to_tensor(zero), "float32")
    unsigned = ops.cast(ops.cast(values, "int32") + 8, "uint8")
    return unsigned, scale, -scale * (zero + 8.0)


def _as_matrix(array, input_dims):
    # [i1, .., i_d, o1, ...] -> [i1 * .. * i_d, o1 * ...]
    rows = math.prod(array.shape[:input_dims])
    return ops.reshape(array, (rows, -1))
