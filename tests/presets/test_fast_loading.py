"""Fast loading: our GGUF container reader and dequantizers against the `gguf` package, and
weights loaded without a random initialization first (while `load_weights=False` stays random).
"""

import gguf
import keras
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from keras.src.backend.common import global_state

from keras_llama.models import Backbone, CausalLM
from keras_llama.presets import gguf_format
from keras_llama.presets.gguf_file import GGUFFile
from tests.hf_reference import make_hf_model


def _pending():
    """Keras' global list of variables still waiting for deferred initialization."""
    return global_state.get_global_attribute("uninitialized_variables") or []


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    """A GGUF file with every metadata value type and several tensor types."""
    path = str(tmp_path_factory.mktemp("gguf") / "all_types.gguf")
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -100)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -30000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_float32("t.f32", 0.1)
    writer.add_uint64("t.u64", 2**63 + 5)
    writer.add_int64("t.i64", -(2**62))
    writer.add_float64("t.f64", 1e-300)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo ✓ 世界")
    writer.add_array("t.strings", ["", "a", "Ġthe", "<0x0A>", "日本", "🙂", "x" * 300] * 50)
    writer.add_array("t.ints", list(range(-5, 500)))
    writer.add_array("t.floats", [0.5, -1.25, 3e-8])
    writer.add_array("t.nested", [[1, 2], [3]])
    tensors = {
        "plain.f32": rng.standard_normal((3, 8)).astype(np.float32),
        "plain.f16": rng.standard_normal((2, 4, 8)).astype(np.float16),
    }
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    for qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1):
        raw = gguf.quants.quantize(rng.standard_normal((5, 256)).astype(np.float32), qtype)
        writer.add_tensor(f"quant.{qtype.name}", raw, raw_shape=raw.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_file_reads_what_gguf_reader_reads(gguf_path):
    ours = GGUFFile(gguf_path)
    reference = gguf.GGUFReader(gguf_path)
    expected = {k: f.contents() for k, f in reference.fields.items() if not k.startswith("GGUF.")}
    # GGUFReader flattens arrays of arrays; we keep them as written.
    assert ours.metadata.pop("t.nested") == [[1, 2], [3]] and expected.pop("t.nested")
    assert ours.metadata == expected
    assert ours.metadata["t.strings"][5] == "🙂" and ours.metadata["t.u64"] == 2**63 + 5
    assert list(ours.tensors) == [t.name for t in reference.tensors]
    assert ours.data_offset == reference.data_offset
    for ref in reference.tensors:
        mine = ours.tensors[ref.name]
        assert mine.tensor_type == ref.tensor_type
        assert mine.shape == tuple(ref.shape.tolist())
        assert (mine.n_elements, mine.n_bytes, mine.data_offset) == (
            ref.n_elements,
            ref.n_bytes,
            ref.data_offset,
        )
        assert mine.data.dtype == ref.data.dtype and mine.data.shape == ref.data.shape
        np.testing.assert_array_equal(mine.data, ref.data)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.F16, Q.F32])
def test_dequantize_equals_gguf_quants(qtype):
    # 4100 * 256 / 32 = 2 * 2**14 + 32 blocks: the fast paths' chunk loop runs three times.
    weights = np.random.default_rng(int(qtype)).standard_normal((4100, 256)).astype(np.float32)
    raw = gguf.quants.quantize(weights, qtype)
    tensor = gguf_file_tensor(raw, qtype, weights.shape)
    ours = gguf_format.dequantize(tensor)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(raw, qtype).ravel())


def gguf_file_tensor(raw, qtype, shape):
    from keras_llama.presets.gguf_file import GGUFTensor

    return GGUFTensor("w", qtype, tuple(reversed(shape)), int(np.prod(shape)), raw.nbytes, 0, raw)


def test_gguf_file_errors(tmp_path, gguf_path):
    data = open(gguf_path, "rb").read()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:200])  # inside the metadata
    with pytest.raises(ValueError, match="truncated"):
        GGUFFile(cut)
    big = tmp_path / "big.gguf"
    writer = gguf.GGUFWriter(str(big), "llama", endianess=gguf.GGUFEndian.BIG)
    writer.add_uint32("t.u32", 7)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="big-endian"):
        GGUFFile(big)
    wrong = tmp_path / "wrong.gguf"
    wrong.write_bytes(b"GGUF" + (9).to_bytes(4, "little") + bytes(16))
    with pytest.raises(ValueError, match="version 9.*Received: version=9"):
        GGUFFile(wrong)


# --- no random initialization when weights are loaded --------------------------------------------
@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    hf = make_hf_model("gqa", seed=21)
    folder = str(tmp_path_factory.mktemp("hf_fast"))
    hf.save_pretrained(folder, safe_serialization=True)
    return hf, folder


def _numpy(variable):
    return keras.ops.convert_to_numpy(variable)


def test_loaded_weights_are_the_checkpoint_and_nothing_is_left_pending(hf_folder):
    hf, folder = hf_folder
    backbone = Backbone.from_preset(folder)
    np.testing.assert_array_equal(
        _numpy(backbone.token_embedding.embeddings), hf.model.embed_tokens.weight.detach().numpy()
    )
    np.testing.assert_array_equal(
        _numpy(backbone.transformer_layers[1]._feedforward_layernorm.scale),
        hf.model.layers[1].post_attention_layernorm.weight.detach().numpy(),
    )
    assert not _pending()
    # Models built afterwards initialize as usual: RandomNormal(stddev=0.02) kernels.
    fresh = Backbone.from_preset(folder, load_weights=False)
    kernel = _numpy(fresh.transformer_layers[0]._feedforward_gate_dense.kernel)
    assert 0.015 < kernel.std() < 0.025 and abs(kernel.mean()) < 0.005
    assert not _pending()


def test_load_weights_false_draws_from_the_initializers(hf_folder):
    _, folder = hf_folder
    backbone = Backbone.from_preset(folder, load_weights=False)
    embeddings = _numpy(backbone.token_embedding.embeddings)
    assert 0.007 < embeddings.std() < 0.013  # RandomNormal(stddev=0.01), KerasHub's choice
    np.testing.assert_array_equal(_numpy(backbone.layer_norm.scale), 1.0)  # "ones"


def test_failed_load_leaves_no_half_initialized_state(hf_folder, tmp_path):
    _, folder = hf_folder
    with pytest.raises(ValueError, match="Shape mismatch"):
        CausalLM.from_preset(folder, intermediate_dim=48)  # the checkpoint has 64
    assert not _pending()
    backbone = Backbone.from_preset(folder)  # the next load is unaffected
    assert all(_numpy(v).any() for v in backbone.weights)
