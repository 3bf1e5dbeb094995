"""Backbone base class: a functional Keras model holding a model's core architecture."""

import keras

from keras_llama.utils.python_utils import classproperty, functional_setattr


@keras.saving.register_keras_serializable(package="keras_llama")
class Backbone(keras.Model):
    """Base class for backbones (KerasHub's `keras_hub.models.Backbone`).

    A backbone maps preprocessed inputs (``{"token_ids", "padding_mask"}``) to hidden states.
    Subclasses build a functional model in ``__init__`` and list their constructor arguments
    in ``get_config()``. ``from_preset`` picks the subclass named by the preset's config.
    """

    def __init__(self, *args, dtype=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._initialized = True
        # Keras functional models take no dtype; remember the policy our layers were built with.
        self._backbone_dtype = keras.dtype_policies.get(dtype) if dtype is not None else None

    def __setattr__(self, name, value):
        functional_setattr(self, Backbone, name, value)

    @property
    def token_embedding(self):
        """A `keras.layers.ReversibleEmbedding` mapping token ids to vectors and back."""
        return self._token_embedding

    @token_embedding.setter
    def token_embedding(self, value):
        self._token_embedding = value

    def get_config(self):
        policy = self._backbone_dtype or self.dtype_policy
        return {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": keras.dtype_policies.serialize(policy),
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    # --- presets -------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """Instantiate a backbone from a preset (built-in name, ``kaggle://``, ``hf://``, a local
        folder or a ``.gguf`` file). ``kwargs`` override the preset's config."""
        from keras_llama.models.preset_loading import load_backbone

        return load_backbone(cls, preset, load_weights=load_weights, **kwargs)

    def save_to_preset(self, preset_dir):
        """Save the config and weights to a preset folder (atomically)."""
        from keras_llama.models.preset_loading import save_backbone

        save_backbone(self, preset_dir)

    @classmethod
    def _presets_table(cls):
        return {}

    @classproperty
    def presets(cls):
        """Built-in presets available on this class, as ``{name: metadata}``."""
        return dict(cls._presets_table())
