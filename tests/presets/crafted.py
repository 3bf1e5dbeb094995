"""Small valid checkpoints and crafted bad ones, written without keras_llama's own readers or
writers (GGUF with the `gguf` package's GGUFWriter or by hand with `struct`, Hugging Face folders
with `safetensors` and `json`), for the hardening tests, the fuzz tests and
``benchmarks/rejections.py``.

The tiny model: vocabulary 16, hidden 8, 2 query heads and 1 key/value head (head_dim 4),
intermediate 16, 2 layers, untied.
"""

import json
import os
import struct

import numpy as np

TINY = dict(vocab=16, hidden=8, heads=2, kv_heads=1, intermediate=16, layers=2)

HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": TINY["vocab"],
    "hidden_size": TINY["hidden"],
    "intermediate_size": TINY["intermediate"],
    "num_hidden_layers": TINY["layers"],
    "num_attention_heads": TINY["heads"],
    "num_key_value_heads": TINY["kv_heads"],
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}


def hf_tensors(layers=TINY["layers"], seed=0):
    """``{hf_name: float32 array}`` of a tiny random Llama ([out, in] layout)."""
    rng = np.random.default_rng(seed)
    v, m, f = TINY["vocab"], TINY["hidden"], TINY["intermediate"]
    head_dim = m // TINY["heads"]
    kv = TINY["kv_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (v, m), "model.norm.weight": (m,),
              "lm_head.weight": (v, m)}  # fmt: skip
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (m, m), p + "self_attn.k_proj.weight": (kv, m),
            p + "self_attn.v_proj.weight": (kv, m), p + "self_attn.o_proj.weight": (m, m),
            p + "mlp.gate_proj.weight": (f, m), p + "mlp.up_proj.weight": (f, m),
            p + "mlp.down_proj.weight": (m, f), p + "input_layernorm.weight": (m,),
            p + "post_attention_layernorm.weight": (m,),
        })  # fmt: skip
    return {k: (0.2 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


def write_hf(folder, config_overrides=None, config=None, layers=TINY["layers"]):
    """A Hugging Face checkpoint folder: ``config.json`` (``HF_CONFIG`` with overrides, or
    ``config`` as given, any JSON value) and ``model.safetensors``."""
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    if config is None:
        config = {**HF_CONFIG, **(config_overrides or {})}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    save_file(hf_tensors(layers), os.path.join(folder, "model.safetensors"))
    return folder


def write_gguf(path, block_count=TINY["layers"], layers=TINY["layers"], metadata=None,
               context_length=64, with_tokenizer=True):  # fmt: skip
    """A GGUF file written with the `gguf` package (tensors stored as llama.cpp names them; the
    rotary row order does not matter for these tests). ``metadata``: extra ``{key: value}``
    (ints as uint32, floats as float32, strings) that replace the defaults."""
    import gguf

    names = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}  # fmt: skip
    layer_names = {
        "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
    }  # fmt: skip
    values = {
        "llama.block_count": block_count,
        "llama.context_length": context_length,
        "llama.embedding_length": TINY["hidden"],
        "llama.feed_forward_length": TINY["intermediate"],
        "llama.attention.head_count": TINY["heads"],
        "llama.attention.head_count_kv": TINY["kv_heads"],
        "llama.rope.freq_base": 10000.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        **(metadata or {}),
    }
    writer = gguf.GGUFWriter(path, "llama")
    for key, value in values.items():
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_string(key, value)
    if with_tokenizer:
        pieces = ["<unk>", "<s>", "</s>"] + [chr(ord("a") + i) for i in range(TINY["vocab"] - 3)]
        writer.add_tokenizer_model("llama")
        writer.add_token_list(pieces)
        writer.add_token_scores([0.0, 0.0, 0.0] + [-float(i) for i in range(len(pieces) - 3)])
        writer.add_token_types([2, 3, 3] + [1] * (len(pieces) - 3))
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
    for name, array in hf_tensors(layers).items():
        if name in names:
            writer.add_tensor(names[name], array)
        else:
            _, _, i, rest = name.split(".", 3)
            writer.add_tensor(f"blk.{i}.{layer_names[rest]}", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- GGUF by hand (for structures GGUFWriter refuses to write) ---------------------------------
def _string(text):
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _kv_string(key, value):
    return _string(key) + struct.pack("<I", 8) + _string(value)


def raw_gguf(path, kv_bytes, n_kv, padding=0):
    """A GGUF v3 header with ``n_kv`` pre-encoded key/values, no tensors, ``padding`` zero bytes."""
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, n_kv + 1)
    with open(path, "wb") as f:
        f.write(header + _kv_string("general.architecture", "llama") + kv_bytes)
        f.write(b"\0" * padding)
    return path


def huge_vocabulary_gguf(path, count=300_000_000):
    """A ~40 KB file whose vocabulary array claims ``count`` strings."""
    kv = _string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, count)
    return raw_gguf(path, kv, 1, padding=40_000)


def nested_arrays_gguf(path, depth=100_000):
    """An array of an array of ... ``depth`` deep (12 bytes a level)."""
    kv = _string("tokenizer.ggml.tokens") + struct.pack("<I", 9)
    kv += struct.pack("<IQ", 9, 1) * (depth - 1) + struct.pack("<IQ", 4, 1) + b"\0" * 4
    return raw_gguf(path, kv, 1)


# --- the crafted files of issue 14, by name (for the tests and the benchmark) ------------------
def crafted_files(folder):
    """``{name: (path, kind)}`` of every crafted bad file; ``kind`` is "gguf" or "hf" (a
    folder)."""
    j = lambda *p: os.path.join(folder, *p)  # noqa: E731
    files = {
        "gguf_huge_vocabulary": huge_vocabulary_gguf(j("vocab.gguf")),
        "gguf_nested_arrays": nested_arrays_gguf(j("nested.gguf")),
        "gguf_block_count_100000": write_gguf(j("blocks.gguf"), block_count=100_000),
        "gguf_head_count_0": write_gguf(
            j("heads.gguf"), metadata={"llama.attention.head_count": 0}
        ),
        "gguf_block_count_string": write_gguf(j("bcs.gguf"), metadata={"llama.block_count": "2"}),
        "gguf_rope_theta_0": write_gguf(j("rope0.gguf"), metadata={"llama.rope.freq_base": 0.0}),
        "gguf_rms_eps_nan": write_gguf(
            j("epsnan.gguf"), metadata={"llama.attention.layer_norm_rms_epsilon": float("nan")}
        ),
        "hf_num_hidden_layers_100000": write_hf(j("hf_layers"), {"num_hidden_layers": 100_000}),
        "hf_rope_theta_negative": write_hf(j("hf_rope"), {"rope_theta": -1.0}),
        "hf_rms_norm_eps_0": write_hf(j("hf_eps"), {"rms_norm_eps": 0.0}),
        "hf_no_hidden_size": write_hf(
            j("hf_nohidden"), config={k: v for k, v in HF_CONFIG.items() if k != "hidden_size"}
        ),
        "hf_config_is_a_list": write_hf(j("hf_list"), config=[1, 2, 3]),
        "hf_llama3_rope_without_low_freq_factor": write_hf(
            j("hf_llama3"),
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8,
                }
            },  # fmt: skip
        ),
    }
    files = {k: (v, "gguf" if v.endswith(".gguf") else "hf") for k, v in files.items()}
    index_folder = write_hf(j("hf_index"))
    os.rename(j("hf_index", "model.safetensors"), j("hf_index", "model-00001.safetensors"))
    with open(j("hf_index", "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}}, f)  # no weight_map
    files["hf_index_without_weight_map"] = (index_folder, "hf")
    bad_json = write_hf(j("hf_badjson"))
    with open(j("hf_badjson", "config.json"), "w") as f:
        f.write('{"hidden_size": 8,')
    files["hf_config_malformed_json"] = (bad_json, "hf")
    files["keras_num_layers_100000"] = (write_keras(j("keras_layers"), num_layers=100_000), "keras")
    return files


def write_keras(folder, **config_changes):
    """A tiny Keras preset (``save_to_preset``) whose config.json then gets ``config_changes``."""
    from keras_llama.models import LlamaBackbone

    backbone = LlamaBackbone(
        vocabulary_size=TINY["vocab"], num_layers=TINY["layers"], num_query_heads=TINY["heads"],
        hidden_dim=TINY["hidden"], intermediate_dim=TINY["intermediate"],
        num_key_value_heads=TINY["kv_heads"],
    )  # fmt: skip
    backbone.save_to_preset(folder)
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["config"].update(config_changes)
    with open(path, "w") as f:
        json.dump(config, f)
    return folder
