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
"""

import numpy as np


def convert_backbone_config(hf_config):
    """`LlamaBackbone` keyword arguments from a Hugging Face ``config.json`` dict."""
    model_type = hf_config.get("model_type", "llama")
    if model_type != "llama":
        raise ValueError(
            "Only Llama-architecture checkpoints can be converted. "
            f"Received: model_type={model_type!r}"
        )
    hidden = hf_config["hidden_size"]
    heads = hf_config["num_attention_heads"]
    head_dim = hf_config.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise ValueError(
            "head_dim * num_attention_heads must equal hidden_size. Received: "
            f"head_dim={head_dim}, num_attention_heads={heads}, hidden_size={hidden}"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if hf_config.get(flag):
            raise ValueError(f"Llama checkpoints with biases are not supported. Received: {flag}=True")
    act = hf_config.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"Only the silu activation is supported. Received: hidden_act={act!r}")

    # transformers >= 5 keeps rope settings in `rope_parameters`; older ones in `rope_scaling`.
    rope = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    theta = rope.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    config = {
        "vocabulary_size": hf_config["vocab_size"],
        "num_layers": hf_config["num_hidden_layers"],
        "num_query_heads": heads,
        "hidden_dim": hidden,
        "intermediate_dim": hf_config["intermediate_size"],
        "num_key_value_heads": hf_config.get("num_key_value_heads") or heads,
        "rope_max_wavelength": theta,
        "layer_norm_epsilon": hf_config.get("rms_norm_eps", 1e-6),
        "tie_word_embeddings": bool(hf_config.get("tie_word_embeddings", False)),
    }
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "linear":
        config["rope_position_scaling_factor"] = float(rope["factor"])
    elif rope_type == "llama3":
        config["rope_frequency_adjustment_factor"] = float(rope["factor"])
        config["rope_low_freq_factor"] = float(rope["low_freq_factor"])
        config["rope_high_freq_factor"] = float(rope["high_freq_factor"])
        config["rope_pretraining_sequence_length"] = int(rope["original_max_position_embeddings"])
    elif rope_type != "default":
        raise ValueError(
            "Supported RoPE scalings are 'default', 'linear' and 'llama3'. "
            f"Received: rope_type={rope_type!r}"
        )
    return config


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

# (Hugging Face name, our variable path, hook(array, backbone_config) -> array)
GLOBAL_WEIGHTS = [
    ("model.embed_tokens.weight", "token_embedding/embeddings", _same),
    ("model.norm.weight", "sequence_output_layernorm/scale", _same),
]
UNTIED_WEIGHTS = [("lm_head.weight", "token_embedding/reverse_embeddings", _transpose)]
LAYER_WEIGHTS = [
    ("self_attn.q_proj.weight", "self_attention/query/kernel", _Q),
    ("self_attn.k_proj.weight", "self_attention/key/kernel", _KV),
    ("self_attn.v_proj.weight", "self_attention/value/kernel", _KV),
    ("self_attn.o_proj.weight", "self_attention/attention_output/kernel", _heads_out),
    ("mlp.gate_proj.weight", "feedforward_gate_dense/kernel", _transpose),
    ("mlp.up_proj.weight", "feedforward_intermediate_dense/kernel", _transpose),
    ("mlp.down_proj.weight", "feedforward_output_dense/kernel", _transpose),
    ("input_layernorm.weight", "self_attention_layernorm/scale", _same),
    ("post_attention_layernorm.weight", "feedforward_layernorm/scale", _same),
]


def weight_table(backbone_config):
    """``[(hf_name, our_path, hook)]`` for every weight of a backbone with this config."""
    table = list(GLOBAL_WEIGHTS)
    if not backbone_config.get("tie_word_embeddings", False):
        table += UNTIED_WEIGHTS
    for i in range(backbone_config["num_layers"]):
        for hf_name, ours, hook in LAYER_WEIGHTS:
            table.append((f"model.layers.{i}.{hf_name}", f"transformer_layer_{i}/{ours}", hook))
    return table


def convert_weights(get_tensor, backbone_config):
    """Yield ``(our_path, numpy array)`` for each weight, reading with ``get_tensor(hf_name)``."""
    for hf_name, ours, hook in weight_table(backbone_config):
        yield ours, np.asarray(hook(np.asarray(get_tensor(hf_name)), backbone_config))
