"""The preprocessor trains on answers only: {"prompts", "responses"} and chat message lists get
sample_weight 0 on prompt tokens. Expected masks are counted by hand from the tiny
SentencePiece vocabulary's pieces (listed beside each case)."""

import pytest
import sentencepiece as spm

from keras_llama.models import LlamaCausalLMPreprocessor, LlamaTokenizer
from tests.presets.helpers import SPM_PROTO

TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}"
)
CHAT = [
    {"role": "user", "content": "the fox"},
    {"role": "assistant", "content": "a lazy dog"},
    {"role": "user", "content": "the quick"},
    {"role": "assistant", "content": "brown fox"},
]


@pytest.fixture
def preprocessor():
    tokenizer = LlamaTokenizer(SPM_PROTO)
    tokenizer.chat_template = TEMPLATE
    return LlamaCausalLMPreprocessor(tokenizer, sequence_length=12)


def test_prompt_and_response(preprocessor):
    # <s> ▁the ▁quick | ▁brown ▁fox </s>: labels ▁the ▁quick ▁brown ▁fox </s>
    x, y, weight = preprocessor({"prompts": "the quick", "responses": "brown fox"})
    sp = spm.SentencePieceProcessor(model_file=SPM_PROTO)
    ids = [1] + sp.encode("the quick") + sp.encode("brown fox") + [2]
    assert x["token_ids"].tolist() == ids + [0] * 6
    assert y.tolist() == ids[1:] + [0] * 7
    assert weight.astype(int).tolist() == [0, 0, 1, 1, 1] + [0] * 7
    assert x["padding_mask"].astype(int).tolist() == [1] * 6 + [0] * 6


def test_batched_prompts_and_responses_truncate_with_their_weights(preprocessor):
    x, y, weight = preprocessor(
        {"prompts": ["the quick", "a lazy dog"], "responses": ["brown fox", "the fox"]},
        sequence_length=4,
    )
    # row 1: <s> ▁a ▁lazy ▁dog | ▁the ... cut to 5 tokens: labels ▁a ▁lazy ▁dog ▁the
    assert weight.astype(int).tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]
    assert x["token_ids"].shape == (2, 4)


def test_chat_trains_on_assistant_turns_only(preprocessor):
    x, y, weight = preprocessor(CHAT, sequence_length=20)
    # tokens: <s> ▁ [INST] ▁the ▁fox ▁ [/INST] | ▁a ▁lazy ▁dog </s> | ▁ [INST] ▁the ▁quick ▁
    #         [/INST] | ▁brown ▁fox </s>          (20 tokens; label t is token t + 1)
    expected = [0] * 6 + [1] * 4 + [0] * 6 + [1] * 3 + [0]
    assert weight.astype(int).tolist() == expected
    assert y[9] == 2 and weight[9]  # the assistant's </s> (a control token) is trained on
    assert x["padding_mask"].all()
    batch = preprocessor([CHAT[:2], CHAT], sequence_length=20)[2].astype(int).tolist()
    assert batch == [[0] * 6 + [1] * 4 + [0] * 10, expected]


def test_plain_text_is_unchanged(preprocessor):
    x, y, weight = preprocessor("the quick brown fox", sequence_length=8)
    assert weight.astype(int).tolist() == [1] * 5 + [0] * 3  # every real label, as before
    assert y[:5].tolist() == [6, 44, 43, 19, 2]  # ▁the ▁quick ▁brown ▁fox </s>


def test_mismatched_prompts_and_responses_are_refused(preprocessor):
    with pytest.raises(ValueError, match="2 prompts and 1 responses"):
        preprocessor({"prompts": ["a", "b"], "responses": ["c"]})
