"""The built-in SmolLM2-135M-Instruct run as its GGUF file stores it (Q4_1 blocks, a Q8_0
embedding) against llama.cpp (llama-cpp-python) on the same file: over every position of real
chat prompts, our top-1 next token agrees with llama.cpp's at least as often as the
dequantized float path's does (``dtype="float32"``). The same for a Q8_0 file written with the
`gguf` package's writer from the same weights."""

import gguf
import keras
import numpy as np
import pytest
from keras import ops

from keras_llama.models import CausalLM
from keras_llama.models.llama3.llama3_presets import backbone_presets
from keras_llama.presets import handles
from tests.kernels import require_native

pytestmark = pytest.mark.real_model

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain photosynthesis in one sentence.",
    "How do I reverse a list in Python?",
]


@pytest.fixture(scope="module")
def q4_1_path():
    return handles.resolve(backbone_presets["smollm2_135m_instruct"]["kaggle_handle"])


@pytest.fixture(scope="module")
def q8_0_path(q4_1_path, tmp_path_factory):
    """The same weights re-quantized to Q8_0 (dequantized with `gguf.quants`, then quantized
    by it), every metadata field copied."""
    reader = gguf.GGUFReader(q4_1_path)
    path = str(tmp_path_factory.mktemp("q8_0") / "SmolLM2-135M-Instruct.Q8_0.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # the writer writes these itself
        value_type = gguf.GGUFValueType(field.types[0])
        sub_type = gguf.GGUFValueType(field.types[1]) if len(field.types) > 1 else None
        value = field.contents()
        if key == "general.file_type":
            value = int(gguf.LlamaFileType.MOSTLY_Q8_0)
        writer.add_key_value(key, value, value_type, sub_type)
    for tensor in reader.tensors:
        if tensor.tensor_type == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(tensor.name, np.asarray(tensor.data))
            continue
        weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        q = gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(tensor.name, q, raw_shape=q.shape,
                          raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def prompts(causal_lm):
    preprocessor = causal_lm.preprocessor
    return [
        preprocessor.tokenizer(
            preprocessor.apply_chat_template([{"role": "user", "content": q}])
        ).tolist()
        for q in QUESTIONS
    ]


def our_top1(causal_lm, rows, decode_kernels=False):
    """Top-1 next token at every position: the forward pass (prefill's dequantize-and-
    multiply), or with ``decode_kernels`` every position through the decode plan's products
    (the native block kernels, M = positions rows)."""
    from tests.kernels.test_decode_matmul import all_at_once_logits, decode_weights

    fused = decode_weights(causal_lm) if decode_kernels else None
    out = []
    for ids in rows:
        tokens = np.array([ids], "int32")
        if decode_kernels:
            logits = all_at_once_logits(causal_lm, tokens, fused)
        else:
            x = {"token_ids": tokens, "padding_mask": np.ones((1, len(ids)), bool)}
            logits = ops.convert_to_numpy(causal_lm(x))
        out.append(np.asarray(logits)[0].argmax(-1))
    return np.concatenate(out)


def llama_cpp_top1(path, rows, monkeypatch):
    from llama_cpp import Llama

    from tests.export.test_llama_cpp import F32, _without_extra_buffers

    _without_extra_buffers(monkeypatch)  # llama.cpp's repacked Q8_0 / Q4_0 buffers crash here
    llm = Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2,
                type_k=F32, type_v=F32)  # fmt: skip
    out = []
    for ids in rows:
        llm.reset()
        llm.eval(ids)
        out.append(np.array(llm.scores[: len(ids)]).argmax(-1))
    return np.concatenate(out)


@pytest.mark.parametrize("file", ["q4_1_path", "q8_0_path"])
def test_top1_agreement_with_llama_cpp_at_least_the_float_paths(request, file, monkeypatch):
    path = request.getfixturevalue(file)
    kept = CausalLM.from_preset(path)
    scheme = "q8_0" if file == "q8_0_path" else "q4_1"
    layer = kept.backbone.transformer_layers[0]._feedforward_gate_dense
    assert layer.dtype_policy.block_format == scheme
    assert kept.backbone.quantization_scheme == scheme  # the embedding is Q8_0 in both files
    rows = prompts(kept)
    reference = llama_cpp_top1(path, rows, monkeypatch)
    ours = (our_top1(kept, rows) == reference).mean()
    dequantized = (our_top1(CausalLM.from_preset(path, dtype="float32"), rows) == reference).mean()
    kernels = ours
    if keras.config.backend() == "jax":
        require_native("decode_matmul")
        assert kept.execution_plan().decode.projections == "packed"
        kernels = (our_top1(kept, rows, decode_kernels=True) == reference).mean()
    print(f"{file}: top-1 agreement with llama.cpp over {len(reference)} positions: kept "
          f"{ours:.4f} (native block kernels {kernels:.4f}), dequantized float "
          f"{dequantized:.4f}")  # fmt: skip
    assert ours >= dequantized and kernels >= dequantized
    assert ours > 0.9
