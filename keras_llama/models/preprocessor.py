"""Preprocessor base classes. (Placeholder until the tokenizer/preprocessor work lands.)"""


class Preprocessor:
    pass


class CausalLMPreprocessor(Preprocessor):
    pass
