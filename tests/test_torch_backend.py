"""Runs the backend-sensitive test files again on the PyTorch backend, in a subprocess
(Keras fixes its backend once per process)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Test files whose assertions must also hold on the torch backend.
TORCH_BACKEND_TESTS = [
    "tests/models/test_llama_parity.py",
    "tests/models/test_backbone.py",
    "tests/models/test_plans.py",
]
# JAX-only tests in those files (a jax.value_and_grad training step).
JAX_ONLY = [
    "tests/models/test_plans.py::test_training_loss_and_gradients_equal_transformers_over_every_plan"
]


@pytest.mark.skipif(os.environ.get("KERAS_BACKEND") == "torch", reason="already on torch")
def test_suite_passes_on_torch_backend():
    pytest.importorskip("torch")
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    files = [f for f in TORCH_BACKEND_TESTS if (ROOT / f).exists()]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files]
        + [f"--deselect={test}" for test in JAX_ONLY],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    tail = result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0, tail
    summary = result.stdout.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary), tail
    assert "skipped" not in summary and "failed" not in summary, summary
