"""The slot engine: continuous batching over a fixed batch of cache rows (slots).

A `SlotEngine` owns ``B`` cache rows of ``S`` slots each, and a thread that loops::

    admit waiting requests into free rows ─> prefill one chunk of one row ─> decode every
    active row by one compiled step ─> hand each request its token ─> free finished rows

Every row writes its next token at the same cache slot, the ``pointer``; each row keeps its own
valid-slot mask and rotary positions, so rows of any lengths share one step (the same
``DecodeState`` idea as `generate()`'s left padding). A new request's prompt is written into its
row just below the pointer (the pointer jumps ahead when the row needs the room: the other rows
just get masked-out slots). When the pointer reaches ``S``, each row's valid slots are moved to
the front of its row (attention does not depend on the order of the keys: rotary positions are
applied when a key is written) and the pointer restarts after the longest row.

The decode step is `GenerationEngine.make_step` (the model's decode plan and weights, as
`generate()` runs it) and the tokens are picked by `RowSampler` (per-row settings as arrays):
the shapes never change, so requests come and go without recompiling. JAX only.
"""

import threading
import time

import keras
import numpy as np
from keras import ops

from keras_llama import samplers
from keras_llama.models.generation_engine import GenerationEngine, bucket_length
from keras_llama.samplers.row_sampler import RowSampler, RowSettings
from keras_llama.serving.slot_state import (
    SlotState,
    head_rows,
    logprobs_of,
    no_logprobs,
    one_hot,
    put_head_rows,
    row_buckets,
)


class QueueFull(Exception):
    """The engine's waiting queue is full (the server answers 429)."""


class Request:
    """One sequence to generate. ``deliver(event)`` is called from the engine thread with
    ``("token", token_id, logprob, top_ids, top_logprobs)``, ``("finish", reason)`` or
    ``("error", message)``; it must not block. ``settings`` holds `RowSettings` values, and
    ``"logprobs": True`` when the logprobs are read (else a decode step may give zeros)."""

    def __init__(self, prompt_ids, max_tokens, settings, stop_ids, deliver):
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.max_tokens = int(max_tokens)
        self.settings = dict(settings)
        self.stop_ids = frozenset(stop_ids)
        self.deliver = deliver
        self.cancelled = False
        self.generated = 0
        self.submitted = time.monotonic()


class SlotEngine:
    """Continuous batching of `Request`s for one causal LM (see the module docstring).

    Args:
        causal_lm: a `CausalLM` (JAX backend).
        max_batch_size: the number of rows decoded together.
        max_queue: requests that may wait for a row; `submit` raises `QueueFull` beyond.
        max_model_len: the most tokens (prompt + completion) of one request.
        prefill_chunk: the most prompt tokens prefilled between two decode steps.
        steps_per_run: decode steps run by one compiled call while no request waits for a
            row or a prefill (tokens then reach the requests in groups of this many; a
            request that arrives, is cancelled or finishes waits at most one run). 1 runs
            one step per call.
        plan: the `ExecutionPlan` to run (default: the model's; tests run every one).

    Raises:
        ValueError: off the JAX backend, or for a non-positive size.

    Example:
        ```python
        import queue
        from keras_llama.serving.slots import Request

        engine = keras_llama.serving.SlotEngine(causal_lm, max_batch_size=2, max_model_len=64)
        events = queue.Queue()
        prompt_ids = [int(t) for t in causal_lm.preprocessor.tokenizer("The quick brown")]
        engine.submit(Request(prompt_ids, 8, {}, (), events.put))  # greedy, 8 tokens
        engine.start()
        tokens = []
        while (event := events.get(timeout=120))[0] == "token":
            tokens.append(event[1])
        engine.stop()   # event == ("finish", "length")
        ```
    """

    def __init__(self, causal_lm, max_batch_size=8, max_queue=64, max_model_len=1024,
                 prefill_chunk=256, steps_per_run=8, plan=None):  # fmt: skip
        if keras.config.backend() != "jax":
            raise ValueError(
                "The slot engine runs on the JAX backend. Received: "
                f"KERAS_BACKEND={keras.config.backend()}"
            )
        for name, value in (("max_batch_size", max_batch_size), ("max_model_len", max_model_len),
                            ("prefill_chunk", prefill_chunk), ("steps_per_run", steps_per_run)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"`max_queue` must be an integer >= 0. Received: {max_queue!r}")
        import jax

        self.model = causal_lm
        self.engine = GenerationEngine(causal_lm, samplers.GreedySampler(), plan=plan)
        self.sampler = RowSampler()
        self.batch_size, self.max_queue, self.max_model_len = (
            max_batch_size,
            max_queue,
            max_model_len,
        )
        self.prefill_chunk = min(prefill_chunk, max_model_len)
        self.steps_per_run = steps_per_run
        # A little room past the longest request, so that the shared write pointer reaches
        # the end (and the rows are compacted, a step's cost) only every ~room steps.
        self.cache_length = max_model_len + max(32, max_model_len // 8)
        self.vocabulary_size = causal_lm.backbone.vocabulary_size
        self._decode_jit = jax.jit(self._decode, donate_argnums=(2,), static_argnums=(7, 8))
        self._prefill_jit = jax.jit(self._prefill, donate_argnums=(2,), static_argnums=(9,))
        self._compact_jit = jax.jit(self._compact_rows, donate_argnums=(0,))
        self._cond = threading.Condition()
        self._waiting = []  # Requests not yet in a row (FIFO)
        self._rows = [None] * max_batch_size  # the Request in each row
        self._prefilled = [0] * max_batch_size  # prompt tokens of the row already prefilled
        self._row_end = np.zeros(max_batch_size, "int64")  # slot after each row's last token
        self._settings = [RowSettings.neutral()] * max_batch_size
        self._pointer = 0
        self._thread = None
        self._running = False
        self.stats = {"steps": 0, "compactions": 0, "prompt_tokens": 0, "generation_tokens": 0}
        self.on_step = None  # optional callback(num_active) after each decode step (metrics)
        self._state = self._initial_state()

    # --- the public side (any thread) -----------------------------------------------------
    def submit(self, request):
        """Queues a request; raises `QueueFull` when ``max_queue`` requests already wait."""
        with self._cond:
            free = sum(r is None for r in self._rows)
            if len(self._waiting) >= self.max_queue + free:
                raise QueueFull(f"{len(self._waiting)} requests are waiting")
            self._waiting.append(request)
            self._cond.notify()

    def cancel(self, request):
        """Frees the request's row (or drops it from the queue) before the next step."""
        with self._cond:
            request.cancelled = True
            self._cond.notify()

    def occupancy(self):
        """``(rows in use, requests waiting)``."""
        with self._cond:
            return sum(r is not None for r in self._rows), len(self._waiting)

    def start(self):
        """Compiles the decode step for each number of rows (so that the first request does
        not wait for it) and starts the engine thread."""
        for rows in row_buckets(self.batch_size):
            for num_steps in sorted({1, self.steps_per_run}):
                # All rows inactive: computes nothing anyone reads.
                self._run_decode(num_steps, rows=rows)
                self._pointer = 0
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="slot-engine", daemon=True)
        self._thread.start()

    def stop(self):
        with self._cond:
            self._running = False
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # --- the engine thread ----------------------------------------------------------------
    def _loop(self):
        while True:
            with self._cond:
                self._drop_cancelled()
                self._admit()
                busy = any(r is not None for r in self._rows)
                if not busy:
                    if not self._running:
                        return
                    self._cond.wait(timeout=1.0)
                    continue
                if not self._running:
                    return
            try:
                self._prefill_next_chunk()
                if any(self._decoding(i) for i in range(self.batch_size)):
                    self._decode_step()
            except Exception as e:  # a failed step ends its requests, never the server
                with self._cond:
                    for i, request in enumerate(self._rows):
                        if request is not None:
                            request.deliver(("error", f"{type(e).__name__}: {e}"))
                            self._free(i)
                    self._state = self._initial_state()
                    self._pointer = 0

    def _drop_cancelled(self):
        self._waiting = [r for r in self._waiting if not r.cancelled]
        for i, request in enumerate(self._rows):
            if request is not None and request.cancelled:
                self._free(i)

    def _admit(self):
        for i in range(self.batch_size):
            if self._rows[i] is None and self._waiting:
                request = self._waiting.pop(0)
                self._rows[i], self._prefilled[i] = request, 0
                self._settings[i] = {**RowSettings.neutral(), **request.settings}

    def _free(self, i):
        self._rows[i], self._prefilled[i], self._row_end[i] = None, 0, 0
        self._settings[i] = RowSettings.neutral()

    def _decoding(self, i):
        request = self._rows[i]
        return request is not None and self._prefilled[i] == len(request.prompt_ids)

    def _prefill_next_chunk(self):
        """Prefills one chunk of the row that waited longest (its first token comes from the
        last chunk)."""
        pending = [i for i in range(self.batch_size)
                   if self._rows[i] is not None and not self._decoding(i)]  # fmt: skip
        if not pending:
            return
        i = min(pending, key=lambda j: self._rows[j].submitted)
        request, done = self._rows[i], self._prefilled[i]
        chunk = request.prompt_ids[done : done + self.prefill_chunk]
        width = bucket_length(len(chunk))
        if max(self._pointer, self._row_end[i] + width) > self.cache_length:
            self._compact()
            room = self.cache_length - int(self._row_end[i])  # >= 32 (see cache_length)
            if width > room:  # the longest chunk that fits; the rest comes next time
                chunk = chunk[
                    : max(c for c in range(1, len(chunk) + 1) if bucket_length(c) <= room)
                ]
                width = bucket_length(len(chunk))
        start = max(self._pointer, int(self._row_end[i]) + width) - width
        ids = np.zeros((1, width), "int32")
        ids[0, width - len(chunk) :] = chunk  # left padding, masked out
        settings = RowSettings.make([self._settings[i]])
        values = [v.value for v in self.engine.variables]
        self._state, token, info = self._prefill_jit(
            values, self.engine.prefill_weights(values), self._state, np.int32(i), ids,
            np.int32(len(chunk)), np.int32(start), np.int32(done), settings, done == 0,
        )  # fmt: skip
        self._pointer = start + width
        self._row_end[i] = start + width
        self._prefilled[i] = done + len(chunk)
        self.stats["prompt_tokens"] += len(chunk)
        if self._decoding(i):
            info = [np.asarray(x)[0] for x in info]
            self._hand_out(i, int(np.asarray(token)[0]), *info)

    def _decode_step(self):
        num_steps = self._steps_to_run()
        if self._pointer + num_steps > self.cache_length:
            self._compact()
            if self._pointer + num_steps > self.cache_length:
                num_steps = 1
        active = np.array([self._decoding(i) for i in range(self.batch_size)])
        # Only the first rows up to the last active one (bucketed) are decoded: requests take
        # the lowest free rows, so a lone request costs a batch-1 step, not a batch-B one.
        last = int(np.flatnonzero(active)[-1]) + 1
        rows = min(r for r in row_buckets(self.batch_size) if r >= last)
        requests = list(self._rows)
        tokens, logprobs, top_ids, top_lps = self._run_decode(num_steps, active, rows)
        self.stats["steps"] += num_steps
        for step in range(num_steps):
            if self.on_step is not None:
                self.on_step(int(active.sum()))
            for i in np.flatnonzero(active):
                # A row whose request finished at an earlier step of the run: the rest of
                # its tokens are dropped (its row is free).
                if self._rows[i] is requests[i]:
                    self._hand_out(i, int(tokens[step, i]), logprobs[step, i],
                                   top_ids[step, i], top_lps[step, i])  # fmt: skip

    def _steps_to_run(self):
        """A run of ``steps_per_run`` steps while no request waits for a row or a prefill and
        some row still has that many tokens to go, else one step."""
        with self._cond:
            free = any(r is None for r in self._rows)
            if (free and self._waiting) or any(r is not None and r.cancelled for r in self._rows):
                return 1
        if any(r is not None and not self._decoding(i) for i, r in enumerate(self._rows)):
            return 1
        to_go = max(
            min(r.max_tokens - r.generated, self.max_model_len - len(r.prompt_ids) - r.generated)
            for r in self._rows if r is not None
        )  # fmt: skip
        return self.steps_per_run if to_go >= self.steps_per_run else 1

    def _run_decode(self, num_steps, active=None, rows=None):
        if active is None:
            active = np.zeros(self.batch_size, bool)
        rows = rows or self.batch_size
        values = [v.value for v in self.engine.variables]
        weights = self.engine.current_weights(values)
        settings = RowSettings.make(self._settings[:rows])
        want_logprobs = any(self._settings[i].get("logprobs") for i in range(rows))
        self._state, out = self._decode_jit(
            values, weights, self._state, settings, active[:rows], np.bool_(want_logprobs),
            np.int32(self._pointer), num_steps, rows,
        )  # fmt: skip
        self._pointer += num_steps
        return [np.asarray(x) for x in out]

    def _hand_out(self, i, token, logprob, top_ids, top_lps):
        """Gives row ``i``'s new token to its request; frees the row when it is finished."""
        request = self._rows[i]
        request.generated += 1
        self.stats["generation_tokens"] += 1
        length = len(request.prompt_ids) + request.generated
        reason = None
        if token in request.stop_ids:  # counted in the usage, never shown
            reason = "stop"
        else:
            request.deliver(("token", token, float(logprob), top_ids, top_lps))
        if reason is None and (
            request.generated >= request.max_tokens or length >= self.max_model_len
        ):
            reason = "length"
        if reason is not None:
            request.deliver(("finish", reason, request.generated))
            with self._cond:
                self._free(i)

    def _compact(self):
        occupied = np.array([r is not None for r in self._rows])
        self._state, counts = self._compact_jit(self._state, occupied)
        counts = np.asarray(counts)
        self._row_end[:] = counts
        self._pointer = int(counts.max(initial=0))
        self.stats["compactions"] += 1

    # --- the traced functions ---------------------------------------------------------------
    def _initial_state(self):
        b, s = self.batch_size, self.cache_length
        return SlotState(
            caches=tuple(tuple(kv) for kv in self.model._build_layer_caches(b, s)),
            cache_mask=np.zeros((b, s), bool),
            positions=np.zeros(b, "int32"),
            tokens=np.zeros(b, "int32"),
            counts=np.zeros((b, self.vocabulary_size), "int32"),
            steps=np.zeros(b, "int32"),
        )

    def _decode(self, values, weights, state, settings, active, want_logprobs, pointer, num_steps,
                rows):  # fmt: skip
        # Decodes the first ``rows`` rows (settings and active [rows]); the others are left as
        # they are. Outputs are [num_steps, rows].
        from jax import lax

        step = self.engine.make_step(weights)
        slots = ops.arange(self.cache_length)[None, :]
        whole = rows == self.batch_size

        def one(carry, _):
            full, pointer = carry
            state = full if whole else head_rows(full, rows)
            with self.engine.scope(values):
                here = slots == pointer  # [1, S]
                # Every row attends to the slot it writes (free rows to nothing else).
                logits, _, caches = step(state.tokens[:, None], state.caches, pointer,
                                         state.cache_mask | here, state.positions[:, None])  # fmt: skip
                tokens = self.sampler.next_tokens(logits, state.counts, settings, state.steps)
                # The top-20 over the vocabulary only when some request asked for logprobs.
                info = ops.cond(want_logprobs, lambda: logprobs_of(logits, tokens),
                                lambda: no_logprobs(logits))  # fmt: skip
            grow = ops.cast(active, "int32")
            new = state._replace(
                caches=caches,
                cache_mask=state.cache_mask | (here & active[:, None]),
                positions=state.positions + grow,
                tokens=ops.where(active, tokens, state.tokens),
                counts=state.counts + one_hot(tokens, self.vocabulary_size) * grow[:, None],
                steps=state.steps + grow,
            )
            if not whole:
                new = put_head_rows(full, new)
            return (new, pointer + 1), (tokens, *info)

        (state, _), out = lax.scan(one, (state, pointer), None, length=num_steps)
        return state, out

    def _prefill(self, values, weights, state, row, ids, length, start, position, settings,
                 first):  # fmt: skip
        # Writes the chunk ``ids`` [1, width] (its last ``length`` tokens real) into row ``row``
        # at slots [start, start + width). A request's first chunk (``first``, static) attends
        # only to itself: it runs on caches of its own width, copied into the row afterwards,
        # so its cost does not grow with the cache (SmolLM2, 128 tokens: 136 ms at 306 slots,
        # 250 ms at 1152 when it attended to the whole row). Later chunks attend to the row.
        from jax import lax

        kv = self.model.backbone.num_key_value_heads
        width = ids.shape[1]
        slots = ops.arange(self.cache_length)
        mask = lax.dynamic_index_in_dim(state.cache_mask, row, keepdims=False)  # [S]
        chunk_slots = (slots >= start + width - length) & (slots < start + width)
        mask = chunk_slots if first else mask | chunk_slots
        positions = ops.maximum(position + ops.arange(width) - (width - length), 0)[None, :]
        if first:
            caches = self.model._build_layer_caches(1, width)
            own_mask = (ops.arange(width) >= width - length)[None, :]
            at = 0
        else:
            caches = [tuple(lax.dynamic_slice_in_dim(c, row * kv, kv, axis=0) for c in pair)
                      for pair in state.caches]  # fmt: skip
            own_mask, at = mask[None], start
        with self.engine.scope(values):
            logits, _, caches = self.model.call_with_layer_caches(
                ids, caches, at, own_mask, positions, last_logits_only=True,
                stage_plan=self.engine.plan.prefill, weights=weights,
            )  # fmt: skip
            logits = ops.cast(logits[:, -1], "float32")
            zeros = ops.zeros((1, self.vocabulary_size), "int32")
            token = self.sampler.next_tokens(logits, zeros, settings, ops.zeros((1,), "int32"))
            info = logprobs_of(logits, token)

        # Keys [B * kv, h, S] and values [B * kv, S, h]: the row's cache rows from row * kv.
        def put_row(big, small, keys):
            if first:  # the chunk's own caches, at slot ``start``
                where = (row * kv, 0, start) if keys else (row * kv, start, 0)
            else:  # the row's caches, whole
                where = (row * kv, 0, 0)
            return lax.dynamic_update_slice(big, ops.cast(small, big.dtype), where)

        new_caches = tuple(
            (put_row(big_k, small_k, True), put_row(big_v, small_v, False))
            for (big_k, big_v), (small_k, small_v) in zip(state.caches, caches)
        )

        def put(x, value):
            return lax.dynamic_update_index_in_dim(x, ops.cast(value, x.dtype), row, axis=0)

        state = state._replace(
            caches=new_caches,
            cache_mask=put(state.cache_mask, mask),
            positions=put(state.positions, position + length),
            tokens=put(state.tokens, token[0]),
            counts=put(state.counts, one_hot(token, self.vocabulary_size)[0]),
            steps=put(state.steps, 1),
        )
        return state, token, info

    def _compact_rows(self, state, occupied):
        # Each row's valid slots move to the front (stable: their order is kept).
        import jax.numpy as jnp

        mask = state.cache_mask & occupied[:, None]
        order = jnp.argsort(~mask, axis=1, stable=True)  # [B, S]
        counts = mask.sum(axis=1).astype("int32")
        b, kv = self.batch_size, self.model.backbone.num_key_value_heads

        def move(x, keys):
            blocks = x.reshape(b, kv, *x.shape[1:])
            index = order[:, None, None, :] if keys else order[:, None, :, None]
            return jnp.take_along_axis(blocks, index, axis=3 if keys else 2).reshape(x.shape)

        caches = tuple((move(k, True), move(v, False)) for k, v in state.caches)
        mask = jnp.arange(self.cache_length)[None, :] < counts[:, None]
        return state._replace(caches=caches, cache_mask=mask), counts
