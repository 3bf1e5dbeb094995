"""The reference for quantized models: transformers in float64 on the weights dequantized in
numpy, by hand from the stored integers and scales (never through the code under test)."""

import keras
import numpy as np

BLOCK = 32  # "int4_weight_only"


def unpack_int4(packed, length, axis):
    """Keras's int4 packing undone by hand: each byte holds two signed 4-bit values, the even
    index in the low nibble; ``axis`` (0 or -1) is the packed one, trimmed to ``length``."""
    b = np.asarray(packed).view(np.uint8).astype(np.int64)
    lo, hi = b & 15, b >> 4
    lo, hi = lo - 16 * (lo >= 8), hi - 16 * (hi >= 8)  # two's complement nibbles
    if axis == 0:
        values = np.stack([lo, hi], axis=1).reshape(2 * b.shape[0], b.shape[1])[:length]
    else:
        values = np.stack([lo, hi], axis=-1).reshape(b.shape[0], 2 * b.shape[1])[:, :length]
    return values.astype("float64")


def dequantized_int4(backbone, path):
    """A Keras int4 variable in blocks of 32, ``(q - zero) * scale`` per block, by hand."""
    variables = {v.path: np.asarray(v) for v in backbone.weights}
    scale = variables[path + "_scale"].astype("float64")
    zero = variables[path + "_zero"].astype("float64")
    hidden = backbone.hidden_dim
    if path.endswith("/embeddings"):  # [vocab, hidden / 2], blocks along hidden: [vocab, G]
        q = unpack_int4(variables[path], hidden, -1)
        g = np.arange(hidden) // BLOCK
        return (q - zero[:, g]) * scale[:, g]
    if path.endswith("/reverse_embeddings"):  # [hidden / 2, vocab]; [G, vocab]
        q = unpack_int4(variables[path], hidden, 0)
    else:  # kernels flattened to [input dims, output dims / 2]; [G, output dims]
        q = unpack_int4(variables[path], scale.shape[-1], -1)
    g = np.arange(q.shape[0]) // BLOCK
    return (q - zero[g]) * scale[g]


def dequantized(backbone, path):
    """An int8 variable of ``backbone`` divided by its scale, in numpy float64: Keras keeps one
    scale per output channel (per vocabulary row for the embedding table), in the output's
    layout (EinsumDense: ``[1, 1, *output dims]``). Int4 variables: `dequantized_int4`."""
    variables = {v.path: np.asarray(v) for v in backbone.weights}
    if path + "_zero" in variables:
        return dequantized_int4(backbone, path)
    if variables[path + "_scale"].dtype == np.float16:  # Q8_0 blocks, rows [out, in]
        q = variables[path].astype("float64")
        scale = variables[path + "_scale"].astype("float64")
        w = q * np.repeat(scale, BLOCK, axis=1)
        return w if path.endswith("/embeddings") else w.T  # ours: kernels [in, out]
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
