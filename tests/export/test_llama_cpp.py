"""llama.cpp (llama-cpp-python, built from source by pip) loads each exported tiny GGUF file:
its logits equal keras-llama's, its tokenization ours, and the chat template is carried over."""

import os

import numpy as np
import pytest
from llama_cpp import Llama

from keras_llama.models import CausalLM
from tests.export.test_gguf import with_spm_tokenizer
from tests.hf_reference import CONFIGS, make_hf_model, to_keras_llama
from tests.presets.helpers import KERAS_HUB, logits

F32 = 0  # GGML_TYPE_F32: a float32 KV cache, so that llama.cpp's logits are float32-close
TEXTS = ["the quick brown fox", "a lazy dog jumps over the fox"]  # in the tiny vocabularies


def _without_extra_buffers(monkeypatch):
    """llama.cpp's extra CPU buffer types (AMX int8 / repacked weights) crash on Q8_0 and Q4_0
    tensors on this machine's CPU, even for files llama.cpp's own quantizer writes; the plain
    CPU path is used for the quantized checks (llama-cpp-python has no argument for it)."""
    import llama_cpp.llama

    default = llama_cpp.llama.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    monkeypatch.setattr(llama_cpp.llama.llama_cpp, "llama_model_default_params", params)


def _llama_cpp(path):
    return Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2,
                 type_k=F32, type_v=F32)  # fmt: skip


def _llama_cpp_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_llama_cpp_logits_equal_ours_on_each_tiny_config(name, tmp_path):
    ours = with_spm_tokenizer(to_keras_llama(make_hf_model(name)), chat_template="{{ 'x' }}")
    ours.export_to_gguf(tmp_path / "m.gguf")
    llm = _llama_cpp(tmp_path / "m.gguf")
    ids = np.random.default_rng(0).integers(3, 100, 40).tolist()  # past the rope's 8 positions
    want = logits(ours, np.array([ids], "int32"))[0]
    got = _llama_cpp_logits(llm, ids)
    np.testing.assert_allclose(got, want, atol=2e-3)
    assert np.abs(want).max() > 1  # logits of a real spread, so 2e-3 is tight
    assert llm.metadata["tokenizer.chat_template"] == "{{ 'x' }}"


@pytest.mark.parametrize("family", ["llama", "llama3"])
def test_llama_cpp_tokenizes_as_we_do(family, tmp_path):
    causal_lm = CausalLM.from_preset(os.path.join(KERAS_HUB, family))
    causal_lm.export_to_gguf(tmp_path / "m.gguf")
    llm = _llama_cpp(tmp_path / "m.gguf")
    preprocessor = causal_lm.preprocessor
    tokenizer = preprocessor.tokenizer
    start = [tokenizer.start_token_id] if preprocessor.add_start_token else []
    for text in TEXTS:
        ids = llm.tokenize(text.encode(), add_bos=preprocessor.add_start_token, special=False)
        assert ids == start + tokenizer(text).tolist(), text
    ids = start + tokenizer(TEXTS[1]).tolist()
    want = logits(causal_lm, np.array([ids], "int32"))[0]
    np.testing.assert_allclose(_llama_cpp_logits(llm, ids), want, atol=2e-3)


def _tiny_backbone(cls, vocabulary_size):
    return cls(vocabulary_size=vocabulary_size, num_layers=1, num_query_heads=4, hidden_dim=32,
               intermediate_dim=64, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip


@pytest.mark.parametrize("family", ["sentencepiece", "tiktoken"])
def test_llama_cpp_tokenizes_the_tricky_corpus_as_we_do_with_real_vocabularies(family, tmp_path):
    from keras_llama import models
    from tests.tokenizers.references import TEXTS as TRICKY
    from tests.tokenizers.references import llama3_tiktoken_path, mistral_v1_path

    if family == "sentencepiece":
        tokenizer = models.LlamaTokenizer(mistral_v1_path())
        backbone = _tiny_backbone(models.LlamaBackbone, tokenizer.vocabulary_size())
        preprocessor = models.LlamaCausalLMPreprocessor(tokenizer)
        causal_lm = models.LlamaCausalLM(backbone, preprocessor)
    else:
        tokenizer = models.Llama3Tokenizer.from_tiktoken(llama3_tiktoken_path())
        backbone = _tiny_backbone(models.Llama3Backbone, tokenizer.vocabulary_size())
        preprocessor = models.Llama3CausalLMPreprocessor(tokenizer)
        causal_lm = models.Llama3CausalLM(backbone, preprocessor)
    causal_lm.export_to_gguf(tmp_path / "m.gguf")
    llm = Llama(model_path=str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    for text in TRICKY:
        got = llm.tokenize(text.encode(), add_bos=True, special=False)
        assert got == [tokenizer.start_token_id] + tokenizer(text).tolist(), text


# llama.cpp rounds the activations to the weights' type in each matmul (f16, bf16, q8_0 for
# both q8_0 and q4_0 weights), so the bounds follow that rounding, on logits of about +-4.
@pytest.mark.parametrize("dtype,atol", [("f16", 1e-2), ("bf16", 1e-1), ("q8_0", 0.3),
                                        ("q4_0", 0.3)])  # fmt: skip
def test_llama_cpp_runs_each_dtype_as_we_read_the_file(dtype, atol, tmp_path, monkeypatch):
    _without_extra_buffers(monkeypatch)
    ours = with_spm_tokenizer(to_keras_llama(make_hf_model("gqa")))
    ours.export_to_gguf(tmp_path / "m.gguf", dtype=dtype)
    reloaded = CausalLM.from_preset(str(tmp_path / "m.gguf"))  # the file's weights, dequantized
    ids = np.random.default_rng(1).integers(3, 100, 32).tolist()
    want = logits(reloaded, np.array([ids], "int32"))[0]
    got = _llama_cpp_logits(_llama_cpp(tmp_path / "m.gguf"), ids)
    np.testing.assert_allclose(got, want, atol=atol)
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9
