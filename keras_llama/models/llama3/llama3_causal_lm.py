"""Llama3CausalLM: `LlamaCausalLM` paired with the Llama 3 backbone and preprocessor."""

import keras

from keras_llama.models.llama.llama_causal_lm import LlamaCausalLM
from keras_llama.models.llama3.llama3_backbone import Llama3Backbone
from keras_llama.models.llama3.llama3_causal_lm_preprocessor import Llama3CausalLMPreprocessor
from keras_llama.utils import registry


@registry.register_class("llama3", "task")
@keras.saving.register_keras_serializable(package="keras_llama")
class Llama3CausalLM(LlamaCausalLM):
    """An end-to-end Llama 3 model for causal language modeling (see `LlamaCausalLM`).

    Args:
        backbone: a `keras_llama.models.Llama3Backbone`.
        preprocessor: a `keras_llama.models.Llama3CausalLMPreprocessor` or None.

    Example:
        ```python
        causal_lm = keras_llama.models.Llama3CausalLM.from_preset("smollm2_135m_instruct")
        prompt = causal_lm.preprocessor.apply_chat_template(
            [{"role": "user", "content": "What is the capital of France?"}])
        causal_lm.generate(prompt, max_length=48, strip_prompt=True)
        ```
    """

    backbone_cls = Llama3Backbone
    preprocessor_cls = Llama3CausalLMPreprocessor
