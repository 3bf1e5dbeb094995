"""From a validated request to choices: prompts -> engine `Request`s -> text events -> the
OpenAI response bodies (whole, or as stream chunks).

`start_choices` submits every choice before anything is sent (so a full queue is a 429, not a
broken stream); `choice_events` turns the engine's tokens into text with a `TextAssembler` per
choice and cancels every engine request when the consumer stops (a client disconnect).
"""

import asyncio
import random
import time
import uuid

from keras_llama.serving.errors import APIError
from keras_llama.serving.slots import QueueFull, Request
from keras_llama.serving.text import TextAssembler


class Choices:
    """The engine requests of one API request (``len(prompts) * n`` choices)."""

    def __init__(self, server, prompts, body, max_tokens, top_logprobs):
        self.server, self.prompts, self.body = server, prompts, body
        self.n = body.n
        self.top_logprobs = top_logprobs  # None: no logprobs
        self.queue = asyncio.Queue()
        self.requests = []
        self.assemblers = []
        self.finish = {}  # choice index -> (finish_reason, completion tokens)
        self.created = int(time.time())
        self.id = uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        stop_ids = () if body.ignore_eos else server.stop_token_ids
        seed = body.seed if body.seed is not None else random.getrandbits(31)
        for p, prompt in enumerate(prompts):
            for j in range(self.n):
                index = p * self.n + j
                settings = {
                    "temperature": body.temperature,
                    "top_k": max(body.top_k, 0),
                    "top_p": body.top_p,
                    "min_p": body.min_p,
                    "presence_penalty": body.presence_penalty,
                    "frequency_penalty": body.frequency_penalty,
                    "seed": (seed + j) % (2**31),
                    "logprobs": top_logprobs is not None,  # else the engine skips them
                }

                def deliver(event, index=index):
                    loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

                self.requests.append(Request(prompt, max_tokens, settings, stop_ids, deliver))
                self.assemblers.append(TextAssembler(server.detokenize, body.stop_strings()))

    def submit(self):
        try:
            for request in self.requests:
                self.server.engine.submit(request)
        except QueueFull:
            self.cancel()
            raise APIError(
                429,
                "The server is at capacity: too many requests are waiting. Retry shortly.",
                "rate_limit_exceeded",
                headers={"Retry-After": "1"},
            ) from None
        return self

    def cancel(self):
        for request in self.requests:
            self.server.engine.cancel(request)

    @property
    def prompt_tokens(self):
        return sum(len(p) for p in self.prompts)

    @property
    def completion_tokens(self):
        return sum(tokens for _, tokens in self.finish.values())

    def usage(self):
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


async def choice_events(choices):
    """Yields ``(index, piece, logprob entries, finish_reason or None)`` until every choice
    is finished; on exit (finished, failed or cancelled) every engine request is cancelled."""
    try:
        while len(choices.finish) < len(choices.requests):
            index, event = await choices.queue.get()
            if index in choices.finish:
                continue  # tokens computed after a stop string was found
            assembler = choices.assemblers[index]
            if event[0] == "token":
                piece, entries = assembler.add(event[1], event[2], (event[3], event[4]))
                if not assembler.stopped:
                    yield index, piece, entries, None
                    continue
                choices.server.engine.cancel(choices.requests[index])
                rest, more = assembler.finish()
                choices.finish[index] = ("stop", len(assembler.ids))
                yield index, piece + rest, entries + more, "stop"
            elif event[0] == "finish":
                piece, entries = assembler.finish()
                choices.finish[index] = (event[1], event[2])
                yield index, piece, entries, event[1]
            else:
                raise APIError(500, f"Generation failed: {event[1]}", "server_error")
    finally:
        choices.cancel()


# --- response bodies ----------------------------------------------------------------------------
def chat_logprobs(server, entries, k):
    content = []
    for _token_id, piece, logprob, (top_ids, top_lps), _ in entries:
        top = [
            _token_logprob(server.token_text(int(t)), float(lp))
            for t, lp in zip(top_ids[:k], top_lps[:k])
        ]
        content.append({**_token_logprob(piece, logprob), "top_logprobs": top})
    return {"content": content}


def _token_logprob(text, logprob):
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def completion_logprobs(server, entries, k, offset):
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for _token_id, piece, logprob, (top_ids, top_lps), _ in entries:
        out["tokens"].append(piece)
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append(
            {server.token_text(int(t)): float(lp) for t, lp in zip(top_ids[:k], top_lps[:k])}
        )
        out["text_offset"].append(offset)
        offset += len(piece)
    return out


async def collect(choices, chat):
    """The whole (non-streamed) response body."""
    server = choices.server
    texts = [""] * len(choices.requests)
    entries = [[] for _ in choices.requests]
    async for index, piece, more, _ in choice_events(choices):
        texts[index] += piece
        entries[index] += more
    out = []
    for index, text in enumerate(texts):
        reason = choices.finish[index][0]
        logprobs = None
        if choices.top_logprobs is not None:
            k = choices.top_logprobs
            logprobs = (
                chat_logprobs(server, entries[index], k)
                if chat
                else completion_logprobs(server, entries[index], k, 0)
            )
        if chat:
            message = {"role": "assistant", "content": text}
            out.append({"index": index, "message": message, "logprobs": logprobs,
                        "finish_reason": reason})  # fmt: skip
        else:
            out.append({"index": index, "text": text, "logprobs": logprobs,
                        "finish_reason": reason})  # fmt: skip
    return {
        "id": ("chatcmpl-" if chat else "cmpl-") + choices.id,
        "object": "chat.completion" if chat else "text_completion",
        "created": choices.created,
        "model": server.model_name,
        "choices": out,
        "usage": choices.usage(),
    }


async def stream_chunks(choices, chat):
    """The stream's chunks (dicts), OpenAI's shape: the role first (chat), text deltas,
    ``finish_reason`` once per choice, then (``include_usage``) a chunk with no choices."""
    server = choices.server
    base = {
        "id": ("chatcmpl-" if chat else "cmpl-") + choices.id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": choices.created,
        "model": server.model_name,
    }
    include_usage = bool(choices.body.stream_options and choices.body.stream_options.include_usage)
    if include_usage:
        base["usage"] = None
    if chat:
        for index in range(len(choices.requests)):
            delta = {"role": "assistant", "content": ""}
            yield {**base, "choices": [_chunk_choice(index, delta, None, None)]}
    offsets = [0] * len(choices.requests)
    async for index, piece, entries, reason in choice_events(choices):
        if not piece and not reason:
            continue
        logprobs = None
        if choices.top_logprobs is not None:
            k = choices.top_logprobs
            logprobs = (
                chat_logprobs(server, entries, k)
                if chat
                else completion_logprobs(server, entries, k, offsets[index])
            )
        offsets[index] += len(piece)
        if chat:
            delta = {"content": piece} if piece else {}
            choice = _chunk_choice(index, delta, logprobs, reason)
        else:
            choice = {"index": index, "text": piece, "logprobs": logprobs, "finish_reason": reason}
        yield {**base, "choices": [choice]}
    if include_usage:
        yield {**base, "choices": [], "usage": choices.usage()}


def _chunk_choice(index, delta, logprobs, reason):
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
