"""The reference for quantized models: transformers in float64 on the weights dequantized in
numpy, by hand from the stored integers and scales (never through the code under test)."""

import keras
import numpy as np


def dequantized(backbone, path):
    """An int8 variable of ``backbone`` divided by its scale, in numpy float64: Keras keeps one
    scale per output channel (per vocabulary row for the embedding table), in the output's
    layout (EinsumDense: ``[1, 1, *output dims]``)."""
    variables = {v.path: np.asarray(v) for v in backbone.weights}
    q = variables[path].astype("float64")
    if path.endswith("/embeddings"):
        return q / variables[path + "_scale"].astype("float64")[:, None]
    scale = variables[path + "_scale"].astype("float64")
    if path.endswith("/reverse_embeddings"):
        return q / scale[None, :]
    out_dims = 1 if path.endswith("attention_output/kernel") else q.ndim - 1
    return q / scale.reshape(q.shape[-out_dims:])


def float64_weights(backbone, dequantize=dequantized):
    """``get(our_path)`` -> float64 numpy: int8 variables through ``dequantize``."""
    variables = {v.path: v for v in backbone.weights}

    def get(path):
        if keras.backend.standardize_dtype(variables[path].dtype) == "int8":
            return dequantize(backbone, path)
        return np.asarray(variables[path], "float64")

    return get


def float64_logits(backbone, token_ids, padding_mask=None, get=None):
    """transformers' `LlamaForCausalLM` in float64 with ``backbone``'s weights (``get`` from
    `float64_weights` by default): logits [batch, seq, vocab] float64."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from keras_llama.presets import huggingface

    config = backbone.get_config()
    get = get or float64_weights(backbone)
    model = LlamaForCausalLM(LlamaConfig(**huggingface.export_config(config))).double().eval()
    state = {name: torch.from_numpy(np.ascontiguousarray(array))
             for name, array in huggingface.export_weights(get, config)}  # fmt: skip
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m or m == "lm_head.weight" for m in missing)
    if config.get("tie_word_embeddings"):
        model.tie_weights()
    mask = None if padding_mask is None else torch.as_tensor(np.asarray(padding_mask))
    with torch.no_grad():
        ids = torch.as_tensor(np.asarray(token_ids), dtype=torch.long)
        return model(input_ids=ids, attention_mask=mask).logits.numpy()
