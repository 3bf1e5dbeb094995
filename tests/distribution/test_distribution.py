"""ModelParallel / DataParallel on 8 simulated CPU devices (JAX): weights sharded as
`LlamaBackbone.get_layout_map` says, logits and fit() losses equal to one device."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from keras_llama.models import LlamaBackbone

ROOT = Path(__file__).resolve().parents[2]
# [path suffix] -> (partition spec, shape of one shard) for hidden 64, 8 query heads and 4
# key/value heads of 8, intermediate 128, vocabulary 128, on a (batch 2, model 4) mesh.
EXPECTED = {
    "token_embedding/embeddings": (["model", None], [32, 64]),
    "token_embedding/reverse_embeddings": ([None, "model"], [64, 32]),
    "self_attention/query/kernel": ([None, "model", None], [64, 2, 8]),
    "self_attention/key/kernel": ([None, "model", None], [64, 1, 8]),
    "self_attention/value/kernel": ([None, "model", None], [64, 1, 8]),
    "self_attention/attention_output/kernel": (["model", None, None], [2, 8, 64]),
    "feedforward_intermediate_dense/kernel": ([None, "model"], [64, 32]),
    "feedforward_gate_dense/kernel": ([None, "model"], [64, 32]),
    "feedforward_output_dense/kernel": (["model", None], [32, 64]),
    "layernorm/scale": ([None], [64]),  # replicated
}


@pytest.fixture(scope="module")
def result():
    env = dict(os.environ, PYTHONPATH=str(ROOT), KERAS_BACKEND="jax")
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("run_distributed.py"))],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT") :])


def test_model_parallel_shards_every_weight_as_the_layout_map_says(result):
    specs, shards = result["specs"], result["shard_shapes"]
    assert len(specs) == 2 + 2 * 9 + 1
    for path in specs:
        matches = [suffix for suffix in EXPECTED if path.endswith(suffix)]
        assert len(matches) == 1, path
        spec, shard = EXPECTED[matches[0]]
        # JAX drops trailing unsharded axes from the spec.
        assert specs[path] + [None] * (len(spec) - len(specs[path])) == spec, path
        assert shards[path] == shard, path


def test_model_parallel_logits_and_losses_equal_single_device(result):
    np.testing.assert_allclose(result["model_parallel_logits"], result["single_logits"],
                               atol=1e-5, rtol=0)  # fmt: skip
    np.testing.assert_allclose(result["model_parallel_losses"], result["single_losses"], rtol=1e-5)
    # The second epoch's loss is after one SGD step: training really happened.
    assert result["single_losses"][1] < result["single_losses"][0]


def test_data_parallel_fit_losses_equal_single_device(result):
    np.testing.assert_allclose(result["data_parallel_losses"], result["single_losses"], rtol=1e-5)


def test_a_mesh_axis_that_does_not_divide_the_weights_is_a_clear_error(result):
    error = result["bad_mesh_error"]
    assert error.startswith("LayoutMapError: The distribution's layout map does not fit"), error
    assert "mesh axes: {'batch': 1, 'model': 8}" in error and "(64, 4, 8)" in error, error


def test_get_layout_map_checks_its_arguments():
    with pytest.raises(ValueError, match="must be a `keras.distribution.DeviceMesh`"):
        LlamaBackbone.get_layout_map("mesh")
