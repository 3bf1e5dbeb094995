"""LlamaBackbone: token embedding, a stack of decoder blocks and a final RMS norm."""

import keras

from keras_llama.models.backbone import Backbone
from keras_llama.models.llama import llama_plan
from keras_llama.models.llama.llama_decoder import LlamaTransformerDecoder
from keras_llama.models.llama.llama_layers import (
    LlamaLayerNorm,
    LlamaRotaryEmbedding,
    ReversibleEmbedding,
    kernel_initializer,
)
from keras_llama.utils import registry
from keras_llama.utils.validation import (
    check_positive_int,
    check_positive_number,
    check_token_ids,
)

ROPE_REQUIRED = ("rope_max_wavelength", "rope_position_scaling_factor", "layer_norm_epsilon")


@registry.register_class("llama", "backbone")
@keras.saving.register_keras_serializable(package="keras_llama")
class LlamaBackbone(Backbone):
    """The Llama decoder network, with KerasHub's constructor and weight layout.

    Maps ``{"token_ids": int [batch, seq], "padding_mask": int [batch, seq]}`` to the final
    normalised hidden states ``[batch, seq, hidden_dim]``. ``backbone.token_embedding(h,
    reverse=True)`` projects hidden states to vocabulary logits (tied or not).

    Args:
        vocabulary_size: int. Size of the token vocabulary.
        num_layers: int. Number of decoder blocks.
        num_query_heads: int. Attention heads for queries.
        hidden_dim: int. Width of the hidden states; a multiple of ``num_query_heads``.
        intermediate_dim: int. Width of the feed-forward layer.
        num_key_value_heads: int. Key/value heads (grouped-query attention); divides
            ``num_query_heads``.
        rope_max_wavelength: int. RoPE base ("rope_theta").
        rope_position_scaling_factor: float. Linear position scaling (positions are divided by
            it), as Hugging Face's ``rope_scaling={"type": "linear"}``.
        rope_frequency_adjustment_factor: float or None. Llama 3.1 RoPE scaling ("factor");
            this and the next three are set together or not at all.
        rope_low_freq_factor: float or None. Llama 3.1 RoPE scaling ("low_freq_factor").
        rope_high_freq_factor: float or None. Llama 3.1 RoPE scaling ("high_freq_factor").
        rope_pretraining_sequence_length: int or None. Llama 3.1 RoPE scaling
            ("original_max_position_embeddings").
        layer_norm_epsilon: float. RMS norm epsilon.
        dropout: float. Dropout rate in the decoder blocks.
        dtype: dtype or `keras.DTypePolicy` of the weights and computation.
        tie_word_embeddings: bool. Whether the output projection reuses the token embedding.

    Example:
        ```python
        backbone = LlamaBackbone(
            vocabulary_size=100, num_layers=2, num_query_heads=4, hidden_dim=32,
            intermediate_dim=64, num_key_value_heads=2)
        hidden = backbone({"token_ids": np.ones((1, 6), "int32"),
                           "padding_mask": np.ones((1, 6), "int32")})
        logits = backbone.token_embedding(hidden, reverse=True)
        ```
    """

    def __init__(
        self,
        vocabulary_size,
        num_layers,
        num_query_heads,
        hidden_dim,
        intermediate_dim,
        num_key_value_heads,
        rope_max_wavelength=10000,
        rope_position_scaling_factor=1.0,
        rope_frequency_adjustment_factor=None,
        rope_low_freq_factor=None,
        rope_high_freq_factor=None,
        rope_pretraining_sequence_length=None,
        layer_norm_epsilon=1e-6,
        dropout=0,
        dtype=None,
        tie_word_embeddings=False,
        **kwargs,
    ):
        for name, value in [
            ("vocabulary_size", vocabulary_size),
            ("num_layers", num_layers),
            ("num_query_heads", num_query_heads),
            ("hidden_dim", hidden_dim),
            ("intermediate_dim", intermediate_dim),
            ("num_key_value_heads", num_key_value_heads),
        ]:
            check_positive_int(name, value)
        if hidden_dim % num_query_heads:
            raise ValueError(
                "`hidden_dim` must be divisible by `num_query_heads`. Received: "
                f"hidden_dim={hidden_dim}, num_query_heads={num_query_heads}"
            )
        if (hidden_dim // num_query_heads) % 2:
            raise ValueError(
                "The head dimension `hidden_dim // num_query_heads` must be even for rotary "
                f"embeddings. Received: hidden_dim={hidden_dim}, num_query_heads={num_query_heads}"
            )
        if num_query_heads % num_key_value_heads:
            raise ValueError(
                "`num_query_heads` must be a multiple of `num_key_value_heads`. Received: "
                f"num_query_heads={num_query_heads}, num_key_value_heads={num_key_value_heads}"
            )
        # A zero, negative or NaN RoPE base or norm epsilon builds fine and gives NaN logits.
        for name, value in [
            ("rope_max_wavelength", rope_max_wavelength),
            ("rope_position_scaling_factor", rope_position_scaling_factor),
            ("layer_norm_epsilon", layer_norm_epsilon),
            ("rope_frequency_adjustment_factor", rope_frequency_adjustment_factor),
            ("rope_low_freq_factor", rope_low_freq_factor),
            ("rope_high_freq_factor", rope_high_freq_factor),
            ("rope_pretraining_sequence_length", rope_pretraining_sequence_length),
        ]:
            if value is not None or name in ROPE_REQUIRED:
                check_positive_number(name, value)
        if not 0 <= dropout < 1:
            raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout}")
        # Validates the RoPE arguments (all-or-none Llama 3 scaling) before anything is built.
        LlamaRotaryEmbedding(
            max_wavelength=rope_max_wavelength,
            scaling_factor=rope_position_scaling_factor,
            frequency_adjustment_factor=rope_frequency_adjustment_factor,
            low_freq_factor=rope_low_freq_factor,
            high_freq_factor=rope_high_freq_factor,
            pretraining_sequence_length=rope_pretraining_sequence_length,
        )

        # === Layers ===
        self.token_embedding = ReversibleEmbedding(
            input_dim=vocabulary_size,
            output_dim=hidden_dim,
            tie_weights=tie_word_embeddings,
            embeddings_initializer=kernel_initializer(stddev=0.01),
            dtype=dtype,
            name="token_embedding",
        )
        self.transformer_layers = []
        for i in range(num_layers):
            layer = LlamaTransformerDecoder(
                intermediate_dim=intermediate_dim,
                num_query_heads=num_query_heads,
                num_key_value_heads=num_key_value_heads,
                rope_max_wavelength=rope_max_wavelength,
                rope_scaling_factor=rope_position_scaling_factor,
                rope_frequency_adjustment_factor=rope_frequency_adjustment_factor,
                rope_low_freq_factor=rope_low_freq_factor,
                rope_high_freq_factor=rope_high_freq_factor,
                rope_pretraining_sequence_length=rope_pretraining_sequence_length,
                layer_norm_epsilon=layer_norm_epsilon,
                activation="silu",
                kernel_initializer=kernel_initializer(stddev=0.02),
                dropout=dropout,
                dtype=dtype,
                name=f"transformer_layer_{i}",
            )
            self.transformer_layers.append(layer)
        self.layer_norm = LlamaLayerNorm(
            epsilon=layer_norm_epsilon, dtype=dtype, name="sequence_output_layernorm"
        )

        # === Functional model ===
        token_id_input = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        padding_mask_input = keras.Input(shape=(None,), dtype="int32", name="padding_mask")
        x = self.token_embedding(token_id_input)
        for transformer_layer in self.transformer_layers:
            x = transformer_layer(x, decoder_padding_mask=padding_mask_input)
        sequence_output = self.layer_norm(x)
        super().__init__(
            inputs={"token_ids": token_id_input, "padding_mask": padding_mask_input},
            outputs=sequence_output,
            dtype=dtype,
            **kwargs,
        )

        # === Config ===
        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.num_query_heads = num_query_heads
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.num_key_value_heads = num_key_value_heads
        self.rope_max_wavelength = rope_max_wavelength
        self.rope_position_scaling_factor = rope_position_scaling_factor
        self.rope_frequency_adjustment_factor = rope_frequency_adjustment_factor
        self.rope_low_freq_factor = rope_low_freq_factor
        self.rope_high_freq_factor = rope_high_freq_factor
        self.rope_pretraining_sequence_length = rope_pretraining_sequence_length
        self.layer_norm_epsilon = layer_norm_epsilon
        self.dropout = dropout
        self.tie_word_embeddings = tie_word_embeddings

    @property
    def head_dim(self):
        return self.hidden_dim // self.num_query_heads

    def call(self, inputs, training=None, mask=None):
        # Keras's entry point (``backbone(inputs)``, ``fit``, ``predict``): the functional
        # graph built in ``__init__`` gives the structure; this runs it with the stage's plan.
        plan = llama_plan.make_plan(self).stage("training" if training else "scoring")
        return self.run(
            inputs["token_ids"], plan, padding_mask=inputs["padding_mask"], training=training
        )

    def run(
        self,
        token_ids,
        stage_plan,
        padding_mask=None,
        attention_mask=None,
        positions=None,
        caches=None,
        cache_update_index=None,
        weights=None,
        training=None,
        layer_intercept_fn=None,
    ):
        """The final normalised hidden states [b, q, m] of ``token_ids`` [b, q], every block
        run as ``stage_plan`` (a `StagePlan`) says.

        Without ``caches``, ``padding_mask`` [b, q] makes the causal mask. With ``caches``
        (see `keras_llama.models.llama.llama_cache`), ``attention_mask`` [b, q, s] and
        ``cache_update_index``, returns ``(hidden, new_caches)``. ``weights`` are the decode
        weights of fused or packed plans (`llama_plan.decode_weights`);
        ``layer_intercept_fn(x, i)`` sees the embeddings (``i = -1``) and each block's output.
        """
        # The embedding gather clamps an id outside the vocabulary without a word: check the
        # ids while an eager call still has their values (inside `jit` they are unknown).
        check_token_ids(token_ids, self.vocabulary_size)
        routes = llama_plan.block_routes(stage_plan, self, weights)
        x = self.token_embedding(token_ids)
        if layer_intercept_fn is not None:
            x = layer_intercept_fn(x, -1)
        new_caches = []
        for i, (block, route) in enumerate(zip(self.transformer_layers, routes)):
            x = block(
                x,
                decoder_padding_mask=padding_mask,
                attention_mask=attention_mask,
                positions=positions,
                cache=None if caches is None else caches[i],
                cache_update_index=cache_update_index,
                training=training,
                route=route,
            )
            if caches is not None:
                x, cache = x
                new_caches.append(cache)
            if layer_intercept_fn is not None:
                x = layer_intercept_fn(x, i)
        hidden = self.layer_norm(x)
        return hidden if caches is None else (hidden, new_caches)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "vocabulary_size": self.vocabulary_size,
                "num_layers": self.num_layers,
                "num_query_heads": self.num_query_heads,
                "hidden_dim": self.hidden_dim,
                "intermediate_dim": self.intermediate_dim,
                "num_key_value_heads": self.num_key_value_heads,
                "rope_max_wavelength": self.rope_max_wavelength,
                "rope_position_scaling_factor": self.rope_position_scaling_factor,
                "rope_frequency_adjustment_factor": self.rope_frequency_adjustment_factor,
                "rope_low_freq_factor": self.rope_low_freq_factor,
                "rope_high_freq_factor": self.rope_high_freq_factor,
                "rope_pretraining_sequence_length": self.rope_pretraining_sequence_length,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "dropout": self.dropout,
                "tie_word_embeddings": self.tie_word_embeddings,
            }
        )
        return config

    @staticmethod
    def get_layout_map(
        device_mesh, model_parallel_dim_name="model", data_parallel_dim_name="batch"
    ):
        """A `keras.distribution.LayoutMap` sharding the weights over ``model_parallel_dim_name``.

        Megatron-style tensor parallelism: the embedding and output projection are split along
        the vocabulary, the query/key/value kernels along their heads and the attention output
        kernel along its input heads, the gate/up kernels along ``intermediate_dim`` and the
        down kernel along its input ``intermediate_dim``; norms are replicated. The size of the
        model axis must divide ``num_query_heads``, ``num_key_value_heads``,
        ``vocabulary_size`` and ``intermediate_dim`` (else building the model raises a
        `LayoutMapError`). Use it with
        ``keras.distribution.ModelParallel(layout_map=..., batch_dim_name=data_parallel_dim_name)``;
        the batch is split over ``data_parallel_dim_name``.

        Example:
            ```python
            # 8 devices: 2-way data parallel x 4-way model parallel.
            mesh = keras.distribution.DeviceMesh((2, 4), ["batch", "model"],
                                                 devices=keras.distribution.list_devices())
            layout_map = LlamaBackbone.get_layout_map(mesh)
            keras.distribution.set_distribution(
                keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch"))
            ```
        """
        if not isinstance(device_mesh, keras.distribution.DeviceMesh):
            raise ValueError(
                "`device_mesh` must be a `keras.distribution.DeviceMesh`. "
                f"Received: device_mesh={device_mesh!r} of type {type(device_mesh)}"
            )
        if model_parallel_dim_name not in device_mesh.axis_names:
            raise ValueError(
                f"`{model_parallel_dim_name}` is not an axis of the mesh. "
                f"Received: device_mesh.axis_names={device_mesh.axis_names}"
            )
        model = model_parallel_dim_name
        layout_map = keras.distribution.LayoutMap(device_mesh)
        layout_map["token_embedding/embeddings"] = (model, None)
        layout_map["token_embedding/reverse_embeddings"] = (None, model)
        layout_map[r"transformer_layer.*self_attention.*(query|key|value).kernel"] = (
            None,
            model,
            None,
        )
        layout_map[r"transformer_layer.*attention_output.kernel"] = (model, None, None)
        layout_map[r"transformer_layer.*feedforward_(intermediate|gate)_dense.kernel"] = (
            None,
            model,
        )
        layout_map[r"transformer_layer.*feedforward_output_dense.kernel"] = (model, None)
        return layout_map
