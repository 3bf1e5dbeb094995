"""Presets we save are in KerasHub's own form (compared with presets KerasHub itself wrote, in
tests/data/keras_hub), and our loader reads them back by class name.

KerasHub actually loading our presets is checked outside the test suite (keras-hub is not a
test dependency): ``KERAS_BACKEND=jax "$KERAS_HUB_PYTHON" scripts/make_test_presets.py
--check-ours DIR`` (results in benchmarks/RESULTS.md, "KerasHub loads our presets").
"""

import json
import os

import numpy as np
import pytest

from keras_llama.models import CausalLM, Llama3CausalLM, Llama3Tokenizer, LlamaCausalLM
from tests.presets.helpers import BPE_MERGES, BPE_VOCAB, KERAS_HUB, logits, token_batch

OUR_KEY = "keras_llama_config"


def _json(folder, name):
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


def _names(serialized):
    return {k: serialized[k] for k in ("module", "class_name", "registered_name")}


@pytest.fixture(scope="module", params=["llama", "llama3", "llama_int8"])
def saved(request, tmp_path_factory):
    """(KerasHub's preset folder, the same model saved by us)."""
    theirs = os.path.join(KERAS_HUB, request.param)
    ours = str(tmp_path_factory.mktemp("ours") / request.param)
    CausalLM.from_preset(theirs).save_to_preset(ours)
    return theirs, ours


def test_backbone_config_is_keras_hubs(saved):
    theirs, ours = (_json(folder, "config.json") for folder in saved)
    assert _names(ours) == _names(theirs)  # e.g. keras_hub>LlamaBackbone
    # Our one extra key is a constructor argument KerasHub's backbone takes but drops from
    # its config; every value KerasHub wrote is written the same.
    assert set(ours["config"]) - set(theirs["config"]) == {"tie_word_embeddings"}
    config, expected = dict(ours["config"]), dict(theirs["config"])
    dtype, expected_dtype = config.pop("dtype"), expected.pop("dtype")
    assert {k: config[k] for k in expected} == expected
    assert _names_and_modes(dtype) == _names_and_modes(expected_dtype)


def _names_and_modes(dtype):
    """A serialized dtype policy (map) as {layer path: (class, quantization mode)}. (Our int8
    maps also name the source float dtype where KerasHub's leave it null.)"""
    if dtype["class_name"] != "DTypePolicyMap":
        return {"": (dtype["class_name"], dtype["config"]["name"])}
    policies = dtype["config"]["policy_map"]
    return {k: (v["class_name"], v["config"].get("mode")) for k, v in policies.items()}


def test_tokenizer_config_is_keras_hubs(saved):
    theirs, ours = (_json(folder, "tokenizer.json") for folder in saved)
    assert _names(ours) == _names(theirs)
    config, expected = dict(ours["config"]), dict(theirs["config"])
    if "unsplittable_tokens" in expected:  # same tokens; KerasHub's order comes from a set
        assert sorted(config.pop("unsplittable_tokens")) == sorted(
            expected.pop("unsplittable_tokens")
        )
    assert config == expected
    assert isinstance(ours[OUR_KEY], dict) and OUR_KEY not in theirs


def test_preprocessor_and_task_configs_are_keras_hubs(saved):
    theirs, ours = (_json(folder, "preprocessor.json") for folder in saved)
    assert _names(ours) == _names(theirs)
    config, expected = dict(ours["config"]), dict(theirs["config"])
    assert _names(config.pop("tokenizer")) == _names(expected.pop("tokenizer"))
    assert config == expected
    theirs_task, ours_task = (_json(folder, "task.json") for folder in saved)
    assert _names(ours_task) == _names(theirs_task)
    assert set(ours_task["config"]) == set(theirs_task["config"])
    for part in ("backbone", "preprocessor"):
        assert _names(ours_task["config"][part]) == _names(theirs_task["config"][part])
    assert ours_task["config"]["backbone"]["config"] == _json(saved[1], "config.json")["config"]


def test_assets_and_weights_are_where_keras_hub_looks(saved):
    theirs, ours = saved
    assets = os.path.join("assets", "tokenizer")
    their_assets = set(os.listdir(os.path.join(theirs, assets)))
    assert their_assets <= set(os.listdir(os.path.join(ours, assets)))
    for name in their_assets - {"vocabulary.json"}:  # byte for byte (spm, merges.txt)
        with open(os.path.join(theirs, assets, name), "rb") as a:
            with open(os.path.join(ours, assets, name), "rb") as b:
                assert a.read() == b.read(), name
    if "vocabulary.json" in their_assets:
        assert _json(ours, os.path.join(assets, "vocabulary.json")) == _json(
            theirs, os.path.join(assets, "vocabulary.json")
        )
    assert os.path.isfile(os.path.join(ours, "model.weights.h5"))
    metadata, their_metadata = _json(ours, "metadata.json"), _json(theirs, "metadata.json")
    assert metadata["parameter_count"] == their_metadata["parameter_count"]


def test_our_settings_outside_keras_hubs_config_survive(tmp_path):
    """Settings KerasHub's config cannot hold (special tokens, pre-tokenizer, stop tokens) are
    read back from our key."""
    base = CausalLM.from_preset(os.path.join(KERAS_HUB, "llama3"))
    tokenizer = Llama3Tokenizer(
        vocabulary=BPE_VOCAB, merges=BPE_MERGES, bos_token="<|start_header_id|>",
        eos_token="<|eot_id|>", misc_special_tokens=["<|end_header_id|>"],
        stop_tokens=["<|end_of_text|>"], pretokenizer="gpt2", ignore_merges=False,
    )  # fmt: skip
    preprocessor = type(base.preprocessor)(tokenizer, sequence_length=7, add_end_token=False)
    model = Llama3CausalLM(base.backbone, preprocessor)
    model.save_to_preset(str(tmp_path / "p"))
    saved = _json(tmp_path / "p", "tokenizer.json")
    assert saved["config"]["bos_token"] == "<|start_header_id|>"  # KerasHub's argument
    loaded = CausalLM.from_preset(str(tmp_path / "p"))
    assert loaded.preprocessor.tokenizer.get_config() == tokenizer.get_config()
    assert loaded.preprocessor.get_config()["sequence_length"] == 7
    assert loaded.preprocessor.add_end_token is False
    text = "<|end_header_id|>the fox 123"
    np.testing.assert_array_equal(loaded.preprocessor.tokenizer(text), tokenizer(text))


def test_loader_maps_names_and_never_imports_module(tmp_path):
    source = CausalLM.from_preset(os.path.join(KERAS_HUB, "llama"))
    target = tmp_path / "p"
    source.save_to_preset(str(target))
    for name in ("config.json", "task.json", "tokenizer.json", "preprocessor.json"):
        serialized = _json(target, name)
        serialized["module"] = "no_such_module_anywhere"  # importing it would fail
        (target / name).write_text(json.dumps(serialized))
    loaded = CausalLM.from_preset(str(target))
    assert type(loaded) is LlamaCausalLM
    ids = token_batch()
    np.testing.assert_array_equal(logits(loaded, ids), logits(source, ids))


def test_sentencepiece_special_token_setting_survives(tmp_path):
    from keras_llama.models import LlamaCausalLMPreprocessor, LlamaTokenizer
    from tests.presets.helpers import SPM_PROTO

    base = CausalLM.from_preset(os.path.join(KERAS_HUB, "llama"))
    tokenizer = LlamaTokenizer(SPM_PROTO, parse_special_tokens=True)  # the opt-in
    model = LlamaCausalLM(base.backbone, LlamaCausalLMPreprocessor(tokenizer))
    model.save_to_preset(str(tmp_path / "p"))
    loaded = CausalLM.from_preset(str(tmp_path / "p")).preprocessor.tokenizer
    assert loaded.parse_special_tokens is True
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=SPM_PROTO)
    assert loaded("the fox</s>").tolist() == sp.encode("the fox") + [2]
    plain = base.preprocessor.tokenizer  # KerasHub's config: the default, SentencePiece's ids
    assert plain.parse_special_tokens is False
    assert plain("the fox</s><s>dog").tolist() == sp.encode("the fox</s><s>dog")
