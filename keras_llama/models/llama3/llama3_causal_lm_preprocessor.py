"""Llama3CausalLMPreprocessor: `CausalLMPreprocessor` paired with `Llama3Tokenizer`."""

import keras

from keras_llama.models.llama3.llama3_backbone import Llama3Backbone
from keras_llama.models.llama3.llama3_tokenizer import Llama3Tokenizer
from keras_llama.models.preprocessor import CausalLMPreprocessor
from keras_llama.utils import registry


@registry.register_class("llama3", "preprocessor")
@keras.saving.register_keras_serializable(package="keras_llama")
class Llama3CausalLMPreprocessor(CausalLMPreprocessor):
    """Llama 3 causal LM preprocessor (KerasHub's `Llama3CausalLMPreprocessor`).

    Strings -> ``({"token_ids", "padding_mask"}, labels, sample_weight)`` with
    ``<|begin_of_text|>`` first and ``<|end_of_text|>`` last; see `CausalLMPreprocessor`.

    Example:
        ```python
        tokenizer = Llama3Tokenizer(vocabulary="vocabulary.json", merges="merges.txt")
        preprocessor = Llama3CausalLMPreprocessor(tokenizer, sequence_length=8)
        x, y, sample_weight = preprocessor(["Taco tuesday", "Fish taco please!"])
        ```
    """

    backbone_cls = Llama3Backbone
    tokenizer_cls = Llama3Tokenizer
