"""Chat templates rendered like transformers' apply_chat_template; built-ins; the sandbox."""

import pytest

from keras_llama.presets import chat_template

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Spain? ünïcödé"},
]


def transformers_render(template, messages, **kwargs):
    """transformers' own renderer (the reference)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        conversations=[messages], chat_template=template, add_generation_prompt=True, **kwargs
    )
    return rendered[0]


@pytest.mark.parametrize("name", sorted(chat_template.BUILTIN_TEMPLATES))
def test_builtin_templates_render_as_transformers(name):
    template = chat_template.BUILTIN_TEMPLATES[name]
    tokens = dict(bos_token="<s>", eos_token="</s>")
    ours = chat_template.render(template, MESSAGES, add_generation_prompt=True, **tokens)
    assert ours == transformers_render(template, MESSAGES, **tokens)


def test_builtin_texts_worked_out_by_hand():
    messages = [{"role": "user", "content": "Hi"}]
    llama3 = chat_template.render(chat_template.LLAMA3_TEMPLATE, messages, bos_token="<B>")
    assert llama3 == (
        "<B><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    llama2 = chat_template.render(chat_template.LLAMA2_TEMPLATE, messages, bos_token="<s>")
    assert llama2 == "<s>[INST] Hi [/INST]"
    chatml = chat_template.render(chat_template.CHATML_TEMPLATE, messages)
    assert chatml == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_template_picked_from_vocabulary():
    assert chat_template.builtin_template_for(
        lambda t: t in {"<|start_header_id|>", "<|eot_id|>"}
    ) == chat_template.LLAMA3_TEMPLATE  # fmt: skip
    assert chat_template.builtin_template_for(
        lambda t: t in {"<|im_start|>", "<|im_end|>"}
    ) == chat_template.CHATML_TEMPLATE  # fmt: skip
    assert chat_template.builtin_template_for(lambda t: False) == chat_template.LLAMA2_TEMPLATE


def test_template_errors_and_sandbox():
    with pytest.raises(ValueError, match="roles must alternate"):
        chat_template.render(chat_template.LLAMA2_TEMPLATE, [{"role": "assistant", "content": "x"}])
    with pytest.raises(ValueError, match="access to attribute|unsafe"):
        chat_template.render("{{ ''.__class__.__mro__[1].__subclasses__() }}", MESSAGES)
    with pytest.raises(ValueError, match="Received: messages\\[0\\]"):
        chat_template.render(chat_template.CHATML_TEMPLATE, [{"role": "user"}])


def test_preprocessor_apply_chat_template_leaves_the_start_token_to_the_preprocessor():
    import os

    from keras_llama.models import Preprocessor
    from tests.presets.helpers import KERAS_HUB

    preprocessor = Preprocessor.from_preset(os.path.join(KERAS_HUB, "llama3"))
    messages = [{"role": "user", "content": "the fox"}]
    prompt = preprocessor.apply_chat_template(messages)  # built-in Llama 3 template
    assert prompt == (
        "<|start_header_id|>user<|end_header_id|>\n\nthe fox<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = preprocessor.generate_preprocess(prompt)["token_ids"]
    bos = preprocessor.tokenizer.start_token_id
    assert ids[0] == bos and ids[1] == preprocessor.tokenizer.token_to_id("<|start_header_id|>")
    preprocessor.add_start_token = False
    assert preprocessor.apply_chat_template(messages).startswith("<|begin_of_text|>")
