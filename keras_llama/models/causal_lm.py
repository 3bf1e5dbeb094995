"""CausalLM base class: compile() with a sampler, and generation."""

import keras

from keras_llama import samplers
from keras_llama.models.task import Task


@keras.saving.register_keras_serializable(package="keras_llama")
class CausalLM(Task):
    """Base class for causal language models (KerasHub's `keras_hub.models.CausalLM`).

    Subclasses implement ``call_with_cache`` and ``_build_cache``; this class turns them into
    ``generate()`` with the sampler chosen in ``compile()``.
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
            weighted_metrics: ``"auto"`` (sparse categorical accuracy) or a list of metrics.
            sampler: a sampler name (``"greedy"``, ``"random"``, ``"top_k"``, ``"top_p"``,
                ``"beam"``, ``"contrastive"``) or a `keras_llama.samplers.Sampler`.
            **kwargs: passed on to `keras.Model.compile`.
        """
        if optimizer == "auto":
            optimizer = keras.optimizers.Adam(2e-5)
        if loss == "auto":
            loss = keras.losses.SparseCategoricalCrossentropy(
                from_logits=True, reduction="mean_with_sample_weight"
            )
        if weighted_metrics == "auto":
            weighted_metrics = [keras.metrics.SparseCategoricalAccuracy()]
        super().compile(
            optimizer=optimizer, loss=loss, weighted_metrics=weighted_metrics, **kwargs
        )
        self.sampler = samplers.get(sampler)
        self.generate_function = None

    def compile_from_config(self, config):
        """Re-compile after `keras.saving.load_model` with the saved optimizer, loss and metrics."""
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built and getattr(self, "optimizer", None) is not None:
            self.optimizer.build(self.trainable_variables)
