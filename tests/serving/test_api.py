"""The OpenAI-compatible API driven by the official `openai` client (and raw HTTP), on a tiny
random model; greedy outputs are compared with `generate()`'s."""

import json

import httpx
import openai
import pytest

from tests.serving.conftest import MAX_MODEL_LEN, MODEL_NAME, chat_ids, reference

HELLO = [{"role": "user", "content": "hello there"}]


def sse_events(url, body, timeout=60):
    """The ``data:`` payloads of a streamed response, parsed (``[DONE]`` kept as a string)."""
    events = []
    with httpx.stream("POST", url, json=body, timeout=timeout) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data:"):
                data = line[5:].strip()
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_models_list_and_get(client):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert e.value.body["param"] == "model"


def test_chat_greedy_equals_generate_and_streamed_equals_whole(client, tiny_lm):
    prompt_ids = chat_ids(tiny_lm, HELLO)
    expected, count = reference(tiny_lm, prompt_ids, 40, stop=False)
    kwargs = dict(model=MODEL_NAME, messages=HELLO, max_tokens=40, temperature=0,
                  extra_body={"ignore_eos": True})  # fmt: skip
    whole = client.chat.completions.create(**kwargs)
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(prompt_ids), count)
    assert whole.usage.total_tokens == len(prompt_ids) + 40
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected


def test_stops_at_the_end_token_like_generate(client, tiny_lm):
    for text in ("hello there", "the letter", "tell her", "a b c"):
        messages = [{"role": "user", "content": text}]
        expected, count = reference(tiny_lm, chat_ids(tiny_lm, messages), 30)
        out = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=30,
                                             temperature=0)  # fmt: skip
        assert out.choices[0].message.content == expected
        assert out.usage.completion_tokens == count
        assert out.choices[0].finish_reason == ("length" if count == 30 else "stop")


def test_stream_chunks_have_openai_shape(served, tiny_lm):
    body = {"model": MODEL_NAME, "messages": HELLO, "max_tokens": 12, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    events = sse_events(served[0] + "/v1/chat/completions", body)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert reasons.count("length") == 1 and reasons[-1] == "length"
    assert set(reasons[:-1]) == {None}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12
    assert all(c["usage"] is None for c in chunks[:-1])


def test_completions_with_list_and_token_id_prompts(client, tiny_lm):
    tokenizer = tiny_lm.preprocessor.tokenizer
    prompts = ["in the sea", "one"]
    ids = [[tokenizer.start_token_id] + [int(t) for t in tokenizer(p)] for p in prompts]
    expected = [reference(tiny_lm, p, 10, stop=False)[0] for p in ids]
    kwargs = dict(model=MODEL_NAME, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    out = client.completions.create(prompt=prompts, **kwargs)
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == expected
    assert out.usage.prompt_tokens == sum(len(p) for p in ids)
    assert client.completions.create(prompt=ids[0], **kwargs).choices[0].text == expected[0]
    out = client.completions.create(prompt=ids, **kwargs)
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == expected


def test_stop_string_starting_inside_a_token_never_leaks(client, tiny_lm):
    prompt_ids = chat_ids(tiny_lm, HELLO)
    full, _ = reference(tiny_lm, prompt_ids, 40, stop=False)
    pieces = _token_pieces(tiny_lm, prompt_ids, 40)
    # A stop string that starts at the second character of a multi-character token.
    offset, start = 0, None
    for piece in pieces:
        if len(piece) > 1 and full.find(full[offset + 1 : offset + 4]) == offset + 1:
            start = offset + 1
            break
        offset += len(piece)
    assert start is not None, f"no multi-character token in {pieces}"
    stop = full[start : start + 3]
    kwargs = dict(model=MODEL_NAME, messages=HELLO, max_tokens=40, temperature=0, stop=[stop],
                  extra_body={"ignore_eos": True})  # fmt: skip
    out = client.chat.completions.create(**kwargs)
    assert out.choices[0].message.content == full[:start]
    assert out.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    streamed = [c.choices[0].delta.content or "" for c in chunks]
    assert "".join(streamed) == full[:start]
    assert [c.choices[0].finish_reason for c in chunks].count("stop") == 1


def _token_pieces(lm, prompt_ids, n):
    import numpy as np

    out = lm.generate({"token_ids": np.array([prompt_ids], "int32")},
                      max_length=len(prompt_ids) + n, stop_token_ids=None, strip_prompt=True)  # fmt: skip
    ids = out["token_ids"][0][out["padding_mask"][0]].tolist()
    special = set(lm.preprocessor.tokenizer.special_token_ids)
    return [lm.preprocessor.tokenizer.detokenize([t]) if t not in special else "" for t in ids]


def test_seeds_reproduce_and_n_gives_independent_choices(client):
    kwargs = dict(model=MODEL_NAME, messages=HELLO, max_tokens=30, temperature=1.0,
                  extra_body={"ignore_eos": True})  # fmt: skip
    a = client.chat.completions.create(seed=5, **kwargs).choices[0].message.content
    b = client.chat.completions.create(seed=5, **kwargs).choices[0].message.content
    c = client.chat.completions.create(seed=6, **kwargs).choices[0].message.content
    assert a == b and a != c
    out = client.chat.completions.create(seed=5, n=3, **kwargs)
    assert sorted(ch.index for ch in out.choices) == [0, 1, 2]
    texts = [ch.message.content for ch in out.choices]
    assert len(set(texts)) == 3 and texts[0] == a
    assert out.usage.completion_tokens == 90


def test_logprobs_join_to_the_content_and_greedy_picks_the_top(client):
    out = client.chat.completions.create(model=MODEL_NAME, messages=HELLO, max_tokens=20,
                                         temperature=0, logprobs=True, top_logprobs=5,
                                         extra_body={"ignore_eos": True})  # fmt: skip
    choice = out.choices[0]
    content = choice.logprobs.content
    assert "".join(t.token for t in content) == choice.message.content
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True)
        assert entry.logprob == pytest.approx(tops[0]) and entry.logprob <= 0
    streamed = list(client.chat.completions.create(model=MODEL_NAME, messages=HELLO,
                                                   max_tokens=20, temperature=0, logprobs=True,
                                                   stream=True, extra_body={"ignore_eos": True}))  # fmt: skip
    tokens = [
        t.token for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.content
    ]
    assert "".join(tokens) == choice.message.content


def test_multi_turn_template_has_one_start_token(served, tiny_lm):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and then?"},
    ]
    r = httpx.post(served[0] + "/tokenize", json={"messages": messages}, timeout=30).json()
    assert r["tokens"] == chat_ids(tiny_lm, messages)
    assert r["tokens"].count(tiny_lm.preprocessor.tokenizer.start_token_id) == 1
    back = httpx.post(served[0] + "/detokenize", json={"tokens": r["tokens"][1:8]}, timeout=30)
    assert back.json()["prompt"] == "system"  # special tokens dropped


TOO_LONG = "a " * MAX_MODEL_LEN


@pytest.mark.parametrize(
    "body,status,param",
    [
        ({"messages": HELLO, "temperature": -1}, 422, "temperature"),
        ({"messages": HELLO, "top_p": 2}, 422, "top_p"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 422, "messages"),
        ({"messages": []}, 422, "messages"),
        ({"messages": HELLO, "n": 0}, 422, "n"),
        ({"messages": HELLO, "max_tokens": 0}, 422, "max_tokens"),
        ({"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, 422, "stop"),
        ({"messages": HELLO, "logprobs": True, "top_logprobs": 21}, 422, "top_logprobs"),
        ({"messages": HELLO, "temperature": "hot"}, 422, "temperature"),
        ({"messages": HELLO, "tools": [{"type": "function"}]}, 400, "tools"),
        ({"messages": HELLO, "response_format": {"type": "json_schema"}}, 400, "response_format"),
        ({"messages": HELLO, "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens"),
        ({"messages": [{"role": "user", "content": TOO_LONG}]}, 400, "messages"),
        ({"messages": HELLO, "model": "gpt-4"}, 404, "model"),
    ],
)
def test_bad_requests_get_their_status_and_the_envelope(served, body, status, param):
    url = served[0] + "/v1/chat/completions"
    r = httpx.post(url, json={"model": MODEL_NAME, **body, "stream": True}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert error["message"]
    if param == "messages" and status == 400:  # both lengths named
        assert str(MAX_MODEL_LEN) in error["message"] and "prompt has" in error["message"]
    ok = httpx.post(url, json={"model": MODEL_NAME, "messages": HELLO, "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200


def test_malformed_json_oversized_bodies_and_unknown_routes(served):
    url = served[0] + "/v1/chat/completions"
    headers = {"content-type": "application/json"}
    for content in (b"{not json", b"[1, 2"):
        r = httpx.post(url, content=content, headers=headers, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(url, content=b" " * (5 * 1024 * 1024), headers=headers, timeout=30)
    assert r.status_code == 413 and "error" in r.json()
    r = httpx.get(served[0] + "/v1/nothing", timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.post(served[0] + "/detokenize", json={"tokens": [10**6]}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert httpx.get(served[0] + "/health", timeout=30).json() == {"status": "ok"}


def test_unknown_fields_are_ignored(client):
    out = client.chat.completions.create(model=MODEL_NAME, messages=HELLO, max_tokens=3,
                                         extra_body={"frobnicate": 1})  # fmt: skip
    assert out.choices[0].message.role == "assistant"
