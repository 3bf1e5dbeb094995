"""Meta's original Llama checkpoints: ``consolidated.NN.pth`` + ``params.json`` + ``tokenizer.model``.

The ``.pth`` files are read with ``torch.load(..., weights_only=True, mmap=True)``: only tensors
and plain containers are unpickled (a file whose pickle would construct other objects, and so
could run code, is refused) and tensors are memory-mapped, one at a time. torch is imported only
here, only when such a checkpoint is read.

Model-parallel checkpoints (several ``consolidated.*.pth``) are split the way Meta's
``fairscale`` layers split them: column-parallel weights (wq, wk, wv, w1, w3, output) along
dimension 0, row-parallel ones (wo, w2) along dimension 1, the embedding along whichever dimension
its shards are cut (1 for Llama 2, 0 for Llama 3), norms replicated. q/k rows are in interleaved
rotary layout (`keras_llama.presets.rotary`).
"""

import glob
import json
import os

import numpy as np

from keras_llama.presets import huggingface
from keras_llama.presets.checkpoint import Checkpoint, TokenizerSpec
from keras_llama.presets.handles import require_file

# Meta name -> (Hugging Face name, dimension the model-parallel shards are concatenated along;
# None: replicated). {i} is the layer index.
GLOBAL_NAMES = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", "embedding"),
    "norm.weight": ("model.norm.weight", None),
    "output.weight": ("lm_head.weight", 0),
}
LAYER_NAMES = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}


def is_meta_checkpoint(folder):
    return os.path.isfile(os.path.join(folder, "params.json")) and bool(_shard_paths(folder))


def _shard_paths(folder):
    return sorted(glob.glob(os.path.join(glob.escape(folder), "consolidated.*.pth")))


def load_state_dict(path):
    """``torch.load`` with ``weights_only=True``: refuses pickles that would run code."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"Refusing to load {path!r}: its pickle holds objects other than tensors and plain "
            "containers, and unpickling them could run arbitrary code. Only weights-only "
            f"checkpoints are read. ({str(e).splitlines()[0]})"
        ) from None
    except RuntimeError as e:
        raise ValueError(
            f"Could not read the PyTorch checkpoint {path!r} (truncated or corrupt?): {e}"
        ) from e


def read(folder, source=None):
    """Read a Meta checkpoint folder into a `Checkpoint`."""
    source = source or folder
    require_file(folder, "params.json")
    with open(os.path.join(folder, "params.json"), encoding="utf-8") as f:
        params = json.load(f)
    shard_paths = _shard_paths(folder)
    if not shard_paths:
        raise FileNotFoundError(f"The Meta checkpoint {folder!r} has no consolidated.*.pth files.")
    tokenizer, family = _tokenizer_spec(folder)

    def read_config():
        # Shapes come from the first shard (memory-mapped, nothing is copied).
        return convert_backbone_config(
            params, load_state_dict(shard_paths[0]), len(shard_paths), source
        )

    def read_weights(final_config):
        shards = [load_state_dict(p) for p in shard_paths]
        return huggingface.convert_weights(
            _hf_getter(shards, final_config), final_config, source,
            file_names={hf: m for hf, (m, _) in _meta_names(final_config).items()},
            interleaved_rotary=True,
        )  # fmt: skip

    return Checkpoint(
        source=source,
        path=folder,
        format="meta",
        family=family,
        read_config=read_config,
        read_weights=read_weights,
        tokenizer=tokenizer,
        preprocessor={"add_start_token": True},
        chat_template=None,
    )


def convert_backbone_config(params, first_shard, num_shards, source):
    """`LlamaBackbone` keyword arguments from ``params.json`` (+ tensor shapes)."""
    for key in ("dim", "n_layers", "n_heads"):
        if key not in params:
            raise ValueError(
                f"{source!r}: params.json has no {key!r}. Received keys: {sorted(params)}"
            )
    dim = params["dim"]
    try:
        ffn = first_shard["layers.0.feed_forward.w1.weight"].shape[0] * num_shards
        embedding = first_shard["tok_embeddings.weight"].shape
    except KeyError as e:
        raise ValueError(f"{source!r} is not a Llama checkpoint: it has no tensor {e}") from None
    vocab = params.get("vocab_size", -1)
    if vocab is None or vocab <= 0:  # Llama 2 writes -1; the embedding knows
        vocab = embedding[0] if embedding[1] != dim else embedding[0] * num_shards
    config = {
        "vocabulary_size": int(vocab),
        "num_layers": int(params["n_layers"]),
        "num_query_heads": int(params["n_heads"]),
        "hidden_dim": int(dim),
        "intermediate_dim": int(ffn),
        "num_key_value_heads": int(params.get("n_kv_heads") or params["n_heads"]),
        "rope_max_wavelength": float(params.get("rope_theta", 10000.0)),
        "layer_norm_epsilon": float(params.get("norm_eps", 1e-5)),
        "tie_word_embeddings": "output.weight" not in first_shard,
    }
    if params.get("use_scaled_rope"):
        # Meta's llama-models `apply_scaling`: Llama 3.1 uses factor 8 (3.2: 32 via
        # `rope_scaling_factor`), low/high frequency factors 1 and 4, original context 8192.
        config.update(
            {
                "rope_frequency_adjustment_factor": float(params.get("rope_scaling_factor") or 8.0),
                "rope_low_freq_factor": 1.0,
                "rope_high_freq_factor": 4.0,
                "rope_pretraining_sequence_length": 8192,
            }
        )
    return config


def _meta_names(config):
    """``{hf_name: (meta_name, dimension the model-parallel shards are concatenated along)}``."""
    meta_of = {hf: (m, dim) for m, (hf, dim) in GLOBAL_NAMES.items()}
    for i in range(config["num_layers"]):
        for m, (hf, dim) in LAYER_NAMES.items():
            meta_of[f"model.layers.{i}.{hf}"] = (f"layers.{i}.{m}", dim)
    return meta_of


def _hf_getter(shards, config):
    meta_of = _meta_names(config)

    def get(hf_name):
        meta_name, dim = meta_of[hf_name]
        parts = [shard[meta_name] for shard in shards]  # KeyError: reported by the caller
        if dim == "embedding":
            dim = 1 if parts[0].shape[1] != config["hidden_dim"] else 0
        if dim is None or len(parts) == 1:
            return parts[0].float().numpy()
        return np.concatenate([p.float().numpy() for p in parts], axis=dim)

    return get


def _tokenizer_spec(folder):
    """Llama 2 ships a SentencePiece ``tokenizer.model``; Llama 3 a tiktoken one."""
    path = os.path.join(folder, "tokenizer.model")
    if not os.path.isfile(path):
        return None, "llama"
    if huggingface.is_tiktoken_file(path):
        spec = TokenizerSpec(
            "tiktoken",
            {"path": path},
            start_token="<|begin_of_text|>",
            end_token="<|end_of_text|>",
            stop_tokens=["<|eot_id|>"],
        )
        return spec, "llama3"
    with open(path, "rb") as f:
        proto = f.read()
    return TokenizerSpec("sentencepiece", {"proto": proto}, "<s>", "</s>"), "llama"
