"""CausalLMPreprocessor against hand-worked packing (KerasHub's documented behaviour).

Token ids come from the `sentencepiece` reference on Mistral's Llama-2-style model:
"The quick brown fox." -> [415, 2936, 9060, 285, 1142, 28723], "Hi" -> [15359];
start <s> = 1, end </s> = 2, pad = 0.
"""

import inspect

import keras
import numpy as np
import pytest

from keras_llama.models import (
    CausalLMPreprocessor,
    Llama3CausalLMPreprocessor,
    Llama3Tokenizer,
    LlamaCausalLMPreprocessor,
    LlamaTokenizer,
    Preprocessor,
)
from tests.tokenizers.references import mistral_v1_path, sentencepiece_processor
from tests.tokenizers.test_byte_pair_tokenizer import MERGES, SPECIAL, TOKENS

FOX = [415, 2936, 9060, 285, 1142, 28723]
HI = [15359]


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = LlamaTokenizer(mistral_v1_path())
    sp = sentencepiece_processor()
    # The ids written above are the reference's.
    assert sp.encode("The quick brown fox.") == FOX and sp.encode("Hi") == HI
    return tokenizer


def test_batch_packing_labels_and_weights(tokenizer):
    pre = LlamaCausalLMPreprocessor(tokenizer, sequence_length=8)
    x, y, sw = pre(["The quick brown fox.", "Hi"])
    # Packed to 9: [1, *FOX, 2] (8 tokens) + 1 pad; [1, 15359, 2] + 6 pads.
    np.testing.assert_array_equal(x["token_ids"], [[1, *FOX, 2], [1, 15359, 2, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(
        x["padding_mask"], [[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0, 0]]
    )
    np.testing.assert_array_equal(y, [[*FOX, 2, 0], [15359, 2, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(sw, [[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0, 0, 0]])
    assert x["token_ids"].dtype == np.int32 and y.dtype == np.int32
    assert x["padding_mask"].dtype == bool and sw.dtype == bool


def test_single_string_is_unbatched(tokenizer):
    pre = LlamaCausalLMPreprocessor(tokenizer, sequence_length=5)
    x, y, sw = pre("Hi")
    np.testing.assert_array_equal(x["token_ids"], [1, 15359, 2, 0, 0])
    np.testing.assert_array_equal(x["padding_mask"], [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(y, [15359, 2, 0, 0, 0])
    np.testing.assert_array_equal(sw, [1, 1, 0, 0, 0])


def test_truncation_keeps_start_and_end(tokenizer):
    pre = LlamaCausalLMPreprocessor(tokenizer, sequence_length=4)
    x, y, sw = pre(["The quick brown fox."])
    # 5 packed tokens: <s>, the first 3 text tokens, </s>.
    np.testing.assert_array_equal(x["token_ids"], [[1, 415, 2936, 9060]])
    np.testing.assert_array_equal(y, [[415, 2936, 9060, 2]])
    np.testing.assert_array_equal(sw, [[1, 1, 1, 1]])
    # The call-time sequence_length overrides the configured one.
    x, y, _ = pre("The quick brown fox.", sequence_length=2)
    np.testing.assert_array_equal(x["token_ids"], [1, 415])
    np.testing.assert_array_equal(y, [415, 2])


def test_start_end_flags(tokenizer):
    pre = LlamaCausalLMPreprocessor(
        tokenizer, sequence_length=4, add_start_token=False, add_end_token=False
    )
    x, y, sw = pre(["The quick brown fox.", "Hi"])
    np.testing.assert_array_equal(x["token_ids"], [FOX[:4], [15359, 0, 0, 0]])
    np.testing.assert_array_equal(y, [FOX[1:5], [0, 0, 0, 0]])
    np.testing.assert_array_equal(sw, [[1, 1, 1, 1], [0, 0, 0, 0]])
    pre = LlamaCausalLMPreprocessor(tokenizer, sequence_length=4, add_end_token=False)
    x, y, _ = pre("Hi")
    np.testing.assert_array_equal(x["token_ids"], [1, 15359, 0, 0])
    np.testing.assert_array_equal(y, [15359, 0, 0, 0])


def test_generate_preprocess_and_postprocess(tokenizer):
    pre = LlamaCausalLMPreprocessor(tokenizer, sequence_length=6)
    x = pre.generate_preprocess(["The quick brown fox.", "Hi"])
    # Start token, no end token, right padding to sequence_length.
    np.testing.assert_array_equal(x["token_ids"], [[1, *FOX[:5]], [1, 15359, 0, 0, 0, 0]])
    np.testing.assert_array_equal(x["padding_mask"], [[1] * 6, [1, 1, 0, 0, 0, 0]])
    single = pre.generate_preprocess("Hi", sequence_length=3)
    np.testing.assert_array_equal(single["token_ids"], [1, 15359, 0])
    # Postprocess drops padding and the special ids (<s>, </s>) then detokenizes.
    generated = {
        "token_ids": np.array([[1, *FOX, 2], [1, 15359, 2, 2, 0, 0, 0, 0]]),
        "padding_mask": np.array([[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0, 0]]),
    }
    assert pre.generate_postprocess(generated) == ["The quick brown fox.", "Hi"]
    # A backend tensor, unbatched, and masked-out tokens that are not padding.
    out = pre.generate_postprocess(
        {
            "token_ids": keras.ops.convert_to_tensor([1, 15359, 415, 2936]),
            "padding_mask": keras.ops.convert_to_tensor([True, True, False, True]),
        }
    )
    assert out == tokenizer.detokenize([15359, 2936]) == "Hi quick"
    with pytest.raises(ValueError, match="same shape"):
        pre.generate_postprocess({"token_ids": np.zeros((2, 3)), "padding_mask": np.zeros(3)})


def test_llama3_preprocessor_uses_its_tokens():
    tokenizer = Llama3Tokenizer(
        TOKENS, MERGES, pretokenizer="smollm", bos_token="<|im_start|>",
        eos_token="<|im_end|>", misc_special_tokens=SPECIAL,
    )  # fmt: skip
    pre = Llama3CausalLMPreprocessor(tokenizer, sequence_length=5)
    hello = tokenizer("hello").tolist()
    assert len(hello) == 1
    x, y, sw = pre("hello")
    np.testing.assert_array_equal(x["token_ids"], [1, *hello, 2, 0, 0])
    np.testing.assert_array_equal(y, [*hello, 2, 0, 0, 0])
    out = pre.generate_postprocess({"token_ids": x["token_ids"], "padding_mask": x["padding_mask"]})
    assert out == "hello"


def test_sequence_length_property_and_errors(tokenizer):
    pre = LlamaCausalLMPreprocessor(tokenizer, sequence_length=8)
    pre.sequence_length = 3
    assert pre.sequence_length == 3 and pre("Hi")[0]["token_ids"].shape == (3,)
    for bad in [0, -1, 2.5, None, True]:
        with pytest.raises(ValueError, match=f"Received: sequence_length={bad!r}"):
            pre.sequence_length = bad
    # The shortest packing: <s> as the input, </s> as its label.
    x, y, sw = pre("Hi", sequence_length=1)
    assert x["token_ids"].tolist() == [1] and y.tolist() == [2] and sw.tolist() == [True]
    with pytest.raises(TypeError, match="int"):
        pre([1, 2])
    with pytest.raises(ValueError, match="no tokenizer"):
        LlamaCausalLMPreprocessor(None).generate_preprocess("Hi")
    with pytest.warns(UserWarning, match="ignored"):
        pre("Hi", y=np.zeros(3))


def test_base_preprocessor_config(tokenizer):
    pre = Preprocessor(tokenizer)
    assert (
        set(pre.get_config())
        == {"tokenizer"}
        == set(inspect.signature(Preprocessor.__init__).parameters) - {"self"}
    )
    restored = Preprocessor.from_config(pre.get_config())
    assert type(restored.tokenizer) is LlamaTokenizer
    with pytest.raises(NotImplementedError, match="call"):
        pre("text")


@pytest.mark.parametrize(
    "cls", [CausalLMPreprocessor, LlamaCausalLMPreprocessor, Llama3CausalLMPreprocessor]
)
def test_config_round_trip(cls, tokenizer):
    if cls is Llama3CausalLMPreprocessor:
        tok = Llama3Tokenizer(TOKENS, MERGES, pretokenizer="smollm", bos_token="<|im_start|>",
                              eos_token="<|im_end|>")  # fmt: skip
    else:
        tok = tokenizer
    pre = cls(tok, sequence_length=7, add_start_token=False, add_end_token=True)
    config = pre.get_config()
    assert set(config) == set(inspect.signature(cls.__init__).parameters) - {"self"}
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(pre))
    assert type(restored) is cls and restored.get_config() == config
    assert type(restored.tokenizer) is type(tok)
    assert restored.tokenizer.get_config() == tok.get_config()
    # KerasHub's preprocessor config also carries layer keys; they are accepted.
    kh = dict(config, name="llama_causal_lm_preprocessor", trainable=True, dtype=None,
              config_file="preprocessor.json")  # fmt: skip
    assert cls.from_config(kh).sequence_length == 7


def test_tokenizer_cls_and_preset_delegation(tmp_path, tokenizer):
    assert LlamaCausalLMPreprocessor.tokenizer_cls is LlamaTokenizer
    assert Llama3CausalLMPreprocessor.tokenizer_cls is Llama3Tokenizer
    pre = LlamaCausalLMPreprocessor(tokenizer)
    _tiny_backbone().save_to_preset(str(tmp_path))  # a preset names its family by its backbone
    pre.save_to_preset(str(tmp_path))
    # The base class picks the subclass the saved preset names.
    loaded = Preprocessor.from_preset(str(tmp_path), sequence_length=16)
    assert type(loaded) is LlamaCausalLMPreprocessor and loaded.sequence_length == 16
    expected = [tokenizer.start_token_id] + sentencepiece_processor().encode("Hi")
    assert loaded.generate_preprocess("Hi")["token_ids"][: len(expected)].tolist() == expected
    with pytest.raises(ValueError, match="Llama3CausalLMPreprocessor cannot hold"):
        Llama3CausalLMPreprocessor.from_preset(str(tmp_path))
    assert "llama2_7b_en" in LlamaCausalLMPreprocessor.presets
    assert "llama3_8b_en" not in LlamaCausalLMPreprocessor.presets
    assert "llama3_8b_en" in Preprocessor.presets and "llama2_7b_en" in Preprocessor.presets
    assert pre.sequence_length == 1024


def _tiny_backbone():
    from keras_llama.models import LlamaBackbone

    return LlamaBackbone(
        vocabulary_size=32000, num_layers=1, num_query_heads=2, hidden_dim=8,
        intermediate_dim=16, num_key_value_heads=1,
    )  # fmt: skip
