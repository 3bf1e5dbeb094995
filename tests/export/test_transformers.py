"""export_to_transformers: transformers itself loads each export (AutoModelForCausalLM,
AutoTokenizer) and is compared with the source transformers model, with keras-llama, with
sentencepiece and with tiktoken."""

import json
import os

import keras
import numpy as np
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from keras_llama.models import CausalLM, Llama3Tokenizer, LlamaTokenizer
from tests.hf_reference import CONFIGS, hf_logits, make_hf_model, to_keras_llama
from tests.presets.helpers import KERAS_HUB, logits, token_batch
from tests.tokenizers.references import (
    TEXTS,
    llama3_tiktoken_path,
    mistral_v1_path,
    sentencepiece_processor,
    tiktoken_ids,
)

EXPECTED = np.load(os.path.join(KERAS_HUB, "expected.npz"))


def _load(folder):
    return AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_each_tiny_config_loads_in_transformers_with_equal_logits(name, tmp_path):
    source = make_hf_model(name)
    ours = to_keras_llama(source)
    ours.export_to_transformers(tmp_path / "out")
    exported = _load(tmp_path / "out")
    ids = token_batch()
    np.testing.assert_allclose(hf_logits(exported, ids), hf_logits(source, ids), atol=1e-5)
    np.testing.assert_allclose(hf_logits(exported, ids), logits(ours, ids), atol=1e-4)
    want, got = source.config, exported.config
    legacy = {"type"}  # the source config also keeps the old name of rope_type
    rope = {k: v for k, v in want.rope_parameters.items() if k not in legacy}
    assert got.rope_parameters == rope  # rope type, factors, theta
    assert got.rms_norm_eps == want.rms_norm_eps == 1e-5
    assert got.tie_word_embeddings == want.tie_word_embeddings
    assert got.num_key_value_heads == want.num_key_value_heads
    assert os.listdir(tmp_path) == ["out"]  # no staging folder left behind


def test_sharded_above_max_shard_size(tmp_path):
    source = make_hf_model("gqa")
    ours = to_keras_llama(source)
    ours.backbone.export_to_transformers(tmp_path / "out", max_shard_size=20_000)
    files = sorted(os.listdir(tmp_path / "out"))
    shards = [f for f in files if f.startswith("model-") and f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files
    assert "model.safetensors" not in files
    ids = token_batch()
    np.testing.assert_allclose(hf_logits(_load(tmp_path / "out"), ids), hf_logits(source, ids),
                               atol=1e-5)  # fmt: skip


def _greedy_ours(causal_lm, prompt, steps):
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(logits(causal_lm, np.array([ids], "int32"))[0, -1].argmax()))
    return ids[len(prompt) :]


def test_lora_is_merged_and_transformers_continues_greedily_the_same(tmp_path):
    source = make_hf_model("llama2_mha")
    ours = to_keras_llama(source)
    ours.backbone.enable_lora(2)
    rng = np.random.default_rng(0)
    for v in ours.backbone.weights:
        if "lora_kernel" in v.path:
            v.assign(rng.normal(0, 0.5, v.shape).astype("float32"))
    prompt = [5, 17, 42, 8]
    ids = np.array([prompt], "int32")
    assert np.abs(logits(ours, ids) - hf_logits(source, ids)).max() > 1e-2  # LoRA changes it
    ours.export_to_transformers(tmp_path / "out")
    exported = _load(tmp_path / "out")
    np.testing.assert_allclose(hf_logits(exported, ids), logits(ours, ids), atol=1e-4)
    import torch

    hf_ids = exported.generate(torch.tensor(ids, dtype=torch.long), max_new_tokens=8,
                               do_sample=False, pad_token_id=0)  # fmt: skip
    assert hf_ids[0, len(prompt) :].tolist() == _greedy_ours(ours, prompt, 8)


def test_quantized_model_is_refused_with_the_mode(tmp_path):
    ours = to_keras_llama(make_hf_model("gqa"))
    ours.quantize("int8_weight_only")
    with pytest.raises(ValueError, match="mode=.int8."):
        ours.export_to_transformers(tmp_path / "out")
    assert not os.path.exists(tmp_path / "out") and os.listdir(tmp_path) == []


@pytest.mark.parametrize("family", ["llama", "llama3"])
def test_keras_hub_preset_exported_reproduces_keras_hubs_logits(family, tmp_path):
    causal_lm = CausalLM.from_preset(os.path.join(KERAS_HUB, family))
    causal_lm.export_to_transformers(tmp_path / "out")
    exported = _load(tmp_path / "out")
    ids, mask = EXPECTED["token_ids"], EXPECTED["padding_mask"].astype(bool)
    got = hf_logits(exported, ids, EXPECTED["padding_mask"])
    np.testing.assert_allclose(got[mask], EXPECTED[f"{family}_logits"][mask], atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    ours = causal_lm.preprocessor.tokenizer
    text = "the quick brown fox"
    start = [ours.start_token_id] if causal_lm.preprocessor.add_start_token else []
    assert tokenizer(text)["input_ids"] == start + ours(text).tolist()
    config = json.load(open(tmp_path / "out" / "config.json"))
    assert config["bos_token_id"] == ours.start_token_id
    assert config["eos_token_id"] == ours.end_token_id


def test_sentencepiece_tokenizer_gives_sentencepiece_ids(tmp_path):
    LlamaTokenizer(mistral_v1_path()).export_to_transformers(tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    processor = sentencepiece_processor()
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == [1] + processor.encode(text), text
    ids = tokenizer("Hello world")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Hello world"


def test_byte_level_tokenizer_gives_tiktoken_ids_and_keeps_the_chat_template(tmp_path):
    tokenizer = Llama3Tokenizer.from_tiktoken(llama3_tiktoken_path())
    tokenizer.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    tokenizer.export_to_transformers(tmp_path / "tok")
    exported = AutoTokenizer.from_pretrained(tmp_path / "tok")
    chat = "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    for text in TEXTS + [chat]:
        assert exported(text)["input_ids"] == [128000] + tiktoken_ids(text), text
    messages = [{"role": "user", "content": "hi"}]
    assert exported.apply_chat_template(messages, tokenize=False) == "[hi]"


def test_preprocessor_without_start_token_writes_add_bos_false(tmp_path):
    causal_lm = CausalLM.from_preset(os.path.join(KERAS_HUB, "llama"))
    causal_lm.preprocessor.add_start_token = False
    causal_lm.preprocessor.export_to_transformers(tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = "the quick brown fox"
    assert tokenizer(text)["input_ids"] == causal_lm.preprocessor.tokenizer(text).tolist()
    assert keras.ops.convert_to_numpy(causal_lm.preprocessor.tokenizer(text))[0] != 1
