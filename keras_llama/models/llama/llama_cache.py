"""The key/value cache layouts, and the conversions between them (written once).

Per layer, the cache is a ``(keys, values)`` pair, heads-major with the batch folded in:

    keys   [b * v, h, s]   (transposed: the decoding score matmul reads them in this order)
    values [b * v, s, h]

These are the layouts decoding attention reads (`SingleQueryAttention`), with no size-1 axis
for XLA to drop: XLA never copies a cache into another layout per decoding step, and never
duplicates the in-place update for a reshaped reader (at batch 1 that copied every cache twice
per step: 2.3 ms of 19). Projections and multi-token attention use [b, s, v, h]; KerasHub's
``call_with_cache`` takes one [b, num_layers, 2, s, v, h] array.
"""

from keras import ops


def to_cache_layout(x, keys, dtype=None):
    """[b, s, v, h] -> keys [b * v, h, s] or values [b * v, s, h]."""
    b, _, v, h = x.shape
    b = ops.shape(x)[0] if b is None else b
    x = ops.transpose(
        x if dtype is None else ops.cast(x, dtype), (0, 2, 3, 1) if keys else (0, 2, 1, 3)
    )
    return ops.reshape(x, (b * v, h, -1) if keys else (b * v, -1, h))


def from_cache_layout(x, keys, num_key_value_heads):
    """keys [b * v, h, s] or values [b * v, s, h] -> [b, s, v, h]."""
    rows, d1, d2 = x.shape
    v = num_key_value_heads
    b = (ops.shape(x)[0] if rows is None else rows) // v
    x = ops.reshape(x, (b, v, d1, d2))
    return ops.transpose(x, (0, 3, 1, 2) if keys else (0, 2, 1, 3))


def update(cache, key, value, start):
    """Writes ``key`` and ``value`` [b, q, v, h] into ``cache`` at slot ``start``."""
    key_cache, value_cache = cache
    key_cache = ops.slice_update(
        key_cache, (0, 0, start), to_cache_layout(key, True, key_cache.dtype)
    )
    value_cache = ops.slice_update(
        value_cache, (0, start, 0), to_cache_layout(value, False, value_cache.dtype)
    )
    return key_cache, value_cache


def zeros(batch_size, num_layers, num_key_value_heads, head_dim, max_length, dtype):
    """All-zeros caches, one ``(keys, values)`` pair per layer."""
    rows = batch_size * num_key_value_heads
    return [
        (
            ops.zeros((rows, head_dim, max_length), dtype),
            ops.zeros((rows, max_length, head_dim), dtype),
        )
        for _ in range(num_layers)
    ]


def from_stacked(cache):
    """KerasHub's cache [b, num_layers, 2, s, v, h] -> a list of per-layer caches."""
    return [
        (to_cache_layout(cache[:, i, 0], True), to_cache_layout(cache[:, i, 1], False))
        for i in range(cache.shape[1])
    ]


def to_stacked(layer_caches, num_key_value_heads):
    """A list of per-layer caches -> KerasHub's cache [b, num_layers, 2, s, v, h]."""
    v = num_key_value_heads
    pairs = [
        ops.stack([from_cache_layout(k, True, v), from_cache_layout(x, False, v)], axis=1)
        for k, x in layer_caches
    ]
    return ops.stack(pairs, axis=1)
