"""Tokenizers backed by `sentencepiece` and Hugging Face `tokenizers` (KerasHub's API)."""

from keras_llama.tokenizers.byte_level_bpe import (
    PRETOKENIZERS,
    build_byte_level_bpe,
    load_tiktoken_bpe,
    tiktoken_to_vocabulary_and_merges,
)
from keras_llama.tokenizers.byte_pair_tokenizer import BytePairTokenizer
from keras_llama.tokenizers.sentencepiece_tokenizer import (
    SentencePieceTokenizer,
    build_sentencepiece_proto,
)
from keras_llama.tokenizers.tokenizer import ChatPrompt, Tokenizer

__all__ = [
    "PRETOKENIZERS",
    "BytePairTokenizer",
    "ChatPrompt",
    "SentencePieceTokenizer",
    "Tokenizer",
    "build_byte_level_bpe",
    "build_sentencepiece_proto",
    "load_tiktoken_bpe",
    "tiktoken_to_vocabulary_and_merges",
]
