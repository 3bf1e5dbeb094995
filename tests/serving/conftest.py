"""A tiny random Llama 3 style model (byte-level BPE with Llama 3's special tokens, so the
built-in Llama 3 chat template applies) served on 127.0.0.1 on a free port."""

import contextlib
import threading
import time

import keras
import numpy as np
import pytest

from keras_llama.models import Llama3CausalLMPreprocessor, LlamaBackbone, LlamaCausalLM
from keras_llama.tokenizers import BytePairTokenizer
from keras_llama.tokenizers.byte_level_bpe import bytes_to_unicode

SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>",
           "<|end_header_id|>"]  # fmt: skip
MERGES = ["h e", "l l", "Ġ t", "e r", "Ġ a"]
VOCAB = SPECIAL + [bytes_to_unicode()[b] for b in range(256)] + [m.replace(" ", "") for m in MERGES]
MAX_MODEL_LEN = 96
MODEL_NAME = "tiny"


def make_tiny_lm(seed=0):
    keras.utils.set_random_seed(seed)
    tokenizer = BytePairTokenizer(
        VOCAB,
        MERGES,
        special_tokens=SPECIAL,
        start_token=SPECIAL[0],
        end_token=SPECIAL[1],
        stop_tokens=[SPECIAL[2]],
    )
    preprocessor = Llama3CausalLMPreprocessor(tokenizer, sequence_length=MAX_MODEL_LEN)
    backbone = LlamaBackbone(
        vocabulary_size=len(VOCAB),
        num_layers=2,
        num_query_heads=4,
        hidden_dim=32,
        intermediate_dim=64,
        num_key_value_heads=2,
    )
    rng = np.random.default_rng(seed)
    for v in backbone.weights:  # larger than the default initialisation: varied greedy outputs
        if len(v.shape) > 1:
            v.assign(rng.normal(0, 0.3, v.shape).astype("float32"))
    causal_lm = LlamaCausalLM(backbone, preprocessor)
    causal_lm.compile(sampler="greedy")
    return causal_lm


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
    """``(base_url, app)`` of a server on the tiny model with 4 slots and a queue of 4."""
    from keras_llama.serving import create_app

    app = create_app(tiny_lm, model_name=MODEL_NAME, max_batch_size=4, max_queue=4,
                     max_model_len=MAX_MODEL_LEN, prefill_chunk=32)  # fmt: skip
    with serve(app) as url:
        yield url, app


@pytest.fixture
def client(served):
    import openai

    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0, timeout=60)
