"""Chat prompts for a model: its checkpoint's template, else a built-in one.

Rendering lives in `keras_llama.presets.chat_template` (jinja2 sandbox, built-in templates);
this module connects it to a tokenizer (``tokenizer.chat_template``, set by ``from_preset``) and
a preprocessor (its start token).
"""

from keras_llama.presets import chat_template as chat_templates
from keras_llama.tokenizers import ChatPrompt


def chat_template_of(tokenizer):
    """The tokenizer's chat template, or the built-in one its vocabulary calls for."""
    template = getattr(tokenizer, "chat_template", None)
    if template:
        return template

    def has_token(token):
        return tokenizer._token_to_id(token) is not None

    return chat_templates.builtin_template_for(has_token)


def apply_chat_template(preprocessor, messages, add_generation_prompt=True, **extra):
    """Render ``messages`` with the model's chat template into a prompt string for
    ``generate()``.

    Returns a `keras_llama.tokenizers.ChatPrompt` (a ``str``), whose special-token strings
    the tokenizer encodes as those tokens. A template that starts with the start token (Llama 2 and 3 templates insert
    ``bos_token``) would give two of them once the preprocessor adds its own
    (``add_start_token=True``); that leading copy is dropped from the text.
    """
    tokenizer = preprocessor.tokenizer
    bos, eos = tokenizer.start_token, tokenizer.end_token
    text = chat_templates.render(
        chat_template_of(tokenizer),
        messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos or "",
        eos_token=eos or "",
        **extra,
    )
    if bos and getattr(preprocessor, "add_start_token", False) and text.startswith(bos):
        text = text[len(bos) :]
    # The template wrote its control tokens as text: marked, the tokenizer encodes them as
    # tokens (plain user strings never get that).
    return ChatPrompt(text)
