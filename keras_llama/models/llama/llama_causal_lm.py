"""LlamaCausalLM: the backbone plus the output projection, with a key/value cache."""

import keras
from keras import ops

from keras_llama.models.causal_lm import CausalLM
from keras_llama.models.execution_plan import STAGES
from keras_llama.models.llama import llama_cache, llama_plan
from keras_llama.models.llama.llama_attention import causal_attention_mask
from keras_llama.models.llama.llama_backbone import LlamaBackbone
from keras_llama.models.llama.llama_causal_lm_preprocessor import LlamaCausalLMPreprocessor
from keras_llama.utils import registry


@registry.register_class("llama", "task")
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
        ```python
        causal_lm = LlamaCausalLM(backbone)
        logits = causal_lm({"token_ids": ids, "padding_mask": mask})  # [batch, seq, vocab]
        ```
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

    def call(self, inputs, training=None, mask=None):
        # Keras's entry point (``causal_lm(inputs)``, ``fit``, ``predict``): logits
        # [b, q, vocabulary] by the training or the scoring plan.
        return self.logits(
            inputs["token_ids"], inputs["padding_mask"], "training" if training else "scoring",
            training=training,
        )  # fmt: skip

    def logits(
        self, token_ids, padding_mask, stage, training=None, layer_intercept_fn=None, plan=None
    ):
        """Logits [b, q, vocabulary] of ``token_ids`` [b, q] without a cache, run by the
        plan of ``stage`` (``"training"`` or ``"scoring"``), or by ``plan`` (a `StagePlan`,
        e.g. one of `llama_plan.alternatives`)."""
        plan = plan or llama_plan.make_plan(self.backbone).stage(stage)
        hidden = self.backbone.run(
            token_ids,
            plan,
            padding_mask=padding_mask,
            training=training,
            layer_intercept_fn=layer_intercept_fn,
        )
        return llama_plan.project_to_vocabulary(plan, self.backbone.token_embedding, hidden)

    def execution_plan(self, build=True):
        """Which path each stage (prefill, decode, training, scoring) takes, and why.

        ``print(causal_lm.execution_plan())`` lists, per stage, how the projections multiply,
        how attention runs and how the vocabulary projection runs, each with its reason (e.g.
        ``projections: packed (native decode matmuls: yes, float32 weights packed)``). With
        ``build=True`` the native ops are built first where they are missing (once per
        machine), so the answer is what ``generate()`` and ``fit()`` will run; ``False`` only
        reads their status; a tuple of stage names builds those stages' ops.

        Returns:
            A `keras_llama.models.ExecutionPlan`.
        """
        stages = STAGES if build is True else (build or ())
        names = dict.fromkeys(name for stage in stages for name in self.native_ops_for(stage))
        return llama_plan.make_plan(self.backbone, build=tuple(names))

    def native_ops_for(self, stage):
        return llama_plan.NATIVE_OPS[stage]

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
        logits, hidden, layer_caches = self.call_with_layer_caches(
            token_ids,
            llama_cache.from_stacked(cache),
            cache_update_index,
            cache_padding_mask,
            positions,
        )
        stacked = llama_cache.to_stacked(layer_caches, self.backbone.num_key_value_heads)
        return logits, hidden, stacked

    def call_with_layer_caches(
        self,
        token_ids,
        layer_caches,
        cache_update_index,
        cache_padding_mask=None,
        positions=None,
        last_logits_only=False,
        stage_plan=None,
        weights=None,
    ):
        """As `call_with_cache`, with the cache as a list of per-layer ``(keys, values)``
        (see `keras_llama.models.llama.llama_cache`: the layouts decoding attention reads, so
        no copies per step; no stacking copies either).

        ``last_logits_only=True`` projects only the last position to the vocabulary (logits
        [batch, 1, vocab]; a prefill needs no more); hidden states keep every position.
        ``stage_plan`` is the prefill or decode `StagePlan` (default: the prefill plan, which
        takes any number of queries) and ``weights`` its `decode_weights` (made here when not
        given and the plan multiplies them)."""
        if stage_plan is None:
            stage_plan = llama_plan.make_plan(self.backbone).prefill
        if weights is None and stage_plan.projections in ("packed", "fused"):
            weights = self.decode_weights(stage_plan)  # the matrices those multiply
        q_len = ops.shape(token_ids)[1]
        max_length = ops.shape(layer_caches[0][1])[1]
        if positions is None:
            positions = (ops.arange(q_len) + cache_update_index)[None, :]
        mask = causal_attention_mask(  # [b, q, max_length]
            cache_padding_mask, q_len, max_length, query_offset=cache_update_index
        )
        hidden, new_caches = self.backbone.run(
            token_ids,
            stage_plan,
            attention_mask=mask,
            positions=positions,
            caches=layer_caches,
            cache_update_index=cache_update_index,
            weights=weights,
        )
        projected = hidden[:, -1:] if last_logits_only else hidden
        embedding = self.backbone.token_embedding
        logits = llama_plan.project_to_vocabulary(stage_plan, embedding, projected, weights)
        return logits, hidden, new_caches

    def decode_weights(self, stage_plan):
        """The weights ``stage_plan`` multiplies (fused or packed), made from the current
        variable values; None when it runs the layers (see `llama_plan.decode_weights`)."""
        return llama_plan.decode_weights(stage_plan, self.backbone)

    def decode_weight_parts(self, stage_plan):
        """`decode_weights` part by part: ``[(layer, make), ...]`` (one per block, then the
        token embedding), or None (see `llama_plan.decode_weight_parts`)."""
        return llama_plan.decode_weight_parts(stage_plan, self.backbone)

    def _build_layer_caches(self, batch_size, max_length, dtype=None):
        """All-zeros per-layer ``(keys, values)`` caches for `call_with_layer_caches`: keys
        [batch * num_key_value_heads, head_dim, max_length], values
        [batch * num_key_value_heads, max_length, head_dim]."""
        backbone = self.backbone
        return llama_cache.zeros(
            batch_size,
            backbone.num_layers,
            backbone.num_key_value_heads,
            backbone.head_dim,
            max_length,
            dtype or self.compute_dtype,
        )

    def _build_cache(self, batch_size, max_length, dtype=None):
        """An all-zeros cache [batch, num_layers, 2, max_length, num_key_value_heads, head_dim]."""
        backbone = self.backbone
        shape = (
            batch_size,
            backbone.num_layers,
            2,
            max_length,
            backbone.num_key_value_heads,
            backbone.head_dim,
        )
        return ops.zeros(shape, dtype=dtype or self.compute_dtype)
