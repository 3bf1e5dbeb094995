"""Byte-level BPE tokenizer on Hugging Face `tokenizers` (Rust), for Llama 3 and GPT-2-style
vocabularies.

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

import base64
import binascii
import json
import os

import keras
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from keras_llama.tokenizers.tokenizer import Tokenizer

VOCAB_FILENAME = "vocabulary.json"
MERGES_FILENAME = "merges.txt"
TOKENIZER_JSON_FILENAME = "tokenizer.json"

# Pre-tokenizer regexes. Several regexes are applied one after another, each splitting the
# pieces left by the previous one (llama.cpp's `regex_exprs`, `tokenizers`' Sequence of Split).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")

# name -> (regexes, ignore_merges default). Names are llama.cpp's `tokenizer.ggml.pre` values
# (src/llama-vocab.cpp), so a GGUF file's pre-tokenizer can be passed as it is.
_LLAMA3 = ([LLAMA3_PATTERN], True)
_GPT2 = ([GPT2_PATTERN], False)
_DIGITS_GPT2 = ([r"\p{N}", GPT2_PATTERN], False)  # GPT-2 regex, every digit on its own
_QWEN2 = ([QWEN2_PATTERN], False)
PRETOKENIZERS = {
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "llama-bpe": _LLAMA3,
    "falcon3": _LLAMA3,
    "dbrx": ([LLAMA3_PATTERN], False),
    "smaug-bpe": ([LLAMA3_PATTERN], False),
    "gpt2": _GPT2,
    "gpt-2": _GPT2,
    "phi-2": _GPT2,
    "mpt": _GPT2,
    "olmo": _GPT2,
    "jais": _GPT2,
    "smollm": _DIGITS_GPT2,
    "starcoder": _DIGITS_GPT2,
    "refact": _DIGITS_GPT2,
    "command-r": _DIGITS_GPT2,
    "codeshell": _DIGITS_GPT2,
    "exaone": _DIGITS_GPT2,
    "minerva-7b": _DIGITS_GPT2,
    "qwen2": _QWEN2,
    "stablelm2": _QWEN2,
    "deepseek-r1-qwen": _QWEN2,
    "default": (
        [
            r"[\p{P}\$\+<=>\^~\|]+",
            r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
            r"\p{N}+",
            r"[0-9][0-9][0-9]",
        ],
        False,
    ),
}


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
        start_token, end_token, pad_token: token strings (None: no start/end token; pad id 0).
        stop_tokens: extra tokens that end generation besides ``end_token``.
        pretokenizer: the regex split applied before BPE when building from vocabulary +
            merges: a name (``"llama3"``, ``"gpt2"``, ``"smollm"``, ... any key of
            ``PRETOKENIZERS``, which are llama.cpp's ``tokenizer.ggml.pre`` names), a regex, or
            a list of regexes applied in turn. A ``tokenizer.json`` brings its own.
        ignore_merges: keep a piece whole when it is itself a token (tiktoken's behaviour).
            None: the pretokenizer's default (True for Llama 3).
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
        self.pretokenizer = _check_pretokenizer(pretokenizer)
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
        tokenizer.set_backend(_read_tokenizer_json(tokenizer_json))
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
        special = _special_token_ids(special_tokens or [], len(ranks), vocabulary)
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
        vocabulary = _read_vocabulary(vocabulary)
        merges = _read_merges(merges)
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
        backend.add_special_tokens([_special(t) for t in special])
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
            self.set_backend(_read_tokenizer_json(full))
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


# --- building blocks ------------------------------------------------------------------------
def build_byte_level_bpe(vocabulary, merges, special_tokens=(), pretokenizer="llama3", *,
                         ignore_merges=None):  # fmt: skip
    """A `tokenizers.Tokenizer` for a byte-level BPE vocabulary (GGUF ``gpt2`` style).

    Args:
        vocabulary: ``{token: id}`` or a list of tokens (index = id). Tokens are in GPT-2's
            byte-to-unicode alphabet (``"Ġthe"``); special tokens must be included.
        merges: ``"a b"`` strings or ``(a, b)`` pairs, highest priority first.
        special_tokens: tokens matched whole in text, keeping their vocabulary ids.
        pretokenizer: a ``PRETOKENIZERS`` name (llama.cpp's ``tokenizer.ggml.pre``: "llama-bpe",
            "smollm", "gpt-2", ...), a regex, or a list of regexes applied in turn.
        ignore_merges: keep whole pieces found in the vocabulary. None: the pretokenizer's
            default (True for the Llama 3 names, as in llama.cpp).
    """
    vocabulary = _read_vocabulary(vocabulary)
    merges = _read_merges(merges)
    regexes, default_ignore = _pretokenizer_regexes(pretokenizer)
    if ignore_merges is None:
        ignore_merges = default_ignore
    for rank, (a, b) in enumerate(merges):
        for token in (a, b, a + b):
            if token not in vocabulary:
                raise ValueError(
                    f"Merge rule {rank} ({a!r} {b!r}) uses {token!r}, which is not in the "
                    f"vocabulary. Received: merge {a + ' ' + b!r}"
                )
    for token in special_tokens:
        if token not in vocabulary:
            raise ValueError(
                f"Special token {token!r} is not in the vocabulary (size {len(vocabulary)}). "
                f"Received: special_tokens containing {token!r}"
            )
    backend = tokenizers.Tokenizer(
        models.BPE(vocab=vocabulary, merges=merges, ignore_merges=bool(ignore_merges))
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([_special(t) for t in special_tokens])
    return backend


def bytes_to_unicode():
    """GPT-2's byte -> printable character table: ``{byte: str}`` for all 256 bytes."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def load_tiktoken_bpe(path):
    """Read a tiktoken BPE file (``<base64 token> <rank>`` lines) -> ``{token_bytes: rank}``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tiktoken BPE file not found. Received: path={path!r}")
    ranks = {}
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except (ValueError, binascii.Error):
                raise ValueError(
                    f"{path!r} is not a tiktoken BPE file: line {number} is not "
                    f"'<base64 token> <rank>'. Received: {line[:80]!r}"
                ) from None
            ranks[token] = rank
    if not ranks:
        raise ValueError(f"{path!r} is not a tiktoken BPE file: it holds no tokens.")
    return ranks


def tiktoken_to_vocabulary_and_merges(ranks):
    """Derive a byte-level vocabulary and merge list from tiktoken ranks.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank. Every split
    ``token = left + right`` with both halves in the vocabulary is a merge; merges are ordered
    by the rank of the merged token, then by the ranks of the halves (transformers'
    ``TikTokenConverter``).
    """
    table = bytes_to_unicode()
    chars = [table[b] for b in range(256)]

    def to_str(token):
        return "".join(chars[b] for b in token)

    vocabulary, merges = {}, []
    for token, rank in ranks.items():
        vocabulary[to_str(token)] = rank
        if len(token) == 1:
            continue
        splits = []
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                splits.append((ranks[left], ranks[right], left, right))
        splits.sort()
        merges.extend((rank, left, right) for _, _, left, right in splits)
    merges.sort(key=lambda m: m[0])  # stable: keeps the per-token order above
    return vocabulary, [(to_str(left), to_str(right)) for _, left, right in merges]


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


def _special(token):
    return AddedToken(token, special=True, normalized=False)


def _check_pretokenizer(pretokenizer):
    _pretokenizer_regexes(pretokenizer)
    return list(pretokenizer) if isinstance(pretokenizer, tuple) else pretokenizer


def _pretokenizer_regexes(pretokenizer):
    """-> (list of regexes, ignore_merges default)."""
    if isinstance(pretokenizer, str) and pretokenizer in PRETOKENIZERS:
        regexes, ignore = PRETOKENIZERS[pretokenizer]
        return list(regexes), ignore
    if isinstance(pretokenizer, str):
        if not any(c in pretokenizer for c in "\\[(|?+*"):
            raise ValueError(
                f"Unknown pretokenizer name. Expected one of {sorted(PRETOKENIZERS)}, a regex "
                f"or a list of regexes. Received: pretokenizer={pretokenizer!r}"
            )
        regexes = [pretokenizer]
    elif isinstance(pretokenizer, (list, tuple)) and all(isinstance(r, str) for r in pretokenizer):
        regexes = list(pretokenizer)
    else:
        raise TypeError(
            "`pretokenizer` must be a name, a regex or a list of regexes. "
            f"Received: pretokenizer={pretokenizer!r}"
        )
    for regex in regexes:
        try:
            Regex(regex)
        except Exception as e:
            raise ValueError(f"Invalid pretokenizer regex {regex!r}: {e}") from e
    return regexes, False


def _read_vocabulary(vocabulary):
    if isinstance(vocabulary, os.PathLike):
        vocabulary = os.fspath(vocabulary)
    if isinstance(vocabulary, str):
        path = vocabulary
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Vocabulary file not found. Received: vocabulary={path!r}")
        try:
            with open(path, encoding="utf-8") as f:
                vocabulary = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"Could not read {path!r} as a JSON vocabulary: {e}") from e
        if not isinstance(vocabulary, dict):
            raise ValueError(
                f"{path!r} must hold a JSON object {{token: id}}. "
                f"Received: a JSON {type(vocabulary).__name__}"
            )
    if isinstance(vocabulary, (list, tuple)):
        as_dict = {}
        for i, token in enumerate(vocabulary):
            if token in as_dict:
                raise ValueError(
                    f"Token {token!r} appears twice in the vocabulary list (ids "
                    f"{as_dict[token]} and {i}). Received: a list of {len(vocabulary)} tokens"
                )
            as_dict[token] = i
        vocabulary = as_dict
    if not isinstance(vocabulary, dict):
        raise TypeError(
            "`vocabulary` must be a dict {token: id}, a list of tokens or a path to a "
            f"vocabulary.json. Received: {type(vocabulary).__name__}"
        )
    for token, id in vocabulary.items():
        if not isinstance(token, str) or isinstance(id, bool) or not isinstance(id, int) or id < 0:
            raise ValueError(
                "`vocabulary` must map token strings to non-negative int ids. "
                f"Received: {token!r}: {id!r}"
            )
    return dict(vocabulary)


def _read_merges(merges):
    if isinstance(merges, os.PathLike):
        merges = os.fspath(merges)
    source = "`merges`"
    if isinstance(merges, str):
        source = merges
        if not os.path.isfile(merges):
            raise FileNotFoundError(f"Merges file not found. Received: merges={merges!r}")
        with open(merges, encoding="utf-8") as f:
            merges = [line.rstrip("\r\n") for line in f]
        merges = [m for m in merges if m and not m.startswith("#version")]
    out = []
    for i, merge in enumerate(merges):
        if isinstance(merge, str):
            if merge.startswith("#version"):
                continue
            parts = merge.split(" ")
        else:
            parts = list(merge)
        if len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
            raise ValueError(
                f"Merge rule {i} in {source} must be two tokens 'a b'. Received: {merge!r}"
            )
        out.append((parts[0], parts[1]))
    return out


def _read_tokenizer_json(source):
    if isinstance(source, tokenizers.Tokenizer):
        return source
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        raise TypeError(
            "Expected a tokenizer.json path, its JSON text or a `tokenizers.Tokenizer`. "
            f"Received: {type(source).__name__}"
        )
    if source.lstrip().startswith("{"):
        try:
            return tokenizers.Tokenizer.from_str(source)
        except Exception as e:
            raise ValueError(f"Could not parse the tokenizer.json text: {e}") from e
    if not os.path.isfile(source):
        raise FileNotFoundError(f"tokenizer.json not found. Received: {source!r}")
    try:
        return tokenizers.Tokenizer.from_file(source)
    except Exception as e:
        raise ValueError(f"Could not read {source!r} as a Hugging Face tokenizer.json: {e}") from e


def _special_token_ids(special_tokens, first_id, vocabulary):
    if isinstance(special_tokens, dict):
        special = dict(special_tokens)
    else:
        special = {token: first_id + i for i, token in enumerate(special_tokens)}
    taken = {id: token for token, id in vocabulary.items()}
    for token, id in special.items():
        if id in taken or token in vocabulary:
            raise ValueError(
                f"Special token {token!r} (id {id}) collides with vocabulary token "
                f"{taken.get(id, token)!r}. Received: special_tokens={special_tokens!r}"
            )
    return special


def _write_text(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
