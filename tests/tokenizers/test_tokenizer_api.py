"""The shared Tokenizer API: config round-trips, input forms, presets delegation."""

import inspect

import keras
import numpy as np
import pytest

from keras_llama.models import Llama3Tokenizer, LlamaTokenizer, Tokenizer
from keras_llama.tokenizers import BytePairTokenizer, SentencePieceTokenizer
from tests.tokenizers.references import mistral_v1_path, sentencepiece_processor
from tests.tokenizers.test_byte_pair_tokenizer import ID, MERGES, SPECIAL, TOKENS

TOKENIZER_CLASSES = [SentencePieceTokenizer, LlamaTokenizer, BytePairTokenizer, Llama3Tokenizer]


def make(cls):
    if issubclass(cls, SentencePieceTokenizer):
        return cls(mistral_v1_path(), start_token="<s>", end_token="</s>", pad_token="<unk>")
    kwargs = dict(pretokenizer="smollm", stop_tokens=["<|endoftext|>"])
    if cls is Llama3Tokenizer:
        kwargs.update(bos_token="<|im_start|>", eos_token="<|im_end|>", misc_special_tokens=SPECIAL)
    else:
        kwargs.update(start_token="<|im_start|>", end_token="<|im_end|>", special_tokens=SPECIAL)
    return cls(TOKENS, MERGES, **kwargs)


@pytest.mark.parametrize("cls", TOKENIZER_CLASSES, ids=lambda c: c.__name__)
def test_config_keys_equal_init_parameters(cls, tmp_path):
    tokenizer = make(cls)
    config = tokenizer.get_config()
    params = set(inspect.signature(cls.__init__).parameters) - {"self"}
    assert set(config) == params
    # Through Keras serialization (registered as keras_llama>ClassName), then assets.
    serialized = keras.saving.serialize_keras_object(tokenizer)
    assert serialized["registered_name"] == f"keras_llama>{cls.__name__}"
    restored = keras.saving.deserialize_keras_object(serialized)
    assert type(restored) is cls and restored.get_config() == config
    tokenizer.save_assets(str(tmp_path))
    restored.load_assets(str(tmp_path))
    text = "hello the 12 <s> <|im_start|>"
    assert restored(text).tolist() == tokenizer(text).tolist()
    assert restored.special_token_ids == tokenizer.special_token_ids
    assert restored.pad_token_id == tokenizer.pad_token_id == 0


def test_input_forms():
    sp = sentencepiece_processor()
    tokenizer = make(LlamaTokenizer)
    ids = sp.encode("Hello world")
    # One sequence: list, tuple, numpy of any int dtype, backend tensor, a single int.
    for form in [ids, tuple(ids), np.array(ids, "int64"), np.array(ids, "uint16")]:
        assert tokenizer.detokenize(form) == "Hello world"
    assert tokenizer.detokenize(keras.ops.convert_to_tensor(ids)) == "Hello world"
    assert tokenizer.detokenize(np.int32(ids[0])) == sp.decode(ids[:1])
    assert tokenizer.detokenize(ids[1]) == sp.decode(ids[1:2])
    # Batches: 2-D tensor, list of arrays (ragged), object array.
    batch = keras.ops.convert_to_tensor([ids, ids])
    assert tokenizer.detokenize(batch) == ["Hello world"] * 2
    ragged = tokenizer(["Hello world", "Hi"])
    assert tokenizer.detokenize(ragged) == ["Hello world", "Hi"]
    assert tokenizer.detokenize(np.array(ragged, dtype=object)) == ["Hello world", "Hi"]
    assert tokenizer([]) == []
    with pytest.raises(ValueError, match="rank 0, 1 or 2"):
        tokenizer.detokenize(np.zeros((1, 1, 1), "int32"))
    with pytest.raises(ValueError, match=r"shape \(1, 1\)"):
        tokenizer.tokenize(np.array([["a"]]))
    with pytest.raises(TypeError, match="dict"):
        tokenizer.tokenize({"text": "a"})


def test_special_properties_before_vocabulary():
    tokenizer = Llama3Tokenizer()
    assert tokenizer.start_token_id is None and tokenizer.end_token_id is None
    assert tokenizer.start_token == "<|begin_of_text|>"
    with pytest.raises(ValueError, match="before a vocabulary"):
        _ = tokenizer.special_token_ids
    with pytest.raises(ValueError, match="No vocabulary has been set for Llama3Tokenizer"):
        tokenizer.detokenize([1])


def test_presets_and_preset_delegation(tmp_path):
    # Tokenizers reach the loader and saver through the registry (no upward import). A preset
    # names its family through its backbone's class.
    _tiny_backbone().save_to_preset(str(tmp_path))
    LlamaTokenizer(mistral_v1_path(), pad_token="<unk>").save_to_preset(str(tmp_path))
    loaded = Tokenizer.from_preset(str(tmp_path), start_token="</s>")
    assert type(loaded) is LlamaTokenizer and loaded.start_token == "</s>"
    assert loaded.pad_token == "<unk>"
    text = "The quick brown fox."
    assert loaded(text).tolist() == sentencepiece_processor().encode(text)
    assert "llama2_7b_en" in LlamaTokenizer.presets and "llama3_8b_en" not in LlamaTokenizer.presets
    assert set(Tokenizer.presets) == set(LlamaTokenizer.presets) | set(Llama3Tokenizer.presets)


def test_base_class_hooks_are_explicit():
    with pytest.raises(ValueError, match="No vocabulary"):
        Tokenizer()("text")
    with pytest.raises(NotImplementedError, match="save_assets"):
        Tokenizer().save_assets(".")
    assert Tokenizer.from_config({}).get_config() == {}
    assert ID["<|im_start|>"] == 1


def _tiny_backbone():
    from keras_llama.models import LlamaBackbone

    return LlamaBackbone(
        vocabulary_size=32000, num_layers=1, num_query_heads=2, hidden_dim=8,
        intermediate_dim=16, num_key_value_heads=1,
    )  # fmt: skip
