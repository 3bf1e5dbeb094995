"""Byte-level BPE tokenizer on Hugging Face `tokenizers` (Rust), for Llama 3 and GPT-2-style
vocabularies. The building blocks (pre-tokenizer regexes, the BPE builder, the file readers) are
in ``byte_level_bpe.py``.

One class reads every form a byte-level BPE vocabulary ships in:

    source                                   how
    ---------------------------------------  -------------------------------------------------
    Hugging Face tokenizer.json              BytePairTokenizer.from_tokenizer_json(path_or_json)
    vocabulary.json + merges.txt (KerasHub)  BytePairTokenizer(vocabulary, merges)
    Meta tiktoken tokenizer.model            BytePairTokenizer.from_tiktoken(path, special_tokens)
    GGUF "gpt2" (tokens, merges, pre)        BytePairTokenizer(tokens, merges, pretokenizer=pre,
                                                               special_tokens=[...])

Byte-level BPE maps every byte to a printable character (GPT-2's ``bytes_to_unicode``), splits
text with a regex (the "pre-tokenizer"), then merges characters inside each piece by merge rank.
``ignore_merges=True`` first looks the whole piece up in the vocabulary and keeps it whole if
found; that is what tiktoken does (it encodes a piece that is itself a token as that token), and
Llama 3 needs it to match Meta's tokenizer on rare strings.

Special tokens are matched as whole tokens anywhere in the text, before the regex split (as
tiktoken's ``allowed_special="all"``), and get their own ids.
"""

import json
import os

import keras
import tokenizers
from tokenizers import decoders

from keras_llama.tokenizers.byte_level_bpe import (
    build_byte_level_bpe,
    check_pretokenizer,
    load_tiktoken_bpe,
    read_tokenizer_json,
    read_vocabulary,
    special_added_token,
    special_token_ids,
    tiktoken_to_vocabulary_and_merges,
)
from keras_llama.tokenizers.tokenizer import Tokenizer

VOCAB_FILENAME = "vocabulary.json"
MERGES_FILENAME = "merges.txt"
TOKENIZER_JSON_FILENAME = "tokenizer.json"


@keras.saving.register_keras_serializable(package="keras_llama")
class BytePairTokenizer(Tokenizer):
    """A byte-level BPE tokenizer backed by Hugging Face `tokenizers`.

    Args:
        vocabulary: ``{token: id}``, a list of tokens (index = id, as in GGUF), or a path to
            a ``vocabulary.json``. None leaves the tokenizer empty until ``load_assets``.
        merges: merge rules, as ``"a b"`` strings or ``(a, b)`` pairs in priority order, or a
            path to a ``merges.txt``.
        special_tokens: tokens matched whole in text. None: the special tokens of a
            ``tokenizer.json``/tiktoken source, or none for vocabulary + merges.
            ``start_token``, ``end_token`` and ``pad_token`` are always matched whole.
        start_token: the token preprocessors prepend, or None for none.
        end_token: the token preprocessors append and the default stop token, or None.
        pad_token: the padding token, or None to pad with id 0.
        stop_tokens: extra tokens that end generation besides ``end_token``.
        pretokenizer: the regex split applied before BPE when building from vocabulary +
            merges: a name (``"llama3"``, ``"gpt2"``, ``"smollm"``, ... any key of
            ``PRETOKENIZERS``, which are llama.cpp's ``tokenizer.ggml.pre`` names), a regex, or
            a list of regexes applied in turn. A ``tokenizer.json`` brings its own.
        ignore_merges: keep a piece whole when it is itself a token (tiktoken's behaviour).
            None: the pretokenizer's default (True for Llama 3).

    Example:
        ```python
        vocabulary = ["<s>", "</s>", "a", "b", "\u0120", "ab", "\u0120a"]
        tokenizer = keras_llama.tokenizers.BytePairTokenizer(
            vocabulary, merges=["a b", "\u0120 a"], special_tokens=["<s>", "</s>"],
            start_token="<s>", end_token="</s>", pretokenizer="gpt2")
        tokenizer("ab a")                          # [5, 6]: "ab", " a"
        tokenizer.detokenize(tokenizer("ab a"))    # "ab a"
        ```
    """

    def __init__(
        self,
        vocabulary=None,
        merges=None,
        special_tokens=None,
        start_token=None,
        end_token=None,
        pad_token=None,
        stop_tokens=None,
        pretokenizer="llama3",
        ignore_merges=None,
    ):
        self.start_token = start_token
        self.end_token = end_token
        self.pad_token = pad_token
        self._special_tokens_arg = _token_list(special_tokens, "special_tokens")
        self._stop_tokens_arg = _token_list(stop_tokens, "stop_tokens")
        self.pretokenizer = check_pretokenizer(pretokenizer)
        self.ignore_merges = ignore_merges
        self._backend = None
        self._resolved_special_tokens = []
        if (vocabulary is None) != (merges is None):
            raise ValueError(
                "Pass both `vocabulary` and `merges`, or neither. Received: "
                f"vocabulary of type {type(vocabulary).__name__}, "
                f"merges of type {type(merges).__name__}"
            )
        if vocabulary is not None:
            self.set_vocabulary_and_merges(vocabulary, merges)

    # --- alternative constructors ---------------------------------------------------------
    @classmethod
    def from_tokenizer_json(cls, tokenizer_json, **kwargs):
        """Build from a Hugging Face ``tokenizer.json``: a path, its JSON text, or a
        ``tokenizers.Tokenizer`` (used as it is: this tokenizer's special tokens are added to
        it). Its normalizer, pre-tokenizer, model and decoder are used as they are; its
        post-processor is not (no BOS is added: preprocessors add it)."""
        tokenizer = cls(**kwargs)
        tokenizer.set_backend(read_tokenizer_json(tokenizer_json))
        return tokenizer

    @classmethod
    def from_tiktoken(cls, path, special_tokens=None, **kwargs):
        """Build from a tiktoken BPE file (``<base64 token> <rank>`` per line, Meta's Llama 3
        ``tokenizer.model``).

        The vocabulary and merges are derived from the ranks as transformers' and tiktoken's
        converters do, with ``ignore_merges=True``, so ids equal tiktoken's.

        Args:
            path: the tiktoken file.
            special_tokens: a list (ids follow the last rank, in order) or ``{token: id}``.
            **kwargs: constructor arguments (``pretokenizer`` defaults to ``"llama3"``).
        """
        ranks = load_tiktoken_bpe(path)
        vocabulary, merges = tiktoken_to_vocabulary_and_merges(ranks)
        special = special_token_ids(special_tokens or [], len(ranks), vocabulary)
        vocabulary.update(special)
        tokenizer = cls(**kwargs)
        ignore = True if tokenizer.ignore_merges is None else tokenizer.ignore_merges
        backend = build_byte_level_bpe(
            vocabulary, merges, list(special), tokenizer.pretokenizer, ignore_merges=ignore
        )
        tokenizer.set_backend(backend)
        return tokenizer

    # --- vocabulary -----------------------------------------------------------------------
    def set_vocabulary_and_merges(self, vocabulary, merges):
        """Build the BPE from a vocabulary and merge rules (data or file paths)."""
        vocabulary = read_vocabulary(vocabulary)
        special = self._special_tokens_arg
        if special is None:
            special = self._auto_special_tokens(vocabulary)
        backend = build_byte_level_bpe(
            vocabulary, merges, special, self.pretokenizer, ignore_merges=self.ignore_merges
        )
        self.set_backend(backend)

    def set_backend(self, backend):
        """Use a ready `tokenizers.Tokenizer`, adding this tokenizer's special tokens to it."""
        if not isinstance(backend, tokenizers.Tokenizer):
            raise TypeError(
                f"Expected a `tokenizers.Tokenizer`. Received: {type(backend).__name__}"
            )
        vocab = backend.get_vocab(with_added_tokens=True)
        if self._special_tokens_arg is None:
            added = backend.get_added_tokens_decoder()
            special = [added[i].content for i in sorted(added) if added[i].special]
        else:
            special = list(self._special_tokens_arg)
        required = [self.start_token, self.end_token, self.pad_token]
        for token in special + required + (self._stop_tokens_arg or []):
            if token is not None and token not in vocab:
                raise ValueError(
                    f"Cannot find special token {token!r} in the vocabulary of "
                    f"{type(self).__name__} (size {len(vocab)}). Make sure the token is in "
                    f"the vocabulary, or pass a different token. Received: {token!r}"
                )
        special = list(dict.fromkeys(special + [t for t in required if t is not None]))
        backend.add_special_tokens([special_added_token(t) for t in special])
        if backend.decoder is None:
            backend.decoder = decoders.ByteLevel()
        self._backend = backend
        self._resolved_special_tokens = special
        self._size = max(vocab.values()) + 1 if vocab else 0

    def _auto_special_tokens(self, vocabulary):
        """Special tokens when building from vocabulary + merges with ``special_tokens=None``."""
        return []

    # --- hooks ----------------------------------------------------------------------------
    def _is_ready(self):
        return self._backend is not None

    def _encode_batch(self, texts):
        return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=False)]

    def _decode_batch(self, sequences):
        return self._backend.decode_batch(sequences, skip_special_tokens=False)

    def _vocabulary_size(self):
        return self._size

    def _id_to_token(self, id):
        token = self._backend.id_to_token(id)
        if token is None:
            raise ValueError(f"Id {id} has no token in this vocabulary. Received: id={id}")
        return token

    def _token_to_id(self, token):
        return self._backend.token_to_id(token)

    # --- special tokens -------------------------------------------------------------------
    @property
    def special_tokens(self):
        """Tokens matched whole in text: the configured special tokens plus start/end/pad."""
        base = super().special_tokens
        return list(dict.fromkeys(base + self._resolved_special_tokens))

    @property
    def stop_tokens(self):
        """``end_token`` followed by ``stop_tokens`` (those in the vocabulary)."""
        extra = self._stop_tokens_arg
        if extra is None:
            extra = self._auto_stop_tokens()
        tokens = super().stop_tokens + list(extra)
        return list(dict.fromkeys(tokens))

    def _auto_stop_tokens(self):
        return []

    # --- assets and config ----------------------------------------------------------------
    def save_assets(self, dir_path):
        """Write ``tokenizer.json`` (the full pipeline) and, for a byte-level BPE, KerasHub's
        ``vocabulary.json`` + ``merges.txt``."""
        self._check_ready()
        text = self._backend.to_str()
        _write_text(os.path.join(dir_path, TOKENIZER_JSON_FILENAME), text)
        model = json.loads(text)["model"]
        if model.get("type") != "BPE":
            return
        merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
        if any(" " in a or " " in b for a, b in merges):
            return  # not representable as "a b" lines
        vocabulary = self._backend.get_vocab(with_added_tokens=True)
        vocabulary = dict(sorted(vocabulary.items(), key=lambda kv: kv[1]))
        _write_text(os.path.join(dir_path, VOCAB_FILENAME), json.dumps(vocabulary))
        _write_text(
            os.path.join(dir_path, MERGES_FILENAME), "".join(f"{a} {b}\n" for a, b in merges)
        )

    def load_assets(self, dir_path):
        """Read ``tokenizer.json`` if present, else KerasHub's ``vocabulary.json`` +
        ``merges.txt`` (built with this tokenizer's ``pretokenizer``)."""
        full = os.path.join(dir_path, TOKENIZER_JSON_FILENAME)
        vocab = os.path.join(dir_path, VOCAB_FILENAME)
        merges = os.path.join(dir_path, MERGES_FILENAME)
        if os.path.isfile(full):
            self.set_backend(read_tokenizer_json(full))
        elif os.path.isfile(vocab) and os.path.isfile(merges):
            self.set_vocabulary_and_merges(vocab, merges)
        else:
            raise FileNotFoundError(
                f"Expected {TOKENIZER_JSON_FILENAME!r} or {VOCAB_FILENAME!r} + "
                f"{MERGES_FILENAME!r} in the tokenizer asset folder. Received: "
                f"dir_path={dir_path!r}"
            )

    def get_config(self):
        return {
            "vocabulary": None,  # stored as assets
            "merges": None,
            "special_tokens": self._special_tokens_arg,
            "start_token": self.start_token,
            "end_token": self.end_token,
            "pad_token": self.pad_token,
            "stop_tokens": self._stop_tokens_arg,
            "pretokenizer": self.pretokenizer,
            "ignore_merges": self.ignore_merges,
        }


# --- helpers --------------------------------------------------------------------------------
def _token_list(tokens, name):
    if tokens is None:
        return None
    if isinstance(tokens, str):
        raise TypeError(f"`{name}` must be a list of token strings. Received: {name}={tokens!r}")
    tokens = sorted(tokens) if isinstance(tokens, (set, frozenset)) else list(tokens)
    for token in tokens:
        if not isinstance(token, str):
            raise TypeError(
                f"`{name}` must hold token strings. Received: {token!r} of type "
                f"{type(token).__name__}"
            )
    return tokens


def _write_text(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
