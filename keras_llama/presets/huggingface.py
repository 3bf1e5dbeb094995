"""Hugging Face Llama checkpoints: config and weight-name tables.

Our variable paths and shapes (``m`` hidden, ``u`` query heads, ``v`` key/value heads, ``h``
head_dim, ``f`` intermediate, ``V`` vocabulary)::

    token_embedding/embeddings                                   [V, m]
    token_embedding/reverse_embeddings                           [m, V]   (untied only)
    transformer_layer_{i}/self_attention/query/kernel            [m, u, h]
    transformer_layer_{i}/self_attention/key/kernel              [m, v, h]
    transformer_layer_{i}/self_attention/value/kernel            [m, v, h]
    transformer_layer_{i}/self_attention/attention_output/kernel [u, h, m]
    transformer_layer_{i}/self_attention_layernorm/scale         [m]
    transformer_layer_{i}/feedforward_gate_dense/kernel          [m, f]
    transformer_layer_{i}/feedforward_intermediate_dense/kernel  [m, f]
    transformer_layer_{i}/feedforward_output_dense/kernel        [f, m]
    transformer_layer_{i}/feedforward_layernorm/scale            [m]
    sequence_output_layernorm/scale                              [m]

`read()` reads a whole Hugging Face checkpoint folder (``config.json``, ``model.safetensors`` or
sharded with ``model.safetensors.index.json``, ``tokenizer.model`` / ``tokenizer.json`` /
``tokenizer_config.json``) into a `Checkpoint`. Pickled ``pytorch_model.bin`` files are never
read.
"""

import os

import numpy as np

from keras_llama.presets.checkpoint import Checkpoint, TokenizerSpec
from keras_llama.presets.handles import load_json
from keras_llama.presets.rotary import half_to_interleaved, interleaved_to_half
from keras_llama.presets.safetensors_files import SafetensorsCheckpoint
from keras_llama.utils.validation import check_positive_int, check_positive_number

_REQUIRED = object()


def convert_backbone_config(hf_config, source=None):
    """`LlamaBackbone` keyword arguments from a Hugging Face ``config.json`` dict.

    Each field is checked (present where required, type and range) and named in the error with
    ``source`` (the file it came from), before anything is built from it.
    """
    where = f"the Hugging Face config {source!r}" if source else "the Hugging Face config"
    if not isinstance(hf_config, dict):
        raise ValueError(
            f"In {where}: expected a JSON object (a dict of settings). "
            f"Received: {type(hf_config).__name__}"
        )

    def get(config, key, default=_REQUIRED, prefix=""):
        value = config.get(key, default)
        if value is _REQUIRED:
            raise ValueError(f"In {where}: the required field `{prefix}{key}` is missing.")
        return value

    def integer(config, key, default=_REQUIRED, prefix=""):
        value = get(config, key, default, prefix)
        if value is not None or default is _REQUIRED:  # None: absent and optional
            check_positive_int(prefix + key, value, where)
        return value

    def number(config, key, default=_REQUIRED, prefix=""):
        value = get(config, key, default, prefix)
        check_positive_number(prefix + key, value, where)
        return float(value)

    model_type = hf_config.get("model_type", "llama")
    if model_type != "llama":
        raise ValueError(
            "Only Llama-architecture checkpoints can be converted. "
            f"Received: model_type={model_type!r}"
        )
    hidden = integer(hf_config, "hidden_size")
    heads = integer(hf_config, "num_attention_heads")
    head_dim = hf_config.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise ValueError(
            "head_dim * num_attention_heads must equal hidden_size. Received: "
            f"head_dim={head_dim}, num_attention_heads={heads}, hidden_size={hidden}"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if hf_config.get(flag):
            raise ValueError(
                f"Llama checkpoints with biases are not supported. Received: {flag}=True"
            )
    act = hf_config.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"Only the silu activation is supported. Received: hidden_act={act!r}")

    # transformers >= 5 keeps rope settings in `rope_parameters`; older ones in `rope_scaling`.
    rope_key = "rope_parameters" if hf_config.get("rope_parameters") else "rope_scaling"
    rope = hf_config.get(rope_key) or {}
    if not isinstance(rope, dict):
        raise ValueError(
            f"In {where}: `{rope_key}` must be an object. Received: {rope_key}={rope!r}"
        )
    theta = number(rope, "rope_theta", number(hf_config, "rope_theta", 10000.0), f"{rope_key}.")
    config = {
        "vocabulary_size": integer(hf_config, "vocab_size"),
        "num_layers": integer(hf_config, "num_hidden_layers"),
        "num_query_heads": heads,
        "hidden_dim": hidden,
        "intermediate_dim": integer(hf_config, "intermediate_size"),
        "num_key_value_heads": integer(hf_config, "num_key_value_heads", None, "") or heads,
        "rope_max_wavelength": theta,
        "layer_norm_epsilon": number(hf_config, "rms_norm_eps", 1e-6),
        "tie_word_embeddings": bool(hf_config.get("tie_word_embeddings", False)),
    }
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    prefix = f"{rope_key}."
    if rope_type == "linear":
        config["rope_position_scaling_factor"] = number(rope, "factor", prefix=prefix)
    elif rope_type == "llama3":
        config["rope_frequency_adjustment_factor"] = number(rope, "factor", prefix=prefix)
        config["rope_low_freq_factor"] = number(rope, "low_freq_factor", prefix=prefix)
        config["rope_high_freq_factor"] = number(rope, "high_freq_factor", prefix=prefix)
        config["rope_pretraining_sequence_length"] = integer(
            rope, "original_max_position_embeddings", prefix=prefix
        )
    elif rope_type != "default":
        raise ValueError(
            "Supported RoPE scalings are 'default', 'linear' and 'llama3'. "
            f"Received: rope_type={rope_type!r}"
        )
    return config


def context_length(hf_config):
    """``max_position_embeddings`` (the model's context), or None when absent or invalid."""
    value = hf_config.get("max_position_embeddings") if isinstance(hf_config, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def export_config(config):
    """A Hugging Face ``config.json`` dict (``LlamaConfig``) from `LlamaBackbone` keyword
    arguments: the inverse of `convert_backbone_config`."""
    heads = config["num_query_heads"]
    hf_config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config["vocabulary_size"],
        "hidden_size": config["hidden_dim"],
        "intermediate_size": config["intermediate_dim"],
        "num_hidden_layers": config["num_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": config.get("num_key_value_heads") or heads,
        "head_dim": config["hidden_dim"] // heads,
        "hidden_act": "silu",
        "rms_norm_eps": float(config.get("layer_norm_epsilon", 1e-6)),
        "rope_theta": float(config.get("rope_max_wavelength", 10000.0)),
        "rope_scaling": None,
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "max_position_embeddings": 4096,
    }
    if config.get("rope_frequency_adjustment_factor") is not None:
        original = int(config["rope_pretraining_sequence_length"])
        factor = float(config["rope_frequency_adjustment_factor"])
        hf_config["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": float(config["rope_low_freq_factor"]),
            "high_freq_factor": float(config["rope_high_freq_factor"]),
            "original_max_position_embeddings": original,
        }
        hf_config["max_position_embeddings"] = int(original * factor)
    elif float(config.get("rope_position_scaling_factor") or 1.0) != 1.0:
        factor = float(config["rope_position_scaling_factor"])
        hf_config["rope_scaling"] = {"rope_type": "linear", "factor": factor}
    return hf_config


def _heads_in(n_heads):
    """HF [n*h, m] projection -> our [m, n, h] kernel."""
    return lambda w, c: w.T.reshape(c["hidden_dim"], n_heads(c), -1)


def _heads_out(w, c):
    """HF o_proj [m, u*h] -> our [u, h, m]."""
    return w.T.reshape(c["num_query_heads"], -1, c["hidden_dim"])


def _transpose(w, c):
    return w.T


def _same(w, c):
    return w


_Q = _heads_in(lambda c: c["num_query_heads"])
_KV = _heads_in(lambda c: c["num_key_value_heads"])

# (Hugging Face name, our variable path, hook(array, backbone_config) -> array, the tensor's
# shape as stored ([out, in]) in the dimensions of `_dimensions`)
GLOBAL_WEIGHTS = [
    ("model.embed_tokens.weight", "token_embedding/embeddings", _same, ("V", "m")),
    ("model.norm.weight", "sequence_output_layernorm/scale", _same, ("m",)),
]
UNTIED_WEIGHTS = [("lm_head.weight", "token_embedding/reverse_embeddings", _transpose, ("V", "m"))]
LAYER_WEIGHTS = [
    ("self_attn.q_proj.weight", "self_attention/query/kernel", _Q, ("u*h", "m")),
    ("self_attn.k_proj.weight", "self_attention/key/kernel", _KV, ("v*h", "m")),
    ("self_attn.v_proj.weight", "self_attention/value/kernel", _KV, ("v*h", "m")),
    ("self_attn.o_proj.weight", "self_attention/attention_output/kernel", _heads_out, ("m", "u*h")),
    ("mlp.gate_proj.weight", "feedforward_gate_dense/kernel", _transpose, ("f", "m")),
    ("mlp.up_proj.weight", "feedforward_intermediate_dense/kernel", _transpose, ("f", "m")),
    ("mlp.down_proj.weight", "feedforward_output_dense/kernel", _transpose, ("m", "f")),
    ("input_layernorm.weight", "self_attention_layernorm/scale", _same, ("m",)),
    ("post_attention_layernorm.weight", "feedforward_layernorm/scale", _same, ("m",)),
]
# Query and key rows rotate in pairs: GGUF and Meta files store them interleaved (see `rotary`).
_ROTARY_HEADS = {"self_attn.q_proj.weight": "num_query_heads",
                 "self_attn.k_proj.weight": "num_key_value_heads"}  # fmt: skip


def _dimensions(c):
    head_dim = c["hidden_dim"] // c["num_query_heads"]
    return {
        "V": c["vocabulary_size"],
        "m": c["hidden_dim"],
        "f": c["intermediate_dim"],
        "u*h": c["num_query_heads"] * head_dim,
        "v*h": c["num_key_value_heads"] * head_dim,
    }


def weight_table(backbone_config):
    """``[(hf_name, our_path, hook, shape)]`` for every weight of a backbone with this config;
    ``shape`` is the Hugging Face tensor's ([out, in])."""
    dims = _dimensions(backbone_config)
    table = list(GLOBAL_WEIGHTS)
    if not backbone_config.get("tie_word_embeddings", False):
        table += UNTIED_WEIGHTS
    for i in range(backbone_config["num_layers"]):
        for hf_name, ours, hook, shape in LAYER_WEIGHTS:
            table.append(
                (f"model.layers.{i}.{hf_name}", f"transformer_layer_{i}/{ours}", hook, shape)
            )
    return [(hf_name, ours, hook, tuple(dims[d] for d in shape))
            for hf_name, ours, hook, shape in table]  # fmt: skip


def convert_weights(get_tensor, backbone_config, source="checkpoint", file_names=None,
                    interleaved_rotary=False, file_shape=tuple, skip=()):  # fmt: skip
    """Yield ``(our_path, numpy array)`` for each weight, reading with ``get_tensor(hf_name)``
    (an array in Hugging Face layout; KeyError when missing).

    Args:
        source: the checkpoint, for error messages.
        file_names: ``{hf_name: name in the file}`` for error messages (GGUF, Meta names).
        interleaved_rotary: q/k rows are stored in interleaved rotary pairs (GGUF, Meta).
        file_shape: a shape as the file lists it (GGUF: innermost dimension first).
        skip: Hugging Face names the caller converts itself (GGUF's block-quantized tensors).
    """
    file_names = file_names or {}
    for hf_name, ours, hook, expected in weight_table(backbone_config):
        if hf_name in skip:
            continue
        name = file_names.get(hf_name, hf_name)
        try:
            array = np.asarray(get_tensor(hf_name))
        except KeyError:
            raise ValueError(
                f"The checkpoint {source!r} has no tensor {name!r}: it is truncated or not a "
                "complete Llama checkpoint of the configured size."
            ) from None
        if array.shape != expected:
            raise ValueError(
                f"Shape mismatch for tensor {name!r} (our weight `{ours}`) of the checkpoint "
                f"{source!r}: expected {file_shape(expected)}, received {file_shape(array.shape)}"
            )
        heads = _ROTARY_HEADS.get(hf_name.split(".", 3)[-1])  # "model.layers.{i}.<name>"
        if interleaved_rotary and heads:
            array = interleaved_to_half(array, backbone_config[heads])
        yield ours, np.asarray(hook(array, backbone_config))


def _from_ours(hook):
    """The inverse of a table hook: our array -> the Hugging Face tensor of ``shape``."""
    if hook is _same:
        return lambda w, shape: w
    # Every other hook is "transpose, then split dimensions": merge them back, transpose.
    return lambda w, shape: w.reshape(shape[::-1]).T


def export_weights(get_variable, backbone_config, interleaved_rotary=False):
    """Yield ``(hf_name, numpy array)`` for every weight, in Hugging Face layout: `convert_weights`
    run backwards over the same table (the exporters' half of rule 6).

    Args:
        get_variable: ``get_variable(our_path)`` -> our variable's value (a numpy array).
        interleaved_rotary: write q/k rows in interleaved rotary pairs (GGUF, Meta).
    """
    for hf_name, ours, hook, shape in weight_table(backbone_config):
        array = _from_ours(hook)(np.asarray(get_variable(ours)), shape)
        heads = _ROTARY_HEADS.get(hf_name.split(".", 3)[-1])
        if interleaved_rotary and heads:
            array = half_to_interleaved(array, backbone_config[heads])
        yield hf_name, np.ascontiguousarray(array)


# --- the whole checkpoint ----------------------------------------------------------------------
def read(folder, source=None):
    """Read a Hugging Face Llama checkpoint folder into a `Checkpoint`."""
    source = source or folder
    config = _load_json(folder, "config.json")
    config_path = os.path.join(folder, "config.json")
    if not isinstance(config, dict):
        raise ValueError(
            f"{config_path!r} must hold a JSON object (a dict of settings). "
            f"Received: {type(config).__name__}"
        )
    tokenizer_config = _load_json(folder, "tokenizer_config.json", missing_ok=True) or {}
    if not isinstance(tokenizer_config, dict):
        raise ValueError(
            f"{os.path.join(folder, 'tokenizer_config.json')!r} must hold a JSON object. "
            f"Received: {type(tokenizer_config).__name__}"
        )
    tokenizer, family = _tokenizer_spec(folder, config, tokenizer_config)
    preprocessor = {}
    add_bos = _add_bos_token(folder, tokenizer_config)
    if add_bos is not None:
        preprocessor["add_start_token"] = add_bos

    def read_weights(final_config):
        tensors = SafetensorsCheckpoint(folder)  # only now: a tokenizer needs no weights
        check_holds(tensors, final_config, source)
        return convert_weights(tensors.__getitem__, final_config, source)

    return Checkpoint(
        source=source,
        path=folder,
        format="huggingface",
        family=family,
        read_config=lambda: convert_backbone_config(config, config_path),
        read_weights=read_weights,
        tokenizer=tokenizer,
        preprocessor=preprocessor,
        chat_template=_chat_template(folder, tokenizer_config),
        context_length=context_length(config),
    )


def _load_json(folder, name, missing_ok=False):
    return load_json(folder, name, missing_ok, what="checkpoint folder")


def _token_content(value):
    """tokenizer_config.json writes special tokens as strings or ``{"content": ...}``."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def is_tiktoken_file(path):
    """Meta's Llama 3 ``tokenizer.model`` is text: ``<base64 token> <rank>`` per line."""
    with open(path, "rb") as f:
        head = f.read(256)
    first = head.split(b"\n", 1)[0].split(b" ")
    return len(first) == 2 and first[1].strip().isdigit()


def _tokenizer_spec(folder, config, tokenizer_config):
    """-> (TokenizerSpec or None, family)."""
    bos = _token_content(tokenizer_config.get("bos_token"))
    eos = _token_content(tokenizer_config.get("eos_token"))
    pad = _token_content(tokenizer_config.get("pad_token"))
    spm_path = os.path.join(folder, "tokenizer.model")
    json_path = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(spm_path) and not is_tiktoken_file(spm_path):
        with open(spm_path, "rb") as f:
            proto = f.read()
        spec = TokenizerSpec(
            "sentencepiece",
            {"proto": proto},
            start_token=bos or "<s>",
            end_token=eos or "</s>",
            pad_token=pad,
        )
        return spec, "llama"
    if os.path.isfile(json_path):
        try:
            return _tokenizer_json_spec(json_path, config, bos, eos, pad)
        except (KeyError, TypeError, AttributeError) as e:  # a malformed structure
            raise ValueError(
                f"{json_path!r} is not a valid tokenizer.json ({type(e).__name__}: {e})."
            ) from e
    if os.path.isfile(spm_path):  # Meta-style tiktoken file copied into an HF folder
        return TokenizerSpec("tiktoken", {"path": spm_path}), "llama3"
    # No tokenizer: a backbone-only checkpoint. Llama 3 vocabularies are 128256 tokens.
    vocab_size = config.get("vocab_size", 0)
    return None, ("llama3" if isinstance(vocab_size, int) and vocab_size >= 128000 else "llama")


def _tokenizer_json_spec(json_path, config, bos, eos, pad):
    data = load_json(*os.path.split(json_path), what="checkpoint folder")
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not _is_byte_level(data):
        raise ValueError(
            f"{json_path!r} holds a {model.get('type')} tokenizer without byte-level "
            "pre-tokenization and there is no SentencePiece `tokenizer.model` beside it. "
            "Llama checkpoints ship one of: `tokenizer.model` (SentencePiece) or a "
            "byte-level BPE `tokenizer.json`."
        )
    added = {t["id"]: t["content"] for t in data.get("added_tokens", [])}
    vocab = model.get("vocab", {})
    id_to_token = {**{i: t for t, i in vocab.items()}, **added}
    bos = bos or id_to_token.get(config.get("bos_token_id"))
    eos_ids = config.get("eos_token_id")
    eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids]
    eos_tokens = [id_to_token[i] for i in eos_ids if i in id_to_token]
    eos = eos or (eos_tokens[0] if eos_tokens else None)
    spec = TokenizerSpec(
        "tokenizer_json",
        {"path": json_path},
        start_token=bos,
        end_token=eos,
        pad_token=pad,
        stop_tokens=[t for t in eos_tokens if t != eos],
    )
    return spec, "llama3"


def _is_byte_level(tokenizer_json):
    def has_byte_level(node):
        if not isinstance(node, dict):
            return False
        if node.get("type") == "ByteLevel":
            return True
        return any(has_byte_level(n) for n in node.get("pretokenizers", []) or [])

    return has_byte_level(tokenizer_json.get("pre_tokenizer")) or (
        (tokenizer_json.get("decoder") or {}).get("type") == "ByteLevel"
    )


def _add_bos_token(folder, tokenizer_config):
    """Whether the checkpoint's tokenizer puts a start token in front of text, or None."""
    if "add_bos_token" in tokenizer_config:
        return bool(tokenizer_config["add_bos_token"])
    json_path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(json_path):
        return None
    try:
        post = load_json(folder, "tokenizer.json", what="checkpoint folder").get("post_processor")
        post = post or {}
        processors = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
        for processor in processors:
            if processor.get("type") == "TemplateProcessing":
                single = processor.get("single") or []
                return bool(single) and "SpecialToken" in single[0]
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(
            f"{json_path!r} has a malformed `post_processor` ({type(e).__name__}: {e})."
        ) from e
    return False


def _chat_template(folder, tokenizer_config):
    """The chat template: ``chat_template.jinja`` (transformers >= 4.43 writes it), else
    ``tokenizer_config.json``'s ``chat_template`` (a string, or a list of named templates of
    which "default" is used)."""
    path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        named = {
            t.get("name"): t.get("template")
            for t in template
            if isinstance(t, dict) and isinstance(t.get("name"), str)
        }
        template = named.get("default") or next(iter(named.values()), None)
    if template is not None and not isinstance(template, str):
        raise ValueError(
            f"The `chat_template` of {os.path.join(folder, 'tokenizer_config.json')!r} must be "
            f"a string or a list of named templates. Received: {type(template).__name__}"
        )
    return template


def check_holds(tensors, backbone_config, source):
    """Raise unless ``tensors`` (a `SafetensorsCheckpoint`) hold every tensor a backbone of
    this config needs, before that backbone is built (a crafted ``num_hidden_layers`` would
    otherwise build its layers first). The last layer is checked first, so a huge count fails
    without a huge table."""
    names = tensors.names()
    last = backbone_config["num_layers"] - 1
    needed = [f"model.layers.{last}.{hf_name}" for hf_name, *_ in LAYER_WEIGHTS]
    if all(n in names for n in needed):
        needed = [hf_name for hf_name, *_ in weight_table(backbone_config)]
    missing = [n for n in needed if n not in names]
    if missing:
        layers = {n.split(".")[2] for n in names if n.startswith("model.layers.")}
        raise ValueError(
            f"The checkpoint {source!r} has no tensor {missing[0]!r} ({len(missing)} "
            f"missing): it holds {len(layers)} layers. Received: "
            f"num_hidden_layers={backbone_config['num_layers']}"
        )
