"""Export to a llama.cpp GGUF file, written with the `gguf` package's ``GGUFWriter``.

The layout is what llama.cpp's ``convert_hf_to_gguf.py`` writes for a ``LlamaForCausalLM``:
the Hugging Face table (`keras_llama.presets.huggingface.export_weights`) gives each tensor in
[out, in] layout with q/k rows in interleaved rotary pairs, and the GGUF name table of the GGUF
loader (`keras_llama.presets.gguf_format`) names it, so the loader and this writer share both
tables.

    dtype   2-D weights               1-D norms   rope_freqs
    f32     F32                       F32         F32
    f16     F16                       F32         F32
    bf16    BF16 (gguf.quants)        F32         F32
    q8_0    Q8_0 (`gguf_quants`)      F32         F32
    q4_0    Q4_0 (`gguf_quants`)      F32         F32

A weight whose rows are not a multiple of 32 cannot be block-quantized: it is written as F16,
as llama.cpp's converter does.

The vocabulary is stored in llama.cpp's form: a SentencePiece model as pieces, scores and
token types (``tokenizer.ggml.model = "llama"``); a byte-level BPE as tokens, merges and the
pre-tokenizer's llama.cpp name (``"gpt2"``, ``tokenizer.ggml.pre``), with the special ids,
``add_bos_token`` and the chat template. Llama 3.1 RoPE scaling becomes the per-frequency
factors tensor ``rope_freqs.weight``; linear scaling the ``rope.scaling.*`` keys.
"""

import json
import math
import os
import tempfile

import numpy as np

from keras_llama.export import gguf_quants
from keras_llama.export.atomic import atomic_file
from keras_llama.export.weights import backbone_config, weight_reader
from keras_llama.presets import gguf_format, huggingface

DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
ARCH = "llama"
# GGUF token types (llama.cpp's llama_token_type; SentencePiece's piece types use the same).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def export_causal_lm(causal_lm, path, dtype="f32", overwrite=False):
    """Write a causal LM (model, and its tokenizer when it has one) to the GGUF file ``path``
    (`CausalLM.export_to_gguf`), for llama.cpp and every GGUF reader.

    Args:
        causal_lm: a `CausalLM` with float weights (a quantized model is refused).
        path: the ``.gguf`` file to write (a temporary file renamed into place).
        dtype: the weights' type: ``"f32"``, ``"f16"``, ``"bf16"``, ``"q8_0"`` or ``"q4_0"``
            (norms stay f32; quantized types quantize with llama.cpp's rounding).
        overwrite: replace an existing file.

    Raises:
        OutputExistsError: (a `ValueError` and `FileExistsError`) when ``path`` exists and
            ``overwrite`` is False, or is a folder where a file is expected.
        ValueError: for an unknown ``dtype`` or a quantized model.

    Example:
        ```python
        from keras_llama.export import gguf
        gguf.export_causal_lm(causal_lm, "model.gguf", dtype="q8_0")
        ```
    """
    if dtype not in DTYPES:
        raise ValueError(f"`dtype` must be one of {DTYPES}. Received: dtype={dtype!r}")
    import gguf

    backbone = causal_lm.backbone
    config = backbone_config(backbone)
    get = weight_reader(backbone)  # refuses quantized models before anything is written
    preprocessor = causal_lm.preprocessor
    with atomic_file(path, overwrite) as staging:
        writer = gguf.GGUFWriter(staging, ARCH)
        _write_config(writer, config, dtype, os.path.basename(os.fspath(path)))
        if preprocessor is not None and preprocessor.tokenizer is not None:
            tokenizer = preprocessor.tokenizer
            _write_vocabulary(writer, tokenizer, config["vocabulary_size"])
            writer.add_add_bos_token(bool(preprocessor.add_start_token))
            writer.add_add_eos_token(False)
            template = getattr(tokenizer, "chat_template", None)
            if template:
                writer.add_chat_template(template)
        _write_tensors(writer, get, config, dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


# --- config -------------------------------------------------------------------------------------
def _write_config(writer, config, dtype, name):
    import gguf

    heads = config["num_query_heads"]
    hf = huggingface.export_config(config)
    writer.add_name(os.path.splitext(name)[0])
    writer.add_context_length(hf["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_dim"])
    writer.add_block_count(config["num_layers"])
    writer.add_feed_forward_length(config["intermediate_dim"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_dimension_count(config["hidden_dim"] // heads)
    writer.add_rope_freq_base(float(config["rope_max_wavelength"]))
    writer.add_layer_norm_rms_eps(float(config["layer_norm_epsilon"]))
    writer.add_vocab_size(config["vocabulary_size"])
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{dtype.upper()}", 0))
    scaling = hf["rope_scaling"]
    if scaling and scaling["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])


def llama3_rope_factors(config):
    """llama.cpp's ``rope_freqs.weight`` for Llama 3.1 scaling (``convert_hf_to_gguf.py``,
    ``LlamaModel.generate_extra_tensors``): one divisor per rotary frequency."""
    head_dim = config["hidden_dim"] // config["num_query_heads"]
    base = float(config["rope_max_wavelength"])
    factor = float(config["rope_frequency_adjustment_factor"])
    low, high = float(config["rope_low_freq_factor"]), float(config["rope_high_freq_factor"])
    original = float(config["rope_pretraining_sequence_length"])
    low_wavelen, high_wavelen = original / low, original / high
    factors = []
    for freq in 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, np.float32)


# --- tensors ------------------------------------------------------------------------------------
def _write_tensors(writer, get, config, dtype):
    names = gguf_format.gguf_names(config)  # {hf_name: gguf_name}: the loader's table
    if config.get("rope_frequency_adjustment_factor") is not None:
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(config))
    for hf_name, array in huggingface.export_weights(get, config, interleaved_rotary=True):
        data, raw_dtype = _encode(array, dtype)  # raw bytes: the writer derives the shape
        writer.add_tensor(names[hf_name], data, raw_dtype=raw_dtype)


def _encode(array, dtype):
    """-> (data, raw_dtype) for ``GGUFWriter.add_tensor`` (None: the numpy dtype says it)."""
    import gguf

    T = gguf.GGMLQuantizationType
    array = np.asarray(array, np.float32)
    if array.ndim == 1 or dtype == "f32":
        return array, None
    if dtype in ("q8_0", "q4_0") and array.shape[-1] % gguf_quants.BLOCK == 0:
        return gguf_quants.quantize(array, dtype), T[dtype.upper()]
    if dtype == "bf16":
        return gguf.quants.quantize(array, T.BF16), T.BF16
    return array.astype(np.float16), None


# --- vocabulary ---------------------------------------------------------------------------------
def _write_vocabulary(writer, tokenizer, vocabulary_size):
    proto = getattr(tokenizer, "proto", None)
    if proto is not None:
        _write_sentencepiece(writer, proto, vocabulary_size)
    else:
        _write_byte_level_bpe(writer, tokenizer, vocabulary_size)
    for key, token in (("bos", tokenizer.start_token), ("eos", tokenizer.end_token),
                       ("pad", tokenizer.pad_token)):  # fmt: skip
        if token is not None:
            getattr(writer, f"add_{key}_token_id")(int(tokenizer.token_to_id(token)))
    stop = [t for t in tokenizer.stop_tokens if t != tokenizer.end_token]
    if stop:  # llama.cpp's end-of-turn token (e.g. <|eot_id|>)
        writer.add_eot_token_id(int(tokenizer.token_to_id(stop[0])))


def _padded(tokens, scores, types, size):
    """llama.cpp wants one token per embedding row: pad a shorter vocabulary as its converter
    does (``[PAD{i}]``, unused)."""
    for i in range(len(tokens), size):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(UNUSED)
    return tokens, scores, types


def _write_sentencepiece(writer, proto, vocabulary_size):
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    model = model_pb2.ModelProto.FromString(proto)
    tokens, scores, types = _padded(
        [p.piece for p in model.pieces], [p.score for p in model.pieces],
        [p.type for p in model.pieces], vocabulary_size,
    )  # fmt: skip
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    spec = model.trainer_spec
    if spec.unk_id >= 0:
        writer.add_unk_token_id(spec.unk_id)
    writer.add_add_space_prefix(bool(model.normalizer_spec.add_dummy_prefix))
    writer.add_remove_extra_whitespaces(bool(model.normalizer_spec.remove_extra_whitespaces))


def _write_byte_level_bpe(writer, tokenizer, vocabulary_size):
    data = _tokenizer_json(tokenizer)
    model = data["model"]
    vocab = dict(model["vocab"])
    vocab.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
    special = set(tokenizer.special_tokens)
    size = max(vocabulary_size, max(vocab.values()) + 1)
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(size):
        token = by_id.get(i, f"[PAD{i}]")
        tokens.append(token)
        types.append(CONTROL if token in special else (NORMAL if i in by_id else UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pretokenizer_name(data))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)


def _tokenizer_json(tokenizer):
    with tempfile.TemporaryDirectory() as assets:
        tokenizer.save_assets(assets)  # the full `tokenizers` pipeline as tokenizer.json
        with open(os.path.join(assets, "tokenizer.json"), encoding="utf-8") as f:
            return json.load(f)


# llama.cpp pre-tokenizer names we can write, most specific first (their regexes are in
# `keras_llama.tokenizers.byte_level_bpe.PRETOKENIZERS`, under llama.cpp's names).
_PRE_CANDIDATES = ("llama-bpe", "smaug-bpe", "smollm", "gpt-2", "qwen2", "default")
_PROBE = (
    "Hello World!  It's 2024: 3.14159 and 1234567 items\n\n\t tabs   and 'quotes' "
    "I'M DON'T they'll we've 日本語 ١٢٣ émigré -- foo_bar(x)=y; 🙂🙂 \r\n end  "
)


def pretokenizer_name(tokenizer_json):
    """llama.cpp's name (``tokenizer.ggml.pre``) for the pre-tokenizer of a byte-level BPE
    ``tokenizer.json``: the candidate whose regexes split a probe text the same way (what
    llama.cpp's converter does with its hash of a test text), with the same ``ignore_merges``.

    Raises:
        ValueError: when no llama.cpp pre-tokenizer splits the probe text the same way.
    """
    import tokenizers
    from tokenizers import Regex, pre_tokenizers

    from keras_llama.tokenizers.byte_level_bpe import PRETOKENIZERS

    ours = tokenizers.Tokenizer.from_str(json.dumps(tokenizer_json)).pre_tokenizer
    if ours is None:
        raise ValueError("The byte-level BPE tokenizer has no pre-tokenizer to name for GGUF.")
    pieces = [p for p, _ in ours.pre_tokenize_str(_PROBE)]
    ignore_merges = bool(tokenizer_json["model"].get("ignore_merges", False))
    for name in _PRE_CANDIDATES:
        regexes, default_ignore = PRETOKENIZERS[name]
        candidate = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        same = [p for p, _ in candidate.pre_tokenize_str(_PROBE)] == pieces
        if same and default_ignore == ignore_merges:
            return name
    raise ValueError(
        "The byte-level BPE tokenizer's pre-tokenizer matches none that llama.cpp knows "
        f"(tried {list(_PRE_CANDIDATES)}): the GGUF file would tokenize differently. "
        f"Received: pre_tokenizer={json.dumps(tokenizer_json.get('pre_tokenizer'))[:200]}"
    )
