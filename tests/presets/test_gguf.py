"""GGUF files written with the `gguf` package's GGUFWriter from random transformers models ->
the same logits as transformers on the same (dequantized) weights."""

import math

import gguf
import numpy as np
import pytest
import sentencepiece as spm
import torch
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from keras_llama.models import CausalLM, Llama3CausalLM, LlamaCausalLM
from tests.hf_reference import hf_logits, make_hf_model
from tests.presets.helpers import (
    BPE_MERGES,
    BPE_VOCAB,
    SPM_PROTO,
    bpe_tokenizer_json,
    logits,
    token_batch,
)

ATOL = 1e-4
UP = "model.layers.0.mlp.up_proj.weight"


def llama_cpp_permute(weights, n_head):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (HF rotate-half -> interleaved)."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


GGUF_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def gguf_name(hf_name):
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, i, rest = hf_name.split(".", 3)
    return f"blk.{i}.{GGUF_NAMES[rest]}"


def write_gguf(path, hf, qtype="F32", tokenizer="llama", arch="llama", rope_freqs=None,
               add_bos=True, override=None):  # fmt: skip
    """Write ``hf``'s weights as llama.cpp does; return {hf_name: weights as stored (dequantized)}."""
    c = hf.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_vocab_size(c.vocab_size)
    if tokenizer == "llama":
        proto = model_pb2.ModelProto()
        proto.ParseFromString(open(SPM_PROTO, "rb").read())
        writer.add_tokenizer_model("llama")
        writer.add_token_list([p.piece for p in proto.pieces])
        writer.add_token_scores([p.score for p in proto.pieces])
        writer.add_token_types([p.type for p in proto.pieces])
        writer.add_bos_token_id(1), writer.add_eos_token_id(2), writer.add_unk_token_id(3)
        writer.add_add_space_prefix(True)
    else:
        import json

        vocab = json.load(open(BPE_VOCAB))
        tokens = sorted(vocab, key=vocab.get)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("llama-bpe")
        writer.add_token_list(tokens)
        writer.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
        writer.add_token_merges([m.strip() for m in open(BPE_MERGES) if m.strip()])
        writer.add_bos_token_id(vocab["<|begin_of_text|>"])
        writer.add_eos_token_id(vocab["<|end_of_text|>"])
        writer.add_eot_token_id(vocab["<|eot_id|>"])
        writer.add_chat_template("{{ bos_token }}{{ messages[0]['content'] }}")
    writer.add_add_bos_token(add_bos)
    stored = {}
    for name, tensor in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # tied checkpoints store no output tensor
        w = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            w = llama_cpp_permute(w, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = llama_cpp_permute(w, c.num_key_value_heads)
        kind = getattr(gguf.GGMLQuantizationType, qtype)
        replacement = (override or {}).get(gguf_name(name))
        if isinstance(replacement, tuple):  # (quantized bytes, their type), stored as given
            q, kind = replacement
            writer.add_tensor(gguf_name(name), q, raw_shape=q.shape, raw_dtype=kind)
            stored[name] = gguf.quants.dequantize(q, kind)
        elif replacement is not None:
            writer.add_tensor(gguf_name(name), replacement)
        elif w.ndim == 2 and kind != gguf.GGMLQuantizationType.F32:
            q = gguf.quants.quantize(w, kind)
            writer.add_tensor(gguf_name(name), q, raw_shape=q.shape, raw_dtype=kind)
            stored[name] = gguf.quants.dequantize(q, kind)
        else:
            writer.add_tensor(gguf_name(name), w)
            stored[name] = w
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def reference_with(hf, stored):
    """transformers model holding the weights exactly as the GGUF file stores them."""
    c = hf.config
    state = {}
    for name, w in stored.items():
        if name.endswith("q_proj.weight"):  # undo the permutation with transformers' own code
            w = reverse_permute(w, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = reverse_permute(w, c.num_key_value_heads)
        state[name] = torch.as_tensor(np.asarray(w, "float32"))
    hf.load_state_dict(state, strict=False)
    return hf


def reverse_permute(weights, n_head):
    """transformers' GGUF loader (integrations/ggml.py, LlamaConverter reverse_permute_weights)."""
    dim = weights.shape[0] // n_head // 2
    w = weights.reshape(n_head, dim, 2, *weights.shape[1:])
    return w.swapaxes(2, 1).reshape(weights.shape)


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_gguf_llama_tokenizer_logits(tmp_path, qtype):
    hf = make_hf_model("gqa", seed=11, hidden_size=64, intermediate_size=128)  # Q8_0 blocks of 32
    original = {k: v.numpy().copy() for k, v in hf.state_dict().items()}
    path = str(tmp_path / f"tiny-{qtype}.gguf")
    stored = write_gguf(path, hf, qtype=qtype)
    causal_lm = CausalLM.from_preset(path)
    assert type(causal_lm) is LlamaCausalLM
    ids = token_batch(seed=12)
    np.testing.assert_allclose(
        logits(causal_lm, ids), hf_logits(reference_with(hf, stored), ids), atol=ATOL, rtol=0
    )
    if qtype == "Q8_0":  # the file really holds quantized weights: rounded, close
        stored_up, original_up = stored[UP], original[UP]
        assert not np.array_equal(stored_up, original_up)
        np.testing.assert_allclose(stored_up, original_up, atol=0.01 * np.abs(original_up).max())
    text = "the quick brown fox"
    reference = spm.SentencePieceProcessor(model_file=SPM_PROTO)
    np.testing.assert_array_equal(causal_lm.preprocessor.tokenizer(text), reference.encode(text))
    assert causal_lm.preprocessor.add_start_token is True


def test_gguf_gpt2_tokenizer_llama31_rope_tied(tmp_path):
    hf = make_hf_model("llama31_rope", seed=13, vocab_size=43, tie_word_embeddings=True)
    c = hf.config
    rope = c.rope_parameters
    # llama.cpp's converter (LlamaModel.generate_extra_tensors) turns rope_scaling into factors.
    head_dim = c.hidden_size // c.num_attention_heads
    base, factor = rope["rope_theta"], rope["factor"]
    low, high, old = (
        rope["low_freq_factor"],
        rope["high_freq_factor"],
        rope["original_max_position_embeddings"],
    )
    factors = []
    for freq in 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    path = str(tmp_path / "llama31.gguf")
    stored = write_gguf(path, hf, tokenizer="gpt2", add_bos=False,
                        rope_freqs=np.array(factors, dtype=np.float32))  # fmt: skip
    causal_lm = CausalLM.from_preset(path)
    assert type(causal_lm) is Llama3CausalLM and causal_lm.backbone.tie_word_embeddings
    assert causal_lm.backbone.rope_pretraining_sequence_length == 8
    ids = token_batch(vocab=43, seed=14, length=40)
    np.testing.assert_allclose(
        logits(causal_lm, ids), hf_logits(reference_with(hf, stored), ids), atol=ATOL, rtol=0
    )
    tokenizer = causal_lm.preprocessor.tokenizer
    text = "the brown fox"
    np.testing.assert_array_equal(tokenizer(text), bpe_tokenizer_json(False).encode(text).ids)
    assert causal_lm.preprocessor.add_start_token is False  # tokenizer.ggml.add_bos_token
    assert tokenizer.start_token == "<|begin_of_text|>"
    assert tokenizer.chat_template == "{{ bos_token }}{{ messages[0]['content'] }}"
    assert tokenizer.token_to_id("<|eot_id|>") in tokenizer.stop_token_ids


def test_unsupported_architecture(tmp_path):
    hf = make_hf_model("gqa", seed=15)
    path = str(tmp_path / "gpt2.gguf")
    write_gguf(path, hf, arch="gpt2")
    with pytest.raises(ValueError, match="holds a 'gpt2' model"):
        CausalLM.from_preset(path)


def test_unsupported_tensor_type(tmp_path):
    hf = make_hf_model("gqa", seed=16)
    path = str(tmp_path / "int.gguf")
    write_gguf(path, hf, override={"output_norm.weight": np.ones(32, dtype=np.int32)})
    with pytest.raises(ValueError, match="'output_norm.weight'.*type I32.*Received: I32"):
        CausalLM.from_preset(path)


def test_truncated_gguf(tmp_path):
    hf = make_hf_model("gqa", seed=17)
    path = tmp_path / "cut.gguf"
    write_gguf(str(path), hf)
    path.write_bytes(path.read_bytes()[:-3000])
    with pytest.raises(ValueError, match="truncated"):
        CausalLM.from_preset(str(path))
