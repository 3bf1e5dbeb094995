"""Issue 14, item 5: the CLI's errors, exit codes and options (in-process, with a tiny GGUF
model from `tests.presets.crafted`; one subprocess for the closed-pipe case)."""

import io
import os
import re
import subprocess
import sys

import pytest

from keras_llama import cli, cli_options, samplers
from tests.presets import crafted


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return crafted.write_gguf(str(tmp_path_factory.mktemp("cli") / "tiny.gguf"))


def run(*argv, stdin=""):
    out = io.StringIO()
    code = cli.main(list(argv), out=out, inp=io.StringIO(stdin))
    return code, out.getvalue()


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert re.fullmatch(r"keras-llama \d+\.\d+\.\d+\n", capsys.readouterr().out)


def test_help_is_plain_text(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert "exit codes:" in text and "``" not in text


@pytest.mark.parametrize(
    "options,message",
    [
        (["--sampler", "greedy", "--top-k", "5"], "--top-k has no effect with the greedy sampler"),
        (["--sampler", "greedy", "--temperature", "50"], "--temperature has no effect"),
        (["--seed", "1"], "--seed has no effect with the greedy sampler"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be a positive integer. Received: 0"),
        (["-n", "-1"], "--max-new-tokens must be a positive integer. Received: -1"),
        (["--dtype", "float64"], "--dtype must be one of float32, bfloat16, float16, int8"),
        (["--min-p", "0.05"], "--min-p is not supported"),
        (["--repeat-penalty", "1.1"], "--repeat-penalty is not supported"),
        (["--top-p", "1.5"], "Received: p=1.5"),
        (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
    ],
)
def test_bad_options_fail_before_the_model_loads(tmp_path, capsys, options, message):
    missing = str(tmp_path / "no_such_preset")  # loading it would be a different error
    code, _ = run("generate", "hi", "--preset", missing, *options)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("keras-llama: error: ") and message in err and err.count("\n") == 1
    assert "no_such_preset" not in err


def _sampler(*options):
    args = cli.build_parser().parse_args(["generate", "hi", *options])
    return cli_options.make_sampler(args)


def test_the_sampler_follows_the_options():
    assert type(_sampler()) is samplers.GreedySampler
    assert type(_sampler("--temperature", "0")) is samplers.GreedySampler
    s = _sampler("--temperature", "0.7", "--seed", "3")
    assert type(s) is samplers.RandomSampler and s.temperature == 0.7 and s.seed == 3
    s = _sampler("--top-k", "5")
    assert type(s) is samplers.TopKSampler and s.k == 5
    s = _sampler("--top-p", "0.9", "--top-k", "7")
    assert type(s) is samplers.TopPSampler and s.p == 0.9 and s.k == 7
    assert type(_sampler("--num-beams", "2")) is samplers.BeamSampler


def test_runtime_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    missing = str(tmp_path / "nope")
    assert run("generate", "hi", "--preset", missing)[0] == 1
    err = capsys.readouterr().err
    assert err.startswith("keras-llama: error: ") and "Traceback" not in err
    assert run("--debug", "generate", "hi", "--preset", missing)[0] == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "keras-llama: error: " in err


def test_os_errors_are_one_line(tiny, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, _ = run("convert", tiny, str(blocker / "preset"))
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("keras-llama: error: ") and err.count("\n") == 1
    assert "a_file" in err and "Traceback" not in err


def test_prompt_sources(tiny, tmp_path, capsys):
    argv = ["--preset", tiny, "--raw", "-n", "3", "--no-stream"]
    expected = run("generate", "a b", *argv)[1]
    assert expected.strip()
    assert run("generate", "-p", "a b", *argv)[1] == expected
    assert run("generate", "-", *argv, stdin="a b")[1] == expected
    path = tmp_path / "prompt.txt"
    path.write_text("a b")
    assert run("generate", "--file", str(path), *argv)[1] == expected
    for bad in ([], ["a b", "-p", "a b"]):
        code, _ = run("generate", *bad, *argv)
        assert code == 2 and "exactly one prompt" in capsys.readouterr().err


def test_max_new_tokens_beyond_the_context_names_the_option(tiny, capsys):
    # The tiny GGUF's llama.context_length is 64.
    code, _ = run("generate", "a b", "--preset", tiny, "--raw", "-n", "100")
    assert code == 2
    assert "--max-new-tokens 100 exceeds the model's context of 64" in capsys.readouterr().err


def test_int8_dtype_quantizes(tiny):
    code, out = run("generate", "a b", "--preset", tiny, "--raw", "-n", "3", "--dtype", "int8")
    assert code == 0 and out.endswith("\n")


def test_closed_pipe_is_quiet(tmp_path):
    long = crafted.write_gguf(str(tmp_path / "long.gguf"), context_length=4096)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    command = [sys.executable, "-m", "keras_llama_launcher", "generate", "a b", "--preset", long,
               "--raw", "-n", "4000"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    process.stdout.read(1)
    process.stdout.close()
    err = process.stderr.read().decode()
    assert process.wait(timeout=120) == cli.EXIT_BROKEN_PIPE, err
    assert "Traceback" not in err and "BrokenPipe" not in err


@pytest.mark.parametrize(
    "options,message",
    [
        (["--steps-per-run", "0"], "--steps-per-run must be a positive integer. Received: 0"),
        (["--max-batch-size", "0"], "--max-batch-size must be a positive integer. Received: 0"),
        (["--max-model-len", "1"], "--max-model-len must be an integer >= 2. Received: 1"),
    ],
)
def test_bad_serve_options_fail_before_anything_starts(tmp_path, capsys, options, message):
    code, _ = run("serve", "--preset", str(tmp_path / "no_such_preset"), *options)
    err = capsys.readouterr().err
    assert code == 2 and message in err, err


@pytest.mark.parametrize("library", ["_multiarray_umath", "libjax_common", "_ml_dtypes_ext"])
def test_ctrl_c_while_starting_exits_130_quietly(library):
    # The command's entry point (`keras_llama_launcher`, as the installed script runs it):
    # a Ctrl-C while Keras and JAX are still importing ends quietly with 130. The signal is
    # sent once the process has loaded ``library`` (numpy's core, jaxlib, ml_dtypes: early,
    # middle and later in the imports, seen in /proc/PID/maps), not after a fixed delay, which
    # would race the interpreter's own start on a busy machine.
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    command = [sys.executable, "-m", "keras_llama_launcher", "presets"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 60
    maps = f"/proc/{process.pid}/maps"
    while process.poll() is None and time.monotonic() < deadline:
        with open(maps) as f:
            if library in f.read():
                break
        time.sleep(0.002)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    if process.returncode == 0:  # finished before the signal: nothing was tested
        pytest.fail(f"`presets` ended before the signal (waited for {library} to load)")
    assert process.returncode == 130, err.decode()
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err, err.decode()


def test_the_installed_command_runs_the_launcher():
    import tomllib

    with open(os.path.join(os.getcwd(), "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts == {"keras-llama": "keras_llama_launcher:main"}
