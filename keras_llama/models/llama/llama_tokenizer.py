from keras_llama.tokenizers.tokenizer import Tokenizer


class LlamaTokenizer(Tokenizer):
    pass
