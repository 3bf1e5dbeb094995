"""The JAX persistent compilation cache that generate() turns on (in fresh subprocesses: the
setting is process-global)."""

import os
import subprocess
import sys

import pytest

CODE = (
    "import keras_llama, jax;"
    "from keras_llama.models.generation_engine import enable_persistent_compilation_cache as f;"
    "f(); print(jax.config.jax_compilation_cache_dir)"
)


def _run(env_extra):
    env = {**os.environ, "KERAS_BACKEND": "jax", **env_extra}
    out = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(os.environ.get("KERAS_BACKEND") == "torch", reason="a JAX setting")
def test_cache_goes_under_the_keras_llama_cache_and_can_be_turned_off(tmp_path):
    assert _run({"KERAS_LLAMA_CACHE": str(tmp_path)}) == str(tmp_path / "jax_compilation_cache")
    assert (tmp_path / "jax_compilation_cache").is_dir()
    assert _run({"KERAS_LLAMA_CACHE": str(tmp_path), "KERAS_LLAMA_JAX_CACHE": "0"}) == "None"
    # A cache the user configured is left alone.
    mine = str(tmp_path / "mine")
    assert _run({"KERAS_LLAMA_CACHE": str(tmp_path), "JAX_COMPILATION_CACHE_DIR": mine}) == mine
