"""The real SmolLM2-135M-Instruct exported to GGUF as f16 and q8_0: llama.cpp loads each file
at the size its type asks for, and its next-token choice agrees with keras-llama's at every
position of real prompts."""

import numpy as np
import pytest

from keras_llama.models import CausalLM
from tests.export.test_llama_cpp import _llama_cpp_logits, _without_extra_buffers
from tests.presets.helpers import logits

pytestmark = pytest.mark.real_model

PROMPTS = [
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) +",
    "Once upon a time, in a land far away, there lived a young girl who loved to read books.",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
]
# Bytes per weight of each file type (GGML block sizes: q8_0 is 32 int8 + one f16 scale).
BYTES_PER_WEIGHT = {"f16": 2.0, "q8_0": 34 / 32}


@pytest.fixture(scope="module")
def smollm2():
    # The float path: GGUF blocks kept as stored are not the weights an export writes.
    return CausalLM.from_preset("smollm2_135m_instruct", dtype="float32")


@pytest.fixture(scope="module")
def ours(smollm2):
    tokenizer = smollm2.preprocessor.tokenizer
    out = []
    for prompt in PROMPTS:
        ids = np.asarray(tokenizer(prompt)).astype("int32")
        out.append((ids.tolist(), logits(smollm2, ids[None])[0]))
    return out


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_llama_cpp_agrees_with_us_on_the_exported_smollm2(
    dtype, smollm2, ours, tmp_path, monkeypatch
):
    from llama_cpp import Llama

    _without_extra_buffers(monkeypatch)
    path = tmp_path / f"smollm2-{dtype}.gguf"
    smollm2.export_to_gguf(path, dtype=dtype)
    weights = sum(int(np.prod(v.shape)) for v in smollm2.backbone.weights)
    expected_size = weights * BYTES_PER_WEIGHT[dtype]
    # Norm weights stay f32 in both types (llama.cpp's rule); the vocabulary and metadata add
    # about 2 MB: the file is within a few percent of the asked type's size.
    assert 0.98 * expected_size < path.stat().st_size < 1.05 * expected_size
    llm = Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    agree = total = 0
    for ids, want in ours:
        got = _llama_cpp_logits(llm, ids)
        assert got.shape == want.shape
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        total += len(ids)
    assert total > 80
    print(f"{dtype}: top-1 agreement {agree}/{total} = {agree / total:.3f}")
    assert agree / total >= 0.95, f"top-1 agreement {agree}/{total}"
