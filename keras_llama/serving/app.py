"""The OpenAI-compatible FastAPI app (`create_app`).

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models`` and
``/v1/models/{id}``, ``POST /tokenize`` and ``/detokenize``, ``GET /metrics`` (Prometheus
text), ``GET /health`` (503 while the model loads) and ``GET /`` (the chat page). With an API
key, every endpoint but ``/health`` and ``/`` needs ``Authorization: Bearer KEY``. Bad requests
get their status and OpenAI's error envelope, never a 500; errors after a stream started are
sent as a ``data: {"error": ...}`` event.
"""

import asyncio
import json
import logging
import os
import threading
import time
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from keras_llama.serving import completions, schemas
from keras_llama.serving.errors import APIError, error_body, validation_error
from keras_llama.serving.metrics import Metrics
from keras_llama.serving.slots import SlotEngine
from keras_llama.serving.text import make_detokenizer

logger = logging.getLogger("keras_llama.serving")
MAX_BODY_BYTES = 4 * 1024 * 1024
PAGE = os.path.join(os.path.dirname(__file__), "chat_page.html")


class Server:
    """What the routes share: the model, its engine, its name and its tokenizer helpers."""

    def __init__(self, model_name, api_key, engine_kwargs):
        self.model_name, self.api_key, self.engine_kwargs = model_name, api_key, engine_kwargs
        self.ready = False
        self.load_error = None
        self.engine = None
        self.metrics = Metrics(lambda: self.engine.occupancy() if self.engine else (0, 0))

    def load(self, causal_lm):
        from keras_llama.models.generation import auto_stop_token_ids

        if causal_lm.preprocessor is None:
            raise ValueError("The server needs a model with a preprocessor (a tokenizer).")
        self.model = causal_lm
        self.preprocessor = causal_lm.preprocessor
        self.tokenizer = causal_lm.preprocessor.tokenizer
        self.detokenize = make_detokenizer(self.preprocessor)
        self.stop_token_ids = auto_stop_token_ids(self.tokenizer)
        kwargs = dict(self.engine_kwargs)
        if kwargs.get("max_model_len") is None:
            kwargs["max_model_len"] = min(self.preprocessor.sequence_length, 2048)
        self.max_model_len = kwargs["max_model_len"]
        self.engine = SlotEngine(causal_lm, **kwargs)
        self.engine.on_step = self.metrics.batch_occupancy.observe
        self.engine.start()
        self.ready = True

    def token_text(self, token_id):
        return self.detokenize([token_id])

    # --- prompts ----------------------------------------------------------------------------
    def encode(self, text, add_start=True):
        ids = [int(t) for t in self.tokenizer(text)]
        start = self.tokenizer.start_token_id
        if add_start and self.preprocessor.add_start_token and start is not None:
            ids = [int(start)] + ids
        return ids

    def chat_prompt(self, messages):
        rendered = self.preprocessor.apply_chat_template(
            [{"role": m.role, "content": m.text()} for m in messages], add_generation_prompt=True
        )
        return self.encode(rendered)

    def check_ids(self, ids):
        vocabulary = self.model.backbone.vocabulary_size
        bad = [t for t in ids if not 0 <= t < vocabulary]
        if bad:
            raise APIError(400, f"Token ids must be in [0, {vocabulary}). Received: {bad[0]}",
                           param="prompt")  # fmt: skip
        if not ids:
            raise APIError(400, "The prompt has no tokens.", param="prompt")
        return ids

    def max_tokens(self, prompts, requested):
        longest = max(len(p) for p in prompts)
        if longest >= self.max_model_len:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens, but the "
                f"prompt has {longest} tokens.",
                param="messages",
                code="context_length_exceeded",
            )
        if requested is None:
            return self.max_model_len - longest
        if longest + requested > self.max_model_len:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens, but "
                f"{longest + requested} were requested ({longest} in the prompt, {requested} "
                "to generate). Lower max_tokens or the prompt.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return requested


def create_app(causal_lm=None, *, loader=None, model_name=None, api_key=None, max_batch_size=8,
               max_queue=64, max_model_len=None, prefill_chunk=256, steps_per_run=8):  # fmt: skip
    """An ASGI app serving ``causal_lm`` (or the model ``loader()`` returns, loaded in the
    background while ``/health`` answers 503) with OpenAI's HTTP API.

    Args:
        causal_lm: a `CausalLM` with a preprocessor (JAX backend), or None with ``loader``.
        loader: a function returning the model (for a server that answers while loading).
        model_name: the id clients pass as ``model`` (default: ``"keras-llama"``).
        api_key: when set, requests need ``Authorization: Bearer <api_key>``.
        max_batch_size: the requests decoded together (`SlotEngine`'s rows).
        max_queue: requests that may wait for a row; beyond, 429 with ``Retry-After``.
        max_model_len: the most tokens (prompt + completion) of one request. None: the
            preprocessor's sequence length, at most 2048.
        prefill_chunk: the most prompt tokens prefilled between two decode steps.
        steps_per_run: decode steps of one compiled call while no request waits (streamed
            tokens then come in groups of this many); 1 for one step per call.

    Returns:
        fastapi.FastAPI: the app; run it with any ASGI server (``uvicorn.run(app)``). The
        engine starts and stops with the app's lifespan.

    Raises:
        ValueError: unless exactly one of ``causal_lm`` and ``loader`` is given.

    Example:
        ```python
        from keras_llama.serving import create_app
        from starlette.testclient import TestClient

        app = create_app(causal_lm, model_name="tiny", max_batch_size=2)
        with TestClient(app) as client:  # or: uvicorn.run(app, port=8000)
            reply = client.post("/v1/completions", json={
                "model": "tiny", "prompt": "The quick brown", "max_tokens": 8})
            reply.json()["choices"][0]["text"]
        ```
    """
    if (causal_lm is None) == (loader is None):
        raise ValueError("Pass exactly one of `causal_lm` and `loader`.")
    engine_kwargs = dict(max_batch_size=max_batch_size, max_queue=max_queue,
                         max_model_len=max_model_len, prefill_chunk=prefill_chunk,
                         steps_per_run=steps_per_run)  # fmt: skip
    server = Server(model_name or "keras-llama", api_key, engine_kwargs)

    def load():
        try:
            server.load(causal_lm if loader is None else loader())
        except Exception as e:  # reported by /health
            server.load_error = f"{type(e).__name__}: {e}"
            logger.exception("loading the model failed")

    @asynccontextmanager
    async def lifespan(app):
        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        if loader is None:  # a model given: ready when the app starts serving
            await asyncio.to_thread(thread.join)
            if server.load_error:
                raise RuntimeError(server.load_error)
        yield
        if server.engine is not None:
            await asyncio.to_thread(server.engine.stop)

    app = FastAPI(title="keras-llama", lifespan=lifespan)
    app.state.server = server
    _add_error_handlers(app)

    @app.middleware("http")
    async def limits_and_metrics(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            response = APIError(413, f"The request body is larger than {MAX_BODY_BYTES} bytes. "
                                     f"Received: content-length={length}").response()  # fmt: skip
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        endpoint = route.path if route is not None else "other"
        server.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    def authorize(request: Request):
        if server.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {server.api_key}":
            raise APIError(401, "Invalid or missing API key: send `Authorization: Bearer <key>`.",
                           code="invalid_api_key")  # fmt: skip

    def ready():
        if not server.ready:
            raise APIError(503, "The model is loading. Retry shortly.",
                           headers={"Retry-After": "5"})  # fmt: skip
        return server

    api = APIRouter(dependencies=[Depends(authorize), Depends(ready)])

    @app.get("/health")
    async def health():
        if server.load_error:
            return JSONResponse({"status": "error", "error": server.load_error}, status_code=500)
        if not server.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        with open(PAGE, encoding="utf-8") as f:
            return HTMLResponse(f.read().replace("__MODEL_NAME__", server.model_name))

    @api.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @api.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [_model_card(server)]}

    @api.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        _check_model(server, model_id)
        return _model_card(server)

    @api.post("/tokenize")
    async def tokenize(body: schemas.TokenizeRequest):
        if body.model is not None:
            _check_model(server, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "Pass exactly one of `prompt` and `messages`.", param="prompt")
        if body.messages is not None:
            ids = server.chat_prompt(body.messages)
        else:
            ids = server.encode(body.prompt, add_start=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": server.max_model_len}

    @api.post("/detokenize")
    async def detokenize(body: schemas.DetokenizeRequest):
        if body.model is not None:
            _check_model(server, body.model)
        return {"prompt": server.detokenize(server.check_ids(body.tokens))}

    @api.post("/v1/chat/completions")
    async def chat_completions(body: schemas.ChatCompletionRequest, request: Request):
        _check_request(server, body)
        if body.logprobs is False and body.top_logprobs:
            raise APIError(400, "`top_logprobs` needs `logprobs: true`.", param="top_logprobs")
        prompts = [server.chat_prompt(body.messages)]
        requested = body.max_completion_tokens or body.max_tokens
        top = (body.top_logprobs or 0) if body.logprobs else None
        return await _respond(server, request, body, prompts, requested, top, chat=True)

    @api.post("/v1/completions")
    async def text_completions(body: schemas.CompletionRequest, request: Request):
        _check_request(server, body)
        prompt = body.prompt
        if isinstance(prompt, str):
            prompts = [server.encode(prompt)]
        elif all(isinstance(p, str) for p in prompt):
            prompts = [server.encode(p) for p in prompt]
        elif all(isinstance(p, int) for p in prompt):
            prompts = [server.check_ids(list(prompt))]
        else:
            prompts = [server.check_ids(list(p)) for p in prompt]
        return await _respond(server, request, body, prompts, body.max_tokens, body.logprobs,
                              chat=False)  # fmt: skip

    app.include_router(api)
    return app


async def _respond(server, request, body, prompts, requested, top_logprobs, chat):
    started = time.monotonic()
    max_tokens = server.max_tokens(prompts, requested)
    choices = completions.Choices(server, prompts, body, max_tokens, top_logprobs).submit()
    server.metrics.prompt_tokens.inc(choices.prompt_tokens)
    if body.stream:
        return EventSourceResponse(_sse(server, choices, chat, started), ping=15)
    task = asyncio.ensure_future(completions.collect(choices, chat))
    try:
        while not task.done():  # a client that leaves frees its slots
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                return Response(status_code=499)
        result = task.result()
    finally:
        if not task.done():
            task.cancel()
        choices.cancel()
    server.metrics.generation_tokens.inc(choices.completion_tokens)
    server.metrics.latency.observe(time.monotonic() - started)
    return result


async def _sse(server, choices, chat, started):
    first = True
    try:
        async for chunk in completions.stream_chunks(choices, chat):
            if first and any(c.get("delta", {}).get("content") or c.get("text")
                             for c in chunk["choices"]):  # fmt: skip
                server.metrics.ttft.observe(time.monotonic() - started)
                first = False
            yield {"data": json.dumps(chunk, ensure_ascii=False)}
    except APIError as e:
        yield {"data": json.dumps(e.body())}
    except Exception as e:  # after the stream started: an error event, never a traceback
        logger.exception("streaming failed")
        yield {"data": json.dumps(error_body(f"{type(e).__name__}: {e}", "server_error"))}
    finally:
        choices.cancel()
        server.metrics.generation_tokens.inc(choices.completion_tokens)
        server.metrics.latency.observe(time.monotonic() - started)
    yield {"data": "[DONE]"}


def _model_card(server):
    return {"id": server.model_name, "object": "model", "created": 0, "owned_by": "keras-llama",
            "max_model_len": server.max_model_len}  # fmt: skip


def _check_model(server, model_id):
    if model_id != server.model_name:
        raise APIError(404, f"The model `{model_id}` does not exist. This server serves "
                            f"`{server.model_name}`.", param="model", code="model_not_found")  # fmt: skip


def _check_request(server, body):
    _check_model(server, body.model)
    unsupported = schemas.unsupported_fields(body)
    if unsupported:
        raise APIError(400, f"`{unsupported}` is not supported by this server.",
                       param=unsupported, code="unsupported_parameter")  # fmt: skip
    ignored = sorted(set(body.model_extra or {}) - set(schemas.UNSUPPORTED))
    if ignored:
        logger.info("ignoring unknown request fields: %s", ", ".join(ignored))


def _add_error_handlers(app):
    @app.exception_handler(APIError)
    async def api_error(request, exc):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def unexpected(request, exc):  # a bug: logged, answered without a traceback
        logger.exception("unexpected error")
        return JSONResponse(error_body(f"Internal error: {type(exc).__name__}", "server_error"),
                            status_code=500)  # fmt: skip
