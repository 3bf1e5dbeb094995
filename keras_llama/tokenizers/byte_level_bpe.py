"""Building a Hugging Face `tokenizers` byte-level BPE from every form a vocabulary ships in.

`BytePairTokenizer` (``byte_pair_tokenizer.py``) runs what this module builds:

    build_byte_level_bpe(vocabulary, merges, special_tokens, pretokenizer)
        the BPE model, the regex pre-tokenizer (``PRETOKENIZERS``, llama.cpp's names), GPT-2's
        byte-level alphabet (``bytes_to_unicode``) and the special tokens matched whole
    read_vocabulary / read_merges        vocabulary.json + merges.txt (KerasHub), or data
    read_tokenizer_json                  a Hugging Face tokenizer.json
    load_tiktoken_bpe +                  Meta's tiktoken tokenizer.model -> vocabulary and merges
    tiktoken_to_vocabulary_and_merges
"""

import base64
import binascii
import json
import os

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

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
"""The regex pre-tokenizers, by llama.cpp's ``tokenizer.ggml.pre`` names: ``{name: (regexes,
ignore_merges)}``. Text is split by each regex in turn before BPE; ``ignore_merges`` keeps a
piece whole when it is a token itself (tiktoken's rule, Llama 3's names).

Example:
    ```python
    regexes, ignore_merges = keras_llama.tokenizers.PRETOKENIZERS["llama-bpe"]
    ignore_merges   # True
    ```
"""


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

    Returns:
        tokenizers.Tokenizer: the Hugging Face tokenizer `BytePairTokenizer` runs.

    Raises:
        ValueError: for an unknown pretokenizer name or a merge of pieces not in the
            vocabulary.

    Example:
        ```python
        hf_tokenizer = keras_llama.tokenizers.build_byte_level_bpe(
            ["a", "b", "ab"], ["a b"], special_tokens=[], pretokenizer="gpt2")
        hf_tokenizer.encode("ab").ids  # [2]
        ```
    """
    vocabulary = read_vocabulary(vocabulary)
    merges = read_merges(merges)
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
    backend.add_special_tokens([special_added_token(t) for t in special_tokens])
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
    """Read a tiktoken BPE file, such as Meta's Llama 3 ``tokenizer.model``.

    Args:
        path: the file, ``<base64 token> <rank>`` on each line.

    Returns:
        dict: ``{token_bytes: rank}``.

    Raises:
        FileNotFoundError: when ``path`` is not a file.
        ValueError: when a line is not ``<base64 token> <rank>`` or the file holds no token.

    Example:
        ```python
        with open("tiny.tiktoken", "w") as f:
            f.write("YQ== 0\\nYg== 1\\nYWI= 2\\n")  # "a", "b", "ab"
        ranks = keras_llama.tokenizers.load_tiktoken_bpe("tiny.tiktoken")
        # {b"a": 0, b"b": 1, b"ab": 2}
        ```
    """
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

    Args:
        ranks: ``{token_bytes: rank}``, as `load_tiktoken_bpe` returns.

    Returns:
        tuple: ``(vocabulary, merges)``: ``{token: id}`` in GPT-2's byte-to-unicode alphabet,
        and ``"left right"`` merge strings, for `BytePairTokenizer`.

    Example:
        ```python
        vocabulary, merges = keras_llama.tokenizers.tiktoken_to_vocabulary_and_merges(
            {b"a": 0, b"b": 1, b"ab": 2})
        # vocabulary == {"a": 0, "b": 1, "ab": 2}, merges == ["a b"]
        ```
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


# --- readers and helpers ---------------------------------------------------------------------
def special_added_token(token):
    return AddedToken(token, special=True, normalized=False)


def check_pretokenizer(pretokenizer):
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


def read_vocabulary(vocabulary):
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


def read_merges(merges):
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
            valid = len(parts) == 2 and parts[0] != "" and parts[1] != ""
        else:  # (written out, not all(): this loop runs once per merge, ~50K times)
            parts = list(merge)
            valid = len(parts) == 2 and isinstance(parts[0], str) and isinstance(parts[1], str)
            valid = valid and parts[0] != "" and parts[1] != ""
        if not valid:
            raise ValueError(
                f"Merge rule {i} in {source} must be two tokens 'a b'. Received: {merge!r}"
            )
        out.append((parts[0], parts[1]))
    return out


def read_tokenizer_json(source):
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


def special_token_ids(special_tokens, first_id, vocabulary):
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
