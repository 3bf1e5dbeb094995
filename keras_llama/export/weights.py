"""A backbone's weights as exporters need them: numpy arrays by our variable path, LoRA merged.

Quantized backbones are refused with the mode named: their int8/int4 kernels are not the
weights a float checkpoint holds, and an exporter must never write wrong weights.
"""

import keras
import numpy as np

from keras_llama.utils import keras_compat


def backbone_config(backbone):
    """The `LlamaBackbone` keyword arguments the converter tables read."""
    return backbone.get_config()


def float_dtype(backbone):
    """The variables' float dtype name ("float32", "bfloat16" or "float16")."""
    return keras.backend.standardize_dtype(backbone.dtype_policy.variable_dtype)


def weight_reader(backbone, merge_lora=True):
    """``get(our_path) -> numpy array`` with LoRA adapters merged into their kernels (the
    frozen base weights with ``merge_lora=False``).

    Raises:
        ValueError: for a quantized backbone (the error names the mode).
    """
    mode = backbone.quantization_scheme
    if mode is not None:
        raise ValueError(
            f"Cannot export a quantized model (mode={mode!r}): its kernels are integers with "
            "scales, not the float weights a checkpoint holds. Export the float model (reload "
            "it from its preset before `quantize()`; a GGUF file's blocks kept as stored: "
            "`from_preset(path, dtype='float32')`), and quantize the export instead, e.g. "
            "`export_to_gguf(path, dtype='q8_0')`."
        )
    layers = {layer.path: layer for layer in keras_compat.sublayers(backbone)}
    variables = {v.path: v for v in backbone.weights}

    def get(path):
        layer_path, name = path.rsplit("/", 1)
        layer = layers.get(layer_path)
        if merge_lora and layer is not None and getattr(layer, "lora_enabled", False):
            value = getattr(layer, name)  # Keras merges the adapters: W + (alpha/r) A @ B
        else:
            value = variables[path]
        return np.asarray(keras.ops.convert_to_numpy(value))

    return get


def lora_free_copy(causal_lm, merge_lora=True):
    """A copy of a task whose backbone has no LoRA adapters: merged into the kernels, or
    dropped (``merge_lora=False``: the base weights). The preprocessor is shared."""
    from keras_llama.models.weights import assign_weights, build_uninitialized

    backbone = causal_lm.backbone
    get = weight_reader(backbone, merge_lora)
    copy = build_uninitialized(type(backbone).from_config, config=backbone.get_config())
    assign_weights(copy, ((v.path, get(v.path)) for v in copy.weights))
    return type(causal_lm)(backbone=copy, preprocessor=causal_lm.preprocessor)
