"""LlamaCausalLM: the backbone plus the output projection, with a key/value cache."""

import contextlib

import keras
from keras import ops

from keras_llama import kernels
from keras_llama.kernels import decode_matmul
from keras_llama.kernels.packing import pack_reverse_embedding
from keras_llama.models.causal_lm import CausalLM
from keras_llama.models.llama.llama_backbone import LlamaBackbone
from keras_llama.models.llama.llama_causal_lm_preprocessor import LlamaCausalLMPreprocessor


@keras.saving.register_keras_serializable(package="keras_llama")
class LlamaCausalLM(CausalLM):
    """An end-to-end Llama model for causal language modeling.

    A causal language model predicts the next token from the previous ones. ``fit()`` pre-trains
    or fine-tunes it; ``generate()`` continues a prompt with the sampler set in ``compile()``
    (``"top_k"`` by default).

    Args:
        backbone: a `keras_llama.models.LlamaBackbone`.
        preprocessor: a `keras_llama.models.LlamaCausalLMPreprocessor` or None. If None, inputs
            must be preprocessed (``{"token_ids", "padding_mask"}``) before calling the model.

    Example:
    >>> causal_lm = LlamaCausalLM(backbone)
    >>> logits = causal_lm({"token_ids": ids, "padding_mask": mask})  # [batch, seq, vocab]
    """

    backbone_cls = LlamaBackbone
    preprocessor_cls = LlamaCausalLMPreprocessor

    def __init__(self, backbone, preprocessor=None, **kwargs):
        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor

        # === Functional model ===
        inputs = backbone.input
        hidden_states = backbone(inputs)
        outputs = backbone.token_embedding(hidden_states, reverse=True)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

    def call_with_cache(
        self,
        token_ids,
        cache,
        cache_update_index,
        cache_padding_mask=None,
        positions=None,
    ):
        """Forward pass for incremental decoding with a fixed-size key/value cache.

        Args:
            token_ids: int [batch, q], the new tokens.
            cache: float [batch, num_layers, 2, max_length, num_key_value_heads, head_dim].
            cache_update_index: int scalar, the cache slot of ``token_ids[:, 0]``.
            cache_padding_mask: optional bool/int [batch, max_length], False for cache slots that
                hold padding (left-padded prompts); they are never attended to.
            positions: optional int [batch, q] rotary positions; defaults to the cache slots.

        Returns:
            ``(logits [batch, q, vocab], hidden_states [batch, q, hidden_dim], cache)``.
        """
        # KerasHub's [b, s, v, h] per key/value <-> our layer caches [b * v, s, h].
        b, _, _, s, v, h = cache.shape
        b = ops.shape(cache)[0] if b is None else b

        def ours(x, keys):  # keys [b * v, h, s], values [b * v, s, h]
            x = ops.transpose(x, (0, 2, 3, 1) if keys else (0, 2, 1, 3))
            return ops.reshape(x, (b * v, h, s) if keys else (b * v, s, h))

        def theirs(x, keys):
            x = ops.reshape(x, (b, v, h, s) if keys else (b, v, s, h))
            return ops.transpose(x, (0, 3, 1, 2) if keys else (0, 2, 1, 3))

        layer_caches = [
            (ours(cache[:, i, 0], True), ours(cache[:, i, 1], False)) for i in range(cache.shape[1])
        ]
        logits, hidden, layer_caches = self.call_with_layer_caches(
            token_ids, layer_caches, cache_update_index, cache_padding_mask, positions
        )
        cache = ops.stack(
            [ops.stack([theirs(kv[0], True), theirs(kv[1], False)], axis=1) for kv in layer_caches],
            axis=1,
        )
        return logits, hidden, cache

    def call_with_layer_caches(
        self,
        token_ids,
        layer_caches,
        cache_update_index,
        cache_padding_mask=None,
        positions=None,
        last_logits_only=False,
    ):
        """As `call_with_cache`, with the cache as a list of per-layer ``(key, value)`` arrays
        (see `_build_layer_caches`: heads-major with the batch folded in, keys transposed; the
        layouts decoding attention reads, so no copies per step; no stacking copies either).

        ``last_logits_only=True`` projects only the last position to the vocabulary (logits
        [batch, 1, vocab]; a prefill needs no more); hidden states keep every position."""
        kernels = self.__dict__.get("_active_decode_kernels")
        return self._call_layers(
            token_ids,
            layer_caches,
            cache_update_index,
            cache_padding_mask,
            positions,
            last_logits_only,
            kernels,
        )

    def _fused_decode_kernels(self):
        """The kernels the compiled decode loop uses (read through the current variable
        values, so a `keras.StatelessScope` applies): ``{"layers": [...], "head": ...}``.

        With the native decoding kernels (`keras_llama.kernels`, JAX on CPU, float32 or
        ``"int8_weight_only"`` weights): per block its `LlamaTransformerDecoder.packed_kernels`
        and the output projection packed. Otherwise, per block its
        `LlamaTransformerDecoder.fused_kernels` and no head (the embedding's own path). None
        when some block is quantized otherwise or has LoRA (the layers' own path)."""
        layers = self.backbone.transformer_layers
        if kernels.library("decode_matmul").ensure_built():
            packed = [layer.packed_kernels() for layer in layers]
            head = pack_reverse_embedding(self.backbone.token_embedding)
            if head is not None and all(p is not None for p in packed):
                return {"layers": packed, "head": head}
        if not all(layer.fusable() for layer in layers):
            return None
        return {"layers": [layer.fused_kernels() for layer in layers], "head": None}

    @contextlib.contextmanager
    def _decoding_with_kernels(self, kernels):
        """Within this context (while tracing the compiled decode loop), `call_with_layer_caches`
        runs the blocks through ``kernels`` from `_fused_decode_kernels`: the same logits with
        fewer, larger matmuls. ``kernels=None`` leaves the layers' own path."""
        # Set through __dict__: trace-time state, not something Keras should track.
        previous = self.__dict__.get("_active_decode_kernels")
        self.__dict__["_active_decode_kernels"] = kernels
        try:
            yield
        finally:
            self.__dict__["_active_decode_kernels"] = previous

    def _call_layers(
        self,
        token_ids,
        layer_caches,
        cache_update_index,
        cache_padding_mask,
        positions,
        last_logits_only,
        kernels,
    ):
        q_len = ops.shape(token_ids)[1]
        max_length = ops.shape(layer_caches[0][1])[1]
        query_slots = ops.arange(q_len) + cache_update_index  # [q]
        if positions is None:
            positions = query_slots[None, :]
        mask = ops.less_equal(ops.arange(max_length)[None, :], query_slots[:, None])[None]
        if cache_padding_mask is not None:
            mask = ops.logical_and(mask, ops.cast(cache_padding_mask, "bool")[:, None, :])
        x = self.backbone.token_embedding(token_ids)
        new_caches = []
        for i, (layer, layer_cache) in enumerate(
            zip(self.backbone.transformer_layers, layer_caches)
        ):
            if kernels is None:
                x, layer_cache = layer(
                    x,
                    attention_mask=mask,
                    positions=positions,
                    cache=layer_cache,
                    cache_update_index=cache_update_index,
                )
            else:
                x, layer_cache = layer.call_with_fused_kernels(
                    x, kernels["layers"][i], mask, positions, layer_cache, cache_update_index
                )
            new_caches.append(layer_cache)
        hidden = self.backbone.layer_norm(x)
        projected = hidden[:, -1:] if last_logits_only else hidden
        if kernels is not None and kernels["head"] is not None:
            logits = decode_matmul.matmul(projected, kernels["head"])
        else:
            logits = self.backbone.token_embedding(projected, reverse=True)
        return logits, hidden, new_caches

    def _build_layer_caches(self, batch_size, max_length, dtype=None):
        """All-zeros per-layer ``(key, value)`` caches for `call_with_layer_caches`: keys
        [batch * num_key_value_heads, head_dim, max_length], values
        [batch * num_key_value_heads, max_length, head_dim]."""
        backbone = self.backbone
        rows, head_dim = batch_size * backbone.num_key_value_heads, backbone.head_dim
        dtype = dtype or self.compute_dtype
        return [
            (
                ops.zeros((rows, head_dim, max_length), dtype),
                ops.zeros((rows, max_length, head_dim), dtype),
            )
            for _ in range(backbone.num_layers)
        ]

    def _build_cache(self, batch_size, max_length, dtype=None):
        """An all-zeros cache [batch, num_layers, 2, max_length, num_key_value_heads, head_dim]."""
        backbone = self.backbone
        shape = (
            batch_size,
            backbone.num_layers,
            2,
            max_length,
            backbone.num_key_value_heads,
            backbone.hidden_dim // backbone.num_query_heads,
        )
        return ops.zeros(shape, dtype=dtype or self.compute_dtype)
