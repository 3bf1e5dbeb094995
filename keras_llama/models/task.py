"""Task base class: a backbone plus an optional preprocessor, as one Keras model."""

import types

import keras

from keras_llama.models import training_data
from keras_llama.models.preset_loading import load_task
from keras_llama.models.preset_saving import save_task
from keras_llama.models.presets_mixin import PresetsMixin
from keras_llama.utils import keras_compat
from keras_llama.utils.python_utils import functional_setattr


@keras.saving.register_keras_serializable(package="keras_llama")
class Task(PresetsMixin, keras.Model):
    """Base class for tasks (KerasHub's `keras_hub.models.Task`).

    A task wraps a `Backbone` and an optional `Preprocessor`; calling ``from_preset`` on a base
    class (``CausalLM.from_preset``) picks the subclass named by the preset.

    Example:
        ```python
        task = keras_llama.models.Task.from_preset("smollm2_135m_instruct")
        type(task).__name__        # "Llama3CausalLM"
        task.backbone.num_layers   # 30
        ```
    """

    backbone_cls = None
    preprocessor_cls = None

    def __init__(self, *args, compile=True, **kwargs):
        super().__init__(*args, **kwargs)
        self._initialized = True
        # Keras wraps `quantize` per instance to check the mode against its own list, which
        # lacks "int8_weight_only"; `Backbone.quantize` validates the mode itself.
        self.__dict__.pop("quantize", None)
        if compile:
            self.compile()

    def __setattr__(self, name, value):
        functional_setattr(self, Task, name, value)

    @property
    def backbone(self):
        """A `Backbone` model with the core architecture."""
        return getattr(self, "_backbone", None)

    @backbone.setter
    def backbone(self, value):
        self._backbone = value

    @property
    def preprocessor(self):
        """A `Preprocessor` used to preprocess inputs, or None."""
        return getattr(self, "_preprocessor", None)

    @preprocessor.setter
    def preprocessor(self, value):
        self._preprocessor = value

    def get_config(self):
        config = {"name": self.name, "trainable": self.trainable}
        config["backbone"] = keras.saving.serialize_keras_object(self.backbone)
        config["preprocessor"] = (
            None
            if self.preprocessor is None
            else keras.saving.serialize_keras_object(self.preprocessor)
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("backbone"), dict):
            config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        if isinstance(config.get("preprocessor"), dict):
            config["preprocessor"] = keras.saving.deserialize_keras_object(config["preprocessor"])
        return cls(**config)

    # --- training and inference on raw data ----------------------------------------------------
    def fit(
        self,
        x=None,
        y=None,
        batch_size=None,
        sample_weight=None,
        validation_data=None,
        shuffle=True,
        **kwargs,
    ):
        """`keras.Model.fit`, where ``x`` may also be raw strings (a list, a numpy array, a
        generator, a `keras.utils.PyDataset` or a ``tf.data.Dataset`` of them), which go through
        the preprocessor batch by batch; preprocessed ``(x, y, sample_weight)`` data passes
        through unchanged. See `keras_llama.models.training_data`."""
        x, y, sample_weight, batch_size = self._adapt_data(x, y, sample_weight, batch_size, shuffle)
        if isinstance(x, types.GeneratorType):
            shuffle = False  # a generator is read in order (Keras would warn on every call)
        validation_data = training_data.adapt_validation_data(
            self.preprocessor, validation_data, batch_size=kwargs.get("validation_batch_size")
        )
        return super().fit(
            x=x,
            y=y,
            batch_size=batch_size,
            sample_weight=sample_weight,
            validation_data=validation_data,
            shuffle=shuffle,
            **kwargs,
        )

    def evaluate(self, x=None, y=None, batch_size=None, sample_weight=None, **kwargs):
        """`keras.Model.evaluate`, taking raw strings as `fit` does."""
        x, y, sample_weight, batch_size = self._adapt_data(x, y, sample_weight, batch_size, False)
        return super().evaluate(
            x=x, y=y, batch_size=batch_size, sample_weight=sample_weight, **kwargs
        )

    def predict(self, x, batch_size=None, **kwargs):
        """`keras.Model.predict`, taking raw strings as `fit` does."""
        x, _, _, batch_size = self._adapt_data(x, None, None, batch_size, False)
        return super().predict(x, batch_size=batch_size, **kwargs)

    def _adapt_data(self, x, y, sample_weight, batch_size, shuffle):
        return training_data.adapt(
            self.preprocessor, x, y, sample_weight, batch_size=batch_size, shuffle=shuffle
        )

    # --- quantization --------------------------------------------------------------------------
    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        """Quantize the backbone's weights in place; see `Backbone.quantize` for the modes
        (``"int8"`` recommended, ``"int4"``) and options (``quantize_activations``)."""
        self.backbone.quantize(mode, config=config, filters=filters, **kwargs)
        # Compiled train/predict/generate functions captured the float variables.
        self.train_function = self.test_function = self.predict_function = None
        if hasattr(self, "generate_function"):
            self.generate_function = None
        if keras.config.backend() == "torch":
            for layer in keras_compat.sublayers(self):
                keras_compat.retrack_variables(layer)

    # --- whole-model saving (`model.save()`): the tokenizer's files travel as Keras assets ---
    def save_assets(self, dir_path):
        tokenizer = getattr(self.preprocessor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_assets(dir_path)

    def load_assets(self, dir_path):
        tokenizer = getattr(self.preprocessor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.load_assets(dir_path)

    # --- presets -------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """Instantiate a task from a preset: a built-in name, ``kaggle://owner/model/keras/variant``,
        ``hf://owner/repo``, a local folder or a ``.gguf`` file. ``kwargs`` override the preset's
        config (backbone arguments such as ``dtype``, preprocessor ones such as
        ``sequence_length``)."""
        return load_task(cls, preset, load_weights=load_weights, **kwargs)

    def save_to_preset(self, preset_dir):
        """Save backbone, preprocessor and task config to a preset folder (atomically)."""
        save_task(self, preset_dir)
