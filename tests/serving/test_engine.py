"""Continuous batching through the server: concurrent streams equal their solo greedy outputs
(and `generate()`'s), a disconnect frees its slot, an overload gets 429, /metrics."""

import concurrent.futures
import contextlib
import json
import time

import httpx
import openai
import pytest

from tests.serving.conftest import MODEL_NAME, chat_ids, reference

PROMPTS = ["hello there", "the letter", "tell her", "a b c", "in the sea", "one", "xyz", "ab"]


def _stream_text(client, text, max_tokens):
    chunks = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": text}], max_tokens=max_tokens,
        temperature=0, stream=True, extra_body={"ignore_eos": True},
    )  # fmt: skip
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@contextlib.contextmanager
def slow_steps(app, seconds):
    """Each decode step takes at least ``seconds`` longer (so that requests overlap)."""
    engine = app.state.server.engine
    original = engine.on_step

    def on_step(active):
        original(active)
        time.sleep(seconds)

    engine.on_step = on_step
    try:
        yield engine
    finally:
        engine.on_step = original


def wait_until(condition, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_eight_concurrent_streams_equal_their_solo_greedy_outputs(client, served, tiny_lm):
    solo = [_stream_text(client, p, 40) for p in PROMPTS]
    expected = [reference(tiny_lm, chat_ids(tiny_lm, [{"role": "user", "content": p}]), 40,
                          stop=False)[0] for p in PROMPTS]  # fmt: skip
    assert solo == expected
    occupancy = []
    with slow_steps(served[1], 0.002) as engine:
        engine_on_step = engine.on_step
        engine.on_step = lambda n: (occupancy.append(n), engine_on_step(n))
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda p: _stream_text(client, p, 40), PROMPTS, timeout=120))
    assert together == solo
    assert max(occupancy) >= 6  # they really ran batched


def test_a_disconnect_frees_its_slot(served):
    url, app = served
    engine = app.state.server.engine
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 60, "ignore_eos": True, "temperature": 0}  # fmt: skip
    with slow_steps(app, 0.05):
        with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True},
                          timeout=30) as response:  # fmt: skip
            for line in response.iter_lines():
                if '"content"' in line and '""' not in line:
                    break  # one token received, then hang up
            assert engine.occupancy()[0] == 1
        assert wait_until(lambda: engine.occupancy() == (0, 0))
        # Not streamed: the client gives up (a timeout) while the answer is being generated.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", json=body, timeout=0.5)
        assert wait_until(lambda: engine.occupancy() == (0, 0))


def test_overload_gets_429_with_retry_after_and_nothing_hangs(served):
    url, app = served
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 20, "ignore_eos": True}  # fmt: skip
    with slow_steps(app, 0.02):  # 8 slots + 2 waiting: 10 of 16 are served
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(httpx.post, url + "/v1/chat/completions", json=body,
                                   timeout=60) for _ in range(16)]  # fmt: skip
            responses = [f.result(timeout=90) for f in futures]
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 10 and 429 in codes and set(codes) == {200, 429}
    limited = next(r for r in responses if r.status_code == 429)
    assert limited.headers["retry-after"] == "1"
    assert limited.json()["error"]["type"] == "rate_limit_exceeded"
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
    assert client.models.list().data[0].id == MODEL_NAME


def test_metrics_are_prometheus_text(client, served):
    client.chat.completions.create(model=MODEL_NAME, max_tokens=3,
                                   messages=[{"role": "user", "content": "hi"}])  # fmt: skip
    text = httpx.get(served[0] + "/metrics", timeout=30).text
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("keras_llama_requests", "keras_llama_prompt_tokens", "keras_llama_generation_tokens",
                 "keras_llama_queue_depth", "keras_llama_running_requests",
                 "keras_llama_batch_occupancy", "keras_llama_time_to_first_token_seconds",
                 "keras_llama_request_latency_seconds"):  # fmt: skip
        assert name in families, name
    generated = [s.value for s in families["keras_llama_generation_tokens"].samples
                 if s.name.endswith("_total")]  # fmt: skip
    assert generated and generated[0] >= 3
    chat = [s for s in families["keras_llama_requests"].samples
            if s.labels.get("endpoint") == "/v1/chat/completions" and s.labels.get("status") == "200"]  # fmt: skip
    assert chat and chat[0].value >= 1


def test_an_error_after_the_stream_started_is_an_error_event_and_serving_goes_on(client, served):
    url, app = served
    engine = app.state.server.engine
    original = engine.on_step
    steps = []

    def failing(active):  # planted: the 6th decode step fails (a device error, say)
        original(active)
        steps.append(1)
        if len(steps) == 6:
            raise RuntimeError("planted step failure")

    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 40, "ignore_eos": True, "temperature": 0, "stream": True}  # fmt: skip
    engine.on_step = failing
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
            assert response.status_code == 200  # the stream had started
            events = [line[len("data: "):] for line in response.iter_lines()
                      if line.startswith("data: ")]  # fmt: skip
    finally:
        engine.on_step = original
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "planted step failure" in error["message"]
    assert set(error) >= {"message", "type", "param", "code"}
    content = [json.loads(e)["choices"][0]["delta"].get("content") for e in events[:-2]]
    assert any(content)  # tokens arrived before the failure
    # The slot was freed and the server answers the next request.
    assert wait_until(lambda: engine.occupancy() == (0, 0))
    reply = client.chat.completions.create(model=MODEL_NAME, max_tokens=3,
                                           messages=[{"role": "user", "content": "hi"}])  # fmt: skip
    assert reply.choices[0].finish_reason in ("stop", "length")
