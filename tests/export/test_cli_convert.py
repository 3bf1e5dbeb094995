"""`keras-llama convert SRC DST --to keras|transformers|gguf`, run in-process against
transformers (the source checkpoint's own library) and gguf's reader."""

import io
import json
import os

import gguf
import numpy as np
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from keras_llama import cli
from keras_llama.models import CausalLM
from tests.hf_reference import hf_logits, make_hf_model
from tests.presets.helpers import logits, token_batch, write_spm_tokenizer


def run_cli(*argv):
    out = io.StringIO()
    return cli.main(list(argv), out=out), out.getvalue()


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    hf = make_hf_model("gqa", seed=3)
    folder = str(tmp_path_factory.mktemp("hf_convert"))
    hf.save_pretrained(folder, safe_serialization=True)
    write_spm_tokenizer(folder, add_bos=True)
    return hf, folder


def test_convert_to_transformers_loads_with_the_source_logits(hf_checkpoint, tmp_path):
    hf, folder = hf_checkpoint
    code, out = run_cli("convert", folder, str(tmp_path / "out"), "--to", "transformers")
    assert code == 0 and "(transformers)" in out
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = token_batch()
    np.testing.assert_allclose(hf_logits(exported, ids), hf_logits(hf, ids), atol=1e-5)
    source_tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "the quick brown fox"
    assert tokenizer(text)["input_ids"] == source_tokenizer(text)["input_ids"]


def test_convert_to_gguf_with_a_dtype(hf_checkpoint, tmp_path):
    hf, folder = hf_checkpoint
    path = str(tmp_path / "m.gguf")
    code, _ = run_cli("convert", folder, path, "--to", "gguf", "--dtype", "q8_0")
    assert code == 0
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert kinds["blk.1.ffn_down.weight"] == "Q8_0"
    ids = token_batch()
    got = logits(CausalLM.from_preset(path), ids)
    assert np.abs(got - hf_logits(hf, ids)).max() < 0.2  # q8_0 rounding only


def test_convert_refuses_an_existing_output_unless_overwrite(hf_checkpoint, tmp_path, capsys):
    _, folder = hf_checkpoint
    dst = str(tmp_path / "preset")
    assert run_cli("convert", folder, dst)[0] == 0
    before = {f: os.path.getmtime(os.path.join(dst, f)) for f in os.listdir(dst)}
    code, _ = run_cli("convert", folder, dst)
    assert code == 2 and dst in capsys.readouterr().err
    assert {f: os.path.getmtime(os.path.join(dst, f)) for f in os.listdir(dst)} == before
    code, _ = run_cli("convert", folder, dst, "--overwrite", "--dtype", "bf16")
    assert code == 0
    config = json.load(open(os.path.join(dst, "config.json")))["config"]
    assert config["dtype"]["config"]["name"] == "bfloat16"


def test_bad_gguf_dtype_is_an_error(hf_checkpoint, tmp_path, capsys):
    _, folder = hf_checkpoint
    code, _ = run_cli("convert", folder, str(tmp_path / "m.gguf"), "--to", "gguf",
                      "--dtype", "q3_k")  # fmt: skip
    assert code == 2 and "q3_k" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
