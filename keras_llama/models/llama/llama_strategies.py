"""The strategies a Llama block runs with: how its projections multiply, how it attends.

`LlamaTransformerDecoder` and `LlamaAttention` are written once; what varies between ways of
running them is a `BlockRoute` (one per block), made from a stage's plan by
`keras_llama.models.llama.llama_plan.block_routes`:

* ``projections``: `LayerProjections` (the Keras layers: every dtype policy, quantization mode
  and LoRA) or `MatrixProjections` (products with [K, N] matrices made from the layers'
  kernels: plain float matrices for training or fused decoding, packed weights for the native
  decode op);
* ``attention``: `EinsumAttention`, `DotProductAttention`, `NativeAttention` (keys and values
  [b, s, v, h]) or `SingleQueryAttention` (one query per row, reading the caches in their own
  layout, see `keras_llama.models.llama.llama_cache`).

Einsum letters: b batch, q queries, s keys, m hidden, u query heads, v key/value heads,
g query heads per key/value head, h head_dim, f intermediate.
"""

import dataclasses
import math

import keras
from keras import ops

from keras_llama.kernels import attention as native_attention
from keras_llama.models.llama import llama_cache

# Masked scores: a large negative number rather than -inf, so a row with no visible key
# softmaxes to uniform weights instead of NaN.
_MASKED = -1e30


# --- projections -------------------------------------------------------------------------------
class LayerProjections:
    """Each projection through its own Keras layer (quantized and LoRA layers included)."""

    def query_key_value(self, attention, x):
        # x [b, q, m] -> [b, q, u, h], [b, q, v, h], [b, q, v, h]
        return attention._query_dense(x), attention._key_dense(x), attention._value_dense(x)

    def attention_output(self, attention, attended):
        # attended [b, q, u, h] -> [b, q, m]
        return attention._output_dense(attended)

    def gated(self, block, x):
        # x [b, q, m] -> [b, q, f]; the gate layer applies the block's activation itself.
        return block._feedforward_gate_dense(x) * block._feedforward_intermediate_dense(x)

    def down(self, block, x):
        # x [b, q, f] -> [b, q, m]
        return block._feedforward_output_dense(x)


class MatrixProjections:
    """Projections as ``matmul(x, w)`` with one block's matrices ``weights``.

    ``weights`` holds ``"qkv"`` (query, key and value kernels concatenated, [m, (u + 2v) * h])
    or ``"query"``, ``"key"`` and ``"value"`` separately; ``"output"`` [u * h, m];
    ``"gate_up"`` ([m, 2f]) or ``"gate"`` and ``"up"``; ``"down"`` [f, m]. ``matmul`` multiplies
    them (`ops.matmul`, the training matmul, or the native decode matmul for packed weights) and
    ``activation(gate, up)`` gates the feed-forward."""

    def __init__(self, weights, matmul, activation):
        self.weights = weights
        self.matmul = matmul
        self.activation = activation

    def query_key_value(self, attention, x):
        b, q = ops.shape(x)[0], ops.shape(x)[1]
        u, v, h = attention.num_query_heads, attention.num_key_value_heads, attention.head_dim
        if "qkv" in self.weights:
            projected = self.matmul(x, self.weights["qkv"])  # [b, q, (u + 2v) * h]
            parts = (
                projected[..., : u * h],
                projected[..., u * h : (u + v) * h],
                projected[..., (u + v) * h :],
            )
        else:
            parts = [self.matmul(x, self.weights[name]) for name in ("query", "key", "value")]
        return tuple(ops.reshape(p, (b, q, n, h)) for p, n in zip(parts, (u, v, v)))

    def attention_output(self, attention, attended):
        b, q = ops.shape(attended)[0], ops.shape(attended)[1]
        return self.matmul(ops.reshape(attended, (b, q, -1)), self.weights["output"])

    def gated(self, block, x):
        if "gate_up" in self.weights:
            gate_up = self.matmul(x, self.weights["gate_up"])  # [b, q, 2f]
            gate = gate_up[..., : block.intermediate_dim]
            up = gate_up[..., block.intermediate_dim :]
        else:
            gate, up = self.matmul(x, self.weights["gate"]), self.matmul(x, self.weights["up"])
        return self.activation(gate, up)

    def down(self, block, x):
        return self.matmul(x, self.weights["down"])


# --- attention ----------------------------------------------------------------------------------
class EinsumAttention:
    """Grouped einsums, keys and values never repeated; dropout on the probabilities. Every
    backend; the reference the others are tested against."""

    reads_caches = False

    def __call__(self, layer, query, key, value, mask, training):
        # query [b, q, u, h] -> [b, q, v, g, h]; key, value [b, s, v, h]; mask [b, q, s].
        b, q = ops.shape(query)[0], ops.shape(query)[1]
        v, g, h = layer.num_key_value_heads, layer.num_key_value_groups, layer.head_dim
        query = ops.reshape(query, (b, q, v, g, h)) * ops.cast(1.0 / math.sqrt(h), query.dtype)
        key, value = ops.cast(key, query.dtype), ops.cast(value, query.dtype)
        scores = ops.cast(ops.einsum("bqvgh,bsvh->bvgqs", query, key), "float32")
        mask = ops.cast(mask, "bool")[:, None, None, :, :]  # [b, 1, 1, q, s]
        probs = ops.softmax(ops.where(mask, scores, _MASKED), axis=-1)
        probs = layer._dropout_layer(ops.cast(probs, query.dtype), training=training)
        attended = ops.einsum("bvgqs,bsvh->bqvgh", probs, value)
        return ops.reshape(attended, (b, q, layer.num_query_heads, h))


class DotProductAttention:
    """`ops.dot_product_attention` on repeated keys and values (JAX, no dropout): inside a
    whole training step XLA:CPU runs its head-batched dots about 2x faster than the grouped
    einsums (SmolLM2-135M fit() step 24 s -> 13 s)."""

    reads_caches = False

    def __call__(self, layer, query, key, value, mask, training):
        groups = layer.num_key_value_groups
        key = ops.repeat(ops.cast(key, query.dtype), groups, axis=2)
        value = ops.repeat(ops.cast(value, query.dtype), groups, axis=2)
        return ops.dot_product_attention(
            query,
            key,
            value,
            mask=ops.cast(mask, "bool")[:, None, :, :],
            scale=1.0 / math.sqrt(layer.head_dim),
        )


class NativeAttention:
    """The native flash-style op (`keras_llama.kernels.attention`; JAX on CPU, float32): a block
    of query rows' scores in a thread-local buffer, keys and values read in place. About 3x
    faster fwd+bwd than XLA's at the SmolLM2-135M training shape, no [b, u, q, s] tensors kept
    for the backward pass."""

    reads_caches = False

    def __init__(self, backward_passes=0):
        self.backward_passes = backward_passes  # 0: the op chooses; 1 or 2 force a scheme

    def __call__(self, layer, query, key, value, mask, training):
        scale = 1.0 / math.sqrt(layer.head_dim)
        return native_attention.attention(
            query, key, value, mask, scale, backward_passes=self.backward_passes
        )


def _grouped_single_query(layer, query):
    """query [b, 1, u, h] -> ``(b, v, h, query [b * v, g, h])``, the layout of the caches'
    rows (g query heads per key/value head); mask [b, 1, s] goes with it."""
    if query.shape[1] != 1:
        raise ValueError(
            f"Single-query attention takes one query per row. Received: {query.shape[1]}"
        )
    b = ops.shape(query)[0]
    v, g, h = layer.num_key_value_heads, layer.num_key_value_groups, layer.head_dim
    return b, v, h, ops.reshape(query, (b * v, g, h))


class SingleQueryAttention:
    """Decoding: one query per row against the caches, keys [b * v, h, s] and values
    [b * v, s, h]. Both products are plain batched matmuls over b * v in the operands' own
    layouts, and the result [b * v, g, h] is already in query-head order: no cache copies, and
    no slow matmul for an awkward output layout (at batch 8 that cost 12 ms a step).

    The caches may hold more rows than the queries (the serving engine decodes its leading
    rows); the first b * v are theirs, sliced out here (a copy; the native op reads them in
    place)."""

    reads_caches = True

    def __call__(self, layer, query, key, value, mask, training):
        b, v, h, query = _grouped_single_query(layer, query)
        if key.shape[0] != query.shape[0]:
            key, value = key[: query.shape[0]], value[: query.shape[0]]
        query = query * ops.cast(1.0 / math.sqrt(h), query.dtype)
        key, value = ops.cast(key, query.dtype), ops.cast(value, query.dtype)
        scores = ops.cast(ops.einsum("ngh,nhs->ngs", query, key), "float32")
        mask = ops.broadcast_to(ops.cast(mask, "bool")[:, None], (b, v, 1, ops.shape(mask)[-1]))
        scores = ops.where(ops.reshape(mask, (b * v, 1, -1)), scores, _MASKED)
        probs = ops.cast(ops.softmax(scores, axis=-1), query.dtype)
        attended = ops.einsum("ngs,nsh->ngh", probs, value)
        return ops.reshape(attended, (b, 1, layer.num_query_heads, h))


class NativeSingleQueryAttention:
    """Decoding in the native op (`keras_llama.kernels.attention.decode_attention`; JAX on
    CPU, float32): the same masked softmax as `SingleQueryAttention`, on the caches in their
    own layout (with more rows than the queries, their first rows), reading only the unmasked
    positions (while a cache fills, step t reads t positions, not the cache's full length)."""

    reads_caches = True

    def __call__(self, layer, query, key, value, mask, training):
        b, _, h, query = _grouped_single_query(layer, query)
        attended = native_attention.decode_attention(
            query,
            key,
            value,
            ops.broadcast_to(ops.cast(mask, "bool")[:, 0], (b, ops.shape(mask)[-1])),
            1.0 / math.sqrt(h),
        )
        return ops.reshape(attended, (b, 1, layer.num_query_heads, h))


ATTENTION = {
    "einsum": EinsumAttention,
    "dot_product": DotProductAttention,
    "native": NativeAttention,
    "single_query": SingleQueryAttention,
    "native_single_query": NativeSingleQueryAttention,
}


@dataclasses.dataclass(frozen=True)
class BlockRoute:
    """How one decoder block runs: its ``projections``, its ``attention``, and how it writes
    a step's keys and values into the cache (``write_cache(cache, key, value, start)``, as
    `llama_cache.update`: a new cache, or the same tensors written in place)."""

    projections: object
    attention: object
    write_cache: object = llama_cache.update


# A block called without a route (building the functional graph, a direct call): the Keras
# layers and the einsum attention, which run on every backend and for every weight kind.
REFERENCE_ROUTE = BlockRoute(LayerProjections(), EinsumAttention())


def gated_activation(block):
    """``activation(gate) * up`` with the block's own activation."""
    activation = block.activation

    def gated(gate, up):
        return activation(gate) * up

    return gated


def is_silu(block):
    return block.activation is keras.activations.silu
