"""The compiled prefill and decode of one model with one sampler (`GenerationEngine`).

On JAX, prefill and decode are ``jax.jit`` functions that take the model's variable values as
arguments (a `keras.StatelessScope` maps them onto the variables while tracing, so weights are
never baked in as constants); decode is one ``lax.while_loop`` on device with its state donated.
Prompt widths and lengths are bucketed (`bucket_length`), so a prompt of similar length reuses
the compiled code. On torch, prefill runs eagerly under ``torch.no_grad()`` and decode runs the
same Python loop around a step that the plan either runs eagerly or compiles once per bucketed
shape (``step: torch_compile``, `keras_llama.models.torch_step`): per token, only the sampler
and the loop's bookkeeping run in Python.

What prefill and decode run is the model's `ExecutionPlan`, decided when the engine is made and
passed to every traced function: nothing is read from hidden state, so concurrent calls of
different lengths each trace their own shapes with the same plan.
"""

import contextlib
import json
import threading
import types
from typing import NamedTuple

import keras
import numpy as np
from keras import ops

from keras_llama.models import torch_step
from keras_llama.samplers.sampler import PAD_TOKEN, DecodeState, run_decode_loop
from keras_llama.utils import keras_compat
from keras_llama.utils.cache import cache_dir
from keras_llama.utils.executable_cache import CachedFunction


def bucket_length(n, minimum=16):
    """``n`` rounded up to one of four sizes per octave (16, 20, 24, 28, 32, 40, ...; at least
    ``minimum``), so compiled shapes repeat for similar lengths and waste at most ~25%."""
    if n <= minimum:
        return minimum
    step = max(1, 2 ** ((n - 1).bit_length() - 3))
    return -(-n // step) * step


class Prompts(NamedTuple):
    """One batch of tokenized prompts (host-side)."""

    rows: list  # one int32 numpy array of prompt tokens per row, without padding
    max_length: int  # total length (prompt + completion) of every row


# --- compilation cache ---------------------------------------------------------------------------
def enable_persistent_compilation_cache():
    """Let JAX keep compiled prefill/decode programs on disk, so that a later process (a second
    ``keras-llama generate``) skips most of the compilation of the first ``generate()``.

    The cache lives in ``<keras-llama cache>/jax_compilation_cache``. It is left alone when the
    user already configured one, and ``KERAS_LLAMA_JAX_CACHE=0`` turns it off.
    """
    import os

    import jax

    if os.environ.get("KERAS_LLAMA_JAX_CACHE", "1").lower() in ("0", "false", "no"):
        return
    if jax.config.jax_compilation_cache_dir:
        return
    path = os.path.join(cache_dir(), "jax_compilation_cache")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:  # a read-only home: compile as usual
        return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# --- stages 3 and 4: prefill and decode ----------------------------------------------------------
class GenerationEngine:
    """Prefill and decode functions of one model with one sampler, compiled once per bucketed
    shape on JAX. `CausalLM.make_generate_function` keeps one in ``generate_function``;
    ``compile()`` and ``quantize()`` reset it."""

    def __init__(self, model, sampler, plan=None):
        self.model = model
        self.sampler = sampler
        self.variables = list(model.variables)  # the order of the values passed to jit
        # What prefill and decode run (the native decode op built first, once per machine);
        # ``plan`` (an `ExecutionPlan`) overrides the model's own.
        self.plan = plan or model.execution_plan(build=("prefill", "decode"))
        self.jax = keras.config.backend() == "jax"
        self._lock = threading.Lock()  # guards the two sets below across threads
        # On torch, the decode step compiled per shape when the plan says so.
        self.compiled_step = (
            torch_step.CompiledStep(self.variables, lambda: self.make_step(None))
            if self.plan.decode.step == "torch_compile"
            else None
        )
        if self.jax:
            enable_persistent_compilation_cache()
            fingerprint = lambda: program_fingerprint(model, sampler, self.plan, self.variables)  # noqa: E731
            self._prefill_jit = CachedFunction(
                "prefill", self._prefill, fingerprint, static_argnums=(4,)
            )
            self._decode_jit = CachedFunction(
                "decode", self._decode, fingerprint, donate_argnums=(1,)
            )
            self._weights_jit = CachedFunction("decode_weights", self._decode_weights, fingerprint)
            # The same weights block by block: one small program for every (alike) block.
            self._parts = _alike_parts(model, self.plan.decode)
            self._block_jit = CachedFunction("decode_weights_block", self._block_part, fingerprint)
            self._head_jit = CachedFunction("decode_weights_head", self._head_part, fingerprint)
            self._index = {id(v): i for i, v in enumerate(self.variables)}
            self._weights = (None, None)  # (the values they were made from, decode weights)
            self._compiled = set()  # decode shapes compiled or compiling
            self._compiling = []  # background compilations to wait for

    def matches(self, model, sampler):
        return (
            sampler is self.sampler
            and len(model.variables) == len(self.variables)
            and model.execution_plan(build=False) == self.plan
        )

    def shapes(self, prompts):
        """``(prompt_width P, buffer_width N, steps)`` for a batch: the cache holds P + N slots
        and the loop runs at most ``steps`` (what the shortest prompt may add)."""
        lengths = [len(r) for r in prompts.rows]
        steps = prompts.max_length - min(lengths)
        if self.jax or self.compiled_step:  # compiled shapes repeat
            return bucket_length(max(lengths)), bucket_length(prompts.max_length), steps
        return max(lengths), steps, steps

    def prefill(self, prompts, stop_token_ids=()):
        """Runs every prompt through the model once; returns ``(state, steps)``. On JAX, the
        decode loop for these shapes (and this many ``stop_token_ids``) is loaded or starts
        compiling too (`_ready_decode`)."""
        width, buffer_width, steps = self.shapes(prompts)
        token_ids = np.full((len(prompts.rows), width), PAD_TOKEN, "int32")
        for i, row in enumerate(prompts.rows):
            token_ids[i, width - len(row) :] = row  # left padding
        lengths = np.array([len(r) for r in prompts.rows], "int32")
        limits = (prompts.max_length - lengths).astype("int32")
        if self.jax:
            values = [v.value for v in self.variables]
            args = (values, token_ids, lengths, limits, buffer_width)
            self._ready_decode(args, stop_token_ids)
            return self._prefill_jit(*args, self.prefill_weights(values)), steps
        with _no_grad():
            return self._prefill(None, token_ids, lengths, limits, buffer_width), steps

    def decode(self, state, stop_at, stop_token_ids):
        """Decodes until every row is done or ``stop_at`` steps have been taken."""
        stop_ids = _stop_array(stop_token_ids)
        stop_at = np.array(stop_at, "int32")
        if not self.jax:
            with _no_grad():
                stop_ids = ops.convert_to_tensor(stop_ids)
                if self.compiled_step:
                    step = self.compiled_step.bind([v.value for v in self.variables])
                else:
                    step = self.make_step(None)
                return run_decode_loop(self.sampler, step, state, stop_at, stop_ids)[0]
        with self._lock:
            compiling, self._compiling = self._compiling, []
        for thread in compiling:
            thread.join()
        values = [v.value for v in self.variables]
        seeds = [v.value for v in self.sampler.variables]
        weights = self.current_weights(values)
        state, seeds = self._decode_jit(values, state, seeds, stop_at, stop_ids, weights)
        for variable, seed in zip(self.sampler.variables, seeds):
            variable.assign(seed)
        return state

    def run(self, prompts, stop_token_ids):
        """Prefill, decode and finalize one batch: the sampler's result (numpy)."""
        state, steps = self.prefill(prompts, stop_token_ids)
        state = self.decode(state, steps, stop_token_ids)
        return self.sampler.finalize(state)

    def _ready_decode(self, prefill_args, stop_token_ids):
        """On the first use of a shape (``prefill_args``: the prefill's arguments but its
        weights), readies the prefill and the decode loop before the packed weights are made (loading a program holds ~100 MB for a moment: SmolLM2's
        README command peaks at 588 MB this way, 608-615 MB with the loads on top of the
        packed copy). A program in the executable cache is loaded now; a missing decode loop
        is traced now and compiled on another thread while the prefill runs (XLA compiles
        without holding the GIL)."""
        key = (prefill_args[1].shape, prefill_args[4], len(stop_token_ids or (-1,)))
        with self._lock:
            if key in self._compiled:
                return
            self._compiled.add(key)
        # The shapes of the decode loop's arguments, from the compiled prefill and weights.
        weights = self._weights_info(prefill_args[0])
        packed = self.plan.prefill.projections == "packed"
        state = self._prefill_jit.compiled(*prefill_args, weights if packed else None).out_info
        seeds = [v.value for v in self.sampler.variables]
        args = (prefill_args[0], state, seeds, np.array(0, "int32"),
                _stop_array(stop_token_ids), weights)  # fmt: skip
        if self._decode_jit.cached(*args) and self._decode_jit.load(*args) is not None:
            return
        lowered = self._decode_jit.lower(*args)  # tracing stays on the calling thread
        thread = threading.Thread(
            target=self._decode_jit.compile_lowered, args=(lowered, args), daemon=True
        )
        thread.start()
        with self._lock:
            self._compiling.append(thread)

    # --- the traced functions ---------------------------------------------------------------
    def prefill_weights(self, values):
        """The weights the prefill plan multiplies: the decode weights when its projections
        are packed (`current_weights`), else None."""
        return self.current_weights(values) if self.plan.prefill.projections == "packed" else None

    def _prefill(self, values, token_ids, lengths, limits, buffer_width, weights=None):
        # token_ids [b, P] left-padded; lengths, limits [b].
        with self.scope(values):
            batch, width = token_ids.shape
            offsets = width - ops.convert_to_tensor(lengths)  # [b]
            slots = ops.arange(width)[None, :]
            prompt_mask = slots >= offsets[:, None]  # [b, P]
            positions = ops.maximum(slots - offsets[:, None], 0)
            cache_mask = ops.concatenate(
                [prompt_mask, ops.ones((batch, buffer_width), dtype="bool")], axis=1
            )
            # The prompt attends to the prompt only: it runs on caches as wide as the prompt,
            # then widened with the empty slots of the tokens to come (a prompt attending to
            # those too, all causally masked, cost (width + buffer) / width its attention).
            caches = self.model._build_layer_caches(batch, width)
            logits, hidden, caches = self.model.call_with_layer_caches(
                ops.convert_to_tensor(token_ids),
                caches,
                0,
                prompt_mask,
                positions,
                last_logits_only=True,
                stage_plan=self.plan.prefill,
                weights=weights,
            )
            caches = [
                (ops.pad(k, ((0, 0), (0, 0), (0, buffer_width))),
                 ops.pad(v, ((0, 0), (0, buffer_width), (0, 0))))
                for k, v in caches
            ]  # fmt: skip
            limits = ops.convert_to_tensor(limits)
            state = DecodeState(
                logits=ops.cast(logits[:, -1], "float32"),
                hidden=hidden[:, -1],
                caches=_as_tuples(caches),
                cache_mask=cache_mask,
                offsets=ops.cast(offsets, "int32"),
                tokens=ops.zeros((batch, buffer_width), dtype="int32"),
                num_generated=ops.zeros((batch,), dtype="int32"),
                done=limits <= 0,
                limits=limits,
                index=ops.convert_to_tensor(0, dtype="int32"),
            )
            return self.sampler.init_state(state, hidden)

    def current_weights(self, values):
        """The decode weights for these variable values (see `_decode_weights`), made once
        and kept until a variable changes (streaming decodes a few steps per call)."""
        made_from, weights = self._weights
        if made_from is None or any(a is not b for a, b in zip(made_from, values)):
            if self._parts is None:
                weights = self._weights_jit(values)
            else:  # block by block: one block's temporaries at a time
                *blocks, head = [self._values_of(layer, values) for layer, _ in self._parts]
                weights = {"layers": [self._block_jit(v) for v in blocks],
                           "head": self._head_jit(head)}  # fmt: skip
            self._weights = (values, weights)
        return weights

    def _weights_info(self, values):
        # The shapes of `current_weights` (from the compiled programs; nothing runs).
        if self._parts is None:
            return self._weights_jit.compiled(values).out_info
        *blocks, head = [self._values_of(layer, values) for layer, _ in self._parts]
        return {"layers": [self._block_jit.compiled(v).out_info for v in blocks],
                "head": self._head_jit.compiled(head).out_info}  # fmt: skip

    def _values_of(self, layer, values):
        return [values[self._index[id(v)]] for v in layer.variables]

    def _decode_weights(self, values):
        # The fused or packed weights of the decode plan (None when it runs the layers).
        with self.scope(values):
            return self.model.decode_weights(self.plan.decode)

    def _block_part(self, values):
        # The decode weights of the first block from ``values`` (any alike block's values).
        block, make = self._parts[0]
        with keras.StatelessScope(state_mapping=list(zip(block.variables, values))):
            return make(block)

    def _head_part(self, values):
        embedding, make = self._parts[-1]
        with keras.StatelessScope(state_mapping=list(zip(embedding.variables, values))):
            return make(embedding)

    def _decode(self, values, state, seeds, stop_at, stop_token_ids, weights=None):
        mapping = list(zip(self.variables, values))
        step = self.make_step(weights)
        return run_decode_loop(
            self.sampler, step, state, stop_at, stop_token_ids, mapping, seeds=seeds
        )

    def make_step(self, weights):
        """One decoding step by the decode plan: ``(logits, hidden, caches)`` of one token."""

        def step(token_ids, caches, slot, cache_mask, positions):
            logits, hidden, caches = self.model.call_with_layer_caches(
                token_ids,
                list(caches),
                slot,
                cache_mask,
                positions,
                stage_plan=self.plan.decode,
                weights=weights,
            )
            return ops.cast(logits[:, -1], "float32"), hidden[:, -1], _as_tuples(caches)

        return step

    def scope(self, values):
        if values is None:
            return contextlib.nullcontext()
        return keras.StatelessScope(state_mapping=list(zip(self.variables, values)))


def program_fingerprint(model, sampler, plan, variables):
    """What names the compiled prefill and decode besides their arguments (see
    `keras_llama.utils.executable_cache`): the model's and sampler's classes and configs, the
    execution plan and the variables' paths. None (never cached) when any code they run comes
    from outside Keras and keras_llama (a layer or sampler class defined elsewhere, a method
    replaced on a class or on the model): that code is not part of the key."""
    layers = [model, *keras_compat.sublayers(model)]
    classes = {type(x) for x in layers} | {type(sampler)}
    functions = [f for cls in classes for klass in cls.__mro__ for f in vars(klass).values()]
    functions += [*vars(model).values(), *vars(sampler).values()]
    for function in functions:
        function = getattr(function, "__func__", function)  # static and class methods
        if isinstance(function, types.FunctionType) and not _ours(function.__module__):
            return None
    if not all(_ours(cls.__module__) for cls in classes):
        return None
    parts = {
        "model": [type(model).__qualname__, _without_names(model.get_config())],
        "layers": sorted(f"{c.__module__}.{c.__qualname__}" for c in classes),
        "sampler": [type(sampler).__qualname__, sampler.get_config()],
        "plan": [str(plan.prefill), str(plan.decode)],  # the stages these programs run
        # Paths below the model's own (unique per instance) name: the order of the values.
        "variables": [v.path.split("/", 1)[-1] for v in variables],
    }
    return json.dumps(parts, sort_keys=True, default=repr)


def _without_names(config):
    # Layer names (``llama_backbone_1``) never change a program; a second model of the same
    # config in one process shares the first one's programs. Only a layer's name goes (its
    # config has ``trainable``): a dtype policy's ``name`` is its dtype.
    if isinstance(config, dict):
        layer = "trainable" in config
        return {k: _without_names(v) for k, v in config.items() if not (layer and k == "name")}
    if isinstance(config, (list, tuple)):
        return [_without_names(v) for v in config]
    return config


def _ours(module):
    return module is not None and module.split(".")[0] in ("keras_llama", "keras")


def _alike_parts(model, decode_plan):
    """``model.decode_weight_parts(decode_plan)`` when every block is alike (same variables
    by relative path, shape and dtype; same config; same sublayer classes, dtype policies,
    quantization and LoRA), so one block's program makes every block's part; else None (the
    whole model's weights are made by one program)."""
    parts = getattr(model, "decode_weight_parts", lambda plan: None)(decode_plan)
    if not parts:
        return None

    def describe(block):
        prefix = block.path + "/"
        variables = [(v.path.removeprefix(prefix), tuple(v.shape), str(v.dtype))
                     for v in block.variables]  # fmt: skip
        layers = [(type(x).__qualname__, x.dtype_policy.name, x.quantization_mode,
                   getattr(x, "lora_enabled", False)) for x in keras_compat.sublayers(block)]  # fmt: skip
        return variables, layers, json.dumps(_without_names(block.get_config()), default=repr)

    blocks = [block for block, _ in parts[:-1]]
    if not blocks or any(p[1] is not parts[0][1] for p in parts[:-1]):
        return None
    first = describe(blocks[0])
    return parts if all(describe(block) == first for block in blocks[1:]) else None


def _stop_array(stop_token_ids):
    # int32 [n]; -1 (never generated) when there are none, so the shape is never empty.
    return np.array(stop_token_ids or (-1,), "int32")


def _as_tuples(caches):
    # One pytree structure for the loop carry: a tuple of (key, value) tuples.
    return tuple(tuple(kv) for kv in caches)


def _no_grad():
    if keras.config.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()
