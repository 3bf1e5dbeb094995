"""SentencePiece tokenizer on the `sentencepiece` package, and a ModelProto builder for GGUF.

A SentencePiece model is one serialized ``ModelProto``: pieces with scores and types, plus the
normalizer and trainer settings that change how text is encoded. KerasHub stores it as
``vocabulary.spm`` in the tokenizer's asset folder; so do we.

GGUF files with ``tokenizer.ggml.model == "llama"`` carry the same data as arrays
(``tokenizer.ggml.tokens`` / ``scores`` / ``token_type`` plus bos/eos/unk ids);
``build_sentencepiece_proto`` turns those back into a real ModelProto.
"""

import os
import re

import keras
import sentencepiece as spm

from keras_llama.tokenizers.tokenizer import ChatPrompt, Tokenizer

VOCAB_FILENAME = "vocabulary.spm"

# SentencePiece's ModelProto.SentencePiece.Type enum; GGUF's token_type uses the same numbers.
PIECE_TYPES = {
    "NORMAL": 1,
    "UNKNOWN": 2,
    "CONTROL": 3,
    "USER_DEFINED": 4,
    "UNUSED": 5,
    "BYTE": 6,
}


@keras.saving.register_keras_serializable(package="keras_llama")
class SentencePieceTokenizer(Tokenizer):
    """A tokenizer running a SentencePiece model with the `sentencepiece` package.

    ``tokenize`` returns ``SentencePieceProcessor.encode(text)`` (no BOS/EOS: the preprocessor
    adds those), as KerasHub does: special-token strings typed in the text (``"<s>"``,
    ``"</s>"``, ``"[INST]"``) are characters like any other, so user text cannot forge control
    tokens. Two exceptions match the model's control, unknown and user-defined pieces (e.g.
    ``<s>``, ``</s>``, ``<unk>``) in the text as their own ids:

    - a `keras_llama.tokenizers.ChatPrompt`, the string ``apply_chat_template`` returns: a
      rendered multi-turn chat prompt such as ``"[INST] a [/INST] b </s><s>[INST] c [/INST]"``
      gets real end/start tokens;
    - every string, when ``parse_special_tokens=True`` (opt-in).

    Matching splits the text on those pieces, longest first, and encodes each piece in between
    with SentencePiece on its own: what llama.cpp (``parse_special``), Meta's Llama 2 chat code
    (turns encoded separately, joined by BOS/EOS ids) and transformers' SentencePiece Llama
    tokenizer (``legacy=True``) do.

    ``detokenize`` is ``SentencePieceProcessor.decode(ids)``, which drops control tokens such
    as ``<s>``.

    Args:
        proto: a path to a SentencePiece ``.model`` file, or the serialized model as bytes.
            None leaves the tokenizer empty until ``load_assets`` is called.
        start_token: token prepended by preprocessors, e.g. ``"<s>"``; None for none.
        end_token: token appended by preprocessors and the default stop token; None for none.
        pad_token: padding token; None pads with id 0.
        parse_special_tokens: bool, default False. True matches special-token strings in all
            text, not only in a `ChatPrompt` (see above).

    Example:
        ```python
        tokenizer = SentencePieceTokenizer("tokenizer.model", start_token="<s>", end_token="</s>")
        tokenizer("Hello world")                 # array([15043, 3186], dtype=int32)
        tokenizer("Hi</s>")                      # [..."Hi", ..."</", ..."s", ...">"]: plain text
        tokenizer(ChatPrompt("Hi</s><s>Yo"))     # [..."Hi", 2, 1, ..."Yo"]
        ```
    """

    def __init__(
        self,
        proto=None,
        start_token=None,
        end_token=None,
        pad_token=None,
        parse_special_tokens=False,
    ):
        if not isinstance(parse_special_tokens, bool):
            raise TypeError(
                "`parse_special_tokens` must be True or False. "
                f"Received: parse_special_tokens={parse_special_tokens!r}"
            )
        self.start_token = start_token
        self.end_token = end_token
        self.pad_token = pad_token
        self.parse_special_tokens = parse_special_tokens
        self.proto = None
        self._processor = None
        self._special_pattern = None
        self.set_proto(proto)

    def set_proto(self, proto):
        """Load a SentencePiece model from a path or serialized bytes (None clears it)."""
        if proto is None:
            self.proto, self._processor = None, None
            return
        source = "the `proto` bytes"
        if isinstance(proto, os.PathLike):
            proto = os.fspath(proto)
        if isinstance(proto, str):
            source = proto
            if not os.path.isfile(proto):
                raise FileNotFoundError(
                    f"SentencePiece model file not found. Received: proto={proto!r}"
                )
            with open(proto, "rb") as f:
                proto = f.read()
        elif not isinstance(proto, (bytes, bytearray)):
            raise TypeError(
                "`proto` must be a path to a SentencePiece model or its serialized bytes. "
                f"Received: proto of type {type(proto).__name__}"
            )
        processor = spm.SentencePieceProcessor()
        try:
            ok = processor.LoadFromSerializedProto(bytes(proto))
        except (RuntimeError, OSError) as e:
            raise ValueError(
                f"Could not parse a SentencePiece model from {source} ({len(proto)} bytes): {e}"
            ) from e
        if not ok or processor.GetPieceSize() == 0:
            raise ValueError(f"Could not parse a SentencePiece model from {source}.")
        self.proto, self._processor = bytes(proto), processor
        self._pieces = {processor.IdToPiece(i): i for i in range(processor.GetPieceSize())}
        self._special_pieces = _special_pieces(self.proto, processor)
        self._special_pattern = None
        if self._special_pieces:
            alternatives = "|".join(re.escape(p) for p in self._special_pieces)
            self._special_pattern = re.compile(f"({alternatives})")
        self._check_special_tokens_in_vocabulary([self.start_token, self.end_token, self.pad_token])

    @property
    def special_pieces(self):
        """The pieces matched as whole tokens in a `ChatPrompt` (in all text when
        ``parse_special_tokens``): control, unknown and user-defined pieces, longest first."""
        return list(self._special_pieces) if self._is_ready() else []

    # --- hooks ----------------------------------------------------------------------------
    def _is_ready(self):
        return self._processor is not None

    def _encode_batch(self, texts):
        pattern = self._special_pattern
        parsed = [self.parse_special_tokens or isinstance(t, ChatPrompt) for t in texts]
        if pattern is None or not any(parsed):
            return self._processor.Encode(texts, out_type=int)
        # Split each parsed text into [text, special, text, special, ..., text] (the others stay
        # whole); encode all the text pieces in one batch call, then put the special ids back.
        parts = [pattern.split(t) if p else [t] for t, p in zip(texts, parsed)]
        plain = [piece for pieces in parts for piece in pieces[::2]]
        encoded = iter(self._processor.Encode(plain, out_type=int))
        out = []
        for pieces in parts:
            ids = list(next(encoded))
            for special in pieces[1::2]:
                ids.append(self._pieces[special])
                ids.extend(next(encoded))
            out.append(ids)
        return out

    def _decode_batch(self, sequences):
        return self._processor.Decode(sequences)

    def _vocabulary_size(self):
        return self._processor.GetPieceSize()

    def _id_to_token(self, id):
        return self._processor.IdToPiece(id)

    def _token_to_id(self, token):
        return self._pieces.get(token)

    # --- assets and config ----------------------------------------------------------------
    def save_assets(self, dir_path):
        self._check_ready()
        with open(os.path.join(dir_path, VOCAB_FILENAME), "wb") as f:
            f.write(self.proto)

    def load_assets(self, dir_path):
        path = os.path.join(dir_path, VOCAB_FILENAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Expected a SentencePiece model at {path!r} (KerasHub's asset layout). "
                f"Received: dir_path={dir_path!r}"
            )
        self.set_proto(path)

    def get_config(self):
        return {
            "proto": None,  # stored as the `vocabulary.spm` asset
            "start_token": self.start_token,
            "end_token": self.end_token,
            "pad_token": self.pad_token,
            "parse_special_tokens": self.parse_special_tokens,
        }


def _special_pieces(proto, processor):
    """The control, unknown and user-defined pieces of a model (the kinds llama.cpp matches in
    text), longest first so that a piece never loses to a shorter one it starts with."""
    user_defined = []
    try:
        from sentencepiece import sentencepiece_model_pb2 as model_pb2

        model = model_pb2.ModelProto.FromString(proto)
        user_defined = [p.piece for p in model.pieces if p.type == PIECE_TYPES["USER_DEFINED"]]
    except ImportError:  # no protobuf: control and unknown pieces only
        pass
    special = [
        processor.IdToPiece(i)
        for i in range(processor.GetPieceSize())
        if processor.IsControl(i) or processor.IsUnknown(i)
    ]
    return sorted({p for p in special + user_defined if p}, key=lambda p: (-len(p), p))


def build_sentencepiece_proto(
    pieces,
    scores,
    types,
    *,
    model_type="bpe",
    unk_id,
    bos_id,
    eos_id,
    pad_id=-1,
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    escape_whitespaces=True,
    treat_whitespace_as_suffix=False,
    byte_fallback=None,
    normalizer_name="identity",
    precompiled_charsmap=b"",
    unk_surface=" \u2047 ",
):
    """Build a serialized SentencePiece ``ModelProto`` from a GGUF-style vocabulary.

    GGUF keeps a SentencePiece model as arrays: ``tokenizer.ggml.tokens`` (pieces),
    ``tokenizer.ggml.scores``, ``tokenizer.ggml.token_type`` (SentencePiece's own type numbers:
    1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte) and the special ids
    ``tokenizer.ggml.{unknown,bos,eos,padding}_token_id``; ``tokenizer.ggml.add_space_prefix``
    and ``tokenizer.ggml.remove_extra_whitespaces`` map to ``add_dummy_prefix`` and
    ``remove_extra_whitespaces``. The defaults are Llama 2's settings.

    Args:
        pieces: token strings, index = id.
        scores: one float per piece (merge priority for BPE, log-probability for unigram).
        types: one piece type per piece, as ints (above) or names (``"CONTROL"``).
        model_type: ``"bpe"`` (Llama, Mistral) or ``"unigram"``.
        unk_id: the unknown piece's id (required).
        bos_id: the start piece's id, -1 for none.
        eos_id: the end piece's id, -1 for none.
        pad_id: the padding piece's id, -1 for none.
        byte_fallback: encode unknown characters as ``<0xNN>`` byte pieces. None: True when
            the vocabulary has BYTE pieces.
        normalizer_name: the SentencePiece normalizer's name (``"identity"`` for Llama).
        precompiled_charsmap: the normalizer's precompiled character map (bytes), if any.

    Returns:
        bytes: a serialized ModelProto for ``SentencePieceTokenizer(proto=...)``.

    Raises:
        ValueError: when the arrays differ in length, a type is unknown or a special id is
            out of range.

    Example:
        ```python
        pieces = ["<unk>", "<s>", "</s>", "\u2581", "a", "b", "\u2581a", "\u2581ab"]
        proto = keras_llama.tokenizers.build_sentencepiece_proto(
            pieces, scores=[0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0],
            types=[2, 3, 3, 1, 1, 1, 1, 1], unk_id=0, bos_id=1, eos_id=2)
        tokenizer = keras_llama.tokenizers.SentencePieceTokenizer(proto)
        tokenizer("ab a")  # the ids of "\u2581ab", "\u2581a"
        ```
    """
    try:  # sentencepiece ships the ModelProto module; it needs `protobuf` (kagglehub's dep)
        from sentencepiece import sentencepiece_model_pb2 as model_pb2
    except ImportError as e:
        raise ImportError(
            "`build_sentencepiece_proto` needs the `protobuf` package for sentencepiece's "
            f"ModelProto (pip install protobuf). Original error: {e}"
        ) from e

    pieces, scores, types = list(pieces), list(scores), list(types)
    if not (len(pieces) == len(scores) == len(types)) or not pieces:
        raise ValueError(
            "`pieces`, `scores` and `types` must be non-empty and of equal length. Received: "
            f"len(pieces)={len(pieces)}, len(scores)={len(scores)}, len(types)={len(types)}"
        )
    model_types = {"bpe": model_pb2.TrainerSpec.BPE, "unigram": model_pb2.TrainerSpec.UNIGRAM}
    if model_type not in model_types:
        raise ValueError(
            f"`model_type` must be one of {sorted(model_types)}. Received: model_type={model_type!r}"
        )
    size = len(pieces)
    for name, value in [("unk_id", unk_id), ("bos_id", bos_id), ("eos_id", eos_id)]:
        if value is None or not -1 <= value < size or (name == "unk_id" and value < 0):
            raise ValueError(
                f"`{name}` must be a token id in [0, {size - 1}]. Received: {name}={value!r}"
            )
    if pad_id is None:
        pad_id = -1
    type_ids = [_piece_type(t, i) for i, t in enumerate(types)]
    if type_ids[unk_id] != PIECE_TYPES["UNKNOWN"]:
        raise ValueError(
            f"The piece at `unk_id` must have type UNKNOWN (2). Received: unk_id={unk_id}, "
            f"piece {pieces[unk_id]!r} of type {type_ids[unk_id]}"
        )
    if byte_fallback is None:
        byte_fallback = PIECE_TYPES["BYTE"] in type_ids

    def piece_at(i, default):
        return pieces[i] if 0 <= i < size else default

    model = model_pb2.ModelProto()
    spec = model.trainer_spec
    spec.model_type = model_types[model_type]
    spec.vocab_size = size
    spec.byte_fallback = bool(byte_fallback)
    spec.treat_whitespace_as_suffix = bool(treat_whitespace_as_suffix)
    spec.allow_whitespace_only_pieces = True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = unk_id, bos_id, eos_id, pad_id
    spec.unk_piece = piece_at(unk_id, "<unk>")
    spec.bos_piece = piece_at(bos_id, "<s>")
    spec.eos_piece = piece_at(eos_id, "</s>")
    spec.pad_piece = piece_at(pad_id, "<pad>")
    spec.unk_surface = unk_surface
    norm = model.normalizer_spec
    norm.name = normalizer_name
    norm.precompiled_charsmap = bytes(precompiled_charsmap)
    norm.add_dummy_prefix = bool(add_dummy_prefix)
    norm.remove_extra_whitespaces = bool(remove_extra_whitespaces)
    norm.escape_whitespaces = bool(escape_whitespaces)
    for piece, score, type_id in zip(pieces, scores, type_ids):
        if isinstance(piece, bytes):
            piece = piece.decode("utf-8")
        entry = model.pieces.add()
        entry.piece, entry.score, entry.type = piece, float(score), type_id
    return model.SerializeToString()


def _piece_type(value, index):
    if isinstance(value, str) and value.upper() in PIECE_TYPES:
        return PIECE_TYPES[value.upper()]
    if not isinstance(value, str) and int(value) in PIECE_TYPES.values():
        return int(value)
    raise ValueError(
        f"Unknown piece type at index {index}: expected one of {PIECE_TYPES}. Received: {value!r}"
    )
