"""LoRA adapters: save/load against kernels merged by hand in numpy; bad arguments."""

import numpy as np
import pytest
from keras import ops

from tests.hf_reference import make_hf_model, to_keras_llama

TOKEN_IDS = np.array([[5, 17, 42, 9, 77, 3], [8, 33, 2, 95, 40, 71]], "int32")
X = {"token_ids": TOKEN_IDS, "padding_mask": np.ones_like(TOKEN_IDS)}


@pytest.fixture(scope="module")
def hf():
    return make_hf_model("gqa", seed=7)


def test_saved_adapters_load_into_a_fresh_model_as_merged_kernels(hf, tmp_path):
    adapted = to_keras_llama(hf)
    adapted.backbone.enable_lora(3)  # default targets: query and value projections
    rng = np.random.default_rng(0)
    lora = [v for v in adapted.backbone.weights if "lora_kernel" in v.path]
    assert sorted({v.path.split("/")[-2] for v in lora}) == ["query", "value"]
    for v in lora:  # B starts at zero: give both factors values, as training would
        v.assign(rng.normal(0, 0.3, v.shape).astype("float32"))
    path = tmp_path / "adapters.lora.h5"
    adapted.backbone.save_lora_weights(path)

    fresh = to_keras_llama(hf)
    fresh.backbone.load_lora_weights(path)
    # Reference: a float model whose kernels are W + (alpha / rank) * A @ B, merged in numpy
    # (alpha defaults to the rank, so the factor is 1).
    merged = to_keras_llama(hf)
    for layer_index in range(2):
        for name in ("query", "value"):
            prefix = f"transformer_layer_{layer_index}/self_attention/{name}/"
            values = {v.path: np.asarray(v) for v in lora if v.path.startswith(prefix)}
            a, b = (
                values[prefix + "lora_kernel_a"],
                values[prefix + "lora_kernel_b"],
            )  # [m,heads,r], [r,h]
            kernel = next(v for v in merged.backbone.weights if v.path == prefix + "kernel")
            kernel.assign(np.asarray(kernel) + np.einsum("mvr,rh->mvh", a, b))
    expected = ops.convert_to_numpy(merged(X))
    np.testing.assert_allclose(ops.convert_to_numpy(fresh(X)), expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(ops.convert_to_numpy(adapted(X)), expected, atol=1e-4, rtol=0)


def test_lora_errors(hf, tmp_path):
    backbone = to_keras_llama(hf).backbone
    for rank in (0, -1, 2.0, "4", True):
        with pytest.raises(ValueError, match=f"positive integer. Received: rank={rank!r}"):
            backbone.enable_lora(rank)
    with pytest.raises(ValueError, match=r"Unknown LoRA target layer names \['qkv'\]"):
        backbone.enable_lora(2, target_layer_names=["query", "qkv"])
    with pytest.raises(ValueError, match="call `enable_lora"):
        backbone.save_lora_weights(tmp_path / "a.lora.h5")
    backbone.enable_lora(2)
    with pytest.raises(ValueError, match=r"ending in `.lora.h5`"):
        backbone.save_lora_weights(tmp_path / "a.h5")
    with pytest.raises(ValueError, match="already enabled"):
        backbone.enable_lora(2)
    backbone.save_lora_weights(tmp_path / "rank2.lora.h5")
    other = to_keras_llama(hf).backbone
    other.enable_lora(4)
    with pytest.raises(ValueError, match="rank 2 but LoRA is enabled here with rank 4"):
        other.load_lora_weights(tmp_path / "rank2.lora.h5")
