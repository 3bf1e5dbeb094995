"""The Llama decoder block: pre-norm grouped-query attention and a SwiGLU feed-forward.

Layer and attribute names follow KerasHub's (they make the ``.weights.h5`` paths).
"""

import keras
from keras import ops

from keras_llama.models.block_layers import Dense
from keras_llama.models.llama import llama_strategies
from keras_llama.models.llama.llama_attention import LlamaAttention, causal_attention_mask
from keras_llama.models.llama.llama_layers import (
    ROPE_ARGUMENTS,
    LlamaLayerNorm,
    clone_initializer,
)
from keras_llama.utils.validation import check_positive_int


@keras.saving.register_keras_serializable(package="keras_llama")
class LlamaTransformerDecoder(keras.layers.Layer):
    """One Llama decoder block: pre-norm attention and a SwiGLU feed-forward, both residual.

    ::

        x ─┬─ norm ─ attention ─ dropout ─(+)─┬─ norm ─ silu(gate(x)) * up(x) ─ down ─(+)─>
           └──────────────────────────────────┘└──────────────────────────────────────────┘

    Args:
        intermediate_dim: int. Width of the feed-forward layer.
        num_query_heads: int.
        num_key_value_heads: int.
        rope_max_wavelength ... rope_pretraining_sequence_length: see `LlamaRotaryEmbedding`.
        activation: activation of the gate projection ("silu" for Llama).
        layer_norm_epsilon: float.
        kernel_initializer: initializer of the dense kernels.
        dropout: float.

    Example:
        ```python
        block = LlamaTransformerDecoder(intermediate_dim=64, num_query_heads=4, num_key_value_heads=2)
        y = block(keras.ops.ones((1, 5, 32)))
        ```
    """

    def __init__(
        self,
        intermediate_dim,
        num_query_heads,
        num_key_value_heads,
        rope_max_wavelength=10000,
        rope_scaling_factor=1.0,
        activation="silu",
        layer_norm_epsilon=1e-6,
        kernel_initializer="glorot_uniform",
        dropout=0,
        rope_frequency_adjustment_factor=None,
        rope_low_freq_factor=None,
        rope_high_freq_factor=None,
        rope_pretraining_sequence_length=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_positive_int("intermediate_dim", intermediate_dim)
        self.intermediate_dim = intermediate_dim
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.activation = keras.activations.get(activation)
        self.layer_norm_epsilon = layer_norm_epsilon
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.dropout = dropout
        self.supports_masking = True
        # Made here (built in `build`): it validates and keeps the rotary arguments.
        self._self_attention_layer = LlamaAttention(
            num_query_heads=num_query_heads,
            num_key_value_heads=num_key_value_heads,
            rope_max_wavelength=rope_max_wavelength,
            rope_scaling_factor=rope_scaling_factor,
            rope_frequency_adjustment_factor=rope_frequency_adjustment_factor,
            rope_low_freq_factor=rope_low_freq_factor,
            rope_high_freq_factor=rope_high_freq_factor,
            rope_pretraining_sequence_length=rope_pretraining_sequence_length,
            kernel_initializer=clone_initializer(self.kernel_initializer),
            dropout=dropout,
            dtype=self.dtype_policy,
            name="self_attention",
        )

    def build(self, decoder_sequence_shape):
        # decoder_sequence_shape: [b, q, m]
        hidden_dim = decoder_sequence_shape[-1]
        self._self_attention_layer.build(decoder_sequence_shape)
        self._self_attention_layernorm = LlamaLayerNorm(
            epsilon=self.layer_norm_epsilon,
            dtype=self.dtype_policy,
            name="self_attention_layernorm",
        )
        self._self_attention_layernorm.build(decoder_sequence_shape)
        self._self_attention_dropout = keras.layers.Dropout(
            rate=self.dropout, dtype=self.dtype_policy, name="self_attention_dropout"
        )
        dense = dict(use_bias=False, dtype=self.dtype_policy)
        self._feedforward_intermediate_dense = Dense(
            self.intermediate_dim,
            kernel_initializer=clone_initializer(self.kernel_initializer),
            name="feedforward_intermediate_dense",
            **dense,
        )
        self._feedforward_intermediate_dense.build(decoder_sequence_shape)
        self._feedforward_gate_dense = Dense(
            self.intermediate_dim,
            activation=self.activation,
            kernel_initializer=clone_initializer(self.kernel_initializer),
            name="feedforward_gate_dense",
            **dense,
        )
        self._feedforward_gate_dense.build(decoder_sequence_shape)
        self._feedforward_output_dense = Dense(
            hidden_dim,
            kernel_initializer=clone_initializer(self.kernel_initializer),
            name="feedforward_output_dense",
            **dense,
        )
        self._feedforward_output_dense.build((None, None, self.intermediate_dim))
        self._feedforward_layernorm = LlamaLayerNorm(
            epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy, name="feedforward_layernorm"
        )
        self._feedforward_layernorm.build(decoder_sequence_shape)
        self.built = True

    def call(
        self,
        decoder_sequence,
        decoder_padding_mask=None,
        attention_mask=None,
        positions=None,
        cache=None,
        cache_update_index=None,
        training=None,
        route=None,
    ):
        """Runs the block on ``decoder_sequence`` [b, q, m].

        ``decoder_padding_mask`` [b, q] (1 for real tokens) builds a causal mask when no
        ``attention_mask`` [b, q, s] is given. With ``cache`` (see `LlamaAttention`), returns
        ``(output, new_cache)``. ``route`` (a `BlockRoute`) says how the projections multiply
        and how attention runs; by default the Keras layers and the einsum attention.
        """
        route = route or llama_strategies.REFERENCE_ROUTE
        if attention_mask is None and decoder_padding_mask is not None and cache is None:
            attention_mask = causal_attention_mask(
                decoder_padding_mask, ops.shape(decoder_sequence)[1]
            )
        residual = decoder_sequence
        x = self._self_attention_layernorm(decoder_sequence)
        attended = self._self_attention_layer(
            x,
            attention_mask=attention_mask,
            positions=positions,
            cache=cache,
            cache_update_index=cache_update_index,
            training=training,
            route=route,
        )
        if cache is not None:
            attended, cache = attended
        x = residual + self._self_attention_dropout(attended, training=training)

        residual = x
        x = self._feedforward_layernorm(x)
        x = route.projections.down(self, route.projections.gated(self, x))
        x = residual + self._self_attention_dropout(x, training=training)
        if cache is not None:
            return x, cache
        return x

    def compute_output_shape(self, decoder_sequence_shape):
        return decoder_sequence_shape

    def get_config(self):
        config = super().get_config()
        # The head counts and rotary arguments live in the attention layer.
        attention = self._self_attention_layer.get_config()
        shared = ("num_query_heads", "num_key_value_heads", *ROPE_ARGUMENTS)
        config.update({name: attention[name] for name in shared})
        config.update(
            {
                "intermediate_dim": self.intermediate_dim,
                "activation": keras.activations.serialize(self.activation),
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "dropout": self.dropout,
            }
        )
        return config
