"""Exports are atomic (a failed export leaves nothing) and refuse to overwrite unless asked;
errors name the path."""

import os

import pytest

from keras_llama.export.atomic import OutputExistsError
from keras_llama.presets import huggingface
from tests.export.test_gguf import with_spm_tokenizer
from tests.hf_reference import make_hf_model, to_keras_llama


@pytest.fixture(scope="module")
def causal_lm():
    return with_spm_tokenizer(to_keras_llama(make_hf_model("gqa")))


def _fail_after_two_tensors(monkeypatch):
    real = huggingface.export_weights

    def failing(*args, **kwargs):
        for i, item in enumerate(real(*args, **kwargs)):
            if i == 2:
                raise RuntimeError("disk full (planted)")
            yield item

    monkeypatch.setattr(huggingface, "export_weights", failing)


@pytest.mark.parametrize("kind", ["transformers", "gguf"])
def test_a_failed_export_leaves_nothing(kind, causal_lm, tmp_path, monkeypatch):
    _fail_after_two_tensors(monkeypatch)
    target = tmp_path / ("out" if kind == "transformers" else "m.gguf")
    with pytest.raises(RuntimeError, match="planted"):
        getattr(causal_lm, f"export_to_{kind}")(target)
    assert os.listdir(tmp_path) == []


def test_a_failed_overwrite_keeps_the_old_export(causal_lm, tmp_path, monkeypatch):
    causal_lm.export_to_transformers(tmp_path / "out")
    before = sorted(os.listdir(tmp_path / "out"))
    _fail_after_two_tensors(monkeypatch)
    with pytest.raises(RuntimeError, match="planted"):
        causal_lm.export_to_transformers(tmp_path / "out", overwrite=True)
    assert sorted(os.listdir(tmp_path / "out")) == before and os.listdir(tmp_path) == ["out"]


def test_existing_outputs_are_refused_naming_the_path(causal_lm, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match=str(folder)) as error:
        causal_lm.export_to_transformers(folder)
    assert isinstance(error.value, ValueError) and "overwrite=True" in str(error.value)
    assert os.listdir(folder) == ["notes.txt"]
    path = tmp_path / "m.gguf"
    path.write_bytes(b"old")
    with pytest.raises(OutputExistsError, match=str(path)):
        causal_lm.export_to_gguf(path)
    assert path.read_bytes() == b"old"
    causal_lm.export_to_gguf(path, overwrite=True)
    assert path.read_bytes()[:4] == b"GGUF"


def test_overwrite_replaces_the_exports_own_files_only(causal_lm, tmp_path):
    folder = tmp_path / "out"
    causal_lm.backbone.export_to_transformers(folder, max_shard_size=20_000)
    assert any(f.startswith("model-0") for f in os.listdir(folder))
    (folder / "README.md").write_text("model card")
    causal_lm.backbone.export_to_transformers(folder, overwrite=True)  # one file now
    causal_lm.preprocessor.export_to_transformers(folder, overwrite=True)
    files = sorted(os.listdir(folder))
    assert not any(f.startswith("model-0") for f in files)  # no stale shards
    assert {"README.md", "model.safetensors", "config.json", "tokenizer.model"} <= set(files)


def test_exports_get_the_users_normal_modes(causal_lm, tmp_path):
    # Staged in mkstemp/mkdtemp files (0600/0700) and renamed: the modes must be reset.
    umask = os.umask(0o022)
    try:
        causal_lm.export_to_transformers(tmp_path / "out")
        causal_lm.export_to_gguf(tmp_path / "m.gguf", dtype="f16")
    finally:
        os.umask(umask)
    assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o755
    assert os.stat(tmp_path / "out" / "config.json").st_mode & 0o777 == 0o644
    assert os.stat(tmp_path / "m.gguf").st_mode & 0o777 == 0o644
