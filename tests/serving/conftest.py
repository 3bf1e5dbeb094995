"""A tiny random Llama 3 style model (byte-level BPE with Llama 3's special tokens, so the
built-in Llama 3 chat template applies) served on 127.0.0.1 on a free port."""

import contextlib
import threading
import time

import numpy as np
import pytest

from keras_llama.tokenizers.byte_level_bpe import bytes_to_unicode
from tests.tiny_models import tiny_llama3_lm

SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>",
           "<|end_header_id|>"]  # fmt: skip
# Printable ASCII only (so that a random model writes readable text), and a few merges (tokens
# of several characters, for stop strings that start inside a token).
CHARS = [bytes_to_unicode()[b] for b in b"abcdefghijklmnopqrstuvwxyz ,.!?\n"]
MERGES = ["h e", "l l", "Ġ t", "e r", "Ġ a", "o n", "i n", "Ġ s"]
VOCAB = SPECIAL + CHARS + [m.replace(" ", "") for m in MERGES]
MAX_MODEL_LEN = 96
MODEL_NAME = "tiny"


def make_tiny_lm(seed=0):
    return tiny_llama3_lm(VOCAB, MERGES, SPECIAL, MAX_MODEL_LEN, seed)


@contextlib.contextmanager
def serve(app, timeout=120):
    """Runs ``app`` with uvicorn on 127.0.0.1, a free port; yields the base URL."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="session")
def tiny_lm():
    return make_tiny_lm()


@pytest.fixture(scope="session")
def served(tiny_lm):
    """``(base_url, app)`` of a server on the tiny model with 8 slots and a queue of 2."""
    from keras_llama.serving import create_app

    app = create_app(tiny_lm, model_name=MODEL_NAME, max_batch_size=8, max_queue=2,
                     max_model_len=MAX_MODEL_LEN, prefill_chunk=32)  # fmt: skip
    with serve(app) as url:
        yield url, app


@pytest.fixture
def client(served):
    import openai

    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def reference(lm, prompt_ids, max_new_tokens, stop=True):
    """``generate()``'s greedy completion (text, token count) of ``prompt_ids``: the
    independent reference for the server's greedy outputs."""
    ids = np.array([prompt_ids], "int32")
    out = lm.generate(
        {"token_ids": ids},
        max_length=len(prompt_ids) + max_new_tokens,
        stop_token_ids="auto" if stop else None,
        strip_prompt=True,
    )
    generated = out["token_ids"][0][out["padding_mask"][0]]
    return lm.preprocessor.generate_postprocess(
        {"token_ids": generated, "padding_mask": np.ones(len(generated), bool)}
    ), len(generated)


def chat_ids(lm, messages):
    """The prompt ids of ``messages``: Llama 3's chat format written out by hand."""
    text = "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>"
        for m in messages
    )
    text += "<|start_header_id|>assistant<|end_header_id|>\n\n"
    tokenizer = lm.preprocessor.tokenizer
    return [tokenizer.start_token_id] + [int(t) for t in tokenizer(text)]
