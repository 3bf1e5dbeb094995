"""LlamaTokenizer: SentencePiece with Llama's special tokens (Llama 1/2, Vicuna, Mistral v1)."""

import keras

from keras_llama.models.llama.llama_backbone import LlamaBackbone
from keras_llama.tokenizers.sentencepiece_tokenizer import SentencePieceTokenizer
from keras_llama.utils import registry


@registry.register_class("llama", "tokenizer")
@keras.saving.register_keras_serializable(package="keras_llama")
class LlamaTokenizer(SentencePieceTokenizer):
    """Llama tokenizer: a SentencePiece model run by the `sentencepiece` package.

    As KerasHub's ``LlamaTokenizer(proto)``: ids equal
    ``sentencepiece.SentencePieceProcessor(model).encode(text)`` for every ``str``, so
    ``"<s>"`` typed in text is characters, not the start token. The string
    ``apply_chat_template`` returns (a `keras_llama.tokenizers.ChatPrompt`) is the exception:
    its special-token strings (``<s>``, ``</s>``, ``<unk>`` and any control or user-defined
    piece of the model) become their ids, as in llama.cpp and Meta's chat code, so a rendered
    multi-turn Llama 2 prompt ``"... [/INST] answer </s><s>[INST] ..."`` gets real end/start
    tokens. ``parse_special_tokens=True`` matches them in all text. The start token is ``<s>``,
    the end token ``</s>``; padding uses id 0 (``<unk>``), as in KerasHub.

    Args:
        proto: a path to a SentencePiece ``tokenizer.model`` or its serialized bytes (for a
            GGUF ``llama`` vocabulary, build them with
            `keras_llama.tokenizers.build_sentencepiece_proto`). Required, as in KerasHub;
            None leaves the tokenizer empty until ``load_assets`` is called.
        start_token: Llama's ``"<s>"`` by default.
        end_token: Llama's ``"</s>"`` by default.
        pad_token: None pads with id 0.
        parse_special_tokens: bool, default False. True matches special-token strings in all
            text, not only in a `ChatPrompt`.

    Example:
        ```python
        tokenizer = keras_llama.models.LlamaTokenizer("tokenizer.model")
        tokenizer("The quick brown fox jumped.")
        tokenizer(["The quick brown fox jumped.", "The fox slept."])
        tokenizer.detokenize(tokenizer("The quick brown fox jumped."))
        ```
    """

    backbone_cls = LlamaBackbone

    def __init__(
        self,
        proto,
        start_token="<s>",
        end_token="</s>",
        pad_token=None,
        parse_special_tokens=False,
    ):
        super().__init__(
            proto=proto,
            start_token=start_token,
            end_token=end_token,
            pad_token=pad_token,
            parse_special_tokens=parse_special_tokens,
        )
