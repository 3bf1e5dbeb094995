"""THE decode loop, its documented state, and the `Sampler` base class.

Generation is a chain of stages (``keras_llama/models/generation.py``)::

    preprocess ─> prefill ─> DecodeState ─> run_decode_loop(sampler.step) ─> finalize ─> postprocess

The prefill runs the prompt through the model once and fills the key/value cache; the loop then
feeds one token per step. A sampler decides only how the next token is picked
(`Sampler.get_next_token`); beam and contrastive search override `Sampler.step` (and
`init_state`/`finalize`) but run inside the same loop. On JAX the loop is a ``lax.while_loop``
inside the caller's ``jax.jit`` (no Python per token); on other backends it is a Python loop
around the same ``step``. Streaming calls the same loop with a stop index a few steps ahead.
"""

from typing import Any, NamedTuple

import keras
from keras import ops, random

# Token written for a row once it has stopped (its padding mask is False there).
PAD_TOKEN = 0


class DecodeState(NamedTuple):
    """The loop state. ``r`` = rows (the batch, times the beams of beam search), ``S`` = cache
    length, ``P`` = prompt width (left-padded), ``N`` = width of the token buffer (``S - P``),
    ``V`` = vocabulary, ``m`` = hidden dim. Fields are backend tensors.

    The prompt of row ``i`` occupies cache slots ``[P - length_i, P)`` (left padding before it);
    generated token ``t`` is fed to the model at slot ``P + t``.
    """

    logits: Any  # float32 [r, V]: logits of the next token (from the prefill or the last step)
    hidden: Any  # [r, m]: final hidden state of the last token fed to the model
    caches: Any  # tuple over layers of (keys, values), each [r * k, ...] with k entries per row:
    # LlamaCausalLM's keys [r * kv_heads, head_dim, S] and values [r * kv_heads, S, head_dim]
    # (`keras_llama.models.llama.llama_cache`); see `repeat_rows` and `take_rows`
    cache_mask: Any  # bool [r, S]: False for the left-padding slots of the prompt
    offsets: Any  # int32 [r]: left padding of each row; rotary position = slot - offset
    tokens: Any  # int32 [r, N]: generated tokens; PAD_TOKEN once a row has stopped
    num_generated: Any  # int32 [r]: tokens generated per row, its stop token included
    done: Any  # bool [r]: the row emitted a stop token or reached its length limit
    limits: Any  # int32 [r]: the most tokens a row may generate (max_length - its prompt)
    index: Any  # int32 []: steps taken so far
    extra: Any = ()  # sampler-specific state (see BeamSampler, ContrastiveSampler)


def prompt_width(state):
    """``P``: the cache slot of generated token 0 (static: cache length minus buffer width)."""
    return state.cache_mask.shape[1] - state.tokens.shape[1]


def feed(state, token, step_fn, rows=None):
    """Runs the model on ``token`` [r] at the current step's cache slot.

    ``step_fn(token_ids [r, 1], caches, slot [], cache_mask [r, S], positions [r, 1])`` returns
    ``(logits [r, V] float32, hidden [r, m], caches)``. ``rows`` optionally replaces the
    state's caches, cache mask and offsets (contrastive search feeds candidate copies).
    """
    caches, cache_mask, offsets = rows or (state.caches, state.cache_mask, state.offsets)
    slot = prompt_width(state) + state.index
    positions = ops.expand_dims(slot - offsets, 1)
    return step_fn(ops.expand_dims(token, 1), caches, slot, cache_mask, positions)


def repeat_rows(x, times, num_rows):
    """Repeats each of the ``num_rows`` rows of ``x`` ``times`` times along axis 0. Caches may
    hold ``k`` entries per row ([num_rows * k, ...]): those repeat as blocks of ``k``."""
    k = x.shape[0] // num_rows
    if k == 1:
        return ops.repeat(x, times, axis=0)
    blocks = ops.reshape(x, (num_rows, k, *x.shape[1:]))
    return ops.reshape(ops.repeat(blocks, times, axis=0), (-1, *x.shape[1:]))


def take_rows(x, rows, num_rows):
    """The rows ``rows`` [n] of ``x`` (``num_rows`` rows along axis 0, each ``k`` entries
    long for caches [num_rows * k, ...])."""
    k = x.shape[0] // num_rows
    if k == 1:
        return ops.take(x, rows, axis=0)
    blocks = ops.reshape(x, (num_rows, k, *x.shape[1:]))
    return ops.reshape(ops.take(blocks, rows, axis=0), (-1, *x.shape[1:]))


def advance(state, token, stop_token_ids, **updates):
    """Writes ``token`` [r] at the current step, updates ``done``, and moves to the next step.

    ``stop_token_ids`` is int32 [n] (``[-1]`` when generation only stops at the length limit).
    ``updates`` replace other fields (the new ``logits``, ``hidden``, ``caches``...).
    """
    token = ops.where(state.done, PAD_TOKEN, ops.cast(token, "int32"))
    tokens = ops.slice_update(state.tokens, (0, state.index), ops.expand_dims(token, 1))
    num_generated = state.num_generated + ops.cast(ops.logical_not(state.done), "int32")
    stopped = ops.any(ops.equal(token[:, None], stop_token_ids[None, :]), axis=-1)
    done = state.done | stopped | (num_generated >= state.limits)
    return state._replace(
        tokens=tokens, num_generated=num_generated, done=done, index=state.index + 1, **updates
    )


def run_decode_loop(sampler, step_fn, state, stop_at, stop_token_ids, scope_mapping=(), seeds=None):
    """Runs ``sampler.step`` until every row is done or ``state.index == stop_at``.

    Args:
        sampler: a `Sampler`.
        step_fn: the model step (see `feed`).
        state: a `DecodeState`.
        stop_at: int (scalar tensor under ``jit``), the step index to stop at.
        stop_token_ids: int32 [n].
        scope_mapping: on JAX, ``(variable, value)`` pairs of the model's variables; together
            with the sampler's seeds they are mapped into a `keras.StatelessScope` so that the
            traced loop reads values passed in as arguments, never weights baked in as constants.
        seeds: on JAX, the values of ``sampler.variables`` (passed into ``jit`` as arguments;
            read from the variables when None).

    Returns:
        ``(state, seeds)``: the final state and the sampler's new seed-generator states (on
        JAX; elsewhere the seed generators update themselves and ``seeds`` is empty).
    """
    if keras.config.backend() != "jax":
        while int(state.index) < int(stop_at) and not bool(ops.all(state.done)):
            state = sampler.step(state, step_fn, stop_token_ids)
        return state, ()

    from jax import lax

    seed_variables = sampler.variables

    def cond(carry):
        state, _ = carry
        return ops.logical_and(state.index < stop_at, ops.logical_not(ops.all(state.done)))

    def body(carry):
        state, seeds = carry
        mapping = list(scope_mapping) + list(zip(seed_variables, seeds))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            state = sampler.step(state, step_fn, stop_token_ids)
        new_seeds = [scope.get_current_value(v) for v in seed_variables]
        seeds = [s if new is None else new for s, new in zip(seeds, new_seeds)]
        return state, seeds

    if seeds is None:
        seeds = [ops.convert_to_tensor(v.value) for v in seed_variables]
    return lax.while_loop(cond, body, (state, list(seeds)))


def _check_temperature(temperature):
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(
            f"`temperature` must be a positive number. Received: temperature={temperature!r}"
        )
    if not temperature > 0:
        raise ValueError(
            f"`temperature` must be a positive number. Received: temperature={temperature}"
        )


def _check_seed(seed):
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"`seed` must be an integer or None. Received: seed={seed!r}")


@keras.saving.register_keras_serializable(package="keras_llama")
class Sampler:
    """Base class of samplers: how `CausalLM.generate()` picks each next token.

    A subclass overrides `get_next_token`, which maps next-token probabilities ``[batch, vocab]``
    to token ids ``[batch]``; the decode loop, caching and stopping are shared. Samplers that
    track several hypotheses per row (beam, contrastive) override `step` instead.

    Args:
        temperature: float > 0. Logits are divided by it before the softmax: below 1 sharpens
            the distribution, above 1 flattens it.

    Example:
        ```python
        class NoTokenZero(keras_llama.samplers.Sampler):
            def get_next_token(self, probabilities):
                return keras.ops.argmax(probabilities[:, 1:], axis=-1) + 1
        causal_lm.compile(sampler=NoTokenZero())
        ```
    """

    def __init__(self, temperature=1.0):
        _check_temperature(temperature)
        self.temperature = temperature
        self._seed_generators = []

    def __setattr__(self, name, value):
        # Seed generators are tracked so that the compiled loop can thread their state.
        if isinstance(value, random.SeedGenerator):
            self.__dict__.setdefault("_seed_generators", []).append(value)
        super().__setattr__(name, value)

    @property
    def variables(self):
        """The states of the sampler's seed generators (updated after each generation)."""
        return [generator.state for generator in self._seed_generators]

    # --- the parts a subclass overrides -------------------------------------------------------
    def compute_probabilities(self, logits):
        """``softmax(logits / temperature)`` in float32. ``logits``: [batch, vocab]."""
        logits = ops.cast(logits, "float32")
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return ops.softmax(logits, axis=-1)

    def get_next_token(self, probabilities):
        """Picks the next token ids [batch] from probabilities [batch, vocab]."""
        raise NotImplementedError(f"{type(self).__name__} must implement `get_next_token()`.")

    def init_state(self, state, prompt_hidden):
        """The state the loop starts from, given the prefill's state and its hidden states
        ``prompt_hidden`` [batch, P, m]. Samplers that expand rows (beams) override it."""
        return state

    def step(self, state, step_fn, stop_token_ids):
        """One decode step: pick a token from ``state.logits``, feed it, write it."""
        probabilities = self.compute_probabilities(state.logits)
        token = ops.cast(self.get_next_token(probabilities), "int32")
        logits, hidden, caches = feed(state, token, step_fn)
        return advance(state, token, stop_token_ids, logits=logits, hidden=hidden, caches=caches)

    def finalize(self, state):
        """The result: ``{"tokens": [batch, N], "num_generated": [batch]}`` (numpy)."""
        return {
            "tokens": ops.convert_to_numpy(state.tokens),
            "num_generated": ops.convert_to_numpy(state.num_generated),
        }

    # --- serialization ------------------------------------------------------------------------
    def get_config(self):
        return {"temperature": self.temperature}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"
