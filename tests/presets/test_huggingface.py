"""Hugging Face checkpoints written by transformers -> same logits as transformers."""

import json
import os
import shutil

import numpy as np
import pytest
import sentencepiece as spm

from keras_llama.models import Backbone, CausalLM, Llama3CausalLM, LlamaCausalLM
from tests.hf_reference import hf_logits, make_hf_model
from tests.presets.helpers import (
    SPM_PROTO,
    bpe_tokenizer_json,
    logits,
    token_batch,
    write_spm_tokenizer,
)

ATOL = 1e-4


def save_hf(model, folder, **kwargs):
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return folder


@pytest.fixture(scope="module")
def llama2_dir(tmp_path_factory):
    """Untied, multi-head, one model.safetensors, SentencePiece tokenizer."""
    hf = make_hf_model("llama2_mha", seed=1)
    folder = save_hf(hf, str(tmp_path_factory.mktemp("hf_llama2")))
    write_spm_tokenizer(folder, add_bos=True, chat_template="{{ messages[0]['content'] }}!")
    return hf, folder


@pytest.fixture(scope="module")
def llama31_sharded_dir(tmp_path_factory):
    """Llama 3.1 RoPE scaling, sharded safetensors with an index, byte-level BPE tokenizer."""
    hf = make_hf_model("llama31_rope", seed=2, vocab_size=43)
    folder = save_hf(hf, str(tmp_path_factory.mktemp("hf_llama31")), max_shard_size="20KB")
    bpe_tokenizer_json(add_bos=True).save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}, f)
    return hf, folder


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    hf = make_hf_model("tied", seed=3)
    return hf, save_hf(hf, str(tmp_path_factory.mktemp("hf_tied")))


def test_single_file_untied_logits_and_tokenizer(llama2_dir):
    hf, folder = llama2_dir
    assert os.path.isfile(os.path.join(folder, "model.safetensors"))
    lm = CausalLM.from_preset(folder)
    assert type(lm) is LlamaCausalLM and not lm.backbone.tie_word_embeddings
    ids = token_batch()
    np.testing.assert_allclose(logits(lm, ids), hf_logits(hf, ids), atol=ATOL, rtol=0)
    reference = spm.SentencePieceProcessor(model_file=SPM_PROTO)
    text = "the quick brown fox"
    np.testing.assert_array_equal(lm.preprocessor.tokenizer(text), reference.encode(text))
    assert lm.preprocessor.add_start_token is True  # tokenizer_config add_bos_token
    assert lm.preprocessor.tokenizer.chat_template == "{{ messages[0]['content'] }}!"


def test_sharded_llama31_rope_scaling(llama31_sharded_dir):
    hf, folder = llama31_sharded_dir
    index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 1
    lm = CausalLM.from_preset(folder)
    assert type(lm) is Llama3CausalLM
    assert lm.backbone.rope_frequency_adjustment_factor == 8.0
    ids = token_batch(vocab=43, length=40)  # past original_max_position_embeddings=8
    np.testing.assert_allclose(logits(lm, ids), hf_logits(hf, ids), atol=ATOL, rtol=0)
    reference = bpe_tokenizer_json(add_bos=False)
    text = "the brown fox"
    np.testing.assert_array_equal(lm.preprocessor.tokenizer(text), reference.encode(text).ids)
    # The post-processor adds <|begin_of_text|>: so does the preprocessor.
    assert lm.preprocessor.add_start_token is True
    assert lm.preprocessor.tokenizer.start_token == "<|begin_of_text|>"


def test_tied_backbone_only(tied_dir):
    hf, folder = tied_dir
    backbone = Backbone.from_preset(folder)
    assert backbone.tie_word_embeddings
    lm = LlamaCausalLM(backbone)
    ids = token_batch(seed=4)
    np.testing.assert_allclose(logits(lm, ids), hf_logits(hf, ids), atol=ATOL, rtol=0)
    assert CausalLM.from_preset(folder).preprocessor is None  # no tokenizer files


def test_bfloat16_safetensors_are_read(tmp_path):
    hf = make_hf_model("gqa", seed=5)
    folder = save_hf(hf.to(__import__("torch").bfloat16), str(tmp_path / "bf16"))
    lm = CausalLM.from_preset(folder)
    ids = token_batch(seed=6)
    np.testing.assert_allclose(logits(lm, ids), hf_logits(hf.float(), ids), atol=ATOL, rtol=0)


def test_offline_hf_handle_from_cache(llama2_dir, tmp_path, monkeypatch):
    """hf://owner/repo resolves from a Hugging Face cache with HF_HUB_OFFLINE=1."""
    import huggingface_hub

    hf, folder = llama2_dir
    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in os.listdir(folder):
        shutil.copy(os.path.join(folder, name), snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    lm = CausalLM.from_preset("hf://someone/tiny-llama")
    ids = token_batch(seed=7)
    np.testing.assert_allclose(logits(lm, ids), hf_logits(hf, ids), atol=ATOL, rtol=0)
    with pytest.raises(FileNotFoundError, match="hf://someone/not-cached.*HF_HUB_OFFLINE"):
        CausalLM.from_preset("hf://someone/not-cached")


# --- bad input -------------------------------------------------------------------------------
def _copy(folder, tmp_path, name="copy"):
    target = tmp_path / name
    shutil.copytree(folder, target)
    return target


def test_other_architecture_is_refused(llama2_dir, tmp_path):
    target = _copy(llama2_dir[1], tmp_path)
    config = json.loads((target / "config.json").read_text())
    config["model_type"] = "mistral"
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type='mistral'"):
        CausalLM.from_preset(str(target))


def test_truncated_safetensors(llama2_dir, tmp_path):
    target = _copy(llama2_dir[1], tmp_path)
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        CausalLM.from_preset(str(target))


def test_wrong_tensor_shape_names_both_shapes(llama2_dir, tmp_path):
    target = _copy(llama2_dir[1], tmp_path)
    config = json.loads((target / "config.json").read_text())
    config["intermediate_size"] = 48  # the file holds 64
    (target / "config.json").write_text(json.dumps(config))
    # Shapes as the file stores them ([out, in]); the tensor and our weight both named.
    match = r"'model.layers.0.mlp.gate_proj.weight' \(our weight `transformer_layer_0/feedforward"
    with pytest.raises(ValueError, match=match + r".*expected \(48, 32\), received \(64, 32\)"):
        CausalLM.from_preset(str(target))


def test_missing_tensor_names_it(llama2_dir, tmp_path):
    target = _copy(llama2_dir[1], tmp_path)
    config = json.loads((target / "config.json").read_text())
    config["num_hidden_layers"] = 3  # the file has 2
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no tensor 'model.layers.2"):
        CausalLM.from_preset(str(target))


def test_shard_outside_the_folder_is_refused(llama31_sharded_dir, tmp_path):
    target = _copy(llama31_sharded_dir[1], tmp_path)
    index = json.loads((target / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../outside.safetensors"
    (target / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="inside its own folder"):
        CausalLM.from_preset(str(target))


def test_pickled_weights_are_not_read(tmp_path):
    hf = make_hf_model("gqa", seed=8)
    hf.config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="pickled PyTorch weights are not loaded"):
        CausalLM.from_preset(str(tmp_path))
