"""Llama3Backbone: the Llama architecture under Llama 3's name (as in KerasHub)."""

import keras

from keras_llama.models.llama.llama_backbone import LlamaBackbone
from keras_llama.utils import registry


@registry.register_class("llama3", "backbone")
@keras.saving.register_keras_serializable(package="keras_llama")
class Llama3Backbone(LlamaBackbone):
    """The Llama 3 decoder network: identical to `LlamaBackbone` (same arguments and weights);
    a separate class so that presets and `from_preset` pair it with `Llama3Tokenizer`.

    Example:
        ```python
        # Llama 3 8B: vocabulary_size=128256, num_layers=32, num_query_heads=32,
        # hidden_dim=4096, intermediate_dim=14336, num_key_value_heads=8. A tiny one:
        backbone = Llama3Backbone(
            vocabulary_size=128, num_layers=2, num_query_heads=4, hidden_dim=32,
            intermediate_dim=64, num_key_value_heads=2, rope_max_wavelength=500000)
        ```
    """
