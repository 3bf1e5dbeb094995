"""GGUF Q8_0 / Q4_0 / Q4_1 weights kept as stored: tiny files written with the `gguf` package's
writer from random transformers models. The layers hold the file's blocks bit for bit (checked
against `gguf.GGUFReader`'s raw bytes), and the forward pass and the decode loop (native block
kernels) give transformers' logits on the same weights (as `gguf.quants.dequantize` gives
them); ``dtype="float32"`` gives the float path; presets save and load the blocks."""

import gguf
import keras
import numpy as np
import pytest

from keras_llama.models import CausalLM
from keras_llama.quantization import BlockDTypePolicy
from tests.hf_reference import hf_logits, make_hf_model
from tests.kernels import require_native
from tests.presets.helpers import logits, token_batch
from tests.presets.test_gguf import reference_with, write_gguf

SHAPE = dict(hidden_size=64, intermediate_size=96)  # blocks of 32: 2 per row, 3 for down
FORMATS = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1"}
# Bytes of one block: (scale, minimum, values) byte ranges, ggml-common.h.
FIELDS = {"Q8_0": ((0, 2), None, (2, 34)), "Q4_0": ((0, 2), None, (2, 18)),
          "Q4_1": ((0, 2), (2, 4), (4, 20))}  # fmt: skip


@pytest.fixture(scope="module", params=list(FORMATS))
def written(request, tmp_path_factory):
    qtype = request.param
    hf = make_hf_model("gqa", seed=21, **SHAPE)
    path = str(tmp_path_factory.mktemp("gguf") / f"tiny-{qtype}.gguf")
    stored = write_gguf(path, hf, qtype=qtype)
    return qtype, path, reference_with(hf, stored)


def raw_blocks(path, name):
    """A tensor's blocks as `gguf.GGUFReader` reads them: uint8 [rows, blocks, bytes]."""
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    data = np.asarray(tensor.data)
    return data.reshape(data.shape[0], -1, gguf.GGML_QUANT_SIZES[tensor.tensor_type][1])


def test_layers_hold_the_files_blocks_bit_for_bit(written):
    qtype, path, _ = written
    backbone = CausalLM.from_preset(path).backbone
    up = backbone.transformer_layers[0]._feedforward_intermediate_dense
    assert isinstance(up.dtype_policy, BlockDTypePolicy)
    assert up.dtype_policy.block_format == FORMATS[qtype]
    assert backbone.token_embedding.dtype_policy.block_format == FORMATS[qtype]
    assert backbone.quantization_scheme == FORMATS[qtype]
    variables = {v.path: np.asarray(v) for v in up.weights}
    blocks = raw_blocks(path, "blk.0.ffn_up.weight")  # [96, 2, bytes]: not rotary-permuted
    scale, minimum, values = FIELDS[qtype]
    kernel = variables[up.path + "/kernel"]
    np.testing.assert_array_equal(
        kernel.view(np.uint8), blocks[..., values[0] : values[1]].reshape(96, -1)
    )
    np.testing.assert_array_equal(
        variables[up.path + "/kernel_scale"].view(np.uint8),
        blocks[..., scale[0] : scale[1]].reshape(96, -1),
    )
    if minimum is not None:
        np.testing.assert_array_equal(
            variables[up.path + "/kernel_min"].view(np.uint8),
            blocks[..., minimum[0] : minimum[1]].reshape(96, -1),
        )
    # Memory: the blocks' own size (34, 18 or 20 bytes per 32 weights), no float copy.
    expected = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[qtype] * 96 * 64 // 32
    assert sum(v.nbytes for v in variables.values()) == expected


def test_forward_and_decode_loop_give_transformers_logits_on_the_stored_weights(written):
    from tests.kernels.test_decode_matmul import decode_logits, decode_weights, is_native

    qtype, path, reference = written
    causal_lm = CausalLM.from_preset(path)
    ids = token_batch(seed=12)
    expected = hf_logits(reference, ids)
    np.testing.assert_allclose(logits(causal_lm, ids), expected, atol=1e-4, rtol=0)
    if keras.config.backend() != "jax":
        return
    require_native("decode_matmul")
    plan = causal_lm.execution_plan().decode
    assert plan.projections == "packed" and plan.head == "packed", plan
    kind = "q8_blocks_int16_dot" if qtype == "Q8_0" else "q4_blocks_int16_dot"
    assert f"{kind} weights packed" in str(plan)
    fused = decode_weights(causal_lm)
    assert is_native(fused) and fused["head"].kind == kind
    # The packed blocks multiply the input rounded to int16 blocks (each value within 2^-16
    # of its block's largest), in the prefill and every step: 2e-3 here (logits up to ~5), 1e-4
    # for the float path above.
    decoded = decode_logits(causal_lm, ids, 3, fused)
    np.testing.assert_allclose(decoded, expected, atol=2e-3, rtol=0)


def test_dtype_float32_gives_the_float_path(written):
    qtype, path, reference = written
    causal_lm = CausalLM.from_preset(path, dtype="float32")
    assert causal_lm.backbone.quantization_scheme is None
    ids = token_batch(seed=13)
    np.testing.assert_allclose(logits(causal_lm, ids), hf_logits(reference, ids), atol=1e-4)


def test_presets_save_and_load_the_blocks(written, tmp_path):
    _, path, _ = written
    causal_lm = CausalLM.from_preset(path)
    causal_lm.save_to_preset(str(tmp_path / "preset"))
    reloaded = CausalLM.from_preset(str(tmp_path / "preset"))
    for ours, theirs in zip(causal_lm.backbone.weights, reloaded.backbone.weights):
        assert ours.path == theirs.path and ours.dtype == theirs.dtype
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs), err_msg=ours.path)
    ids = token_batch(seed=14)
    np.testing.assert_array_equal(logits(reloaded, ids), logits(causal_lm, ids))


def test_tied_table_lookup_dequantizes_the_gathered_rows(tmp_path):
    hf = make_hf_model("tied", seed=22, **SHAPE)
    path = str(tmp_path / "tied.gguf")
    stored = write_gguf(path, hf, qtype="Q4_1")
    causal_lm = CausalLM.from_preset(path)
    embedding = causal_lm.backbone.token_embedding
    assert embedding.tie_weights and embedding.dtype_policy.block_format == "q4_1"
    ids = np.array([[5, 17, 99, 0]], "int32")
    rows = keras.ops.convert_to_numpy(embedding(ids))[0]
    np.testing.assert_array_equal(rows, stored["model.embed_tokens.weight"][ids[0]])
    tokens = token_batch(seed=15)
    expected = hf_logits(reference_with(hf, stored), tokens)
    np.testing.assert_allclose(logits(causal_lm, tokens), expected, atol=1e-4, rtol=0)


def test_a_layer_with_tensors_of_two_types_is_dequantized(tmp_path):
    # An untied output projection in Q8_0 beside a Q4_1 table: one layer holds both, so the
    # embedding is dequantized to float; the blocks are kept everywhere else.
    hf = make_hf_model("gqa", seed=23, **SHAPE)
    lm_head = hf.state_dict()["lm_head.weight"].float().numpy()
    q8 = (gguf.quants.quantize(lm_head, gguf.GGMLQuantizationType.Q8_0),
          gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
    path = str(tmp_path / "mixed.gguf")
    stored = write_gguf(path, hf, qtype="Q4_1", override={"output.weight": q8})
    causal_lm = CausalLM.from_preset(path)
    backbone = causal_lm.backbone
    assert backbone.token_embedding.quantization_mode is None
    gate = backbone.transformer_layers[0]._feedforward_gate_dense
    assert gate.dtype_policy.block_format == "q4_1"
    ids = token_batch(seed=16)
    expected = hf_logits(reference_with(hf, stored), ids)
    np.testing.assert_allclose(logits(causal_lm, ids), expected, atol=1e-4, rtol=0)


def test_q5_0_is_repacked_into_ggufs_own_q8_0_of_its_weights(tmp_path):
    # Q5_0 and the K-quants have no kernel here: dequantized by gguf.quants, then quantized to
    # Q8_0 by it (the same path for every re-packed type; SmolLM2 as Q4_K_M measured in
    # benchmarks/gguf_repack_accuracy.py).
    hf = make_hf_model("gqa", seed=24, **SHAPE)
    path = str(tmp_path / "q5_0.gguf")
    stored = write_gguf(path, hf, qtype="Q5_0")
    causal_lm = CausalLM.from_preset(path)
    up = causal_lm.backbone.transformer_layers[0]._feedforward_intermediate_dense
    assert up.dtype_policy.block_format == "q8_0"
    weights = stored["model.layers.0.mlp.up_proj.weight"]  # as the file stores it, dequantized
    raw = gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q8_0).reshape(96, 2, 34)
    variables = {v.path: np.asarray(v) for v in up.weights}
    np.testing.assert_array_equal(
        variables[up.path + "/kernel"].view(np.uint8), raw[..., 2:].reshape(96, 64)
    )
    np.testing.assert_array_equal(
        variables[up.path + "/kernel_scale"].view(np.uint8), raw[..., :2].reshape(96, 4)
    )
    # Close to the file's own weights: Q8_0 rounds each block to 1/127 of its largest value.
    repacked = {n: gguf.quants.dequantize(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0),
                                          gguf.GGMLQuantizationType.Q8_0)
                for n, w in stored.items() if w.ndim == 2}  # fmt: skip
    ids = token_batch(seed=17)
    expected = hf_logits(reference_with(hf, {**stored, **repacked}), ids)
    np.testing.assert_allclose(logits(causal_lm, ids), expected, atol=1e-4, rtol=0)
    float_path = logits(CausalLM.from_preset(path, dtype="float32"), ids)
    np.testing.assert_allclose(
        logits(causal_lm, ids), float_path, atol=0.05 * np.abs(float_path).max()
    )


def test_convert_to_transformers_writes_the_dequantized_weights(written, tmp_path):
    import io

    import torch
    from transformers import AutoModelForCausalLM

    from keras_llama import cli

    _, path, reference = written
    target = str(tmp_path / "hf")
    code = cli.main(["convert", path, target, "--to", "transformers"], out=io.StringIO())
    assert code == 0
    exported = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    ids = token_batch(seed=18)
    np.testing.assert_allclose(hf_logits(exported, ids), hf_logits(reference, ids), atol=1e-5)


def test_lora_over_blocks_is_refused_and_the_plan_names_the_format(written):
    qtype, path, _ = written
    causal_lm = CausalLM.from_preset(path)
    if keras.config.backend() == "jax":  # on torch the training plan runs the layers anyway
        assert f"projections are {FORMATS[qtype]}" in str(causal_lm.execution_plan().training)
    with pytest.raises(ValueError, match="LoRA adapters over block-quantized weights"):
        causal_lm.backbone.enable_lora(2)


def test_export_of_blocks_kept_as_stored_is_refused_naming_the_mode_and_the_float_path(
    written, tmp_path
):
    qtype, path, _ = written
    causal_lm = CausalLM.from_preset(path)
    with pytest.raises(ValueError, match=rf"mode='{FORMATS[qtype]}'.*dtype='float32'"):
        causal_lm.export_to_gguf(tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
