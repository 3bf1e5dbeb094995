"""The decode step's choice in the plan, and the compiled torch step (`models/torch_step.py`).

Greedy tokens of the compiled step (and of the eager one) against transformers' over every
plan are in `test_plans.py`; here: the plan's reason, weights read as inputs (a changed weight
is used by the next call, never a stale constant), and compiled shapes that repeat.
"""

import keras
import numpy as np
import pytest

from keras_llama import samplers
from keras_llama.models import generation_engine
from tests.hf_reference import make_hf_model, to_keras_llama

SHAPE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4)
NEW_TOKENS = 8
TORCH = keras.config.backend() == "torch"


def _hf_greedy(hf, prompt):
    import torch

    hf.generation_config.pad_token_id = 0
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.as_tensor(prompt[None, :], dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
        )
    return out[0, len(prompt) :].numpy()


def _greedy(engine, prompt):
    batch = generation_engine.Prompts(rows=[prompt], max_length=len(prompt) + NEW_TOKENS)
    return engine.run(batch, ())["tokens"][0, :NEW_TOKENS]


def test_decode_step_choice_says_how_and_why(compiling):
    causal_lm = to_keras_llama(make_hf_model("gqa", seed=1, **SHAPE))
    step = next(c for c in causal_lm.execution_plan().decode.choices if c.part == "step")
    if TORCH:
        assert step.strategy == "torch_compile" and "torch.compile" in step.reason
    else:
        assert step.strategy == "xla_loop" and "while_loop" in step.reason


def test_compile_can_be_turned_off_and_the_plan_says_so(monkeypatch):
    monkeypatch.setenv("KERAS_LLAMA_TORCH_COMPILE", "0")
    causal_lm = to_keras_llama(make_hf_model("gqa", seed=1, **SHAPE))
    decode = causal_lm.execution_plan().decode
    assert decode.step == "eager"
    assert "KERAS_LLAMA_TORCH_COMPILE=0" in str(decode)
    engine = generation_engine.GenerationEngine(causal_lm, samplers.get("greedy"))
    assert engine.compiled_step is None


@pytest.fixture
def compiling(monkeypatch):
    # The plan's own choice, even where the run opted out (CI's torch run compiles only where a
    # test asks: each new shape costs seconds of Inductor compilation).
    monkeypatch.setenv("KERAS_LLAMA_TORCH_COMPILE", "1")


def test_compiled_step_reads_changed_weights(compiling):
    first, second = (make_hf_model("gqa", seed=s, **SHAPE) for s in (11, 12))
    causal_lm = to_keras_llama(first)
    engine = generation_engine.GenerationEngine(causal_lm, samplers.get("greedy"))
    assert engine.plan.decode.step == "torch_compile"
    prompt = np.array([5, 17, 42, 8, 99, 3], "int32")
    np.testing.assert_array_equal(_greedy(engine, prompt), _hf_greedy(first, prompt))
    # Same shapes, other weights: the compiled step must read them, not its first values.
    for variable, other in zip(causal_lm.variables, to_keras_llama(second).variables):
        variable.assign(other.value)
    np.testing.assert_array_equal(_greedy(engine, prompt), _hf_greedy(second, prompt))
    assert engine.compiled_step.num_compiled == 1


def test_similar_lengths_reuse_one_compiled_step(compiling):
    hf = make_hf_model("gqa", seed=13, **SHAPE)
    causal_lm = to_keras_llama(hf)
    engine = generation_engine.GenerationEngine(causal_lm, samplers.get("greedy"))
    rng = np.random.default_rng(0)
    for length in (5, 6, 7):  # prompt and cache lengths fall in the same buckets
        prompt = rng.integers(1, 100, size=length).astype("int32")
        np.testing.assert_array_equal(_greedy(engine, prompt), _hf_greedy(hf, prompt))
    assert engine.compiled_step.num_compiled == 1
