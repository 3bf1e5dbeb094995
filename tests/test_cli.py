"""The `keras-llama` CLI, run in-process. The CLI only calls the public API; these tests check
its wiring against independent references (transformers + sentencepiece, the spec's table)."""

import io
import re

import numpy as np
import pytest
import sentencepiece as spm
import torch

from keras_llama import cli
from keras_llama.models import CausalLM
from tests.hf_reference import hf_logits, make_hf_model
from tests.presets.helpers import SPM_PROTO, logits, token_batch, write_spm_tokenizer


def run_cli(*argv, stdin=None):
    out = io.StringIO()
    if stdin is None:
        code = cli.main(list(argv), out=out)
    else:
        args = cli.build_parser().parse_args(list(argv))
        code = cli.cmd_chat(args, out, inp=io.StringIO(stdin))
    return code, out.getvalue()


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    hf = make_hf_model("llama2_mha", seed=5)
    folder = str(tmp_path_factory.mktemp("hf_cli"))
    hf.save_pretrained(folder, safe_serialization=True)
    write_spm_tokenizer(folder, add_bos=True)
    return hf, folder


@pytest.fixture(scope="module")
def converted(hf_checkpoint, tmp_path_factory):
    _, folder = hf_checkpoint
    dst = str(tmp_path_factory.mktemp("converted") / "preset")
    code, out = run_cli("convert", folder, dst)
    assert code == 0 and "Saved LlamaCausalLM" in out
    return dst


def test_presets_lists_the_spec_table():
    code, out = run_cli("presets")
    assert code == 0
    # From the spec's presets table.
    for name, params in [
        ("llama2_7b_en", "6.74B"),
        ("llama2_instruct_7b_en_int8", "6.74B"),
        ("vicuna_1.5_7b_en", "6.74B"),
        ("llama3_8b_en", "8.03B"),
        ("llama3_instruct_8b_en_int8", "8.03B"),
    ]:
        assert re.search(rf"^{re.escape(name)}\s+{re.escape(params)}\s", out, re.M), name
    assert "smollm2_135m_instruct" in out


def test_convert_writes_a_preset_with_transformers_logits(hf_checkpoint, converted):
    hf, _ = hf_checkpoint
    lm = CausalLM.from_preset(converted)
    ids = token_batch()
    np.testing.assert_allclose(logits(lm, ids), hf_logits(hf, ids), atol=1e-4, rtol=0)


def _reference_continuation(hf, prompt, new_tokens):
    sp = spm.SentencePieceProcessor(model_file=SPM_PROTO)
    ids = torch.tensor([[sp.bos_id()] + sp.encode(prompt)])
    out = hf.generate(
        ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return sp.decode(out[0, ids.shape[1] :].tolist())


@pytest.mark.parametrize("stream", [True, False])
def test_generate_prints_the_greedy_continuation(hf_checkpoint, converted, stream):
    hf, _ = hf_checkpoint
    argv = ["generate", "the quick brown", "--preset", converted, "--max-new-tokens", "8"]
    code, out = run_cli(*argv, *([] if stream else ["--no-stream"]))
    assert code == 0
    expected = _reference_continuation(hf, "the quick brown", 8)
    # The model has no end token in its first 8 greedy tokens, so all 8 are printed.
    assert out.rstrip("\n").strip() == expected.strip()


@pytest.mark.parametrize("stream", [True, False])
def test_generate_max_length_is_the_total_length(hf_checkpoint, converted, stream):
    """``--max-length`` is generate()'s ``max_length``: prompt (BOS + SentencePiece ids)
    plus completion."""
    hf, _ = hf_checkpoint
    prompt = "the quick brown"
    prompt_tokens = 1 + len(spm.SentencePieceProcessor(model_file=SPM_PROTO).encode(prompt))
    argv = ["generate", prompt, "--preset", converted, "--max-length", str(prompt_tokens + 5)]
    code, out = run_cli(*argv, *([] if stream else ["--no-stream"]))
    assert code == 0
    assert out.rstrip("\n").strip() == _reference_continuation(hf, prompt, 5).strip()


def test_generate_length_options_are_exclusive_and_checked(converted, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(
            "generate", "hi", "--preset", converted, "--max-length", "9", "--max-new-tokens", "3"
        )
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    # A total length that leaves no room after the prompt: generate()'s own error.
    code, _ = run_cli("generate", "the quick brown", "--preset", converted, "--max-length", "3")
    assert code == 1
    assert "Received: max_length=3" in capsys.readouterr().err
    code, _ = run_cli("generate", "hi", "--preset", converted, "--max-new-tokens", "0")
    assert code == 2
    assert "--max-new-tokens must be a positive integer. Received: 0" in capsys.readouterr().err


def test_chat_answers_each_turn_and_exits(converted):
    code, out = run_cli(
        "chat",
        "--preset",
        converted,
        "--max-new-tokens",
        "4",
        stdin="hello\n\nagain\n/exit\nignored\n",
    )
    assert code == 0
    # Two replies, each cut by the 4-token limit and marked so; nothing after /exit.
    lines = out.rstrip("\n").split("\n")
    assert len(lines) == 4 and lines[1] == lines[3] == cli.CUT_MARK


def test_bad_sampler_option_is_refused(converted, capsys):
    code, _ = run_cli(
        "generate", "hi", "--preset", converted, "--sampler", "greedy", "--top-p", "0.5"
    )
    assert code == 2
    assert "--top-p has no effect with the greedy sampler" in capsys.readouterr().err


def test_missing_preset_reports_error(tmp_path, capsys):
    code, _ = run_cli("generate", "hi", "--preset", str(tmp_path / "nope"))
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("keras-llama: error: ") and "nope" in err and err.count("\n") == 1


@pytest.mark.real_model
def test_real_model_answers_out_of_the_box():
    code, out = run_cli("generate", "What is the capital of France?", "--max-new-tokens", "24")
    assert code == 0
    assert "Paris" in out
