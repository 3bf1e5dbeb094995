from keras_llama.tokenizers.tokenizer import Tokenizer


class Llama3Tokenizer(Tokenizer):
    pass
