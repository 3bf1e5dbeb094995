"""GGUF's Q8_0, Q4_0 and Q4_1 tensors kept as stored, and the K-quants (Q2_K..Q6_K) and Q5_0 /
Q5_1 re-packed into Q8_0 (`keras_llama.presets.gguf_format`).

A layer whose tensors all go to one block format gets a
`keras_llama.quantization.BlockDTypePolicy` in the backbone config's ``dtype`` (a
`keras.dtype_policies.DTypePolicyMap`). Kept tensors are split, bit for bit, into the
values, float16 scales (and minimums) that layer holds (`keras_llama.models.block_layers`),
in the file's own rows ([out, ...]). Re-packed tensors are dequantized one at a time
(``gguf.quants``) and quantized to Q8_0 by ``gguf.quants`` (ggml's reference quantizer).

Why Q8_0 for the K-quants: their super-blocks (256 values, 6-bit sub-block scales) have no
kernel here; Q8_0 keeps what they hold almost exactly (its rounding, at most half of a 1/127
step of each block's largest value, is far below a 4-6-bit format's) and every projection of a
mixed file (Q4_K_M: Q4_K and Q6_K) then packs into the same native int8-block kernel. The cost
is memory, 8.5 bits per weight instead of 4.5-6.6. Measured on SmolLM2-135M-Instruct as
Q4_K_M (``benchmarks/RESULTS.md``, 2026-12-03). ``names``: ``{hf_name: gguf_name}``
(`gguf_format.gguf_names`).
"""

import numpy as np

from keras_llama.presets.huggingface import _ROTARY_HEADS, weight_table
from keras_llama.presets.rotary import interleaved_to_half
from keras_llama.quantization import quantize_blocks, split_blocks

BLOCK = 32

KEPT_TYPES = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1"}  # GGML type -> block format
REPACKED_TYPES = {name: "q8_0" for name in ("Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                                            "Q6_K")}  # fmt: skip


def target_format(type_name):
    """The block format a GGML tensor type is held in (kept or re-packed), or None (float)."""
    return KEPT_TYPES.get(type_name) or REPACKED_TYPES.get(type_name)


def _layer_formats(config, tensors, names):
    """``{layer path: (block format, [hf names])}`` for every layer whose tensors are all of
    one block format (an embedding with an untied output projection: both)."""
    layers = {}
    for hf_name, ours, _, _ in weight_table(config):
        if ours.endswith("/scale"):  # norms stay float
            continue
        layers.setdefault(ours.rsplit("/", 1)[0], []).append(hf_name)
    formats = {}
    for layer, hf_names in layers.items():
        targets = {target_format(tensors[names[n]].tensor_type.name)
                   for n in hf_names if names[n] in tensors}  # fmt: skip
        if len(targets) == 1 and None not in targets:
            formats[layer] = (targets.pop(), hf_names)
    return formats


def block_policy_map(config, tensors, names):
    """A `keras.dtype_policies.DTypePolicyMap` giving each layer kept as stored its
    `BlockDTypePolicy` (float32 elsewhere), or None when no layer is."""
    import keras

    from keras_llama.quantization import block_policy

    formats = _layer_formats(config, tensors, names)
    if not formats:
        return None
    policies = keras.dtype_policies.DTypePolicyMap(default_policy="float32")
    for layer, (block_format, _) in formats.items():
        policies[layer] = block_policy(block_format, "float32")
    return policies


def kept_tensors(config, tensors, names):
    """Hugging Face names of the tensors kept as stored: those of the layers the config's
    ``dtype`` (a `DTypePolicyMap`) gives a `BlockDTypePolicy`."""
    import keras

    from keras_llama.quantization import BlockDTypePolicy

    policies = config.get("dtype")
    if not isinstance(policies, keras.dtype_policies.DTypePolicyMap):
        return set()
    kept = set()
    for layer, (block_format, hf_names) in _layer_formats(config, tensors, names).items():
        policy = policies[layer]
        if isinstance(policy, BlockDTypePolicy) and policy.block_format == block_format:
            kept.update(hf_names)
    return kept


def block_weights(config, tensors, names, kept, source):
    """``(our path, array)`` for the values, scales (and minimums) of each kept (or re-packed)
    tensor, in the file's own rows ([out, ...]; q/k rows put from interleaved into half rotary order)."""
    for hf_name, ours, _, expected in weight_table(config):
        if hf_name not in kept:
            continue
        tensor = tensors[names[hf_name]]
        rows, depth = (int(d) for d in reversed(tensor.shape))
        if (rows, depth) != expected:
            raise ValueError(
                f"Shape mismatch for tensor {names[hf_name]!r} (our weight `{ours}`) of the "
                f"checkpoint {source!r}: expected {expected[::-1]}, received {tensor.shape}"
            )
        type_name = tensor.tensor_type.name
        if type_name in KEPT_TYPES:
            blocks = np.asarray(tensor.data).reshape(rows, depth // BLOCK, -1)  # [out, G, bytes]
            arrays = split_blocks(blocks, KEPT_TYPES[type_name])
        else:  # re-packed: dequantized, then quantized to the target format
            from gguf import quants

            weights = np.asarray(quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
            arrays = quantize_blocks(weights.reshape(rows, depth), REPACKED_TYPES[type_name])
        heads = _ROTARY_HEADS.get(hf_name.split(".", 3)[-1])
        for suffix, array in arrays.items():
            if heads:
                array = interleaved_to_half(array, config[heads])
            yield ours + suffix, np.ascontiguousarray(array)
