"""Llama 1/2 (SentencePiece vocabulary): registers the built-in presets of this family."""

from keras_llama.models.llama.llama_presets import backbone_presets
from keras_llama.utils import registry

registry.register_presets(backbone_presets)
