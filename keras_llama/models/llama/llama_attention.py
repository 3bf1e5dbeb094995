"""Grouped-query self-attention with rotary embeddings and an optional key/value cache.

Layer and attribute names follow KerasHub's (they make the ``.weights.h5`` paths). Einsum
letters: b batch, q queries, s keys (cache slots), m hidden, u query heads, v key/value heads,
h head_dim. The output projection is written ``bqah,ahm->bqm``: with the heads letter sorting
before the head-dim letter, XLA contracts the kernel in its stored order instead of copying it
transposed on every call (16-18% of a CPU decode step).
"""

import keras
from keras import ops

from keras_llama.models.block_layers import EinsumDense
from keras_llama.models.llama import llama_cache, llama_strategies
from keras_llama.models.llama.llama_layers import (
    LlamaRotaryEmbedding,
    clone_initializer,
    rope_config,
)
from keras_llama.utils.validation import check_positive_int


def causal_attention_mask(padding_mask, query_length, key_length=None, query_offset=0):
    """Boolean mask ``[batch, q, s]``: key ``s`` is visible to query ``q`` if it is not padding
    and ``s <= q + query_offset``."""
    key_length = query_length if key_length is None else key_length
    q_idx = ops.arange(query_length)[:, None] + query_offset
    k_idx = ops.arange(key_length)[None, :]
    causal = ops.less_equal(k_idx, q_idx)[None, :, :]
    if padding_mask is None:
        return causal
    return ops.logical_and(causal, ops.cast(padding_mask, "bool")[:, None, :])


@keras.saving.register_keras_serializable(package="keras_llama")
class LlamaAttention(keras.layers.Layer):
    """Grouped-query self-attention with rotary embeddings and an optional key/value cache.

    Args:
        num_query_heads: int. Number of query heads.
        num_key_value_heads: int. Number of key/value heads; divides ``num_query_heads``.
        rope_max_wavelength, rope_scaling_factor, rope_frequency_adjustment_factor,
        rope_low_freq_factor, rope_high_freq_factor, rope_pretraining_sequence_length:
            passed to `LlamaRotaryEmbedding`.
        kernel_initializer: initializer of the projection kernels.
        dropout: float. Dropout on the attention probabilities.

    Example:
        ```python
        attention = LlamaAttention(num_query_heads=4, num_key_value_heads=2)
        y = attention(keras.ops.ones((1, 5, 32)))
        ```
    """

    def __init__(
        self,
        num_query_heads,
        num_key_value_heads,
        rope_max_wavelength=10000,
        rope_scaling_factor=1.0,
        rope_frequency_adjustment_factor=None,
        rope_low_freq_factor=None,
        rope_high_freq_factor=None,
        rope_pretraining_sequence_length=None,
        kernel_initializer="glorot_uniform",
        dropout=0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_positive_int("num_query_heads", num_query_heads)
        check_positive_int("num_key_value_heads", num_key_value_heads)
        if num_query_heads % num_key_value_heads:
            raise ValueError(
                "`num_query_heads` must be a multiple of `num_key_value_heads`. Received: "
                f"num_query_heads={num_query_heads}, num_key_value_heads={num_key_value_heads}"
            )
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.rope_max_wavelength = rope_max_wavelength
        self.rope_scaling_factor = rope_scaling_factor
        self.rope_frequency_adjustment_factor = rope_frequency_adjustment_factor
        self.rope_low_freq_factor = rope_low_freq_factor
        self.rope_high_freq_factor = rope_high_freq_factor
        self.rope_pretraining_sequence_length = rope_pretraining_sequence_length
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.dropout = dropout
        self.num_key_value_groups = num_query_heads // num_key_value_heads
        # LlamaRotaryEmbedding's arguments are ours without the "rope_" prefix.
        rotary = {name.removeprefix("rope_"): value for name, value in rope_config(self).items()}
        self.rotary_embedding_layer = LlamaRotaryEmbedding(
            **rotary, dtype=self.dtype_policy, name="rotary_embedding"
        )

    def build(self, inputs_shape):
        # inputs_shape: [b, q, m]
        hidden_dim = inputs_shape[-1]
        if hidden_dim % self.num_query_heads:
            raise ValueError(
                "`hidden_dim` must be divisible by `num_query_heads`. Received: "
                f"hidden_dim={hidden_dim}, num_query_heads={self.num_query_heads}"
            )
        self.head_dim = hidden_dim // self.num_query_heads
        u, v, h = self.num_query_heads, self.num_key_value_heads, self.head_dim
        common = dict(
            kernel_initializer=clone_initializer(self.kernel_initializer), dtype=self.dtype_policy
        )
        self._query_dense = EinsumDense(
            "bqm,muh->bquh", output_shape=(None, u, h), name="query", **common
        )
        self._query_dense.build(inputs_shape)
        self._key_dense = EinsumDense(
            "bkm,mvh->bkvh", output_shape=(None, v, h), name="key", **common
        )
        self._key_dense.build(inputs_shape)
        self._value_dense = EinsumDense(
            "bkm,mvh->bkvh", output_shape=(None, v, h), name="value", **common
        )
        self._value_dense.build(inputs_shape)
        self._dropout_layer = keras.layers.Dropout(
            rate=self.dropout, dtype=self.dtype_policy, name="attention_dropout"
        )
        self._output_dense = EinsumDense(
            "bqah,ahm->bqm", output_shape=(None, hidden_dim), name="attention_output", **common
        )
        self._output_dense.build((None, None, u, h))
        self.built = True

    def call(
        self,
        hidden_states,
        attention_mask=None,
        cache=None,
        cache_update_index=None,
        training=None,
        positions=None,
        route=None,
    ):
        """Attends ``hidden_states`` [b, q, m] to itself, or to the cache when one is given.

        Args:
            attention_mask: bool [b, q, s], True where query q may see key s (s spans the
                cache when there is one). Defaults to a causal mask.
            cache: ``(keys [b * v, h, s], values [b * v, s, h])`` (see
                `keras_llama.models.llama.llama_cache`), or None.
            cache_update_index: int (scalar) cache slot of the first query.
            training: bool, for the attention dropout.
            positions: int [b, q], rotary positions of the queries. Defaults to
                ``cache_update_index + arange(q)``.
            route: the `BlockRoute` to run with (how the projections multiply, how attention
                runs); defaults to the Keras layers and the einsum attention.

        Returns:
            ``output`` [b, q, m], or ``(output, (keys, values))`` with a cache.
        """
        route = route or llama_strategies.REFERENCE_ROUTE
        query, key, value = route.projections.query_key_value(self, hidden_states)
        q_len = ops.shape(query)[1]
        start = 0 if cache_update_index is None else cache_update_index
        if positions is None:
            positions = (ops.arange(q_len) + start)[None, :]
        cos, sin = self.rotary_embedding_layer.cos_sin(positions, self.head_dim)
        query = self.rotary_embedding_layer.apply(query, cos, sin)
        key = self.rotary_embedding_layer.apply(key, cos, sin)
        if cache is not None:
            cache = route.write_cache(cache, key, value, start)
            key, value = cache
            if not route.attention.reads_caches:  # -> [b, s, v, h]
                key = llama_cache.from_cache_layout(key, True, self.num_key_value_heads)
                value = llama_cache.from_cache_layout(value, False, self.num_key_value_heads)
        if attention_mask is None:
            attention_mask = causal_attention_mask(
                None, q_len, ops.shape(value)[1], query_offset=start
            )
        attended = route.attention(self, query, key, value, attention_mask, training)
        output = route.projections.attention_output(self, attended)  # [b, q, m]
        if cache is not None:
            return output, cache
        return output

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_query_heads": self.num_query_heads,
                "num_key_value_heads": self.num_key_value_heads,
                **rope_config(self),
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "dropout": self.dropout,
            }
        )
        return config
