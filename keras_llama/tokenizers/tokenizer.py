"""Tokenizer base class: plain Python (no TensorFlow), KerasHub's tokenizer API.

A tokenizer maps text to int32 token ids and back. Subclasses wrap a well-kept library
(`sentencepiece`, Hugging Face `tokenizers`) and implement six hooks:

    _encode_batch(list[str]) -> list[list[int]]      _decode_batch(list[list[int]]) -> list[str]
    _vocabulary_size() -> int                        _id_to_token(int) -> str
    _token_to_id(str) -> int | None                  _is_ready() -> bool

This base class owns everything else: input checks, batching, the special-token properties,
config round-trips and preset delegation.

Shapes: ``tokenize("a b")`` -> int32 array ``[n]``; ``tokenize(["a", "b c"])`` -> list of int32
arrays (ragged batch). ``detokenize([1, 2])`` -> ``str``; ``detokenize([[1, 2], [3]])`` or a
2-D array -> ``list[str]``.
"""

import inspect

import keras
import numpy as np

from keras_llama.utils import registry
from keras_llama.utils.python_utils import classproperty

# Keys KerasHub writes into a tokenizer's config that have no counterpart here. They are
# accepted by `from_config` when they hold KerasHub's defaults, so KerasHub presets load.
_KERAS_HUB_DEFAULTS = {
    "name": None,
    "trainable": None,
    "dtype": None,
    "config_file": None,
    "sequence_length": None,
    "add_prefix_space": False,
    "add_bos": False,
    "add_eos": False,
    "unsplittable_tokens": None,
}
_ANY_VALUE = {"name", "trainable", "dtype", "config_file", "unsplittable_tokens"}


class ChatPrompt(str):
    """A string rendered by a chat template: its special-token strings are the template's own
    control tokens, and every tokenizer encodes them as those tokens.

    Plain ``str`` text is encoded as the tokenizer's library encodes it (for SentencePiece,
    ``"<s>"`` typed by a user is three characters, not the start token: user text cannot forge
    control tokens). ``apply_chat_template`` returns a `ChatPrompt`, so a rendered multi-turn
    Llama 2 prompt ``"[INST] a [/INST] b </s><s>[INST] c [/INST]"`` gets real end/start ids.
    String operations return plain ``str``; wrap the result again to keep the marking.

    Example:
        ```python
        tokenizer("Hi</s>")              # SentencePiece: "<", "/", "s", ">" pieces
        tokenizer(ChatPrompt("Hi</s>"))  # [..."Hi", 2]
        ```
    """

    __slots__ = ()


@keras.saving.register_keras_serializable(package="keras_llama")
class Tokenizer:
    """Base class for tokenizers (KerasHub's `keras_hub.tokenizers.Tokenizer`).

    Subclasses set ``start_token``, ``end_token`` and ``pad_token`` (token strings, or None)
    and implement the hooks listed in the module docstring. ``pad_token=None`` means pad id 0,
    KerasHub's choice for Llama.

    Example:
        ```python
        tokenizer = keras_llama.models.Tokenizer.from_preset("smollm2_135m_instruct")
        ids = tokenizer("The quick brown fox.")        # int32 array
        tokenizer.detokenize(ids)                      # "The quick brown fox."
        tokenizer(["a", "b c"])                        # list of int32 arrays
        ```
    """

    backbone_cls = None
    start_token = None
    end_token = None
    pad_token = None

    # --- the public API -------------------------------------------------------------------
    def __call__(self, inputs):
        return self.tokenize(inputs)

    def tokenize(self, inputs):
        """Text to token ids.

        Args:
            inputs: a string (-> int32 array ``[n]``), or a list/tuple/1-D array of strings
                (-> list of int32 arrays, one per string).
        """
        self._check_ready()
        texts, batched = _canonicalize_text(inputs)
        ids = [np.asarray(seq, dtype="int32") for seq in self._encode_batch(texts)]
        return ids if batched else ids[0]

    def detokenize(self, inputs):
        """Token ids to text.

        Args:
            inputs: one sequence of ids (a list, 1-D array or tensor, or a single int) -> ``str``;
                a batch (a 2-D array or tensor, or a list of sequences) -> ``list[str]``.
        """
        self._check_ready()
        sequences, batched = _canonicalize_ids(inputs)
        size = self.vocabulary_size()
        for seq in sequences:
            for i in seq:
                if not 0 <= i < size:
                    raise ValueError(
                        f"Token id {i} is out of range for {type(self).__name__}'s vocabulary "
                        f"of size {size} (valid ids are 0..{size - 1}). Received: id={i}"
                    )
        texts = self._decode_batch(sequences)
        return texts if batched else texts[0]

    def vocabulary_size(self):
        """The number of token ids (the largest id plus one)."""
        self._check_ready()
        return self._vocabulary_size()

    def get_vocabulary(self):
        """All tokens as a list of strings, indexed by id."""
        return [self._id_to_token(i) for i in range(self.vocabulary_size())]

    def id_to_token(self, id):
        """The token string of an integer id."""
        self._check_ready()
        size = self.vocabulary_size()
        if isinstance(id, (bool, np.bool_)) or not isinstance(id, (int, np.integer)):
            raise TypeError(f"`id` must be an integer. Received: id={id!r} of type {type(id)}")
        if not 0 <= id < size:
            raise ValueError(
                f"`id` must be in range [0, {size - 1}] for a vocabulary of size {size}. "
                f"Received: id={id}"
            )
        return self._id_to_token(int(id))

    def token_to_id(self, token):
        """The integer id of a token string (the vocabulary entry, not tokenized text)."""
        self._check_ready()
        if isinstance(token, bytes):
            token = token.decode("utf-8")
        if not isinstance(token, str):
            raise TypeError(
                f"`token` must be a string. Received: token={token!r} of type {type(token)}"
            )
        id = self._token_to_id(token)
        if id is None:
            raise ValueError(
                f"Token {token!r} is not in the vocabulary of {type(self).__name__} "
                f"(size {self.vocabulary_size()}). Received: token={token!r}"
            )
        return id

    # --- special tokens -------------------------------------------------------------------
    @property
    def start_token_id(self):
        """Id of ``start_token`` (prepended by preprocessors), or None."""
        return self._optional_id(self.start_token)

    @property
    def end_token_id(self):
        """Id of ``end_token`` (appended by preprocessors, default stop token), or None."""
        return self._optional_id(self.end_token)

    @property
    def pad_token_id(self):
        """Id used for padding: ``pad_token``'s id, or 0 when ``pad_token`` is None."""
        if self.pad_token is None:
            return 0
        return self._optional_id(self.pad_token)

    @property
    def special_tokens(self):
        """Special token strings: removed by ``generate_postprocess`` before detokenizing."""
        return [t for t in dict.fromkeys([self.start_token, self.end_token]) if t is not None]

    @property
    def special_token_ids(self):
        """Ids of ``special_tokens``."""
        if not self._is_ready():
            raise ValueError(
                f"Cannot read `special_token_ids` before a vocabulary is set on "
                f"{type(self).__name__}."
            )
        return [self.token_to_id(t) for t in self.special_tokens]

    @property
    def stop_tokens(self):
        """Tokens that end generation by default: ``end_token`` first."""
        return [t for t in [self.end_token] if t is not None]

    @property
    def stop_token_ids(self):
        """Ids of ``stop_tokens`` (what ``generate(stop_token_ids="auto")`` stops on)."""
        ids = [self._optional_id(t) for t in self.stop_tokens]
        return list(dict.fromkeys(i for i in ids if i is not None))

    # --- config and presets ---------------------------------------------------------------
    def get_config(self):
        """Constructor arguments. Vocabulary data is not in the config: see ``save_assets``."""
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**_drop_keras_hub_keys(cls, config))

    def save_assets(self, dir_path):
        """Write the vocabulary files into ``dir_path`` (KerasHub's asset layout)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement `save_assets()`.")

    def load_assets(self, dir_path):
        """Read the vocabulary files written by ``save_assets`` (or by KerasHub)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement `load_assets()`.")

    @classmethod
    def from_preset(cls, preset, **kwargs):
        """Instantiate a tokenizer from a preset: a built-in name, ``kaggle://...``,
        ``hf://...``, a local folder or a ``.gguf`` file. ``kwargs`` override the config."""
        # Registered by `keras_llama.models.tokenizer_loading` (tokenizers sit below models).
        load_tokenizer = registry.tokenizer_preset_function("load_tokenizer")
        return load_tokenizer(cls, preset, **kwargs)

    def save_to_preset(self, preset_dir):
        """Save the tokenizer config and assets to a preset folder."""
        save_tokenizer = registry.tokenizer_preset_function("save_tokenizer")
        save_tokenizer(self, preset_dir)

    def export_to_transformers(self, path, overwrite=False):
        """Write the files transformers' ``AutoTokenizer.from_pretrained(path)`` reads
        (SentencePiece: ``tokenizer.model``; byte-level BPE: ``tokenizer.json``; both with
        ``tokenizer_config.json``, the special tokens and the chat template). Atomic; see
        `keras_llama.export.transformers`.

        Args:
            path: the folder to write.
            overwrite: replace this export's files in an existing, non-empty folder.

        Raises:
            ValueError: when ``path`` exists and ``overwrite`` is False.

        Example:
            ```python
            tokenizer.export_to_transformers("./hf_tokenizer")
            # transformers.AutoTokenizer.from_pretrained("./hf_tokenizer")
            ```
        """
        # Exporters sit above tokenizers: reached through the registry (`models` fills it).
        registry.tokenizer_preset_function("export_tokenizer")(self, path, overwrite)

    @classproperty
    def presets(cls):
        """Built-in presets available on this class, as ``{name: metadata}``."""
        return registry.presets_for(cls)

    def __repr__(self):
        size = self._vocabulary_size() if self._is_ready() else None
        return f"<{type(self).__name__} vocabulary_size={size}>"

    # --- hooks for subclasses -------------------------------------------------------------
    def _is_ready(self):
        return False

    def _encode_batch(self, texts):
        raise NotImplementedError

    def _decode_batch(self, sequences):
        raise NotImplementedError

    def _vocabulary_size(self):
        raise NotImplementedError

    def _id_to_token(self, id):
        raise NotImplementedError

    def _token_to_id(self, token):
        raise NotImplementedError

    # --- helpers --------------------------------------------------------------------------
    def _check_ready(self):
        if not self._is_ready():
            raise ValueError(
                f"No vocabulary has been set for {type(self).__name__}. Pass one to the "
                "constructor, call `load_assets(dir_path)`, or use `from_preset(...)`."
            )

    def _optional_id(self, token):
        if token is None or not self._is_ready():
            return None
        return self._token_to_id(token)

    def _check_special_tokens_in_vocabulary(self, tokens):
        """Raise if a configured special token is missing from the vocabulary (called by
        subclasses once a vocabulary is set)."""
        for token in tokens:
            if token is not None and self._token_to_id(token) is None:
                raise ValueError(
                    f"Cannot find special token {token!r} in the vocabulary of "
                    f"{type(self).__name__} (size {self._vocabulary_size()}). Make sure the "
                    f"token is in the vocabulary, or pass a different token. Received: {token!r}"
                )


def _canonicalize_text(inputs):
    """-> (list of str, batched)."""
    if isinstance(inputs, np.ndarray) and inputs.ndim == 0:
        inputs = inputs.item()
    if isinstance(inputs, (str, bytes)):
        return [_as_str(inputs, None)], False
    if isinstance(inputs, np.ndarray):
        if inputs.ndim != 1:
            raise ValueError(
                "Expected a string, a list of strings or a 1-D array of strings. "
                f"Received: an array of shape {inputs.shape}"
            )
        inputs = inputs.tolist()
    if isinstance(inputs, (list, tuple)):
        return [_as_str(x, i) for i, x in enumerate(inputs)], True
    raise TypeError(
        "Expected a string, a list of strings or a 1-D array of strings. "
        f"Received: inputs={inputs!r} of type {type(inputs).__name__}"
    )


def _as_str(x, index):
    if isinstance(x, str):
        try:
            x.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates: no UTF-8 text holds them
            where = "" if index is None else f" at index {index}"
            raise ValueError(
                f"Expected text that can be encoded as UTF-8; the string{where} holds a lone "
                f"surrogate {x[e.start]!r} at position {e.start}. Received: {x[:40]!r}"
            ) from None
        return x
    if isinstance(x, bytes):
        try:
            return x.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"Expected UTF-8 text. Received: {x[:40]!r}") from e
    where = "" if index is None else f" at index {index}"
    raise TypeError(
        f"Expected text (str) to tokenize. Received: {x!r} of type {type(x).__name__}{where}"
    )


def _canonicalize_ids(inputs):
    """-> (list of list of int, batched)."""
    if isinstance(inputs, (list, tuple)):
        if len(inputs) == 0 or _is_int(inputs[0]):
            return [_int_list(inputs)], False
        return [_int_list(seq) for seq in inputs], True
    if _is_int(inputs):
        return [[int(inputs)]], False
    if not isinstance(inputs, np.ndarray):
        if not keras.ops.is_tensor(inputs):
            raise TypeError(
                "Expected token ids: an int, a list of ints, a list of lists, or an integer "
                f"array or tensor. Received: {inputs!r} of type {type(inputs).__name__}"
            )
        inputs = keras.ops.convert_to_numpy(inputs)
    if inputs.dtype == object:
        return _canonicalize_ids(inputs.tolist())
    if not np.issubdtype(inputs.dtype, np.integer):
        raise TypeError(f"Expected integer token ids. Received: an array of dtype {inputs.dtype}")
    if inputs.ndim == 0:
        return [[int(inputs)]], False
    if inputs.ndim == 1:
        return [inputs.tolist()], False
    if inputs.ndim == 2:
        return inputs.tolist(), True
    raise ValueError(
        f"Expected token ids of rank 0, 1 or 2. Received: an array of shape {inputs.shape}"
    )


def _is_int(x):
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _int_list(seq):
    if isinstance(seq, np.ndarray) or keras.ops.is_tensor(seq):
        seq = np.asarray(keras.ops.convert_to_numpy(seq))
        if seq.ndim != 1 or not np.issubdtype(seq.dtype, np.integer):
            raise TypeError(
                "Expected a 1-D sequence of integer token ids. "
                f"Received: an array of shape {seq.shape} and dtype {seq.dtype}"
            )
        return seq.tolist()
    out = []
    for x in seq:
        if not _is_int(x):
            raise TypeError(
                f"Expected integer token ids. Received: {x!r} of type {type(x).__name__}"
            )
        out.append(int(x))
    return out


def _drop_keras_hub_keys(cls, config):
    """Drop config keys KerasHub writes that this class has no parameter for."""
    params = inspect.signature(cls.__init__).parameters
    config = dict(config)
    for key, default in _KERAS_HUB_DEFAULTS.items():
        if key in config and key not in params:
            value = config.pop(key)
            if key not in _ANY_VALUE and value != default:
                raise ValueError(
                    f"{cls.__name__} does not support KerasHub's `{key}` option; it expects "
                    f"{key}={default!r}. Received: {key}={value!r}"
                )
    return config
