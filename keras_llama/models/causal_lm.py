"""CausalLM base class: compile() with a sampler, and generation."""

import keras

from keras_llama import kernels, losses, samplers
from keras_llama.models import generation, generation_engine
from keras_llama.models.task import Task
from keras_llama.utils.validation import check_positive_int, check_token_ids

# The limit on generate()'s `max_length` when the model's context is unknown: the longest Llama
# context (Llama 3.1). A key/value cache is allocated for the whole length up front, so an
# unchecked `max_length=10**9` would try to allocate gigabytes before the first token.
DEFAULT_MAX_SEQUENCE_LENGTH = 131072


@keras.saving.register_keras_serializable(package="keras_llama")
class CausalLM(Task):
    """Base class for causal language models (KerasHub's `keras_hub.models.CausalLM`).

    Subclasses implement ``execution_plan`` and ``native_ops_for`` (what each stage runs),
    ``logits`` (a forward pass without a cache, for ``call``/``fit``/``score``),
    ``call_with_layer_caches``, ``decode_weights`` and ``_build_layer_caches`` (prefill and
    decode steps, driven by `keras_llama.models.generation`), and KerasHub's
    ``call_with_cache`` / ``_build_cache``. This class turns them into ``generate()`` with the
    sampler chosen in ``compile()``, and into ``score()`` and ``perplexity()``.

    Example:
        ```python
        causal_lm = keras_llama.models.CausalLM.from_preset("smollm2_135m_instruct")
        causal_lm.compile(sampler="greedy")
        causal_lm.generate("The capital of France is", max_length=16)
        ```
    """

    def compile(
        self,
        optimizer="auto",
        loss="auto",
        *,
        weighted_metrics="auto",
        sampler="top_k",
        **kwargs,
    ):
        """Configure the model for training and generation.

        Args:
            optimizer: ``"auto"`` (``keras.optimizers.Adam(2e-5)``), a name or an optimizer.
            loss: ``"auto"`` (sparse categorical cross-entropy from logits, averaged over the
                tokens whose sample weight is non-zero, so padding never dilutes the loss: the
                loss of Hugging Face's ``labels=`` with padding set to -100), a name or a loss.
                Keras's ``SparseCategoricalCrossentropy`` becomes the equivalent
                `keras_llama.losses.SparseCategoricalCrossentropy` (same values, cheaper
                gradient over a large vocabulary).
            weighted_metrics: ``"auto"`` (sparse categorical accuracy) or a list of metrics.
            sampler: a sampler name (``"greedy"``, ``"random"``, ``"top_k"``, ``"top_p"``,
                ``"beam"``, ``"contrastive"``) or a `keras_llama.samplers.Sampler`.
            **kwargs: passed on to `keras.Model.compile`.
        """
        if optimizer == "auto":
            optimizer = keras.optimizers.Adam(2e-5)
        if loss == "auto":
            loss = losses.SparseCategoricalCrossentropy(
                from_logits=True, reduction="mean_with_sample_weight"
            )
        # Keras's sparse cross-entropy -> the same loss with a one-pass gradient (losses.py).
        loss = losses.faster_equivalent(loss)
        if weighted_metrics == "auto":
            weighted_metrics = [keras.metrics.SparseCategoricalAccuracy()]
        super().compile(optimizer=optimizer, loss=loss, weighted_metrics=weighted_metrics, **kwargs)
        # Native training ops compile (once per machine) while Keras builds the optimizer and
        # XLA the step; `make_train_function` waits for them before the step is traced.
        kernels.build_in_background(*self.native_ops_for("training"))
        self.sampler = samplers.get(sampler)
        self.generate_function = None

    def native_ops_for(self, stage):
        """The names of the native libraries (`keras_llama.kernels.library`) ``stage`` may use."""
        return ()

    def execution_plan(self, build=True):
        """Which path each stage takes and why: a `keras_llama.models.ExecutionPlan`.

        ``build``: True (build the native ops of every stage first, where missing), False
        (only read their status), or a tuple of stage names."""
        raise NotImplementedError

    # Keras makes each step function before tracing it: the native ops a stage may use are
    # built (or found unusable) first, so its plan is settled and no build starts mid-trace.
    def make_train_function(self, force=False):
        self.execution_plan(build=("training",))
        return super().make_train_function(force)

    def make_test_function(self, force=False):
        self.execution_plan(build=("scoring",))
        return super().make_test_function(force)

    def make_predict_function(self, force=False):
        self.execution_plan(build=("scoring",))
        return super().make_predict_function(force)

    # --- generation (stages in keras_llama/models/generation.py) --------------------------------
    @property
    def max_sequence_length(self):
        """The longest ``max_length`` (prompt plus completion) ``generate()`` accepts: the
        model's context as its preset gives it (Hugging Face ``max_position_embeddings``,
        GGUF ``llama.context_length``), else `DEFAULT_MAX_SEQUENCE_LENGTH`. Settable (None
        restores the default)."""
        return getattr(self, "_max_sequence_length", None) or DEFAULT_MAX_SEQUENCE_LENGTH

    @max_sequence_length.setter
    def max_sequence_length(self, value):
        if value is not None:
            check_positive_int("max_sequence_length", value)
        self._max_sequence_length = value

    def make_generate_function(self):
        """The `GenerationEngine` (compiled prefill and decode) for the current sampler; built
        on first use and again after ``compile()`` or ``quantize()``."""
        sampler = getattr(self, "sampler", None)
        if sampler is None:
            sampler = self.sampler = samplers.get("top_k")
        engine = getattr(self, "generate_function", None)
        if not isinstance(engine, generation_engine.GenerationEngine) or not engine.matches(
            self, sampler
        ):
            engine = self.generate_function = generation_engine.GenerationEngine(self, sampler)
        return engine

    def generate(self, inputs, max_length=None, stop_token_ids="auto", strip_prompt=False):
        """Generate text (or token ids) continuing the prompt ``inputs``.

        The sampler set in ``compile()`` picks each token. Each batch is prefilled once over its
        real prompt length, then decoded one token per step from the key/value cache in one
        compiled loop (JAX); prompts of different lengths in a batch each generate exactly what
        they would alone.

        Args:
            inputs: a string, a list of strings (one batch), a dict ``{"token_ids",
                "padding_mask"}`` of [batch, length] arrays (no preprocessing), or an iterable
                of such batches (including a ``tf.data.Dataset``), generated batch by batch and
                concatenated. Strings need a `preprocessor`.
            max_length: int. Total length, prompt plus completion, of each row. Defaults to the
                preprocessor's ``sequence_length``, or the width of ``token_ids`` for dict
                inputs. Must be larger than the longest prompt.
            stop_token_ids: ``"auto"`` (the tokenizer's end token, plus ``<|eot_id|>`` for
                Llama 3; needs a preprocessor), ``None`` (generate up to ``max_length``) or a
                tuple of token ids, each of which stops a row. Generation ends as soon as every
                row has stopped; the stop token is kept and later positions are padding.
            strip_prompt: bool. If True, return only the completion.

        Returns:
            A string for a string, a list of strings for a list, or for token inputs a dict of
            numpy arrays ``{"token_ids": int32, "padding_mask": bool}`` [batch, max_length]
            (prompt then completion, left-aligned). ``BeamSampler(return_all_beams=True)`` adds
            a beam axis (and ``"scores"``) or gives a list of strings per prompt.

        Example:
            ```python
            causal_lm.generate("The quick brown fox", max_length=30)
            causal_lm.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=None)
            ```
        """
        return generation.generate(
            self,
            inputs,
            max_length=max_length,
            stop_token_ids=stop_token_ids,
            strip_prompt=strip_prompt,
        )

    def stream(self, inputs, max_length=None, stop_token_ids="auto"):
        """Generate text for one prompt, as an iterator of text pieces as they are produced.

        Drives the same compiled decode step as `generate`; the pieces concatenate to
        ``generate(inputs, ..., strip_prompt=True)`` and never split a multi-byte character.
        With `BeamSampler` the completion comes as one piece at the end. Arguments as in
        `generate`, for a single string.

        Example:
            ```python
            for piece in causal_lm.stream("Tell me a story", max_length=200):
                print(piece, end="", flush=True)
            ```
        """
        return generation.stream(self, inputs, max_length=max_length, stop_token_ids=stop_token_ids)

    def export_to_transformers(self, path, overwrite=False, max_shard_size="5GB"):
        """Write a Hugging Face transformers folder: the model (config, safetensors weights,
        LoRA merged) and the tokenizer (``AutoTokenizer`` files with the chat template and
        ``add_bos_token``). Atomic; an existing non-empty folder is refused unless
        ``overwrite=True``. See `keras_llama.export.transformers`.

        Args:
            path: the folder to write.
            overwrite: replace an existing, non-empty folder.
            max_shard_size: bytes (int) or a size such as ``"5GB"``.

        Raises:
            ValueError: when ``path`` exists and ``overwrite`` is False, for a quantized
                model, or a bad ``max_shard_size``.

        Example:
            ```python
            causal_lm.export_to_transformers("./hf_model")
            # transformers.AutoModelForCausalLM.from_pretrained("./hf_model")
            ```
        """
        from keras_llama.export import transformers  # export imports models: lazily

        transformers.export_causal_lm(self, path, overwrite, max_shard_size)

    def export_to_gguf(self, path, dtype="f32", overwrite=False):
        """Write a llama.cpp GGUF file: the weights as ``dtype`` (``"f32"``, ``"f16"``,
        ``"bf16"``, ``"q8_0"`` or ``"q4_0"``; norms stay f32), the vocabulary in llama.cpp's
        form, the special ids, ``add_bos_token``, the chat template and the RoPE settings.
        Atomic; an existing file is refused unless ``overwrite=True``. See
        `keras_llama.export.gguf`.

        Args:
            path: the ``.gguf`` file to write.
            dtype: ``"f32"``, ``"f16"``, ``"bf16"``, ``"q8_0"`` or ``"q4_0"``.
            overwrite: replace an existing file.

        Raises:
            ValueError: when ``path`` exists and ``overwrite`` is False, for an unknown
                ``dtype`` or a quantized model.

        Example:
            ```python
            causal_lm.export_to_gguf("model.gguf", dtype="q8_0")
            # llama-cli -m model.gguf, or CausalLM.from_preset("model.gguf")
            ```
        """
        from keras_llama.export import gguf  # export imports models: lazily

        gguf.export_causal_lm(self, path, dtype=dtype, overwrite=overwrite)

    def compile_from_config(self, config):
        """Re-compile after `keras.saving.load_model` with the saved optimizer, loss and metrics."""
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built and getattr(self, "optimizer", None) is not None:
            self.optimizer.build(self.trainable_variables)

    # --- scoring (training/adaptation) ---------------------------------------------------------
    def score(
        self,
        token_ids,
        padding_mask=None,
        scoring_mode="logits",
        layer_intercept_fn=None,
        target_ids=None,
    ):
        """Score a batch of token ids: logits, or the per-token loss against ``target_ids``.

        As KerasHub's ``CausalLM.score``: position ``t``'s logits predict ``target_ids[:, t]``
        (pass the inputs shifted left by one to score a text). Padding positions are not
        masked here; multiply by the mask when summing (`perplexity` does).

        Args:
            token_ids: int [batch, seq].
            padding_mask: int/bool [batch, seq], 1 for real tokens; defaults to all ones.
            scoring_mode: ``"logits"`` (returns [batch, seq, vocab]) or ``"loss"`` (returns
                the per-token cross-entropy [batch, seq], float32).
            layer_intercept_fn: optional ``fn(x, i) -> x`` applied to the embeddings
                (``i = -1``) and to the output of each decoder block ``i`` (for probing and
                interventions).
            target_ids: int [batch, seq], required for ``"loss"``.
        """
        from keras import ops

        if scoring_mode not in ("logits", "loss"):
            raise ValueError(
                "`scoring_mode` must be 'logits' or 'loss'. "
                f"Received: scoring_mode={scoring_mode!r}"
            )
        if scoring_mode == "loss" and target_ids is None:
            raise ValueError(
                "scoring_mode='loss' needs the target token ids. Received: target_ids=None"
            )
        token_ids = ops.convert_to_tensor(token_ids, "int32")
        if len(token_ids.shape) != 2:
            raise ValueError(
                f"`token_ids` must have shape [batch, seq]. Received: shape={token_ids.shape}"
            )
        if padding_mask is None:
            padding_mask = ops.ones_like(token_ids)
        # Out-of-vocabulary ids would be clamped by the gather: refuse them while they are
        # concrete (eager calls; skipped inside `jit`).
        check_token_ids(token_ids, self.backbone.vocabulary_size)
        if target_ids is not None:
            check_token_ids(target_ids, self.backbone.vocabulary_size)
        self.execution_plan(build=("scoring",))
        logits = self.logits(
            token_ids, padding_mask, "scoring", layer_intercept_fn=layer_intercept_fn
        )
        if scoring_mode == "logits":
            return logits
        per_token_loss = keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="none"
        )
        return per_token_loss(ops.convert_to_tensor(target_ids, "int32"), logits)

    def perplexity(self, x, padding_mask=None, per_sequence=False):
        """Perplexity, ``exp(mean next-token loss)`` over the real (non-padding) tokens.

        Args:
            x: raw strings (tokenized by the preprocessor, which also gives the targets and
                their mask) or int token ids [batch, seq] (each token is then predicted from
                the ones before it).
            padding_mask: with token ids, int/bool [batch, seq], 1 for real tokens.
            per_sequence: return one perplexity per sequence (numpy [batch]) instead of one
                over all tokens (a Python float).
        """
        import numpy as np
        from keras import ops

        from keras_llama.models import training_data

        if training_data._is_string_data(x):
            if self.preprocessor is None:
                raise ValueError(
                    "`x` holds strings but this model has no preprocessor. Received: "
                    f"x={training_data._preview(x)}"
                )
            inputs, targets, weights = self.preprocessor(x)[:3]
            token_ids, padding_mask = inputs["token_ids"], inputs["padding_mask"]
        else:
            token_ids = np.asarray(x)
            if padding_mask is None:
                padding_mask = np.ones_like(token_ids)
            padding_mask = np.asarray(padding_mask).astype("int32")
            # Position t predicts token t + 1; both must be real tokens.
            targets = np.concatenate([token_ids[:, 1:], np.zeros_like(token_ids[:, :1])], 1)
            weights = np.concatenate([padding_mask[:, 1:], np.zeros_like(padding_mask[:, :1])], 1)
            weights = weights * padding_mask
        loss = self.score(token_ids, padding_mask, scoring_mode="loss", target_ids=targets)
        loss = ops.convert_to_numpy(loss).astype("float64")
        weights = np.asarray(ops.convert_to_numpy(weights)).astype("float64")
        if per_sequence:
            return np.exp((loss * weights).sum(1) / np.maximum(weights.sum(1), 1))
        return float(np.exp((loss * weights).sum() / max(weights.sum(), 1)))
