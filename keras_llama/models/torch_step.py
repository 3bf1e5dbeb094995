"""The per-token decode step compiled on the torch backend (`CompiledStep`).

On torch, Keras runs every layer eagerly: a decode step of SmolLM2-135M is thousands of
Python-dispatched ops. ``torch.compile`` straight on a step that calls Keras layers breaks its
graph at Keras's own Python (dtype bookkeeping, name scopes, ``setattr`` hooks: dozens of
breaks and a recompile per call, measured on a 2-layer model). So the step is compiled in two
moves, once per shape:

1. **trace**: `make_fx` runs the step once (the plan's routes, the Keras layers, the rotary and
   cache code: the one model implementation) and records only the ATen ops it dispatches, as an
   FX graph. Variable values are graph *inputs* (a `keras.StatelessScope` maps them onto the
   variables while tracing), never constants, so a changed weight is read by the next call.
2. **compile**: ``torch.compile(graph, dynamic=False)`` (Inductor: fused C++/OpenMP kernels on
   CPU around the library matmuls; on CUDA, ``mode="reduce-overhead"`` also captures the step in
   a CUDA graph). Dynamo has nothing left to break on: the graph is plain ATen calls.

Shapes are static: the engine buckets prompt widths and cache lengths
(`generation_engine.bucket_length`), so a new shape (and a compilation) comes only with a new
batch size or length bucket. Inductor keeps its compiled kernels on disk (its FX graph cache),
so a later process compiling the same shapes mostly reads them back.
"""

import os
import shutil
import threading

import keras

from keras_llama.models.llama import llama_cache

# ``KERAS_LLAMA_TORCH_COMPILE=0`` keeps the eager step (the plan says so).
COMPILE_ENV = "KERAS_LLAMA_TORCH_COMPILE"
# FX tracing sets a process-wide flag under which a compiled function refuses to run, and Dynamo
# compiles are not thread-safe: concurrent generate() calls trace, compile and run their steps
# one at a time (a decode step already uses every core).
_LOCK = threading.Lock()


def unavailable_reason(respect_opt_out=True):
    """None when the decode step can be compiled here, else why not (a short phrase).
    ``respect_opt_out=False`` ignores ``KERAS_LLAMA_TORCH_COMPILE=0`` (a plan chosen by the
    caller, e.g. in `llama_plan.alternatives`, may still compile)."""
    value = os.environ.get(COMPILE_ENV, "1")
    if respect_opt_out and value.lower() in ("0", "false", "no", "off"):
        return f"disabled by {COMPILE_ENV}={value}"
    import torch

    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    if _device() == "cpu" and not _cpp_compiler():
        return "no C++ compiler for Inductor's CPU kernels ($CXX, c++, g++ or clang++)"
    return None


def _cpp_compiler():
    names = [os.environ.get("CXX"), "c++", "g++", "clang++"]
    return next((shutil.which(n) for n in names if n and shutil.which(n)), None)


def _device():
    # Where Keras puts new tensors ("cpu" or "cuda"): the device the step runs on.
    return keras.ops.convert_to_tensor(0).device.type


class CompiledStep:
    """``step_fn(token_ids, caches, slot, cache_mask, positions)`` (see
    `keras_llama.samplers.sampler.feed`) traced and compiled once per input shape.

    Args:
        variables: the model's variables, in the order of the ``values`` given to `bind`.
        make_step: a function returning the eager step (the engine's ``make_step(None)``).
    """

    def __init__(self, variables, make_step):
        self.variables = variables
        self.make_step = make_step
        self._compiled = {}  # input shapes -> compiled graph

    def bind(self, values):
        """The step for these variable values: the decode loop's ``step_fn``."""

        def step(token_ids, caches, slot, cache_mask, positions):
            args = (values, token_ids, caches, slot, cache_mask, positions)
            key = _shapes(args)
            with _LOCK:
                if key not in self._compiled:
                    self._compiled[key] = self._trace_and_compile(args)
                return self._compiled[key](*args)  # the first call compiles

        return step

    def _trace_and_compile(self, args):
        import torch
        from torch.fx.experimental.proxy_tensor import make_fx

        variables, make_step = self.variables, self.make_step

        def traced(values, token_ids, caches, slot, cache_mask, positions):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return make_step()(token_ids, caches, slot, cache_mask, positions)

        graph = make_fx(traced)(*args)
        options = {
            # The graph is compiled for one key of `_shapes` (every input's shape, dtype and
            # strides), checked before each call: Dynamo's own guards, one per input tensor,
            # would check the same again (1 ms a step at SmolLM2-135M's 273 inputs).
            "guard_filter_fn": torch.compiler.skip_all_guards_unsafe,
        }
        if _device() == "cuda":
            options["triton.cudagraphs"] = True  # what mode="reduce-overhead" sets
        return torch.compile(graph, dynamic=False, fullgraph=True, options=options)

    @property
    def num_compiled(self):
        """How many shapes have been compiled."""
        return len(self._compiled)


def write_cache_in_place(cache, key, value, start):
    """`llama_cache.update` writing into the cache tensors themselves (``index_copy_`` at
    slots ``start + arange(q)``): the compiled step's static cache, no copy of it per token.
    Only the decode plan with ``step: torch_compile`` routes blocks here; its engine owns the
    caches it passes (fresh from each prefill)."""
    import torch

    key_cache, value_cache = cache
    q = key.shape[1]
    slots = torch.arange(q, device=key_cache.device) + torch.as_tensor(start).to(torch.int64)
    key_cache.index_copy_(2, slots, llama_cache.to_cache_layout(key, True, key_cache.dtype))
    value_cache.index_copy_(1, slots, llama_cache.to_cache_layout(value, False, value_cache.dtype))
    return key_cache, value_cache


def _shapes(tree):
    # Every tensor's shape, strides and dtype, in order (the step's inputs are flat tensors and tuples).
    if isinstance(tree, (list, tuple)):
        return tuple(_shapes(x) for x in tree)
    return (tuple(tree.shape), tuple(tree.stride()), tree.dtype)
