"""Opening a preset and choosing the class that builds it.

The readers in `keras_llama.presets` return plain data: a `KerasPreset` (serialized configs
and a Keras weight file) for KerasHub-layout folders, or a `Checkpoint` (backbone kwargs, a
weight iterator, a tokenizer spec) for Hugging Face, GGUF and Meta checkpoints.

Classes are chosen from the registry (`keras_llama.utils.registry`) by the checkpoint's family
("llama": SentencePiece vocabulary, "llama3": byte-level BPE), which a KerasHub-layout preset
gives by its backbone's class *name*. Calling ``from_preset`` on a base class (``CausalLM``,
``Backbone``, ``Tokenizer``, ``Preprocessor``) or on ``LlamaCausalLM`` for a Llama 3 preset
returns the matching subclass; asking a class that cannot hold the preset (``Llama3CausalLM``
for a SentencePiece model) is an error.
"""

import os

from keras_llama.presets import gguf_format, handles, huggingface, keras_format, meta_format
from keras_llama.presets.checkpoint import Checkpoint
from keras_llama.utils import registry


def open_preset(preset):
    """Resolve ``preset`` and read it: a `KerasPreset` or a `Checkpoint` (no weights loaded)."""
    if isinstance(preset, (keras_format.KerasPreset, Checkpoint)):
        return preset
    path = handles.resolve(preset, registry.builtin_presets())
    source = os.fspath(preset)
    if os.path.isfile(path):
        if not gguf_format.is_gguf(path):
            raise ValueError(f"{path!r} is not a GGUF file (no GGUF magic). Received: {source!r}")
        return gguf_format.read(path, source)
    if keras_format.is_keras_preset(path):
        return keras_format.read(path, source)
    if os.path.isfile(os.path.join(path, "config.json")):
        return huggingface.read(path, source)
    if meta_format.is_meta_checkpoint(path):
        return meta_format.read(path, source)
    ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    if ggufs:
        raise ValueError(
            f"The folder {path!r} holds GGUF files {ggufs[:5]}: pass one of them (a path, or "
            f"`hf://owner/repo/<file>.gguf`). Received: preset={source!r}"
        )
    raise ValueError(
        f"{path!r} is not a preset folder: expected config.json (a KerasHub or Hugging Face "
        "checkpoint), params.json with consolidated.*.pth (Meta), or a .gguf file. "
        f"Found: {sorted(os.listdir(path))[:10]}. Received: preset={source!r}"
    )


def family_of(src):
    """The family of an opened preset (see `keras_llama.utils.registry`)."""
    if isinstance(src, Checkpoint):
        return src.family
    name = keras_format.class_name(src.backbone)
    family = registry.family_of_backbone_name(name)
    if family is None:
        known = sorted(c["backbone"].__name__ for c in registry.families().values())
        raise ValueError(
            f"The preset {src.source!r} holds a {name!r} model ({keras_format.CONFIG_FILE}); "
            f"keras-llama loads the Llama architecture only: {known}. Received: class_name={name!r}"
        )
    return family


def pick_class(cls, src, role):
    """The registered class of ``src``'s family for ``role``, if it is ``cls`` or a subclass."""
    family = family_of(src)
    target = registry.classes_of(family)[role]
    if issubclass(target, cls):
        return target
    raise ValueError(
        f"The preset {src.source!r} holds a {target.__name__.replace('Backbone', '')}-family model "
        f"({'SentencePiece' if family == 'llama' else 'byte-level BPE'} vocabulary), which "
        f"{cls.__name__} cannot hold. Load it with {target.__name__} or with the base class."
    )
