"""``Tokenizer.from_preset``: a tokenizer from a preset, reading only the tokenizer's files.

Registered with `keras_llama.utils.registry` (tokenizers sit below models and cannot import
this module); `Tokenizer.from_preset` calls it through the registry.
"""

from keras_llama.models.preset_reading import open_preset, pick_class
from keras_llama.presets import keras_format
from keras_llama.presets.checkpoint import Checkpoint
from keras_llama.tokenizers import build_sentencepiece_proto
from keras_llama.utils import registry


@registry.register_tokenizer_preset_function
def load_tokenizer(cls, preset, **kwargs):
    """``cls.from_preset(preset, **kwargs)`` for tokenizers."""
    src = open_preset(preset)
    tokenizer_cls = pick_class(cls, src, "tokenizer")
    if isinstance(src, Checkpoint):
        if src.tokenizer is None:
            raise FileNotFoundError(f"The checkpoint {src.source!r} has no tokenizer files.")
        tokenizer = _build_tokenizer(tokenizer_cls, src.tokenizer, **kwargs)
    else:
        if src.tokenizer is None:
            raise FileNotFoundError(
                f"The preset {src.source!r} has no {keras_format.TOKENIZER_FILE}."
            )
        config = {**keras_format.our_config(src.tokenizer), **kwargs}
        tokenizer = tokenizer_cls.from_config(config)
        if src.tokenizer_assets is None:
            raise FileNotFoundError(
                f"The preset {src.source!r} has no tokenizer assets folder "
                f"({keras_format.TOKENIZER_ASSETS_DIR})."
            )
        tokenizer.load_assets(src.tokenizer_assets)
    tokenizer.chat_template = src.chat_template
    return tokenizer


def _build_tokenizer(tokenizer_cls, spec, **kwargs):
    """A tokenizer from a `TokenizerSpec` (Hugging Face, GGUF and Meta checkpoints)."""
    specials = {"start_token": spec.start_token, "end_token": spec.end_token}
    if spec.kind in ("sentencepiece", "sentencepiece_pieces"):
        if spec.kind == "sentencepiece":
            proto = spec.data["proto"]
        else:
            proto = build_sentencepiece_proto(**spec.data)
        args = {k: v for k, v in specials.items() if v is not None}
        if spec.pad_token is not None:
            args["pad_token"] = spec.pad_token
        return tokenizer_cls(proto=proto, **{**args, **kwargs})
    args = {"bos_token": spec.start_token, "eos_token": spec.end_token}
    args = {k: v for k, v in args.items() if v is not None}
    if spec.stop_tokens:
        args["stop_tokens"] = spec.stop_tokens
    if spec.kind == "byte_level_bpe":
        # GGUF token types: 3 control, 4 user-defined tokens are matched whole in text.
        data = spec.data
        special = [t for t, kind in zip(data["tokens"], data["types"]) if kind in (3, 4)]
        args.update(misc_special_tokens=special, pretokenizer=data["pre"])
        args["stop_tokens"] = spec.stop_tokens  # GGUF names its stop tokens: no guessing
        if spec.pad_token is not None:
            args["pad_token"] = spec.pad_token
        return tokenizer_cls(vocabulary=data["tokens"], merges=data["merges"], **{**args, **kwargs})
    if spec.kind == "tokenizer_json":
        return tokenizer_cls.from_tokenizer_json(spec.data["path"], **{**args, **kwargs})
    if spec.kind == "tiktoken":
        return tokenizer_cls.from_tiktoken(spec.data["path"], **{**args, **kwargs})
    raise ValueError(f"Unknown tokenizer kind. Received: {spec.kind!r}")
