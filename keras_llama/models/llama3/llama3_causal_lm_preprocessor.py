from keras_llama.models.preprocessor import CausalLMPreprocessor


class Llama3CausalLMPreprocessor(CausalLMPreprocessor):
    pass
