"""The ``presets`` class property shared by Backbone, Task and Preprocessor."""

from keras_llama.utils.python_utils import classproperty


class PresetsMixin:
    """Adds ``Cls.presets``: the built-in presets whose classes this class can load."""

    @classmethod
    def _presets_table(cls):
        from keras_llama.models.preset_loading import presets_for

        return presets_for(cls)

    @classproperty
    def presets(cls):
        """Built-in presets available on this class, as ``{name: metadata}``."""
        return dict(cls._presets_table())
