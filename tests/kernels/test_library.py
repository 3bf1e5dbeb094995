"""The native library loader (`keras_llama.kernels.library`): every source compiles without a
warning; builds that fail (no compiler, a failing compiler, a broken source) are reported once
and never raise; builds are cached by source and compiler; a real build loads and registers
its targets; opting out builds nothing; ops refuse to run before their library is loaded.

Each test builds its own `NativeLibrary` into a temporary cache folder (the table's libraries
are shared by the whole test session)."""

import logging
import os
import shutil
import stat
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from keras_llama import kernels
from keras_llama.kernels.library import LibraryStatus, NativeLibrary

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "jax", reason="the native ops are a JAX (CPU) fast path"
)
LOGGER = "keras_llama.kernels.library"
SWIGLU = kernels.library("swiglu")


@pytest.fixture(autouse=True)
def environment(monkeypatch, tmp_path):
    monkeypatch.delenv("KERAS_LLAMA_KERNELS", raising=False)
    monkeypatch.setenv("KERAS_LLAMA_CACHE", str(tmp_path / "cache"))


def real_compiler():
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    pytest.skip("no C++ compiler")


def fake_compiler(folder, body, version="fake-c++ 1.0"):
    """An executable "compiler" script: ``--version`` prints ``version``; any other call is
    logged (one line to ``<folder>/calls``) and runs ``body``."""
    path = folder / "fake-c++"
    path.write_text(
        f'#!/bin/sh\nif [ "$1" = "--version" ]; then echo "{version}"; exit 0; fi\n'
        f'echo "$@" >> "{folder}/calls"\n{body}'
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def compile_calls(folder):
    calls = folder / "calls"
    return calls.read_text().splitlines() if calls.exists() else []


WRITES_OUTPUT = 'while [ $# -gt 0 ]; do [ "$1" = "-o" ] && echo lib > "$2"; shift; done\n'


def swiglu_copy(tmp_path, **kwargs):
    """A library of ``activations.cc`` (or ``source=``) into ``tmp_path/kernels``."""
    kwargs.setdefault("source", SWIGLU.source)
    kwargs.setdefault("targets", SWIGLU.targets)
    return NativeLibrary("swiglu_copy", cache_folder=tmp_path / "kernels", **kwargs)


# --- the sources ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(kernels.LIBRARIES))
def test_every_source_compiles_without_a_warning(name, tmp_path):
    library = kernels.library(name)
    command = library.command(tmp_path / "lib.so", real_compiler()) + ["-Werror"]
    assert "-Wall" in command and "-Wextra" in command and "-w" not in command
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr[-3000:]


def test_the_table_and_lookup():
    assert set(kernels.LIBRARIES) == {"decode_matmul", "attention", "cross_entropy", "swiglu"}
    for name, library in kernels.LIBRARIES.items():
        assert kernels.library(name) is library and library.name == name
        assert library.source.exists() and library.targets
    with pytest.raises(ValueError, match=r"Expected one of \['attention', .*name='matmul'"):
        kernels.library("matmul")


# --- failures: reported once, never raised --------------------------------------------------
def test_without_a_compiler_the_build_fails_clearly_once(tmp_path, caplog):
    library = swiglu_copy(tmp_path, compiler="/nonexistent")
    assert library.status() == LibraryStatus(None, "not built yet")
    with pytest.raises(RuntimeError, match="C\\+\\+ compiler not found: '/nonexistent'"):
        library.build()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert library.ensure_built() is False
    assert "native swiglu_copy ops unavailable" in caplog.text
    assert "/nonexistent" in caplog.text
    assert isinstance(library.error, RuntimeError)
    status = library.status()
    assert status.available is False and "compiler not found" in status.reason
    # Tried once per process: no second build, no second warning.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert library.ensure_built() is False
    assert caplog.text == "" and not library.loaded


def test_with_no_compiler_on_path_the_error_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no c++, g++ or clang++
    with pytest.raises(RuntimeError, match=r"no C\+\+ compiler found \(set CXX"):
        swiglu_copy(tmp_path).build()


def test_cxx_picks_the_compiler(tmp_path, monkeypatch):
    compiler = fake_compiler(tmp_path, WRITES_OUTPUT)
    monkeypatch.setenv("CXX", str(compiler))
    swiglu_copy(tmp_path).build()
    assert len(compile_calls(tmp_path)) == 1


def test_a_failing_compiler_is_reported_and_leaves_no_library(tmp_path, caplog):
    compiler = fake_compiler(tmp_path, 'sleep 1\necho "fake-c++: error: refused" >&2\nexit 1\n')
    library = swiglu_copy(tmp_path, compiler=str(compiler))
    with pytest.raises(RuntimeError, match="compiling activations.cc failed") as error:
        library.build()
    assert "fake-c++: error: refused" in str(error.value)
    assert os.listdir(tmp_path / "kernels") == []  # the temporary folder is gone
    # In the background, as generate() and compile() start it: ensure_built() waits for it.
    library = swiglu_copy(tmp_path, compiler=str(compiler))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        library.build_in_background()
        assert library.status() == LibraryStatus(None, "building in the background")
        assert library.ensure_built() is False
    assert caplog.text.count("fake-c++: error: refused") == 1
    assert "compiling activations.cc failed" in str(library.error)
    assert "fake-c++: error: refused" in library.status().reason


@pytest.mark.parametrize("name", list(kernels.LIBRARIES))
def test_a_broken_source_logs_why_and_is_not_loaded(name, tmp_path, caplog):
    real_compiler()
    original = kernels.library(name)
    broken = tmp_path / original.source.name
    broken.write_text("int main( { return 0; }\n")  # a syntax error
    library = NativeLibrary(name, broken, original.targets, cache_folder=tmp_path / "kernels")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert library.ensure_built() is False
    assert f"native {name} ops unavailable" in caplog.text
    assert f"compiling {broken.name} failed" in caplog.text
    assert isinstance(library.error, RuntimeError) and broken.name in str(library.error)
    assert not library.loaded and os.listdir(tmp_path / "kernels") == []


@pytest.mark.parametrize("value", ["0", "false", "off", "no", "OFF"])
def test_opting_out_builds_nothing(tmp_path, monkeypatch, value):
    compiler = fake_compiler(tmp_path, WRITES_OUTPUT)
    library = swiglu_copy(tmp_path, compiler=str(compiler))
    monkeypatch.setenv("KERAS_LLAMA_KERNELS", value)
    assert kernels.enabled() is False
    assert library.status() == LibraryStatus(False, f"disabled by KERAS_LLAMA_KERNELS={value}")
    library.build_in_background()
    assert library.ensure_built() is False
    assert compile_calls(tmp_path) == [] and library.error is None
    import jax

    monkeypatch.setenv("KERAS_LLAMA_KERNELS", "1")
    assert kernels.enabled() is (jax.default_backend() == "cpu")
    assert library.status() == LibraryStatus(None, "not built yet")


# --- caching --------------------------------------------------------------------------------
def test_the_cached_library_is_reused_and_keyed_by_source_and_compiler(tmp_path):
    # A compiler that writes its -o file, so every build step but the compile itself is real.
    compiler = fake_compiler(tmp_path, WRITES_OUTPUT)
    library = swiglu_copy(tmp_path, compiler=str(compiler))
    first = library.build()
    assert first.parent == tmp_path / "kernels" and first.read_text() == "lib\n"
    assert len(compile_calls(tmp_path)) == 1
    assert library.build() == first and len(compile_calls(tmp_path)) == 1  # cached
    # Another source: another library.
    source = tmp_path / "activations.cc"
    source.write_text(SWIGLU.source.read_text() + "\n// changed\n")
    second = swiglu_copy(tmp_path, source=source, compiler=str(compiler)).build()
    assert second != first and second.exists() and len(compile_calls(tmp_path)) == 2
    # Another compiler version: another library.
    fake_compiler(tmp_path, WRITES_OUTPUT, version="fake-c++ 2.0")
    assert library.build() not in (first, second) and len(compile_calls(tmp_path)) == 3


def test_the_default_cache_folder_follows_keras_llama_cache(tmp_path):
    compiler = fake_compiler(tmp_path, WRITES_OUTPUT)
    library = NativeLibrary("copy", SWIGLU.source, SWIGLU.targets, compiler=str(compiler))
    assert library.build().parent == tmp_path / "cache" / "kernels"


def test_a_real_build_compiles_once_loads_and_registers_its_targets(tmp_path):
    import ctypes

    import jax

    # The real compiler behind a script that logs its calls; fresh FFI names (a name is
    # registered with XLA once per process, and the session's own swiglu library holds its).
    compiler = fake_compiler(tmp_path, f'exec "{real_compiler()}" "$@"\n')
    compiler.write_text(compiler.read_text().replace('echo "fake-c++ 1.0"', "echo real"))
    targets = {"keras_llama_test_swiglu_forward": "KerasLlamaSwigluForward"}
    library = swiglu_copy(tmp_path, targets=targets, compiler=str(compiler))
    path = library.build()
    assert len(compile_calls(tmp_path)) == 1
    assert all(hasattr(ctypes.CDLL(str(path)), symbol) for symbol in SWIGLU.targets.values())
    mtime = path.stat().st_mtime_ns
    assert library.ensure_built() is True and library.loaded and library.error is None
    assert library.status() == LibraryStatus(True, "built and loaded")
    assert len(compile_calls(tmp_path)) == 1 and path.stat().st_mtime_ns == mtime  # reused
    gate, up = np.linspace(-3, 3, 20, dtype="float32"), np.full(20, 2.0, "float32")
    out = jax.ffi.ffi_call(
        "keras_llama_test_swiglu_forward", jax.ShapeDtypeStruct(gate.shape, "float32")
    )(gate, up)
    expected = gate / (1 + np.exp(-gate.astype("float64"))) * 2
    np.testing.assert_allclose(out, expected, rtol=1e-5)


# --- ops never build ------------------------------------------------------------------------
def test_ops_refuse_to_run_before_their_library_is_loaded():
    # A fresh process: no library loaded yet; each op names its library and the fix.
    code = textwrap.dedent(
        """
        import numpy as np
        from keras_llama.kernels import attention, cross_entropy, decode_matmul, swiglu
        x = np.ones((1, 2, 2, 16), "float32")
        calls = {
            "decode_matmul": lambda: decode_matmul.matmul(
                x[0, 0], decode_matmul.pack(np.ones((16, 3), "float32"))),
            "attention": lambda: attention.attention(x, x, x, np.ones((1, 2, 2), bool), 1.0),
            "cross_entropy": lambda: cross_entropy.cross_entropy(x[0, 0], np.zeros(2, "int32")),
            "swiglu": lambda: swiglu.swiglu(x, x),
        }
        for name, call in calls.items():
            try:
                call()
                print(name, "ran")
            except RuntimeError as e:
                print(name, "|", e)
        """
    )
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 4, result.stdout
    for name, line in zip(["decode_matmul", "attention", "cross_entropy", "swiglu"], lines):
        assert line.startswith(f"{name} | The native {name!r} library is not loaded: "), line
        assert f"keras_llama.kernels.library({name!r}).ensure_built()" in line, line
