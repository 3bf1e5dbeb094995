"""Progress bars while converting checkpoint weights: shown on a terminal or when asked,
silent otherwise (logs, pipes, tests)."""

import contextlib
import io

import pytest

from keras_llama import cli
from keras_llama.models import Backbone, CausalLM
from keras_llama.models.preset_loading import PROGRESS_ENV
from tests.hf_reference import make_hf_model
from tests.presets.test_gguf import write_gguf


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self):
        return True


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    hf = make_hf_model("gqa", seed=31)
    folder = str(tmp_path_factory.mktemp("hf_progress"))
    hf.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture
def terminal(monkeypatch):
    """A terminal stderr, installed inside the test body (pytest re-installs its own capture
    between fixture setup and the test call)."""
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    return _Terminal()


def test_quiet_when_stderr_is_not_a_terminal(hf_folder, capsys, monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    Backbone.from_preset(hf_folder)
    assert capsys.readouterr().err == ""


def test_bar_counts_every_tensor_on_a_terminal(hf_folder, terminal):
    with contextlib.redirect_stderr(terminal):
        backbone = Backbone.from_preset(hf_folder)
    n = len(backbone.weights)  # 2 layers x 9 + embedding, lm head, final norm = 21
    output = terminal.getvalue()
    assert "Converting Hugging Face weights" in output and f"{n}/{n}" in output


def test_asked_for_or_turned_off(hf_folder, terminal, monkeypatch):
    with contextlib.redirect_stderr(terminal):
        CausalLM.from_preset(hf_folder, progress=False)
        monkeypatch.setenv(PROGRESS_ENV, "0")
        Backbone.from_preset(hf_folder)
    assert terminal.getvalue() == ""
    monkeypatch.setenv(PROGRESS_ENV, "1")
    with contextlib.redirect_stderr(io.StringIO()) as pipe:  # not a terminal, but asked
        Backbone.from_preset(hf_folder)
    assert "Converting Hugging Face weights" in pipe.getvalue()
    with contextlib.redirect_stderr(io.StringIO()) as pipe:
        Backbone.from_preset(hf_folder, progress=True)
    assert "21/21" in pipe.getvalue()


def test_convert_command_shows_the_bar_on_a_terminal(tmp_path, terminal):
    hf = make_hf_model("gqa", seed=32)
    source = str(tmp_path / "model.gguf")
    write_gguf(source, hf, qtype="Q8_0")
    with contextlib.redirect_stderr(terminal):
        code = cli.main(["convert", source, str(tmp_path / "preset")], out=io.StringIO())
    assert code == 0
    output = terminal.getvalue()
    # One step per variable: Q8_0 blocks are kept, values and scales (2 x 16 block tensors +
    # 5 norms).
    assert "Converting GGUF weights" in output and "37/37" in output
