"""save_to_preset -> from_preset round trips, and atomic saving."""

import json
import os

import keras
import numpy as np
import pytest

from keras_llama.models import Backbone, CausalLM, Llama3CausalLM, LlamaCausalLM, Tokenizer
from tests.presets.helpers import KERAS_HUB, logits, token_batch

EXPECTED = np.load(os.path.join(KERAS_HUB, "expected.npz"))


@pytest.fixture(scope="module")
def llama3_lm():
    """The KerasHub Llama 3 preset (KerasHub's logits are the reference), with a chat template."""
    causal_lm = CausalLM.from_preset(os.path.join(KERAS_HUB, "llama3"))
    causal_lm.preprocessor.tokenizer.chat_template = "{{ messages[0]['content'] }}|"
    return causal_lm


def keras_hub_logits_match(causal_lm, name):
    mask = EXPECTED["padding_mask"].astype(bool)
    inputs = {"token_ids": EXPECTED["token_ids"], "padding_mask": EXPECTED["padding_mask"]}
    ours = keras.ops.convert_to_numpy(causal_lm(inputs))
    np.testing.assert_allclose(ours[mask], EXPECTED[f"{name}_logits"][mask], atol=1e-5, rtol=0)


def test_round_trip_identical_logits_tokens_and_generation(llama3_lm, tmp_path):
    target = tmp_path / "preset"
    llama3_lm.save_to_preset(str(target))
    expected_files = {"config.json", "metadata.json", "tokenizer.json", "preprocessor.json",
                      "task.json", "model.weights.h5", "assets"}  # fmt: skip
    assert expected_files <= set(os.listdir(target))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".preset")]  # no staging left
    loaded = CausalLM.from_preset(str(target))
    assert type(loaded) is Llama3CausalLM
    keras_hub_logits_match(loaded, "llama3")
    ids = token_batch(vocab=43, seed=3)
    np.testing.assert_array_equal(logits(loaded, ids), logits(llama3_lm, ids))
    text = "the quick brown fox"
    np.testing.assert_array_equal(
        loaded.preprocessor.tokenizer(text), llama3_lm.preprocessor.tokenizer(text)
    )
    assert loaded.preprocessor.tokenizer.chat_template == "{{ messages[0]['content'] }}|"
    assert loaded.preprocessor.sequence_length == llama3_lm.preprocessor.sequence_length
    for model in (llama3_lm, loaded):
        model.compile(sampler="greedy")
    prompt = "the fox"
    assert loaded.generate(prompt, max_length=12) == llama3_lm.generate(prompt, max_length=12)
    metadata = json.loads((target / "metadata.json").read_text())
    assert metadata["parameter_count"] == llama3_lm.backbone.count_params()


def test_round_trip_int8_and_tied(tmp_path):
    int8 = CausalLM.from_preset(os.path.join(KERAS_HUB, "llama_int8"))
    int8.save_to_preset(str(tmp_path / "int8"))
    from tests.presets.test_keras_presets import assert_int8_preset_logits

    assert_int8_preset_logits(CausalLM.from_preset(str(tmp_path / "int8")))

    from tests.hf_reference import make_hf_model, to_keras_llama

    tied = to_keras_llama(make_hf_model("tied", seed=4))
    tied.backbone.save_to_preset(str(tmp_path / "tied"))
    loaded = Backbone.from_preset(str(tmp_path / "tied"))
    assert loaded.tie_word_embeddings
    ids = token_batch(seed=5)
    np.testing.assert_array_equal(logits(LlamaCausalLM(loaded), ids), logits(tied, ids))


def test_sharded_save(llama3_lm, tmp_path):
    from keras_llama.models.preset_saving import save_task

    save_task(llama3_lm, str(tmp_path / "sharded"), max_shard_size=2e-5)
    files = os.listdir(tmp_path / "sharded")
    assert "model.weights.json" in files and "model_00001.weights.h5" in files
    keras_hub_logits_match(CausalLM.from_preset(str(tmp_path / "sharded")), "llama3")


def test_failed_save_keeps_the_old_preset(llama3_lm, tmp_path, monkeypatch):
    target = tmp_path / "preset"
    llama3_lm.save_to_preset(str(target))
    before = {n: (target / n).read_bytes() for n in os.listdir(target) if (target / n).is_file()}

    tokenizer = llama3_lm.preprocessor.tokenizer

    def fail(dir_path):
        with open(os.path.join(dir_path, "vocabulary.json"), "w") as f:
            f.write("{half")  # a partial write, then the failure
        raise OSError("disk full")

    monkeypatch.setattr(tokenizer, "save_assets", fail)
    llama3_lm.backbone.weights[0].assign(llama3_lm.backbone.weights[0] * 0)  # changed weights
    with pytest.raises(OSError, match="disk full"):
        llama3_lm.save_to_preset(str(target))
    after = {n: (target / n).read_bytes() for n in os.listdir(target) if (target / n).is_file()}
    assert after == before
    assert sorted(os.listdir(tmp_path)) == ["preset"]  # the staging folder is gone
    keras_hub_logits_match(CausalLM.from_preset(str(target)), "llama3")


def test_saving_parts_into_one_folder_keeps_the_others(tmp_path):
    """As in KerasHub: backbone.save_to_preset(d) then tokenizer.save_to_preset(d)."""
    source = CausalLM.from_preset(os.path.join(KERAS_HUB, "llama"))
    target = str(tmp_path / "parts")
    source.backbone.save_to_preset(target)
    source.preprocessor.tokenizer.save_to_preset(target)
    assert Tokenizer.from_preset(target)("the fox").tolist() == (
        source.preprocessor.tokenizer("the fox").tolist()
    )
    keras_hub_logits_match(LlamaCausalLM(Backbone.from_preset(target)), "llama")


def test_refuses_to_replace_a_folder_that_is_not_a_preset(llama3_lm, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no preset"):
        llama3_lm.backbone.save_to_preset(str(tmp_path))
    assert (tmp_path / "notes.txt").read_text() == "mine"
