"""The ``presets`` class property shared by Backbone, Task and Preprocessor."""

from keras_llama.utils import registry
from keras_llama.utils.python_utils import classproperty


class PresetsMixin:
    """Adds ``Cls.presets``: the built-in presets whose classes this class can load."""

    @classproperty
    def presets(cls):
        """Built-in presets available on this class, as ``{name: metadata}``."""
        return registry.presets_for(cls)
