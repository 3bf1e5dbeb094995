"""Llama 3 (byte-level BPE vocabulary): registers the built-in presets of this family."""

from keras_llama.models.llama3.llama3_presets import backbone_presets
from keras_llama.utils import registry

registry.register_presets(backbone_presets)
