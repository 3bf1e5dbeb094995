"""Chat templates: turning a list of messages into one prompt string.

Checkpoints ship their own template (GGUF ``tokenizer.chat_template``, Hugging Face
``tokenizer_config.json`` / ``chat_template.jinja``), written in Jinja for transformers'
``apply_chat_template``. We render them the same way transformers does: in jinja2's
``ImmutableSandboxedEnvironment`` (a template cannot reach Python internals or mutate its
inputs), with ``trim_blocks`` / ``lstrip_blocks``, the ``loopcontrols`` extension,
``raise_exception``, ``strftime_now`` and a ``tojson`` that keeps non-ASCII text.

Models without one get a built-in template picked from their vocabulary: Llama 3's header
tokens, ChatML (``<|im_start|>``) or Llama 2's ``[INST]``.
"""

import datetime
import functools
import json

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)

LLAMA3_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

BUILTIN_TEMPLATES = {
    "llama2": LLAMA2_TEMPLATE,
    "llama3": LLAMA3_TEMPLATE,
    "chatml": CHATML_TEMPLATE,
}


def builtin_template_for(has_token):
    """The built-in template matching a vocabulary; ``has_token(str) -> bool``."""
    if has_token("<|start_header_id|>") and has_token("<|eot_id|>"):
        return LLAMA3_TEMPLATE
    if has_token("<|im_start|>") and has_token("<|im_end|>"):
        return CHATML_TEMPLATE
    return LLAMA2_TEMPLATE


def render(template, messages, add_generation_prompt=True, bos_token="", eos_token="", **extra):
    """Render a Jinja chat ``template`` for ``messages``.

    Args:
        template: the template source (a string).
        messages: a list of ``{"role": str, "content": str}`` dicts.
        add_generation_prompt: end with the header that opens the assistant's turn.
        bos_token, eos_token: token strings the template may insert.
        **extra: further template variables (e.g. ``tools``, ``date_string``).

    Returns:
        The prompt string.
    """
    messages = _check_messages(messages)
    from jinja2.exceptions import TemplateError

    try:
        compiled = _compile(template)
        return compiled.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token or "",
            eos_token=eos_token or "",
            **extra,
        )
    except TemplateError as e:
        raise ValueError(f"The chat template failed to render: {e}") from e


def _check_messages(messages):
    if isinstance(messages, dict):
        messages = [messages]
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(
            "`messages` must be a non-empty list of {'role': ..., 'content': ...} dicts. "
            f"Received: messages={messages!r}"
        )
    for i, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not (isinstance(message.get("content"), str))
        ):
            raise ValueError(
                "Each message must be a dict with a string 'role' and a string 'content'. "
                f"Received: messages[{i}]={message!r}"
            )
    return list(messages)


def _raise_exception(message):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers overrides jinja's `tojson` (which escapes HTML characters) with this.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format):
    return datetime.datetime.now().strftime(format)


@functools.lru_cache(maxsize=16)
def _compile(template):
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if not isinstance(template, str) or not template:
        raise ValueError(f"A chat template must be a non-empty string. Received: {template!r}")
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)
