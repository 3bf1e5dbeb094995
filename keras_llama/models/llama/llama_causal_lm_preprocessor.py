from keras_llama.models.preprocessor import CausalLMPreprocessor


class LlamaCausalLMPreprocessor(CausalLMPreprocessor):
    pass
