"""Masked softmax attention for training and scoring (`attention.cc`), differentiable.

Training and scoring spend about a fifth of their time in attention, which XLA:CPU runs as
many small batched matmuls around full [batch, heads, q, s] score tensors with layout copies
between them. The native kernels compute it a block of query rows at a time with the scores
in a thread-local buffer (flash-attention style: the forward pass keeps one log-sum-exp per
row, the backward pass recomputes the probabilities), reading grouped-query operands in their
own layout: about 3x faster than XLA for forward + backward at the SmolLM2-135M training
shape, and no score tensors in memory.

Needs ``library("attention").ensure_built()`` before `attention` is traced.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from keras_llama.kernels.library import require_loaded

FFI_NAMES = {
    "forward": "keras_llama_attention_forward",
    "backward": "keras_llama_attention_backward",
}
# The backward pass: 0 lets the kernel choose (one pass per (batch, key/value head) when there
# are at least 4 per thread, else two finer-grained passes); 1 or 2 force one.
BACKWARD_PASSES = (0, 1, 2)


def supported(query, key, value):
    """Whether `attention` takes these operands: float32, head size a multiple of 16, query
    heads a multiple of key/value heads, at least one key."""
    if not (query.ndim == key.ndim == value.ndim == 4):
        return False
    if any(x.dtype != jnp.float32 for x in (query, key, value)):
        return False
    head_dim, heads, kv_heads = query.shape[3], query.shape[2], key.shape[2]
    return (
        head_dim % 16 == 0
        and kv_heads > 0
        and heads % kv_heads == 0
        and key.shape[1] > 0
        and key.shape == value.shape
    )


def attention(query, key, value, mask, scale, backward_passes=0):
    """Masked softmax attention, differentiable (float32; see `supported`).

    ``softmax(where(mask, scale * q.k, -inf)) @ v`` for ``query`` [B, T, U, H] over ``key`` and
    ``value`` [B, S, V, H] (query head u reads key/value head u // (U // V)), ``mask`` bool
    [B, T, S] (broadcastable). A row whose mask is all False attends to every key uniformly
    and passes no gradient to its scores (as a very negative masking constant does).
    ``backward_passes`` picks the backward scheme: 0 lets the kernel choose, 1 or 2 force one
    (same results). Returns [B, T, U, H] float32.
    """
    return _default()(query, key, value, mask, scale, backward_passes)


def forward(query, key, value, mask, scale):
    """The forward kernel: ``(output [B, T, U, H], log-sum-exp [B, U, T])``."""
    require_loaded("attention")
    b, t, u, _ = query.shape
    out = (
        jax.ShapeDtypeStruct(query.shape, jnp.float32),
        jax.ShapeDtypeStruct((b, u, t), jnp.float32),
    )
    call = jax.ffi.ffi_call(FFI_NAMES["forward"], out, vmap_method="sequential")
    return call(query, key, value, mask, scale=np.float32(scale))


def backward(query, key, value, mask, output, lse, grad, scale, backward_passes):
    """The backward kernel: the gradients of ``query``, ``key`` and ``value``."""
    require_loaded("attention")
    out = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (query, key, value))
    call = jax.ffi.ffi_call(FFI_NAMES["backward"], out, vmap_method="sequential")
    passes = np.int32(backward_passes)
    return call(query, key, value, mask, output, lse, grad, scale=np.float32(scale), passes=passes)


def make_attention(forward=forward, backward=backward):
    """`attention` with its custom VJP made of these ``forward`` and ``backward`` functions
    (same signatures as this module's): tests build a copy with a wrong half planted in."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
    def attend(query, key, value, mask, scale, backward_passes):
        return forward(query, key, value, mask, scale)[0]

    def attend_forward(query, key, value, mask, scale, backward_passes):
        output, lse = forward(query, key, value, mask, scale)
        return output, (query, key, value, mask, output, lse)

    def attend_backward(scale, backward_passes, residuals, grad):
        grads = backward(*residuals, grad, scale, backward_passes)
        return (*grads, None)

    attend.defvjp(attend_forward, attend_backward)

    def op(query, key, value, mask, scale, backward_passes=0):
        if backward_passes not in BACKWARD_PASSES:
            raise ValueError(
                f"`backward_passes` must be one of {BACKWARD_PASSES}. "
                f"Received: backward_passes={backward_passes!r}"
            )
        b, t = query.shape[0], query.shape[1]
        mask = jnp.broadcast_to(jnp.asarray(mask, bool), (b, t, key.shape[1]))
        return attend(query, key, value, mask, float(scale), int(backward_passes))

    return op


@functools.cache
def _default():
    return make_attention()


def decode_attention(query, keys, values, mask, scale):
    """Decoding attention in the caches' own layout (`decode_attention.cc`): ``query`` [N, G,
    H] (N = batch * key/value heads, G query heads per key/value head, H a multiple of 16, G
    at most 16), ``keys`` [R, H, S], ``values`` [R, S, H] (R >= N: caches may hold more rows
    than the queries, whose rows are the first N; float32, or both float16), ``mask`` bool [B,
    S] (N a multiple of B) -> ``softmax(where(mask, scale * q.k, -1e30)) @ v`` [N, G, H]
    float32, computed in float32, reading only the unmasked positions. Not differentiable
    (decoding)."""
    require_loaded("attention")
    dtypes = {jnp.dtype(keys.dtype), jnp.dtype(values.dtype)}
    if dtypes not in ({jnp.dtype("float32")}, {jnp.dtype("float16")}):
        raise ValueError(
            "The caches must both be float32 or both float16. "
            f"Received: keys.dtype={keys.dtype}, values.dtype={values.dtype}"
        )
    name = "keras_llama_decode_attention" + ("_f16" if keys.dtype == jnp.float16 else "")
    out = jax.ShapeDtypeStruct(query.shape, jnp.float32)
    return jax.ffi.ffi_call(name, out)(
        query, keys, values, jnp.asarray(mask, jnp.bool_), scale=np.float32(scale)
    )
