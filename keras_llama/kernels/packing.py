"""TEMPORARY shim (replaced by the kernels branch)."""

import math

import keras
from keras import ops

from keras_llama.kernels import decode_matmul
from keras_llama.quantization import Int8WeightOnlyDTypePolicy, resolved_policy


def is_plain(*layers):
    return all(
        x.quantization_mode is None and not getattr(x, "lora_enabled", False) for x in layers
    )


def dense_matrix(layer, input_dims):
    return _as_matrix(ops.cast(layer.kernel, layer.compute_dtype), input_dims)


def _as_matrix(array, input_dims):
    rows = math.prod(array.shape[:input_dims])
    return ops.reshape(array, (rows, -1))


def _mode(layer):
    if getattr(layer, "lora_enabled", False) or layer.compute_dtype != "float32":
        return None
    if layer.quantization_mode is None:
        return "float32"
    if isinstance(resolved_policy(layer), Int8WeightOnlyDTypePolicy):
        return "int8"
    return None


def packable_mode(layers):
    """ "float32" or "int8" when every layer packs the same way, else None."""
    modes = {_mode(layer) for layer in layers}
    return modes.pop() if len(modes) == 1 and None not in modes else None


def packable_embedding_mode(embedding):
    if embedding.logit_soft_cap is not None or embedding.compute_dtype != "float32":
        return None
    if getattr(embedding, "reverse_dtype", None) not in (None, "float32"):
        return None
    return _mode(embedding)


def pack_dense(layers, input_dims):
    modes = {packable_mode(layers)}
    if modes == {None}:
        return None
    if modes == {"float32"}:
        matrices = [_as_matrix(ops.convert_to_tensor(x.kernel), input_dims) for x in layers]
        return decode_matmul.pack(ops.concatenate(matrices, axis=1))
    if modes != {"int8"}:
        return None
    matrices, scales = [], []
    for layer in layers:
        kernel = ops.convert_to_tensor(layer._kernel)
        scale = ops.cast(ops.convert_to_tensor(layer.kernel_scale), "float32")
        if isinstance(layer, keras.layers.EinsumDense):
            adjust = getattr(layer, "_adjust_scale_for_dequant", None)
            if adjust is None:
                return None
            scale = adjust(scale)
        scale = ops.broadcast_to(scale, kernel.shape)
        matrices.append(_as_matrix(kernel, input_dims))
        scales.append(1.0 / _as_matrix(scale, input_dims)[0])
    return decode_matmul.pack_int8(
        ops.concatenate(matrices, axis=1), ops.concatenate(scales, axis=0)
    )


def pack_reverse_embedding(embedding):
    mode = packable_embedding_mode(embedding)
    if mode is None:
        return None
    if mode == "float32":
        if embedding.tie_weights:
            kernel = ops.transpose(ops.convert_to_tensor(embedding.embeddings))
        else:
            kernel = ops.convert_to_tensor(embedding.reverse_embeddings)
        return decode_matmul.pack(kernel)
    if embedding.tie_weights:
        kernel = ops.transpose(ops.convert_to_tensor(embedding._embeddings))
        scale = ops.convert_to_tensor(embedding.embeddings_scale)
    else:
        kernel = ops.convert_to_tensor(embedding.reverse_embeddings)
        scale = ops.convert_to_tensor(embedding.reverse_embeddings_scale)
    vocab = kernel.shape[1]
    if math.prod(scale.shape) != vocab:
        return None
    return decode_matmul.pack_int8(kernel, 1.0 / ops.reshape(ops.cast(scale, "float32"), (-1,)))
