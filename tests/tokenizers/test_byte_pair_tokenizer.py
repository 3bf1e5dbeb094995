"""BytePairTokenizer on GGUF-style `gpt2` vocabularies (token list + merges + pre-tokenizer
name), checked against `tokenizers` pipelines assembled the way Hugging Face ships them and
against ids worked out by hand."""

import re

import numpy as np
import pytest
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from keras_llama.models import Llama3Tokenizer
from keras_llama.tokenizers import BytePairTokenizer, build_byte_level_bpe
from keras_llama.tokenizers.byte_level_bpe import bytes_to_unicode
from tests.tokenizers.references import TEXTS

# A SmolLM2-shaped vocabulary: ChatML special tokens first, then the 256 byte characters,
# then merged tokens (a GGUF `tokenizer.ggml.tokens` list: index = id).
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BYTES = [bytes_to_unicode()[b] for b in range(256)]
MERGES = ["l l", "e ll", "h ell", "hell o", "h e", "Ġ t", "Ġt he", "Ġ 1", "Ġ1 2", "1 2", "o Ġ"]
TOKENS = SPECIAL + BYTES + [m.replace(" ", "") for m in MERGES]
ID = {t: i for i, t in enumerate(TOKENS)}


def hf_pipeline(pre_tokenizer):
    """The tokenizer.json structure HF uses: BPE + pre-tokenizer + ByteLevel decoder."""
    backend = tokenizers.Tokenizer(
        models.BPE(vocab=dict(ID), merges=[tuple(m.split(" ")) for m in MERGES])
    )
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    return backend


def chatml(pretokenizer):
    return Llama3Tokenizer(
        vocabulary=TOKENS,
        merges=MERGES,
        pretokenizer=pretokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        misc_special_tokens=SPECIAL,
        stop_tokens=["<|endoftext|>"],
    )


def test_smollm_pretokenizer_by_hand():
    tokenizer = chatml("smollm")
    # "hello the 12": digits split one by one, so " 12" is " ", "1", "2" (no "Ġ12").
    assert tokenizer("hello the 12").tolist() == [
        ID["hello"], ID["Ġthe"], ID["Ġ"], ID["1"], ID["2"]
    ]  # fmt: skip
    # GPT-2's regex would keep " 12" together and merge it.
    assert chatml("gpt2")("hello the 12").tolist() == [ID["hello"], ID["Ġthe"], ID["Ġ12"]]
    # "o Ġ" spans a regex boundary ("hello", " the"): never merged.
    assert ID["oĠ"] not in tokenizer("hello the").tolist()
    # Special tokens are matched whole and keep their ids.
    assert tokenizer("<|im_start|>hello<|im_end|>").tolist() == [1, ID["hello"], 2]
    assert tokenizer.start_token_id == 1 and tokenizer.end_token_id == 2
    assert tokenizer.stop_token_ids == [2, 0]
    assert sorted(tokenizer.special_token_ids) == [0, 1, 2]
    assert tokenizer.vocabulary_size() == len(TOKENS)


@pytest.mark.parametrize(
    "name, hf_pre_tokenizer",
    [
        # SmolLM2's tokenizer.json: Digits(individual) then ByteLevel's GPT-2 regex.
        (
            "smollm",
            pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Digits(individual_digits=True),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
                ]
            ),
        ),
        # GPT-2's tokenizer.json: ByteLevel with its built-in regex.
        ("gpt2", pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)),
    ],
)
def test_named_pretokenizers_equal_hf_pipelines(name, hf_pre_tokenizer):
    ours = chatml(name)
    reference = hf_pipeline(hf_pre_tokenizer)
    texts = TEXTS + ["<|im_start|>user\nhello 12<|im_end|>\n", "hello hello  12 121212"]
    for text in texts:
        assert ours(text).tolist() == reference.encode(text).ids, text
        assert ours.detokenize(ours(text)) == text


def test_build_byte_level_bpe_and_regex_pretokenizer():
    backend = build_byte_level_bpe(TOKENS, MERGES, SPECIAL, pretokenizer=r"\p{N}|[^\p{N}]+")
    # The custom regex isolates digits and keeps spaces with the text before them, so the
    # "o Ġ" merge applies here (never under the GPT-2 regex, which puts spaces in front).
    assert backend.encode("no 12", add_special_tokens=False).ids == [
        ID["n"], ID["oĠ"], ID["1"], ID["2"]
    ]  # fmt: skip
    assert chatml("gpt2")("no 12").tolist() == [ID["n"], ID["o"], ID["Ġ12"]]
    tokenizer = BytePairTokenizer.from_tokenizer_json(backend, end_token="<|endoftext|>")
    assert tokenizer.special_tokens == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tokenizer.start_token_id is None and tokenizer.end_token_id == 0
    assert tokenizer("<|endoftext|>").tolist() == [0]


def test_vocabulary_and_merges_forms(tmp_path):
    import json

    (tmp_path / "vocabulary.json").write_text(json.dumps(ID))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    from_files = BytePairTokenizer(
        str(tmp_path / "vocabulary.json"), str(tmp_path / "merges.txt"), pretokenizer="smollm"
    )
    from_pairs = BytePairTokenizer(ID, [tuple(m.split(" ")) for m in MERGES], pretokenizer="smollm")
    for tokenizer in (from_files, from_pairs):
        assert tokenizer("hello the 12").tolist() == [ID["hello"], ID["Ġthe"], 35, 52, 53]
        # Without special_tokens, special strings are plain text.
        assert ID["<|im_end|>"] not in tokenizer("<|im_end|>").tolist()
    assert (ID["Ġ"], ID["1"], ID["2"]) == (35, 52, 53)  # bytes 0x20, 0x31, 0x32, after 3 specials


def test_config_round_trip_keeps_settings(tmp_path):
    tokenizer = chatml("smollm")
    config = tokenizer.get_config()
    assert config["pretokenizer"] == "smollm" and config["bos_token"] == "<|im_start|>"
    restored = Llama3Tokenizer.from_config(config)
    tokenizer.save_assets(str(tmp_path))
    restored.load_assets(str(tmp_path))
    assert restored.get_config() == config
    for text in TEXTS[:5]:
        assert restored(text).tolist() == tokenizer(text).tolist()
    assert restored.stop_token_ids == [2, 0]


def test_bad_vocabularies(tmp_path):
    with pytest.raises(ValueError, match="'Ġx'"):
        build_byte_level_bpe(TOKENS, MERGES + ["Ġ x"])
    with pytest.raises(ValueError, match="Merge rule 0 .*'a b c'"):
        BytePairTokenizer(TOKENS, ["a b c"])
    for bad in ("a ", " a", "ab", ("a", ""), ("a", 1), ("a",)):
        with pytest.raises(ValueError, match=f"Merge rule 1 .*{re.escape(repr(bad))}"):
            build_byte_level_bpe(TOKENS, [MERGES[0], bad])
    with pytest.raises(ValueError, match="'<\\|im_start\\|>' is not in the vocabulary"):
        build_byte_level_bpe(BYTES, [], ["<|im_start|>"])
    with pytest.raises(ValueError, match="twice.*ids 3 and 4"):
        BytePairTokenizer(["a", "b", "c", "d", "d"], [])
    with pytest.raises(ValueError, match="Unknown pretokenizer name.*'lama3'"):
        BytePairTokenizer(pretokenizer="lama3")
    with pytest.raises(ValueError, match="Invalid pretokenizer regex"):
        BytePairTokenizer(pretokenizer=["(unclosed"])
    with pytest.raises(ValueError, match="both `vocabulary` and `merges`"):
        BytePairTokenizer(vocabulary=TOKENS)
    with pytest.raises(FileNotFoundError, match="vocab_missing.json"):
        BytePairTokenizer(str(tmp_path / "vocab_missing.json"), MERGES)
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="bad.json"):
        BytePairTokenizer(str(tmp_path / "bad.json"), MERGES)
    with pytest.raises(FileNotFoundError, match="tokenizer.json.*vocabulary.json"):
        BytePairTokenizer().load_assets(str(tmp_path))
    with pytest.raises(ValueError, match="No vocabulary"):
        BytePairTokenizer()("text")
    tokenizer = chatml("smollm")
    with pytest.raises(ValueError, match=f"Token id {len(TOKENS)} "):
        tokenizer.detokenize(np.array([[1, len(TOKENS)]]))
    with pytest.raises(TypeError, match="special_tokens"):
        BytePairTokenizer(special_tokens="<|im_start|>")
