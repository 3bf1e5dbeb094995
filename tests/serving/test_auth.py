"""``api_key``: every API endpoint needs it; ``/health`` and the chat page do not."""

import httpx
import openai
import pytest

from keras_llama.serving import create_app
from tests.serving.conftest import MODEL_NAME, serve


@pytest.fixture(scope="module")
def keyed(tiny_lm):
    app = create_app(tiny_lm, model_name=MODEL_NAME, api_key="sesame", max_batch_size=2,
                     max_model_len=64)  # fmt: skip
    with serve(app) as url:
        yield url


def test_api_key_is_checked_on_every_api_endpoint(keyed):
    for method, path in [("GET", "/v1/models"), ("GET", f"/v1/models/{MODEL_NAME}"),
                         ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
                         ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/metrics")]:  # fmt: skip
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.request(method, keyed + path, headers=headers, json={}, timeout=30)
            assert r.status_code == 401, (path, r.text)
            assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(keyed + "/health", timeout=30).status_code == 200
    page = httpx.get(keyed + "/", timeout=30)
    assert page.status_code == 200 and "<textarea" in page.text


def test_the_right_key_works_with_the_openai_client(keyed):
    bad = openai.OpenAI(base_url=keyed + "/v1", api_key="wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=keyed + "/v1", api_key="sesame", max_retries=0, timeout=30)
    out = good.chat.completions.create(model=MODEL_NAME, max_tokens=3,
                                       messages=[{"role": "user", "content": "hi"}])  # fmt: skip
    assert out.choices[0].message.role == "assistant"
