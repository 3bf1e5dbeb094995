"""export_to_gguf: the file is read back with `gguf.GGUFReader` and with our own GGUF loader
(logits against the source), quantized blocks are bit-equal to `gguf.quants`, and llama.cpp
(llama-cpp-python) loads each tiny export with logits and tokenization equal to ours."""

import os

import gguf
import numpy as np
import pytest

from keras_llama.export import gguf_quants
from keras_llama.export.gguf import pretokenizer_name
from keras_llama.models import (
    CausalLM,
    LlamaCausalLM,
    LlamaCausalLMPreprocessor,
    LlamaTokenizer,
)
from keras_llama.presets.rotary import half_to_interleaved
from tests.hf_reference import CONFIGS, hf_logits, make_hf_model, to_keras_llama
from tests.presets.helpers import KERAS_HUB, SPM_PROTO, logits, token_batch

TEXTS = ["the quick brown fox", "a lazy dog jumps over the fox", "Hello, World!  x\n\ty"]


def with_spm_tokenizer(causal_lm, chat_template=None):
    """The tiny model with the 100-piece SentencePiece tokenizer of the KerasHub test preset."""
    tokenizer = LlamaTokenizer(SPM_PROTO)
    tokenizer.chat_template = chat_template
    return LlamaCausalLM(causal_lm.backbone, LlamaCausalLMPreprocessor(tokenizer))


def _field(reader, key):
    return reader.get_field(key).contents()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_f32_export_reloads_with_the_source_logits(name, tmp_path):
    ours = with_spm_tokenizer(to_keras_llama(make_hf_model(name)))
    path = tmp_path / "m.gguf"
    ours.export_to_gguf(path)
    reader = gguf.GGUFReader(path)
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    assert len(_field(reader, "tokenizer.ggml.tokens")) == 100
    assert _field(reader, "tokenizer.ggml.add_bos_token") is True
    assert {t.tensor_type.name for t in reader.tensors} == {"F32"}
    has_factors = "rope_freqs.weight" in {t.name for t in reader.tensors}
    assert has_factors == (name == "llama31_rope")
    reloaded = CausalLM.from_preset(str(path))
    got, want = reloaded.backbone.get_config(), ours.backbone.get_config()
    assert got.pop("layer_norm_epsilon") == pytest.approx(want.pop("layer_norm_epsilon"))  # f32
    assert got == want | {"name": got["name"]}
    ids = token_batch()
    np.testing.assert_allclose(logits(reloaded, ids), logits(ours, ids), atol=1e-5)
    for text in TEXTS:
        tokenizer = reloaded.preprocessor.tokenizer
        assert tokenizer(text).tolist() == ours.preprocessor.tokenizer(text).tolist()
    assert os.listdir(tmp_path) == ["m.gguf"]


def _rounded_like_gguf(model, dtype):
    """A copy of a transformers model whose 2-D weights went through `gguf.quants` (quantize,
    then dequantize): the weights a GGUF file of ``dtype`` holds. Rotary row permutation
    commutes with row-wise block quantization, so it is not needed here."""
    import copy

    import torch

    qtype = gguf.GGMLQuantizationType[dtype.upper()]
    model = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                w = p.numpy()
                rounded = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
                p.copy_(torch.from_numpy(np.asarray(rounded, "float32").reshape(w.shape)))
    return model


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0", "q4_0"])
def test_each_dtype_reloads_with_the_logits_of_gguf_rounded_weights(dtype, tmp_path):
    source = make_hf_model("gqa")
    ours = with_spm_tokenizer(to_keras_llama(source))
    path = tmp_path / "m.gguf"
    ours.export_to_gguf(path, dtype=dtype)
    reader = gguf.GGUFReader(path)
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == kinds["token_embd.weight"] == dtype.upper()
    assert kinds["blk.0.attn_norm.weight"] == "F32"
    ids = token_batch()
    got = logits(CausalLM.from_preset(str(path)), ids)
    reference = hf_logits(_rounded_like_gguf(source, dtype), ids)
    np.testing.assert_allclose(got, reference, atol=1e-4)
    assert np.abs(got - logits(ours, ids)).max() > 1e-4  # the rounding is really there
    if dtype in ("q8_0", "q4_0"):  # the stored blocks are gguf.quants' own, bit for bit
        q = source.state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy()
        q = half_to_interleaved(q, source.config.num_attention_heads)
        stored = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight").data
        expected = gguf.quants.quantize(q, gguf.GGMLQuantizationType[dtype.upper()])
        assert np.array_equal(np.asarray(stored), expected)


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_numpy_quantizers_are_bit_equal_to_gguf_quants(kind):
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (96, 128)).astype("float32")
    x[0, :32] = 0  # all-zero block
    x[1, :32] = 0.5  # ties
    x[2, 40] = -9.0  # a large negative maximum
    x[3] = np.round(x[3] * 4) / 4 * 127 / 127
    expected = gguf.quants.quantize(x, gguf.GGMLQuantizationType[kind.upper()])
    got = gguf_quants.quantize(x, kind)
    assert got.dtype == expected.dtype and np.array_equal(got, expected)
    x[5, 7] += 0.3  # a planted change shows
    assert not np.array_equal(gguf_quants.quantize(x, kind), expected)


@pytest.mark.parametrize("family", ["llama", "llama3"])
def test_keras_hub_preset_round_trips_vocabulary_and_template(family, tmp_path):
    causal_lm = CausalLM.from_preset(os.path.join(KERAS_HUB, family))
    tokenizer = causal_lm.preprocessor.tokenizer
    tokenizer.chat_template = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
    path = tmp_path / "m.gguf"
    causal_lm.export_to_gguf(path)
    reader = gguf.GGUFReader(path)
    model = "llama" if family == "llama" else "gpt2"
    assert _field(reader, "tokenizer.ggml.model") == model
    if family == "llama3":
        assert _field(reader, "tokenizer.ggml.pre") == "llama-bpe"
        assert len(_field(reader, "tokenizer.ggml.merges")) > 0
    else:
        assert len(_field(reader, "tokenizer.ggml.scores")) == 100
    assert _field(reader, "tokenizer.chat_template") == tokenizer.chat_template
    assert _field(reader, "tokenizer.ggml.bos_token_id") == tokenizer.start_token_id
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.end_token_id
    reloaded = CausalLM.from_preset(str(path))
    back = reloaded.preprocessor.tokenizer
    for text in TEXTS:
        assert back(text).tolist() == tokenizer(text).tolist(), text
    assert back.chat_template == tokenizer.chat_template
    assert reloaded.preprocessor.add_start_token == causal_lm.preprocessor.add_start_token
    ids = token_batch(vocab=causal_lm.backbone.vocabulary_size)
    np.testing.assert_allclose(logits(reloaded, ids), logits(causal_lm, ids), atol=1e-5)


def test_pretokenizer_names_of_known_tokenizers():
    import json

    from tests.presets.helpers import bpe_tokenizer_json

    gpt2 = json.loads(bpe_tokenizer_json().to_str())  # ByteLevel(use_regex=True): GPT-2's
    gpt2["model"]["ignore_merges"] = False
    assert pretokenizer_name(gpt2) == "gpt-2"
    gpt2["model"]["ignore_merges"] = True  # llama.cpp's gpt-2 never ignores merges
    with pytest.raises(ValueError, match="none that llama.cpp knows"):
        pretokenizer_name(gpt2)
    gpt2["pre_tokenizer"] = {"type": "Whitespace"}
    with pytest.raises(ValueError, match="none that llama.cpp knows"):
        pretokenizer_name(gpt2)
