"""The same references over every execution plan this machine can run.

Each stage's plans come from `llama_plan.alternatives` (the chosen plan, then each choice
swapped for every other applicable strategy): scoring logits and training loss and gradients
against transformers on the same weights, greedy generation against transformers' generate(),
int8 weight-only decoding against Keras's own int8 layers. Concurrent generate() calls on one
fresh model give the sequential results.

Backend-sensitive: CI runs this file on the torch backend too (`.ci/run`), where fewer plans
apply and the decode step runs both compiled and eager.
"""

import threading

import keras
import numpy as np
import pytest

from keras_llama import samplers
from keras_llama.models import generation_engine
from keras_llama.models.llama import llama_plan
from tests.hf_reference import hf_logits, hf_loss_and_gradients, make_hf_model, to_keras_llama

# head_dim 16: the native attention op applies.
SHAPE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4)
RNG = np.random.default_rng(3)
TOKEN_IDS = RNG.integers(1, 100, size=(2, 12)).astype("int32")
PADDING_MASK = np.ones((2, 12), "int32")
PADDING_MASK[1, :3] = 0  # a left-padded row
SCORED = (PADDING_MASK[:, :-1] * PADDING_MASK[:, 1:]).astype(bool)  # position t predicts t + 1
PROMPTS = [RNG.integers(1, 100, size=n).astype("int32") for n in (5, 9, 2)]
NEW_TOKENS = 12


def plan_id(plan):
    return ",".join(f"{c.part}={c.strategy}" for c in plan.choices)


@pytest.fixture(scope="module", params=["untied", "tied"])
def pair(request):
    hf = make_hf_model("gqa", seed=5, tie_word_embeddings=request.param == "tied", **SHAPE)
    causal_lm = to_keras_llama(hf)
    causal_lm.execution_plan()  # build every native op this machine can
    return hf, causal_lm


def stage_plans(causal_lm, stage):
    plans = llama_plan.alternatives(causal_lm.backbone, stage)
    assert plans, stage
    return plans


# --- scoring -------------------------------------------------------------------------------------
def test_scoring_logits_equal_transformers_over_every_plan(pair):
    hf, causal_lm = pair
    expected = hf_logits(hf, TOKEN_IDS, PADDING_MASK)
    real = PADDING_MASK.astype(bool)
    plans = stage_plans(causal_lm, "scoring")
    if keras.config.backend() == "jax":
        assert {"einsum", "dot_product", "native"} <= {p.attention for p in plans}
    for plan in plans:
        logits = causal_lm.logits(TOKEN_IDS, PADDING_MASK, "scoring", plan=plan)
        logits = keras.ops.convert_to_numpy(logits)
        np.testing.assert_allclose(logits[real], expected[real], atol=2e-4, err_msg=plan_id(plan))


# --- training ------------------------------------------------------------------------------------
def _loss_and_grads(causal_lm, plan):
    import jax

    variables = causal_lm.trainable_variables
    targets, weights = TOKEN_IDS[:, 1:], SCORED.astype("float32")

    def loss_fn(values):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            logits = causal_lm.logits(TOKEN_IDS, PADDING_MASK, "training", True, plan=plan)
            return causal_lm.loss(targets, logits[:, :-1], sample_weight=weights)

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))([v.value for v in variables])
    return float(loss), {v.path: np.asarray(g) for v, g in zip(variables, grads)}


def test_training_loss_and_gradients_equal_transformers_over_every_plan(pair):
    hf, causal_lm = pair
    causal_lm.compile()
    expected_loss, expected = hf_loss_and_gradients(hf, causal_lm, TOKEN_IDS, PADDING_MASK, SCORED)
    plans = stage_plans(causal_lm, "training")
    assert {"training_matmuls", "layers"} <= {p.projections for p in plans}
    assert {"native_swiglu", "layers"} <= {p.activation for p in plans}
    for plan in plans:
        loss, grads = _loss_and_grads(causal_lm, plan)
        np.testing.assert_allclose(loss, expected_loss, atol=1e-5, err_msg=plan_id(plan))
        for path, grad in grads.items():
            size = np.abs(expected[path]).max()
            assert size > 1e-3, path  # a real gradient
            error = np.abs(grad - expected[path]).max()
            assert error <= 1e-4 * max(1.0, size), (plan_id(plan), path, error, size)


# --- generation ----------------------------------------------------------------------------------
def _hf_greedy(hf, prompts):
    import torch

    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.as_tensor(p)
        mask[i, width - len(p) :] = 1
    hf.generation_config.pad_token_id = 0
    hf.generation_config.eos_token_id = None  # run every row to the length limit
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False
        )
    return out[:, width:].numpy()


def _greedy(causal_lm, plan, prompts=PROMPTS):
    engine = generation_engine.GenerationEngine(causal_lm, samplers.get("greedy"), plan=plan)
    width = max(map(len, prompts)) + NEW_TOKENS
    batch = generation_engine.Prompts(rows=list(prompts), max_length=width)
    result = engine.run(batch, ())
    return np.stack([r[:NEW_TOKENS] for r in result["tokens"]])


def _generation_plans(causal_lm):
    chosen = causal_lm.execution_plan()
    for prefill in stage_plans(causal_lm, "prefill"):
        for decode in stage_plans(causal_lm, "decode"):
            yield chosen.__class__(prefill, decode, chosen.training, chosen.scoring)


def test_greedy_generation_equals_transformers_over_every_plan(pair):
    hf, causal_lm = pair
    expected = _hf_greedy(hf, PROMPTS)
    plans = list(_generation_plans(causal_lm))
    if keras.config.backend() == "jax":
        assert {"packed", "fused", "layers"} == {p.decode.projections for p in plans}
        attention = {p.decode.attention for p in plans}
        assert {"single_query", "native_single_query"} == attention
    else:  # torch: the compiled step too, even where the run opted out of it
        assert {"torch_compile", "eager"} == {p.decode.step for p in plans}
    for plan in plans:
        tokens = _greedy(causal_lm, plan)
        np.testing.assert_array_equal(
            tokens, expected, err_msg=f"{plan_id(plan.prefill)} / {plan_id(plan.decode)}"
        )


QUANTIZED = {  # name -> quantize() arguments
    "int8": ("int8", {}),
    "int8_blocks": ("int8_weight_only", {"block_size": 32}),  # GGUF's Q8_0 blocks
    "int4_weight_only": ("int4_weight_only", {}),
}


@pytest.mark.parametrize("name", list(QUANTIZED))
def test_quantized_decoding_equals_keras_quantized_layers_over_every_plan(name):
    hf = make_hf_model("gqa", seed=7, **SHAPE)
    causal_lm = to_keras_llama(hf)
    mode, kwargs = QUANTIZED[name]
    causal_lm.quantize(mode, **kwargs)
    chosen = causal_lm.execution_plan()
    plans = stage_plans(causal_lm, "decode")
    # The reference: Keras's own int8 / int4 layers (the "layers" projections), themselves
    # tested against transformers in float64 on the dequantized weights
    # (tests/quantization/test_quantize.py).
    layers_plan = next(p for p in plans if p.projections == "layers")
    reference = _greedy(causal_lm, chosen.__class__(chosen.prefill, layers_plan, None, None))
    if keras.config.backend() == "jax":
        assert "packed" in {p.projections for p in plans}  # int8 / 4-bit blocks pack
        assert "fused" not in {p.projections for p in plans}  # fused needs float kernels
    for plan in plans:
        tokens = _greedy(causal_lm, chosen.__class__(chosen.prefill, plan, None, None))
        np.testing.assert_array_equal(tokens, reference, err_msg=plan_id(plan))


def test_lora_and_quantized_models_plan_the_layers_where_only_they_are_exact():
    hf = make_hf_model("gqa", seed=8, **SHAPE)
    causal_lm = to_keras_llama(hf)
    causal_lm.backbone.enable_lora(2)
    plan = causal_lm.execution_plan()
    assert plan.decode.projections == "layers" and plan.training.projections == "layers"
    jax = keras.config.backend() == "jax"
    assert "LoRA" in str(plan.decode) or not jax
    quantized = to_keras_llama(hf)
    quantized.quantize("int8", quantize_activations=True)  # W8A8
    plan = quantized.execution_plan()
    assert plan.decode.projections == "layers" and ("int8" in str(plan.decode) or not jax)


def test_concurrent_generate_calls_equal_sequential_ones():
    hf = make_hf_model("gqa", seed=9, **SHAPE)
    causal_lm = to_keras_llama(hf)
    causal_lm.compile(sampler="greedy")
    prompt = {"token_ids": PROMPTS[1][None, :], "padding_mask": np.ones((1, 9), bool)}
    lengths = [20, 40, 80, 160]
    results, errors = {}, []

    def run(n):
        try:
            results[n] = causal_lm.generate(prompt, max_length=n, stop_token_ids=None)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(n,)) for n in lengths]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for n in lengths:
        sequential = causal_lm.generate(prompt, max_length=n, stop_token_ids=None)
        np.testing.assert_array_equal(results[n]["token_ids"], sequential["token_ids"])
    # And they are transformers' greedy tokens.
    expected = _hf_greedy(hf, [PROMPTS[1]])
    np.testing.assert_array_equal(results[160]["token_ids"][0, 9 : 9 + NEW_TOKENS], expected[0])
