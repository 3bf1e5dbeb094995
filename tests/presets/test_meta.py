"""Meta's original checkpoints (torch.save of a state dict + params.json) -> transformers' logits."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from keras_llama.models import CausalLM, LlamaCausalLM
from tests.hf_reference import hf_logits, make_hf_model
from tests.presets.helpers import SPM_PROTO, logits, token_batch

META_NAMES = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
# Model-parallel split dims of Meta's fairscale layers (Llama 2: the embedding along dim 1).
SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1,
             "tok_embeddings": 1}  # fmt: skip


def to_meta(hf_name, w, config):
    """HF -> Meta: names, and q/k rows back to interleaved rotary pairs (the inverse of
    transformers' convert_llama_weights_to_hf.py `permute`)."""
    if hf_name == "model.embed_tokens.weight":
        return "tok_embeddings.weight", w
    if hf_name == "model.norm.weight":
        return "norm.weight", w
    if hf_name == "lm_head.weight":
        return "output.weight", w
    _, _, i, rest = hf_name.split(".", 3)
    heads = {"self_attn.q_proj.weight": config.num_attention_heads,
             "self_attn.k_proj.weight": config.num_key_value_heads}.get(rest)  # fmt: skip
    if heads:
        rows, cols = w.shape
        w = w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)
    return f"layers.{i}.{META_NAMES[rest]}", w


def write_meta(folder, hf, shards=1):
    c = hf.config
    state = dict(to_meta(k, v.clone(), c) for k, v in hf.state_dict().items())
    for s in range(shards):
        part = {}
        for name, w in state.items():
            kind = name.split(".")[-2]
            dim = SPLIT_DIM.get(kind)
            part[name] = w if dim is None or shards == 1 else w.chunk(shards, dim=dim)[s].clone()
        torch.save(part, os.path.join(folder, f"consolidated.{s:02d}.pth"))
    params = {"dim": c.hidden_size, "n_layers": c.num_hidden_layers,
              "n_heads": c.num_attention_heads, "n_kv_heads": c.num_key_value_heads,
              "norm_eps": c.rms_norm_eps, "vocab_size": -1, "multiple_of": 32,
              "rope_theta": c.rope_parameters["rope_theta"]}  # fmt: skip
    with open(os.path.join(folder, "params.json"), "w") as f:
        json.dump(params, f)
    shutil.copy(SPM_PROTO, os.path.join(folder, "tokenizer.model"))


@pytest.mark.parametrize("shards", [1, 2])
def test_meta_checkpoint_logits(tmp_path, shards):
    hf = make_hf_model("gqa", seed=21)
    write_meta(str(tmp_path), hf, shards=shards)
    causal_lm = CausalLM.from_preset(str(tmp_path))
    assert type(causal_lm) is LlamaCausalLM
    assert causal_lm.backbone.vocabulary_size == 100
    ids = token_batch(seed=22)
    np.testing.assert_allclose(logits(causal_lm, ids), hf_logits(hf, ids), atol=1e-4, rtol=0)
    assert causal_lm.preprocessor.tokenizer.start_token == "<s>"


class _RunsCode:
    def __reduce__(self):
        marker = os.environ["KERAS_LLAMA_TEST_MARKER"]
        return (open, (marker, "w"))  # unpickling would create the marker file


def test_pickled_code_is_refused(tmp_path, monkeypatch):
    hf = make_hf_model("gqa", seed=23)
    write_meta(str(tmp_path), hf)
    marker = tmp_path / "pwned"
    monkeypatch.setenv("KERAS_LLAMA_TEST_MARKER", str(marker))
    state = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    state["payload"] = _RunsCode()
    torch.save(state, tmp_path / "consolidated.00.pth")
    with pytest.raises(ValueError, match="Refusing to load.*could run arbitrary code"):
        CausalLM.from_preset(str(tmp_path))
    assert not marker.exists()
