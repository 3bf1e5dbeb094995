"""LlamaTokenizer / SentencePieceTokenizer against the `sentencepiece` reference, on Mistral's
Llama-2-style tokenizer.model.v1 (PyPI wheel mistral-common)."""

import numpy as np
import pytest

from keras_llama.models import LlamaTokenizer
from keras_llama.tokenizers import ChatPrompt, SentencePieceTokenizer, build_sentencepiece_proto
from tests.tokenizers.references import TEXTS, mistral_v1_path, sentencepiece_processor

# Plain text: exactly SentencePiece's ids.
SPM_TEXTS = TEXTS
# Special-token strings in text: plain text by default (SentencePiece itself, KerasHub); matched
# as tokens in a ChatPrompt or with parse_special_tokens=True (llama.cpp, Meta, transformers'
# SentencePiece tokenizer with legacy=True).
SPECIAL_TEXTS = [
    "<s>Hello</s> <unk> [INST] hi [/INST]",
    "[INST] Hi [/INST] Hello! </s><s>[INST] Again [/INST]",
    "a </s> b<unk>c",
    " <s> x",
    "x<s>",
    "</s></s>",
    "<<s>>",
    "</s >",
    " </s>\n<s>\n",
    "<unk>",
    "日本語</s>😀<s> tab\there",
]
# "▁" is SentencePiece's escaped space: it encodes fine but decodes to " " (lossy).
LOSSY = ["▁already▁escaped ▁"]


@pytest.fixture(scope="module")
def tokenizer():
    return LlamaTokenizer(mistral_v1_path())


@pytest.fixture(scope="module")
def sp():
    return sentencepiece_processor()


def test_ids_equal_sentencepiece(tokenizer, sp):
    for text in SPM_TEXTS + LOSSY + SPECIAL_TEXTS:
        ids = tokenizer.tokenize(text)
        assert ids.dtype == np.int32 and ids.ndim == 1
        assert ids.tolist() == sp.encode(text), text
    assert [a.tolist() for a in tokenizer(SPECIAL_TEXTS)] == [sp.encode(t) for t in SPECIAL_TEXTS]


def test_special_token_strings_in_user_text_are_characters(tokenizer, sp):
    """As SentencePiece and KerasHub: user text cannot forge control tokens."""
    for text in ["<s>", "</s>", "<unk>", "[INST] hi [/INST] </s><s>"]:
        ids = tokenizer(text).tolist()
        assert ids == sp.encode(text)
        assert not {sp.bos_id(), sp.eos_id(), sp.unk_id()} & set(ids), text
    # Worked by hand: "</s>" is the pieces "▁</", "s", ">" (no end token, id 2).
    assert [sp.id_to_piece(i) for i in tokenizer("</s>").tolist()] == ["▁</", "s", ">"]


@pytest.fixture(scope="module")
def parsing():
    return LlamaTokenizer(mistral_v1_path(), parse_special_tokens=True)


def test_special_token_strings_equal_transformers_sentencepiece_tokenizer(tokenizer, parsing, sp):
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    # transformers' SentencePiece-backed ("slow") Llama tokenizer; legacy=True is the mode
    # that agrees with llama.cpp and Meta (a dummy-prefix space after each special token).
    reference = SentencePieceBackend(
        vocab_file=mistral_v1_path(), bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        legacy=True,
    )  # fmt: skip
    # Opt-in for all text, and always for a ChatPrompt.
    for text in SPECIAL_TEXTS + SPM_TEXTS:
        expected = reference.encode(text, add_special_tokens=False)
        assert parsing(text).tolist() == expected, text
        assert tokenizer(ChatPrompt(text)).tolist() == expected, text
    batch = parsing(SPECIAL_TEXTS + SPM_TEXTS[:3])  # one batched sentencepiece call
    expected = [
        reference.encode(t, add_special_tokens=False) for t in SPECIAL_TEXTS + SPM_TEXTS[:3]
    ]
    assert [b.tolist() for b in batch] == expected
    # A batch mixing user text and a ChatPrompt: only the ChatPrompt's strings are tokens.
    text = SPECIAL_TEXTS[1]
    mixed = tokenizer([text, ChatPrompt(text)])
    assert mixed[0].tolist() == sp.encode(text)
    assert mixed[1].tolist() == reference.encode(text, add_special_tokens=False)


def test_llama2_chat_prompt_gets_meta_ids(tokenizer, sp):
    """A rendered two-turn Llama 2 chat equals Meta's `chat_completion` encoding: each turn
    `sp.encode(f"[INST] {q} [/INST] {a} ")` between BOS (1) and EOS (2) ids."""
    from keras_llama.models import LlamaCausalLMPreprocessor

    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
    ]
    meta = (
        [1] + sp.encode("[INST] What is 2+2? [/INST] 4. ") + [2]
        + [1] + sp.encode("[INST] And 3+3? [/INST]")
    )  # fmt: skip
    preprocessor = LlamaCausalLMPreprocessor(tokenizer, sequence_length=64)
    prompt = preprocessor.apply_chat_template(messages)
    assert "</s><s>[INST]" in prompt and isinstance(prompt, ChatPrompt)
    packed = preprocessor.generate_preprocess(prompt)
    ids, mask = (np.asarray(packed[k]) for k in ("token_ids", "padding_mask"))
    assert ids[mask.astype(bool)].tolist() == meta
    # Worked by hand for the turn boundary: "▁" "4" "." "▁" </s> <s> "▁[" "INST" "]".
    boundary = meta.index(2)
    assert [sp.id_to_piece(i) for i in meta[boundary - 4 : boundary + 5]] == [
        "▁", "4", ".", "▁", "</s>", "<s>", "▁[", "INST", "]",
    ]  # fmt: skip


def test_user_defined_pieces_are_split_as_llama_cpp_does(sp):
    """A GGUF-style vocabulary with a user-defined piece: llama.cpp splits the text on it
    and encodes each side on its own (a dummy-prefix space after it); SentencePiece itself
    matches it inline."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    original = model_pb2.ModelProto()
    with open(mistral_v1_path(), "rb") as f:
        original.ParseFromString(f.read())
    pieces = [p.piece for p in original.pieces] + ["<|im_start|>"]
    scores = [p.score for p in original.pieces] + [0.0]
    types = [int(p.type) for p in original.pieces] + [4]  # USER_DEFINED
    proto = build_sentencepiece_proto(pieces, scores, types, unk_id=0, bos_id=1, eos_id=2)
    ours = SentencePieceTokenizer(proto, parse_special_tokens=True)
    assert ours.special_pieces == ["<|im_start|>", "<unk>", "</s>", "<s>"]
    text = "hi<|im_start|>there"
    assert ours(text).tolist() == sp.encode("hi") + [32000] + sp.encode("there")
    import sentencepiece

    native = sentencepiece.SentencePieceProcessor(model_proto=proto)
    plain = SentencePieceTokenizer(proto)  # the default: SentencePiece's own encoding
    assert plain(text).tolist() == native.encode(text) != ours(text).tolist()
    with pytest.raises(TypeError, match="parse_special_tokens.*Received: parse_special_tokens"):
        SentencePieceTokenizer(proto, parse_special_tokens="yes")


def test_batch_is_ragged_list(tokenizer, sp):
    batch = tokenizer(SPM_TEXTS)  # __call__ == tokenize
    assert isinstance(batch, list) and len(batch) == len(SPM_TEXTS)
    for text, ids in zip(SPM_TEXTS, batch):
        assert ids.dtype == np.int32 and ids.tolist() == sp.encode(text)
    # Tuples and 1-D string arrays are batches too; a 0-d array is one string.
    as_array = tokenizer(np.array(["Hi there", "x"]))
    assert [a.tolist() for a in as_array] == [sp.encode("Hi there"), sp.encode("x")]
    assert [a.tolist() for a in tokenizer(("a b",))] == [sp.encode("a b")]
    assert tokenizer(np.array("Hi there")).tolist() == sp.encode("Hi there")
    assert tokenizer(b"bytes text").tolist() == sp.encode("bytes text")


def test_round_trip_and_detokenize_equals_sentencepiece(tokenizer, sp):
    # Llama's model: identity normalizer, no whitespace collapsing, byte fallback -> lossless.
    for text in SPM_TEXTS:
        assert tokenizer.detokenize(tokenizer(text)) == text
    # Special-token strings are text (round trip) unless in a ChatPrompt, where they become
    # control ids, which decode to nothing (as in sentencepiece).
    assert tokenizer.detokenize(tokenizer("a</s><s>b")) == "a</s><s>b"
    ids = sp.encode("a") + [2, 1] + sp.encode("b")
    assert tokenizer.detokenize(tokenizer(ChatPrompt("a</s><s>b"))) == sp.decode(ids) == "a b"
    ids = sp.encode("Hello world")
    assert tokenizer.detokenize(ids) == sp.decode(ids) == "Hello world"
    # Control tokens decode to nothing, as in sentencepiece.
    assert tokenizer.detokenize([1] + ids + [2]) == sp.decode([1] + ids + [2]) == "Hello world"
    padded = np.array([[1] + ids + [2], [1, ids[0], 2, 0]], dtype="int64")
    assert tokenizer.detokenize(padded) == [sp.decode(row) for row in padded.tolist()]
    assert tokenizer.detokenize([ids, ids[:1]]) == ["Hello world", sp.decode(ids[:1])]
    assert tokenizer.detokenize([]) == ""


def test_special_tokens_and_vocabulary(tokenizer, sp):
    assert tokenizer.vocabulary_size() == sp.get_piece_size() == 32000
    assert tokenizer.start_token_id == sp.bos_id() == 1
    assert tokenizer.end_token_id == sp.eos_id() == 2
    assert tokenizer.pad_token_id == 0  # KerasHub's choice (the `<unk>` id)
    assert sorted(tokenizer.special_token_ids) == [1, 2]
    assert tokenizer.special_tokens == ["<s>", "</s>"]
    assert tokenizer.stop_token_ids == [2]
    assert tokenizer.id_to_token(1) == "<s>" and tokenizer.token_to_id("</s>") == 2
    vocab = tokenizer.get_vocabulary()
    assert len(vocab) == 32000
    for i in [0, 3, 259, 415, 31999]:
        assert vocab[i] == tokenizer.id_to_token(i) == sp.id_to_piece(i)
        assert tokenizer.token_to_id(sp.id_to_piece(i)) == i


def test_rebuild_proto_from_gguf_style_arrays(sp):
    """A GGUF `llama` vocabulary (pieces, scores, token types + ids) rebuilt into a
    SentencePiece model encodes exactly as the original model."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    original = model_pb2.ModelProto()
    with open(mistral_v1_path(), "rb") as f:
        original.ParseFromString(f.read())
    pieces = [p.piece for p in original.pieces]
    scores = [p.score for p in original.pieces]
    types = [int(p.type) for p in original.pieces]  # GGUF token_type uses these numbers
    proto = build_sentencepiece_proto(
        pieces, scores, types, unk_id=0, bos_id=1, eos_id=2, add_dummy_prefix=True
    )
    rebuilt = SentencePieceTokenizer(proto, start_token="<s>", end_token="</s>")
    for text in SPM_TEXTS + LOSSY:
        assert rebuilt(text).tolist() == sp.encode(text), text
        assert rebuilt.detokenize(rebuilt(text)) == sp.decode(sp.encode(text))
    # Byte fallback was inferred from the BYTE pieces: an unseen character becomes bytes.
    assert rebuilt("\U0001f99c").tolist() == sp.encode("\U0001f99c")
    assert all(3 <= i < 259 for i in sp.encode("\U0001f99c")[1:])
    # Type names work as well as numbers; add_dummy_prefix=False equals the original model
    # with that flag cleared by protobuf, and differs from the default (not vacuous).
    import sentencepiece

    original.normalizer_spec.add_dummy_prefix = False
    reference = sentencepiece.SentencePieceProcessor(model_proto=original.SerializeToString())
    names = {1: "NORMAL", 2: "UNKNOWN", 3: "CONTROL", 6: "BYTE"}
    no_prefix = SentencePieceTokenizer(
        build_sentencepiece_proto(
            pieces, scores, [names[t] for t in types], unk_id=0, bos_id=1, eos_id=2,
            add_dummy_prefix=False,
        )
    )  # fmt: skip
    for text in ["Hello world", " two  spaces", TEXTS[4]]:
        assert no_prefix(text).tolist() == reference.encode(text)
    assert no_prefix("Hello").tolist() != sp.encode("Hello")


def test_build_proto_bad_input():
    with pytest.raises(ValueError, match="equal length"):
        build_sentencepiece_proto(["<unk>", "a"], [0.0], [2, 1], unk_id=0, bos_id=-1, eos_id=-1)
    with pytest.raises(ValueError, match="unk_id"):
        build_sentencepiece_proto(["<unk>", "a"], [0, 0], [2, 1], unk_id=5, bos_id=-1, eos_id=-1)
    with pytest.raises(ValueError, match="UNKNOWN"):
        build_sentencepiece_proto(["<unk>", "a"], [0, 0], [1, 1], unk_id=0, bos_id=-1, eos_id=-1)
    with pytest.raises(ValueError, match="index 1.*Received: 9"):
        build_sentencepiece_proto(["<unk>", "a"], [0, 0], [2, 9], unk_id=0, bos_id=-1, eos_id=-1)
    with pytest.raises(ValueError, match="model_type"):
        build_sentencepiece_proto(
            ["<unk>"], [0], [2], unk_id=0, bos_id=-1, eos_id=-1, model_type="wordpiece"
        )


def test_assets_round_trip(tokenizer, sp, tmp_path):
    tokenizer.save_assets(str(tmp_path))
    assert (tmp_path / "vocabulary.spm").read_bytes() == open(mistral_v1_path(), "rb").read()
    restored = LlamaTokenizer.from_config(tokenizer.get_config())
    assert restored.proto is None  # the config holds no vocabulary: it is an asset
    with pytest.raises(ValueError, match="No vocabulary"):
        restored("text")
    restored.load_assets(str(tmp_path))
    assert restored(TEXTS[0]).tolist() == sp.encode(TEXTS[0])


def test_proto_as_bytes(sp):
    with open(mistral_v1_path(), "rb") as f:
        tokenizer = LlamaTokenizer(proto=f.read())
    assert tokenizer(TEXTS[1]).tolist() == sp.encode(TEXTS[1])


def test_missing_and_corrupt_files(tmp_path):
    missing = str(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="nope.model"):
        LlamaTokenizer(missing)
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(ValueError, match="corrupt.model"):
        LlamaTokenizer(str(corrupt))
    with pytest.raises(FileNotFoundError, match="vocabulary.spm"):
        LlamaTokenizer(None).load_assets(str(tmp_path))
    with pytest.raises(TypeError, match="int"):
        LlamaTokenizer(proto=123)


def test_bad_inputs(tokenizer):
    with pytest.raises(ValueError, match=r"Token id 32000 .*size 32000"):
        tokenizer.detokenize([1, 32000])
    with pytest.raises(ValueError, match=r"Token id -1 "):
        tokenizer.detokenize(np.array([[5, -1]]))
    with pytest.raises(TypeError, match="int"):
        tokenizer.tokenize(42)
    with pytest.raises(TypeError, match="NoneType.*index 1"):
        tokenizer.tokenize(["fine", None])
    with pytest.raises(TypeError, match="float"):
        tokenizer.detokenize(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"\[0, 31999\].*Received: id=32000"):
        tokenizer.id_to_token(32000)
    with pytest.raises(ValueError, match="not in the vocabulary.*'<not a piece>'"):
        tokenizer.token_to_id("<not a piece>")
    with pytest.raises(ValueError, match="special token '<bos>'"):
        LlamaTokenizer(mistral_v1_path(), start_token="<bos>")
