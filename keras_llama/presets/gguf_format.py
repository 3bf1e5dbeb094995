"""GGUF files (llama.cpp) of the ``llama`` architecture.

Tensors are memory-mapped by `keras_llama.presets.gguf_file` (a read-only parser of the
container, much faster than ``gguf.GGUFReader`` on large vocabularies). Q8_0, Q4_0 and Q4_1
weights are kept as stored: their layers get a `keras_llama.quantization.BlockDTypePolicy`
(through the config's ``dtype``, a `keras.dtype_policies.DTypePolicyMap`) and their blocks
are split into the values, scales and minimums those layers hold, bit for bit. Everything
else (F32, F16, BF16, Q5_0, Q5_1, the K-quants Q2_K..Q6_K and the IQ types), and every weight
when the caller passes a ``dtype`` (``from_preset(path, dtype="float32")``: the exact float
path), is dequantized one tensor at a time with ``gguf.quants.dequantize``. An untied output
projection is kept only in the embedding table's format (one layer holds both). Each GGUF name maps to its Hugging Face name, so the
Hugging Face table (`keras_llama.presets.huggingface`) does the rest; llama.cpp stores q/k rows
in interleaved rotary layout, undone by `keras_llama.presets.rotary.interleaved_to_half`.

The tokenizer comes from the metadata: ``tokenizer.ggml.model == "llama"`` is a SentencePiece
model kept as arrays (tokens, scores, token types), ``"gpt2"`` a byte-level BPE vocabulary with
merges. ``tokenizer.ggml.add_bos_token`` becomes the preprocessor's ``add_start_token`` and
``tokenizer.chat_template`` the chat template.
"""

import os

import numpy as np

from keras_llama.presets import gguf_blocks, huggingface
from keras_llama.presets.checkpoint import Checkpoint, TokenizerSpec
from keras_llama.utils.validation import check_positive_int, check_positive_number

SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF tensor name -> Hugging Face tensor name ({i} is the layer index).
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
# Tensors that carry no weights of ours: llama.cpp stores Llama 3.1 RoPE scaling as per-frequency
# factors in `rope_freqs.weight` (read into the config instead).
IGNORED_TENSORS = ("rope_freqs.weight",)


def _supported_types():
    from gguf import GGMLQuantizationType as T

    names = [
        "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
        "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS",
    ]  # fmt: skip
    return {getattr(T, n) for n in names if hasattr(T, n)}


def _open(path):
    from keras_llama.presets.gguf_file import GGUFFile

    try:
        return GGUFFile(path)
    except ValueError as e:
        raise ValueError(
            f"Could not read the GGUF file {path!r} (truncated or not a GGUF file?): {e}"
        ) from e


def read(path, source=None):
    """Read a ``.gguf`` file into a `Checkpoint`."""
    source = source or path
    gguf_file = _open(path)
    meta = gguf_file.metadata
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"The GGUF file {source!r} holds a {arch!r} model; only the "
            f"{SUPPORTED_ARCHITECTURES} architecture is supported. "
            f"Received: general.architecture={arch!r}"
        )
    tensors = gguf_file.tensors
    supported = _supported_types()
    for t in tensors.values():
        if t.tensor_type not in supported and t.name not in IGNORED_TENSORS:
            raise ValueError(
                f"Tensor {t.name!r} of the GGUF file {source!r} has type {t.tensor_type.name}, "
                f"which cannot be dequantized. Supported types: "
                f"{sorted(s.name for s in supported)}. Received: {t.tensor_type.name}"
            )
    tokenizer, family, add_bos = _tokenizer_spec(meta, source)

    def read_weights(final_config):
        names = gguf_names(final_config)
        kept = gguf_blocks.kept_tensors(final_config, tensors, names)
        yield from huggingface.convert_weights(
            lambda hf_name: _read_tensor(tensors[names[hf_name]]), final_config, source,
            file_names=names, interleaved_rotary=True, file_shape=lambda s: tuple(reversed(s)),
            skip=kept,
        )  # fmt: skip
        yield from gguf_blocks.block_weights(final_config, tensors, names, kept, source)

    def read_config():
        config = convert_backbone_config(meta, tensors, source)
        policies = gguf_blocks.block_policy_map(config, tensors, gguf_names(config))
        if policies is not None:
            config["dtype"] = policies
        return config

    return Checkpoint(
        source=source,
        path=path,
        format="gguf",
        family=family,
        read_config=read_config,
        read_weights=read_weights,
        tokenizer=tokenizer,
        preprocessor={"add_start_token": add_bos},
        chat_template=_chat_template(meta, source),
        context_length=_context_length(meta),
    )


def _context_length(meta):
    value = meta.get(f"{meta.get('general.architecture')}.context_length")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _chat_template(meta, source):
    template = meta.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise ValueError(
            f"The GGUF file {source!r} has a `tokenizer.chat_template` that is not a string. "
            f"Received: {type(template).__name__}"
        )
    return template


def convert_backbone_config(meta, tensors, source):
    """`LlamaBackbone` keyword arguments from GGUF ``llama.*`` metadata.

    Every number is checked (type and range, named by its metadata key) and the layer count
    against the blocks the file holds, before anything is built from them.
    """
    arch = meta["general.architecture"]

    def get(key, default=None, required=True):
        value = meta.get(f"{arch}.{key}", default)
        if value is None and required:
            raise ValueError(f"The GGUF file {source!r} has no `{arch}.{key}` metadata.")
        return value

    def get_int(key, default=None, required=True):
        value = get(key, default, required)
        if value is not None:
            check_positive_int(f"{arch}.{key}", value, where=f"the GGUF file {source!r}")
        return value

    def get_float(key, default=None, required=True):
        value = get(key, default, required)
        if value is not None:
            check_positive_number(f"{arch}.{key}", value, where=f"the GGUF file {source!r}")
            value = float(value)
        return value

    hidden = get_int("embedding_length")
    heads = get_int("attention.head_count")
    head_dim = hidden // heads
    rope_dim = get("rope.dimension_count", head_dim)
    key_length = get("attention.key_length", head_dim)
    if rope_dim != head_dim or key_length != head_dim or head_dim * heads != hidden:
        raise ValueError(
            f"The GGUF file {source!r} has a head layout this model does not support: "
            f"embedding_length={hidden}, head_count={heads}, rope.dimension_count={rope_dim}, "
            f"attention.key_length={key_length} (expected head_dim = embedding_length / "
            "head_count, fully rotary)."
        )
    vocab = get_int("vocab_size", None, required=False)
    if vocab is None:
        if "token_embd.weight" not in tensors:
            raise ValueError(
                f"The GGUF file {source!r} has no `token_embd.weight` tensor and no "
                f"`{arch}.vocab_size` metadata: it is not a complete Llama checkpoint."
            )
        vocab = int(tensors["token_embd.weight"].shape[-1])  # GGUF shapes are [in, out]
    num_layers = get_int("block_count")
    _check_blocks(tensors, num_layers, f"{arch}.block_count", source)
    config = {
        "vocabulary_size": vocab,
        "num_layers": num_layers,
        "num_query_heads": heads,
        "hidden_dim": hidden,
        "intermediate_dim": get_int("feed_forward_length"),
        "num_key_value_heads": get_int("attention.head_count_kv", heads),
        "rope_max_wavelength": get_float("rope.freq_base", 10000.0),
        "layer_norm_epsilon": get_float("attention.layer_norm_rms_epsilon", 1e-5),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    scaling = get("rope.scaling.type", None, required=False)
    if scaling == "linear":
        config["rope_position_scaling_factor"] = get_float("rope.scaling.factor")
    elif scaling not in (None, "none"):
        raise ValueError(
            f"The GGUF file {source!r} uses RoPE scaling {scaling!r}; supported: linear, and "
            f"Llama 3.1 frequency factors (`rope_freqs.weight`). Received: {scaling!r}"
        )
    if "rope_freqs.weight" in tensors:
        config.update(_llama3_rope_from_factors(tensors["rope_freqs.weight"], config, source))
    return config


def _check_blocks(tensors, num_layers, field, source):
    """The file must hold tensors for exactly the blocks ``block_count`` claims: a crafted count
    would otherwise build that many layers before any tensor is looked at."""
    blocks = set()
    for name in tensors:
        if name.startswith("blk."):
            index = name.split(".", 2)[1]
            if index.isdigit():
                blocks.add(int(index))
    if len(blocks) != num_layers or (blocks and max(blocks) != num_layers - 1):
        held = f"blk.0..blk.{max(blocks)}" if blocks else "none"
        raise ValueError(
            f"The GGUF file {source!r} claims {num_layers} blocks but holds tensors for "
            f"{len(blocks)} (blocks {held}): truncated or corrupt. Received: {field}={num_layers}"
        )


def _llama3_rope_from_factors(tensor, config, source):
    """Recover Llama 3.1 RoPE scaling from llama.cpp's per-frequency factors.

    llama.cpp divides each rotary frequency by ``rope_freqs[i]`` (its converter computes these
    from ``rope_scaling`` and drops the parameters). We find the standard parameters that
    reproduce the factors exactly.
    """
    from gguf import quants

    factors = np.asarray(quants.dequantize(tensor.data, tensor.tensor_type), "float64").ravel()
    head_dim = config["hidden_dim"] // config["num_query_heads"]
    base = config["rope_max_wavelength"]
    inv_freq = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    factor = float(factors.max())
    medium = (factors > 1 + 1e-6) & (factors < factor - 1e-6)
    for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0)):
        candidates = [8192, 4096, 2048, 16384, 32768, 65536, 131072]
        if medium.any():  # solve 1/f_i = (1 - s)/factor + s for s, then s for the context
            i = int(np.argmax(medium))
            smooth = (1 / factors[i] - 1 / factor) / (1 - 1 / factor)
            candidates.insert(0, round(wavelen[i] * (smooth * (high - low) + low)))
        elif (factors == 1).any() and (factors == factor).any():
            # No band in between: any context between the two bands gives these factors.
            lo, hi = wavelen[factors == 1].max() * high, wavelen[factors == factor].min() * low
            candidates.insert(0, float(np.sqrt(lo * hi)))
        for original in candidates:
            smooth = (original / wavelen - low) / (high - low)
            expected = np.where(
                wavelen < original / high,
                1.0,
                np.where(wavelen > original / low, factor, 1.0 / ((1 - smooth) / factor + smooth)),
            )
            if np.allclose(expected, factors, rtol=1e-4):
                return {
                    "rope_frequency_adjustment_factor": factor,
                    "rope_low_freq_factor": low,
                    "rope_high_freq_factor": high,
                    "rope_pretraining_sequence_length": original,
                }
    raise ValueError(
        f"The GGUF file {source!r} has RoPE frequency factors (`rope_freqs.weight`) that match "
        "no Llama 3.1-style scaling (factor, low/high frequency factors, original context)."
    )


def gguf_names(config):
    """``{hf_name: gguf_name}`` for every tensor of a backbone with this config."""
    names = {hf: g for g, hf in GLOBAL_NAMES.items()}
    for i in range(config["num_layers"]):
        for g, hf in LAYER_NAMES.items():
            names[f"model.layers.{i}.{hf}"] = f"blk.{i}.{g}"
    return names


def _read_tensor(tensor):
    """A GGUF tensor as float32 in [out, in] (PyTorch) layout: GGUF lists dimensions innermost
    first."""
    return dequantize(tensor).reshape(tuple(int(d) for d in reversed(tensor.shape)))


# --- dequantization ----------------------------------------------------------------------------
# The simple block formats most small checkpoints use get a direct numpy path: one pass per
# chunk of blocks, written into the output array (gguf.quants splits each tensor into groups
# of 16 rows and concatenates them, about twice as slow). Layouts are ggml's (ggml-common.h),
# 32 weights per block, fp16 scales:
#   Q8_0  [d: f16][qs: 32 x int8]               w = d * q
#   Q4_0  [d: f16][qs: 16 bytes]                w = d * (q - 8)
#   Q4_1  [d: f16][m: f16][qs: 16 bytes]        w = d * q + m
# where byte j of qs holds weight j in its low nibble and weight j + 16 in its high nibble.
_BLOCK = 32
_CHUNK_BLOCKS = 1 << 14  # 512k weights per step: temporaries stay small


def _dequantize_q8_0(blocks, out):
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # [n, 1]
    np.multiply(blocks[:, 2:].view(np.int8), scale, out=out)


def _nibbles(quants, out):
    halves = out.reshape(-1, 2, _BLOCK // 2)  # [n, low/high nibble, 16]
    np.bitwise_and(quants, 15, out=halves[:, 0], casting="unsafe")
    np.right_shift(quants, 4, out=halves[:, 1], casting="unsafe")


def _dequantize_q4_0(blocks, out):
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    _nibbles(blocks[:, 2:], out)
    out -= 8
    out *= scale


def _dequantize_q4_1(blocks, out):
    scale = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    minimum = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    _nibbles(blocks[:, 4:], out)
    out *= scale
    out += minimum


_FAST_DEQUANTIZERS = {  # type name -> (bytes per block, function(blocks [n, bytes], out [n, 32]))
    "Q8_0": (34, _dequantize_q8_0),
    "Q4_0": (18, _dequantize_q4_0),
    "Q4_1": (20, _dequantize_q4_1),
}


def dequantize(tensor):
    """A GGUF tensor as a flat float32 array (``tensor`` from `gguf_file.GGUFFile.tensors`)."""
    fast = _FAST_DEQUANTIZERS.get(tensor.tensor_type.name)
    if fast is None:
        from gguf import quants

        return np.asarray(quants.dequantize(tensor.data, tensor.tensor_type), "float32").ravel()
    block_bytes, function = fast
    blocks = tensor.data.reshape(-1, block_bytes)  # the file's bytes, memory-mapped
    out = np.empty((blocks.shape[0], _BLOCK), np.float32)
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        stop = start + _CHUNK_BLOCKS
        function(blocks[start:stop], out[start:stop])
    return out.reshape(-1)


def _tokenizer_spec(meta, source):
    """-> (TokenizerSpec or None, family, add_bos_token)."""
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model is None or tokens is None:
        return None, "llama", True

    def array(key, kinds, default=None):
        """``tokenizer.ggml.<key>``: a list of ``kinds`` as long as the vocabulary."""
        value = meta.get(f"tokenizer.ggml.{key}", default)
        if value is None:
            return None
        if not isinstance(value, list) or not all(
            isinstance(v, kinds) and not isinstance(v, list) for v in value
        ):
            raise ValueError(
                f"The GGUF file {source!r} has a malformed `tokenizer.ggml.{key}`: expected an "
                f"array of {' or '.join(k.__name__ for k in kinds)}. Received: "
                f"{type(value).__name__} {str(value)[:80]}"
            )
        if key != "merges" and len(value) != len(tokens):
            raise ValueError(
                f"The GGUF file {source!r} has {len(value)} entries in `tokenizer.ggml.{key}` "
                f"for {len(tokens)} tokens. Received: len={len(value)}"
            )
        return value

    def integer(key, default):
        value = meta.get(f"tokenizer.ggml.{key}", default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(
                f"The GGUF file {source!r} has a non-integer `tokenizer.ggml.{key}`. "
                f"Received: {value!r}"
            )
        return value

    tokens = array("tokens", (str,))
    types = array("token_type", (int,)) or [1] * len(tokens)

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        ok = isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(tokens)
        return tokens[i] if ok else None

    stop = [token(k) for k in ("eot", "eom")]
    stop = [t for t in stop if t is not None and t != token("eos")]
    if model == "llama":
        data = {
            "pieces": tokens,
            "scores": array("scores", (float, int)) or [0.0] * len(tokens),
            "types": types,
            "unk_id": integer("unknown_token_id", 0),
            "bos_id": integer("bos_token_id", -1),
            "eos_id": integer("eos_token_id", -1),
            "pad_id": integer("padding_token_id", -1),
            "add_dummy_prefix": bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
            "remove_extra_whitespaces": bool(
                meta.get("tokenizer.ggml.remove_extra_whitespaces", False)
            ),
        }
        spec = TokenizerSpec(
            "sentencepiece_pieces",
            data,
            start_token=token("bos"),
            end_token=token("eos"),
            stop_tokens=stop,
        )
        family, default_bos = "llama", True
    elif model == "gpt2":
        data = {
            "tokens": tokens,
            "merges": array("merges", (str,)) or [],
            "types": types,
            "pre": str(meta.get("tokenizer.ggml.pre", "default")),
        }
        spec = TokenizerSpec(
            "byte_level_bpe",
            data,
            start_token=token("bos"),
            end_token=token("eos"),
            pad_token=token("padding"),
            stop_tokens=stop,
        )
        family, default_bos = "llama3", False
    else:
        raise ValueError(
            f"The GGUF file {source!r} has a {model!r} tokenizer; supported: 'llama' "
            f"(SentencePiece) and 'gpt2' (byte-level BPE). Received: tokenizer.ggml.model={model!r}"
        )
    add_bos = meta.get("tokenizer.ggml.add_bos_token", default_bos)
    return spec, family, bool(add_bos)


def is_gguf(path):
    """True for a file that starts with the GGUF magic."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"
