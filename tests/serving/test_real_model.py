"""The built-in SmolLM2-135M-Instruct served: the official `openai` client asks the README's
question and gets Paris, streamed and whole alike, the template applied once (no double BOS)."""

import openai
import pytest

from keras_llama.models import CausalLM
from tests.serving.conftest import serve

pytestmark = pytest.mark.real_model

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_the_real_model_answers_through_the_openai_client():
    from keras_llama.serving import create_app

    causal_lm = CausalLM.from_preset("smollm2_135m_instruct")
    app = create_app(causal_lm, model_name="smollm2", max_batch_size=2, max_model_len=256)
    with serve(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        whole = client.chat.completions.create(model="smollm2", messages=QUESTION,
                                               max_tokens=24, temperature=0)  # fmt: skip
        chunks = client.chat.completions.create(model="smollm2", messages=QUESTION,
                                                max_tokens=24, temperature=0, stream=True)  # fmt: skip
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    answer = whole.choices[0].message.content
    assert "Paris" in answer and streamed == answer
    # generate() on the same chat prompt: the independent greedy reference.
    prompt = causal_lm.preprocessor.apply_chat_template(QUESTION)
    causal_lm.compile(sampler="greedy")
    expected = causal_lm.generate(prompt, max_length=len(causal_lm.preprocessor.tokenizer(prompt)) + 24,
                                  strip_prompt=True)  # fmt: skip
    assert answer == expected.strip() or answer == expected
    prompt_tokens = len(causal_lm.preprocessor.tokenizer(prompt))  # SmolLM2 adds no BOS
    assert whole.usage.prompt_tokens == prompt_tokens
