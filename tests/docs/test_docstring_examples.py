"""The Example of every public docstring runs. Examples are written against a few names a
reader has at hand (documented in docs/guides/contributing_docs.md): ``keras_llama``,
``keras``, ``np``, the public classes and functions, and ``causal_lm``, ``backbone``,
``preprocessor``, ``tokenizer``, ``ids``, ``mask`` of a tiny Llama (KerasHub's tiny preset
committed in tests/data), in a folder holding its ``tokenizer.model`` and a tiny Llama 3
``vocabulary.json`` / ``merges.txt``. Examples that load ``smollm2_135m_instruct`` load the
built-in model (offline cache)."""

import os
import shutil

import pytest

from tests.docs.examples import ROOT, docstring_examples, python_fences
from tests.docs.public_api import public_names

TINY_LLAMA = os.path.join(ROOT, "tests", "data", "keras_hub", "llama")
TINY_LLAMA3 = os.path.join(ROOT, "tests", "data", "keras_hub", "llama3")


def _examples():
    import griffe

    package = griffe.load("keras_llama", search_paths=[ROOT], docstring_parser="google")
    cases = []
    for name in public_names():
        for text in docstring_examples(package[name.split(".", 1)[1]]):
            for i, code in enumerate(python_fences(text)):
                cases.append(pytest.param(name, code, id=f"{name}[{i}]"))
    return cases


def reader_namespace():
    import keras
    import numpy as np

    import keras_llama
    from keras_llama import models, samplers, tokenizers

    namespace = {"keras_llama": keras_llama, "keras": keras, "np": np}
    for module in (models, samplers, tokenizers):
        namespace.update({name: getattr(module, name) for name in module.__all__})
    causal_lm = models.LlamaCausalLM.from_preset(TINY_LLAMA)
    causal_lm.compile(sampler="greedy")
    x = causal_lm.preprocessor.generate_preprocess(["The quick brown"])
    namespace.update(
        causal_lm=causal_lm,
        backbone=causal_lm.backbone,
        preprocessor=causal_lm.preprocessor,
        tokenizer=causal_lm.preprocessor.tokenizer,
        ids=np.asarray(x["token_ids"]),
        mask=np.asarray(x["padding_mask"]),
    )
    return namespace


@pytest.fixture
def reader_folder(tmp_path, monkeypatch):
    shutil.copy(os.path.join(TINY_LLAMA, "assets", "tokenizer", "vocabulary.spm"),
                tmp_path / "tokenizer.model")  # fmt: skip
    for name in ("vocabulary.json", "merges.txt"):
        shutil.copy(os.path.join(TINY_LLAMA3, "assets", "tokenizer", name), tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("name,code", _examples())
def test_docstring_example_runs(name, code, reader_folder):
    namespace = reader_namespace()
    exec(compile(code, f"<Example of {name}>", "exec"), namespace)
