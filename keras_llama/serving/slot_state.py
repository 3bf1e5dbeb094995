"""The slot engine's device state (`SlotState`) and the traced helpers of its decode step:
running only the leading rows of the batch, token counts, logprobs."""

from typing import Any, NamedTuple

from keras import ops

from keras_llama.samplers.row_sampler import MAX_TOP_LOGPROBS, token_logprobs


class SlotState(NamedTuple):
    """Device state of the batch of rows. ``B`` rows, ``S`` cache slots, ``V`` vocabulary."""

    caches: Any  # tuple over layers of (keys [B * kv, h, S], values [B * kv, S, h])
    cache_mask: Any  # bool [B, S]: the slots that hold a token of the row's request
    positions: Any  # int32 [B]: rotary position of each row's next token (its length so far)
    tokens: Any  # int32 [B]: the token each row feeds at the next step (its last pick)
    counts: Any  # int32 [B, V]: how often each token was generated (penalties)
    steps: Any  # int32 [B]: tokens generated so far (the random stream's counter)


def row_buckets(batch_size):
    """The numbers of leading rows a decode step may run: powers of two up to a quarter of the
    batch, and the whole batch."""
    return sorted({2**i for i in range(batch_size.bit_length()) if 4 * 2**i <= batch_size}
                  | {batch_size})  # fmt: skip


def head_rows(state, rows):
    """The first ``rows`` rows of the state, but the whole caches: a step over the leading
    rows reads and writes their cache rows in place (the decode attention takes caches with
    more rows than queries; cache rows are [row * kv + head]), so no cache is copied."""
    return state._replace(**{name: getattr(state, name)[:rows] for name in SlotState._fields[1:]})


def put_head_rows(full, head):
    """``full`` with its first rows from ``head`` (and ``head``'s caches, already whole)."""
    from jax import lax

    fields = {
        name: lax.dynamic_update_slice_in_dim(getattr(full, name), getattr(head, name), 0, axis=0)
        for name in SlotState._fields[1:]
    }
    return full._replace(caches=head.caches, **fields)


def one_hot(tokens, vocabulary_size):
    return ops.cast(ops.arange(vocabulary_size)[None, :] == tokens[:, None], "int32")


def logprobs_of(logits, tokens):
    """``(chosen [b], top_ids [b, k], top_logprobs [b, k])`` (see `token_logprobs`)."""
    return token_logprobs(logits, tokens, min(MAX_TOP_LOGPROBS, logits.shape[-1]))


def no_logprobs(logits):
    """Zeros shaped as `logprobs_of`'s result, for steps where no request asked for them."""
    b, k = logits.shape[0], min(MAX_TOP_LOGPROBS, logits.shape[-1])
    return ops.zeros((b,), "float32"), ops.zeros((b, k), "int32"), ops.zeros((b, k), "float32")
