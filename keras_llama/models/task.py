"""Task base class: a backbone plus an optional preprocessor, as one Keras model."""

import keras

from keras_llama.utils.python_utils import classproperty, functional_setattr


@keras.saving.register_keras_serializable(package="keras_llama")
class Task(keras.Model):
    """Base class for tasks (KerasHub's `keras_hub.models.Task`).

    A task wraps a `Backbone` and an optional `Preprocessor`; calling ``from_preset`` on a base
    class (``CausalLM.from_preset``) picks the subclass named by the preset.
    """

    backbone_cls = None
    preprocessor_cls = None

    def __init__(self, *args, compile=True, **kwargs):
        super().__init__(*args, **kwargs)
        self._initialized = True
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

    # --- presets -------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """Instantiate a task from a preset: a built-in name, ``kaggle://owner/model/keras/variant``,
        ``hf://owner/repo``, a local folder or a ``.gguf`` file. ``kwargs`` override the preset's
        config (backbone arguments such as ``dtype``, preprocessor ones such as
        ``sequence_length``)."""
        from keras_llama.models.preset_loading import load_task

        return load_task(cls, preset, load_weights=load_weights, **kwargs)

    def save_to_preset(self, preset_dir):
        """Save backbone, preprocessor and task config to a preset folder (atomically)."""
        from keras_llama.models.preset_loading import save_task

        save_task(self, preset_dir)

    @classmethod
    def _presets_table(cls):
        return {}

    @classproperty
    def presets(cls):
        """Built-in presets available on this class, as ``{name: metadata}``."""
        return dict(cls._presets_table())
