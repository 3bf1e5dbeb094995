"""Llama3Tokenizer: byte-level BPE with Llama 3's special tokens and Meta's token ids."""

import re

import keras

from keras_llama.models.llama3.llama3_backbone import Llama3Backbone
from keras_llama.tokenizers.byte_pair_tokenizer import BytePairTokenizer
from keras_llama.utils import registry

# Meta's special tokens for Llama 3.1 and later (llama-models, llama3/tokenizer.py); ids are
# 128000 + index. Llama 3.0 named most of them `<|reserved_special_token_N|>`.
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message (tool calls)
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",
] + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - 12)]
LLAMA3_0_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(5, 256 - 5)]

# Meta's `stop_tokens` (besides the configured eos): end of turn, end of message, end of text.
LLAMA3_STOP_TOKENS = ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"]

_SPECIAL_SHAPE = re.compile(r"<\|[A-Za-z0-9_]+\|>")


@registry.register_class("llama3", "tokenizer")
@keras.saving.register_keras_serializable(package="keras_llama")
class Llama3Tokenizer(BytePairTokenizer):
    """Llama 3 tokenizer: byte-level BPE on Hugging Face `tokenizers`, with ids equal to Meta's
    tiktoken encoding (special tokens matched whole in text).

    Three sources give the same tokenizer:

    ```python
    Llama3Tokenizer(vocabulary="vocabulary.json", merges="merges.txt")    # KerasHub assets
    Llama3Tokenizer.from_tokenizer_json("tokenizer.json")                 # Hugging Face
    Llama3Tokenizer.from_tiktoken("original/tokenizer.model")             # Meta
    ```

    The same class serves other byte-level vocabularies with their own special tokens, e.g.
    SmolLM2 from a GGUF file:

    ```python
    Llama3Tokenizer(
        vocabulary=gguf_tokens, merges=gguf_merges, pretokenizer="smollm",
        bos_token="<|im_start|>", eos_token="<|im_end|>",
        misc_special_tokens=control_tokens, stop_tokens=["<|endoftext|>"])
    ```

    Args:
        vocabulary: ``{token: id}``, a list of tokens (index = id) or a path to a
            ``vocabulary.json`` (see `BytePairTokenizer`).
        merges: merge rules or a path to a ``merges.txt`` (see `BytePairTokenizer`).
        bos_token: start token, ``"<|begin_of_text|>"`` (id 128000).
        eos_token: end token, ``"<|end_of_text|>"`` (id 128001).
        misc_special_tokens: other tokens matched whole in text. None: every ``<|name|>``
            token of the vocabulary (or a tokenizer.json's special tokens).
        pad_token: None pads with id 0, as KerasHub.
        stop_tokens: tokens ending generation besides ``eos_token``. None: ``<|eot_id|>``,
            ``<|eom_id|>`` and ``<|end_of_text|>`` where present (Meta's stop tokens).
        pretokenizer: see `BytePairTokenizer` (default: Llama 3's regex).
        ignore_merges: see `BytePairTokenizer` (None: the pretokenizer's default, True for
            Llama 3's, as tiktoken).

    Example:
        ```python
        tokenizer = keras_llama.models.Llama3Tokenizer(
            vocabulary="vocabulary.json", merges="merges.txt")
        ids = tokenizer("The quick brown fox.")
        tokenizer.detokenize(ids)   # "The quick brown fox."
        ```
    """

    backbone_cls = Llama3Backbone

    def __init__(
        self,
        vocabulary=None,
        merges=None,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        misc_special_tokens=None,
        pad_token=None,
        stop_tokens=None,
        pretokenizer="llama3",
        ignore_merges=None,
    ):
        if isinstance(misc_special_tokens, (set, frozenset)):
            misc_special_tokens = sorted(misc_special_tokens)
        super().__init__(
            vocabulary=vocabulary,
            merges=merges,
            special_tokens=misc_special_tokens,
            start_token=bos_token,
            end_token=eos_token,
            pad_token=pad_token,
            stop_tokens=stop_tokens,
            pretokenizer=pretokenizer,
            ignore_merges=ignore_merges,
        )

    @property
    def bos_token(self):
        return self.start_token

    @property
    def eos_token(self):
        return self.end_token

    @classmethod
    def from_tiktoken(cls, path, special_tokens=None, **kwargs):
        """Build from Meta's tiktoken ``tokenizer.model``. ``special_tokens`` defaults to
        `LLAMA3_SPECIAL_TOKENS` (Llama 3.1+ names; pass `LLAMA3_0_SPECIAL_TOKENS` for 3.0)."""
        if special_tokens is None:
            special_tokens = LLAMA3_SPECIAL_TOKENS
        return super().from_tiktoken(path, special_tokens=special_tokens, **kwargs)

    def _auto_special_tokens(self, vocabulary):
        return [t for t in vocabulary if _SPECIAL_SHAPE.fullmatch(t)]

    def _auto_stop_tokens(self):
        return [t for t in LLAMA3_STOP_TOKENS if self._token_to_id(t) is not None]

    def get_config(self):
        config = super().get_config()
        return {
            "vocabulary": None,
            "merges": None,
            "bos_token": config["start_token"],
            "eos_token": config["end_token"],
            "misc_special_tokens": config["special_tokens"],
            "pad_token": config["pad_token"],
            "stop_tokens": config["stop_tokens"],
            "pretokenizer": config["pretokenizer"],
            "ignore_merges": config["ignore_merges"],
        }
