"""LlamaCausalLMPreprocessor: `CausalLMPreprocessor` paired with `LlamaTokenizer`."""

import keras

from keras_llama.models.llama.llama_backbone import LlamaBackbone
from keras_llama.models.llama.llama_tokenizer import LlamaTokenizer
from keras_llama.models.preprocessor import CausalLMPreprocessor
from keras_llama.utils import registry


@registry.register_class("llama", "preprocessor")
@keras.saving.register_keras_serializable(package="keras_llama")
class LlamaCausalLMPreprocessor(CausalLMPreprocessor):
    """Llama causal LM preprocessor (KerasHub's `LlamaCausalLMPreprocessor`).

    Strings -> ``({"token_ids", "padding_mask"}, labels, sample_weight)`` with ``<s>`` first
    and ``</s>`` last; see `CausalLMPreprocessor`.

    Example:
        ```python
        preprocessor = LlamaCausalLMPreprocessor(LlamaTokenizer("tokenizer.model"), sequence_length=8)
        x, y, sample_weight = preprocessor(["Taco tuesday", "Fish taco please!"])
        ```
    """

    backbone_cls = LlamaBackbone
    tokenizer_cls = LlamaTokenizer
