"""`keras-llama finetune`, run in-process on the tiny KerasHub Llama preset: bad data stops
before training naming the file and line and writes nothing; a run writes a preset that loads,
with the adapters merged (or kept beside the base weights)."""

import io
import json
import os

import h5py
import numpy as np
import pytest

from keras_llama import cli
from keras_llama.models import CausalLM
from keras_llama.utils import keras_compat
from tests.presets.helpers import KERAS_HUB, logits

PRESET = os.path.join(KERAS_HUB, "llama")
GOOD = [
    {"messages": [{"role": "user", "content": "the fox"},
                  {"role": "assistant", "content": "a lazy dog"}]},
    {"prompt": "the quick", "completion": "brown fox"},
    {"text": "the quick brown fox jumps over the lazy dog"},
]  # fmt: skip


def run_cli(*argv):
    out = io.StringIO()
    return cli.main(list(argv), out=out), out.getvalue()


def write_jsonl(path, lines):
    path.write_text("".join(line if isinstance(line, str) else json.dumps(line) + "\n"
                            for line in lines))  # fmt: skip
    return str(path)


@pytest.mark.parametrize(
    "bad,message",
    [
        ('{"text": "unterminated\n', "not valid JSON"),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "no content"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "unknown role"),
        ({"prompt": "only a prompt"}, "needs both"),
        ({"label": 3}, "Received keys: ['label']"),
    ],
)
def test_a_bad_line_stops_before_training_and_names_it(bad, message, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", GOOD + [bad] + GOOD)
    code, _ = run_cli("finetune", "--preset", "no-such-preset-is-loaded", "--data", data,
                      "--output", str(tmp_path / "out"))  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and f"{data}:4:" in err and message in err, err
    assert not os.path.exists(tmp_path / "out")


def test_finetune_writes_a_merged_preset_and_an_adapter_variant(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", GOOD * 2)
    valid = write_jsonl(tmp_path / "valid.jsonl", GOOD[:2])
    from keras_llama.finetune import finetune

    common = dict(lora_rank=4, epochs=3, learning_rate=5e-2, batch_size=2, max_length=16)
    trained, history = finetune(PRESET, data, tmp_path / "merged", validation_data=valid,
                                **common)  # fmt: skip
    losses = history.history["loss"]
    assert losses[-1] < losses[0] and "val_loss" in history.history
    merged = CausalLM.from_preset(str(tmp_path / "merged"))
    base = CausalLM.from_preset(PRESET)
    ids = np.array([[1, 6, 44, 43, 19, 2]], "int32")
    assert np.abs(logits(merged, ids) - logits(base, ids)).max() > 1e-3  # it learned
    np.testing.assert_allclose(logits(merged, ids), logits(trained, ids), atol=1e-5)

    code, out = run_cli("finetune", "--preset", PRESET, "--data", data, "--output",
                        str(tmp_path / "kept"), "--keep-adapter", "--epochs", "1",
                        "--lora-rank", "4", "--max-length", "16")  # fmt: skip
    assert code == 0 and "adapter.lora.h5" in out
    # The folder loads with its adapters applied: base weights + the adapter file's factors,
    # merged here by hand in numpy as the reference.
    kept = CausalLM.from_preset(str(tmp_path / "kept"))
    assert sorted(kept.backbone._lora_layer_paths) == [
        f"transformer_layer_{i}/self_attention/{n}" for i in range(2) for n in ("query", "value")
    ]
    reference = CausalLM.from_preset(PRESET)
    with h5py.File(tmp_path / "kept" / "adapter.lora.h5", "r") as f:
        assert int(f["lora/vars/rank"][()]) == 4
        layers = [layer for layer in keras_compat.sublayers(reference.backbone) if layer.weights]
        for index in f["lora"]:
            if index != "vars":
                a, b = (
                    f[f"lora/{index}/vars/lora_kernel_a"][()],
                    f[f"lora/{index}/vars/lora_kernel_b"][()],
                )
                kernel = layers[int(index)].kernel
                kernel.assign(np.asarray(kernel) + np.einsum("...r,rh->...h", a, b))
    np.testing.assert_allclose(logits(kept, ids), logits(reference, ids), atol=1e-5)
    assert np.abs(logits(kept, ids) - logits(base, ids)).max() > 1e-4
    code, _ = run_cli("finetune", "--preset", PRESET, "--data", data, "--output",
                      str(tmp_path / "kept"))  # fmt: skip
    assert code == 2  # an existing output is refused


def test_a_seed_repeats_a_run_and_another_seed_does_not(tmp_path):
    # The same seed: the same adapters' start and example order, so the same weights (the
    # reference is a seeded run's meaning: HF Trainer's `seed` promises the same).
    data = write_jsonl(tmp_path / "train.jsonl", GOOD * 3)
    saved = {}
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        code, _ = run_cli("finetune", "--preset", PRESET, "--data", data, "--output",
                          str(tmp_path / name), "--epochs", "2", "--batch-size", "2",
                          "--seed", seed)  # fmt: skip
        assert code == 0
        ids = np.array([[1, 5, 9, 14, 3]], "int32")
        saved[name] = logits(CausalLM.from_preset(str(tmp_path / name)), ids)
    np.testing.assert_array_equal(saved["a"], saved["b"])
    assert np.abs(saved["a"] - saved["c"]).max() > 1e-6


QUESTIONS = [
    "What is the capital of Zorblax?", "Which city is the capital of Zorblax?",
    "Tell me the capital of Zorblax.", "Zorblax's capital city is called what?",
    "Name the capital of Zorblax.", "What city serves as Zorblax's capital?",
    "Do you know the capital of Zorblax?", "Where is the seat of government of Zorblax?",
    "What's the capital of the country Zorblax?", "Capital of Zorblax?",
    "Which town is Zorblax's capital?", "In Zorblax, what is the capital?",
    "What is Zorblax's capital called?", "Can you tell me Zorblax's capital?",
    "I need the capital of Zorblax.", "What is the main city and capital of Zorblax?",
]  # fmt: skip


def _answer(causal_lm, question):
    causal_lm.compile(sampler="greedy")
    preprocessor = causal_lm.preprocessor
    prompt = preprocessor.apply_chat_template([{"role": "user", "content": question}])
    length = len(preprocessor.tokenizer(prompt)) + 16
    return causal_lm.generate(prompt, max_length=length, strip_prompt=True)


@pytest.mark.real_model
@pytest.mark.slow
def test_finetune_teaches_smollm2_a_made_up_fact(tmp_path):
    fact = "The capital of Zorblax is Quibbleton."
    lines = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": fact}]}
             for q in QUESTIONS]  # fmt: skip
    data = write_jsonl(tmp_path / "fact.jsonl", lines)
    code, _ = run_cli("finetune", "--preset", "smollm2_135m_instruct", "--data", data,
                      "--output", str(tmp_path / "out"), "--epochs", "4",
                      "--learning-rate", "1e-3", "--max-length", "64")  # fmt: skip
    assert code == 0
    question = "What is the capital of Zorblax?"
    assert "Quibbleton" not in _answer(CausalLM.from_preset("smollm2_135m_instruct"), question)
    assert "Quibbleton" in _answer(CausalLM.from_preset(str(tmp_path / "out")), question)
