"""Public model classes, under KerasHub's names."""

from keras_llama.models.backbone import Backbone
from keras_llama.models.causal_lm import CausalLM
from keras_llama.models.llama.llama_backbone import LlamaBackbone
from keras_llama.models.llama.llama_causal_lm import LlamaCausalLM
from keras_llama.models.llama.llama_causal_lm_preprocessor import LlamaCausalLMPreprocessor
from keras_llama.models.preprocessor import CausalLMPreprocessor, Preprocessor
from keras_llama.models.task import Task

__all__ = [
    "Backbone",
    "CausalLM",
    "CausalLMPreprocessor",
    "LlamaBackbone",
    "LlamaCausalLM",
    "LlamaCausalLMPreprocessor",
    "Preprocessor",
    "Task",
]
