"""Per-row sampling: every row of a batch with its own temperature, top-k, top-p, min-p,
penalties and seed (`RowSettings`), as the slot engine of `keras_llama.serving` needs.

`Sampler` subclasses pick tokens with one setting for the whole batch; `RowSampler` reads its
settings from arrays of shape [b], so that requests with different settings share one compiled
step and no setting change recompiles it. Written once, in backend ops, for any batch::

    logits ─penalties─> ─/temperature─> ─top-k, top-p, min-p filter─> ─Gumbel-max─> token
                        (temperature 0: argmax of the penalized logits)

The random draw is a counter-based hash of ``(seed, step, token id)``: a row's tokens depend
only on its own seed and step, never on which other rows share the batch, so a seeded request
gives the same output alone or batched.
"""

from typing import Any, NamedTuple

import numpy as np
from keras import ops

# Any value above the largest top_logprobs a request may ask for (OpenAI's limit is 20).
MAX_TOP_LOGPROBS = 20


class RowSettings(NamedTuple):
    """Sampling settings per row (each [b]); `RowSettings.make` builds them on the host."""

    temperature: Any  # float32: 0 = greedy
    top_k: Any  # int32: 0 = no top-k filter
    top_p: Any  # float32: 1 = no nucleus filter
    min_p: Any  # float32: 0 = no min-p filter
    presence_penalty: Any  # float32: subtracted once from each token already generated
    frequency_penalty: Any  # float32: subtracted once per time a token was generated
    seed: Any  # int32: the row's random stream

    @classmethod
    def make(cls, rows):
        """Settings from a list of dicts (missing keys take the neutral value), as numpy."""
        defaults = cls.neutral()
        columns = {
            name: np.array([row.get(name, default) for row in rows], _dtype(name))
            for name, default in defaults.items()
        }
        return cls(**columns)

    @staticmethod
    def neutral():
        return dict(
            temperature=0.0,
            top_k=0,
            top_p=1.0,
            min_p=0.0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            seed=0,
        )


def _dtype(name):
    return "int32" if name in ("top_k", "seed") else "float32"


class RowSampler:
    """Picks one token per row from logits [b, V] with per-row `RowSettings`."""

    def next_tokens(self, logits, counts, settings, steps):
        """Token ids int32 [b].

        Args:
            logits: float32 [b, V], the model's next-token logits.
            counts: int32 [b, V], how often each token was generated so far (penalties).
            settings: a `RowSettings` of [b] arrays.
            steps: int32 [b], the index of the token being picked (the random counter).
        """
        logits = ops.cast(logits, "float32")
        # Each part runs only when some row needs it (`ops.cond`: one branch executes), so an
        # all-greedy batch costs an argmax, not a sort of the vocabulary.
        penalized = ops.any(settings.presence_penalty != 0) | ops.any(
            settings.frequency_penalty != 0
        )
        logits = ops.cond(
            penalized,
            lambda: apply_penalties(
                logits, counts, settings.presence_penalty, settings.frequency_penalty
            ),
            lambda: logits,
        )
        greedy = ops.cast(ops.argmax(logits, axis=-1), "int32")
        sampling = settings.temperature > 0
        filtering = sampling & ((settings.top_k > 0) | (settings.top_p < 1) | (settings.min_p > 0))

        def sample():
            scaled = logits / ops.maximum(settings.temperature, 1e-6)[:, None]
            scaled = ops.cond(
                ops.any(filtering),
                lambda: filter_logits(scaled, settings.top_k, settings.top_p, settings.min_p),
                lambda: scaled,
            )
            noise = gumbel_noise(settings.seed, steps, ops.shape(logits)[-1])
            return ops.cast(ops.argmax(scaled + noise, axis=-1), "int32")

        sampled = ops.cond(ops.any(sampling), sample, lambda: greedy)
        return ops.where(sampling, sampled, greedy)


def apply_penalties(logits, counts, presence, frequency):
    """OpenAI's penalties: ``logits - frequency * count - presence * (count > 0)``."""
    logits, counts = ops.convert_to_tensor(logits), ops.cast(counts, "float32")
    seen = ops.cast(counts > 0, "float32")
    presence, frequency = ops.convert_to_tensor(presence), ops.convert_to_tensor(frequency)
    return logits - frequency[:, None] * counts - presence[:, None] * seen


def filter_logits(logits, top_k, top_p, min_p):
    """``logits`` [b, V] with the tokens outside each row's top-k, top-p (nucleus) and min-p
    sets at -inf. The most likely token always stays; ties at the threshold all stay."""
    vocabulary = ops.shape(logits)[-1]
    top_k, top_p, min_p = (ops.convert_to_tensor(x) for x in (top_k, top_p, min_p))
    ordered = ops.flip(ops.sort(logits, axis=-1), axis=-1)  # [b, V], descending
    probabilities = ops.softmax(ordered, axis=-1)
    rank = ops.arange(vocabulary)[None, :]
    keep = (top_k[:, None] <= 0) | (rank < top_k[:, None])
    mass_before = ops.cumsum(probabilities, axis=-1) - probabilities
    keep = keep & (mass_before < top_p[:, None])
    keep = keep & (probabilities >= min_p[:, None] * probabilities[:, :1])
    keep = keep | (rank == 0)
    threshold = ops.min(ops.where(keep, ordered, np.inf), axis=-1)  # [b]
    return ops.where(logits >= threshold[:, None], logits, -np.inf)


def token_logprobs(logits, tokens, k=MAX_TOP_LOGPROBS):
    """Log-probabilities of the model's distribution (before sampling settings):
    ``(chosen [b], top_ids [b, k], top_logprobs [b, k])``, the top list in descending order."""
    logprobs = ops.log_softmax(ops.cast(logits, "float32"), axis=-1)
    chosen = ops.take_along_axis(logprobs, ops.cast(tokens, "int32")[:, None], axis=-1)[:, 0]
    top_values, top_ids = ops.top_k(logprobs, k)
    return chosen, ops.cast(top_ids, "int32"), top_values


# --- the random stream -----------------------------------------------------------------------
def _u32(x):
    # A uint32 constant as the int32 with the same bits (int32 products wrap around).
    return x - (1 << 32) if x >= 1 << 31 else x


def _shift_right(x, bits):
    # Logical right shift of int32 bits (ops.right_shift is arithmetic on signed ints).
    return ops.bitwise_and(ops.right_shift(x, bits), (1 << (32 - bits)) - 1)


def uniform_noise(seed, steps, vocabulary):
    """float32 [b, V] in (0, 1): a hash of ``(seed [b], steps [b], token id)`` (murmur3's
    finalizer over int32 bits), the same on every backend and for every batch layout."""
    ids = ops.arange(vocabulary, dtype="int32")[None, :]
    x = (
        ops.cast(seed, "int32")[:, None] * _u32(0x9E3779B1)
        + ops.cast(steps, "int32")[:, None] * _u32(0x85EBCA77)
        + ids * _u32(0xC2B2AE3D)
    )
    x = ops.bitwise_xor(x, _shift_right(x, 16)) * _u32(0x85EBCA6B)
    x = ops.bitwise_xor(x, _shift_right(x, 13)) * _u32(0xC2B2AE35)
    x = ops.bitwise_xor(x, _shift_right(x, 16))
    bits = ops.cast(_shift_right(x, 8), "float32")  # 24 random bits
    return (bits + 0.5) / float(1 << 24)


def gumbel_noise(seed, steps, vocabulary):
    """Gumbel(0, 1) noise [b, V]: ``argmax(logits + noise)`` samples ``softmax(logits)``."""
    return -ops.log(-ops.log(uniform_noise(seed, steps, vocabulary)))
