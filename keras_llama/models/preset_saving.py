"""``save_to_preset`` for every class: model objects -> a KerasHub-layout preset folder.

Presets we write name KerasHub's classes exactly as KerasHub's own presets do
(``"registered_name": "keras_hub>LlamaBackbone"``, KerasHub's module paths and configs), so
that ``keras_hub.models.CausalLM.from_preset(folder)`` loads them. Reading maps the names back
to our classes through the registry by class name; the ``module`` field is never imported.
Settings of ours that KerasHub's configs cannot hold (a tokenizer's special tokens, ...) go
under `keras_format.OUR_CONFIG_KEY` beside ``config``.
"""

import datetime
import math
import os
import re

import keras
import numpy as np

from keras_llama.presets import keras_format
from keras_llama.tokenizers.byte_pair_tokenizer import BytePairTokenizer
from keras_llama.utils import registry
from keras_llama.version import __version__

# Where KerasHub defines each class we write under its name.
KERAS_HUB_MODULES = {
    "LlamaBackbone": "keras_hub.src.models.llama.llama_backbone",
    "LlamaCausalLM": "keras_hub.src.models.llama.llama_causal_lm",
    "LlamaCausalLMPreprocessor": "keras_hub.src.models.llama.llama_causal_lm_preprocessor",
    "LlamaTokenizer": "keras_hub.src.models.llama.llama_tokenizer",
    "Llama3Backbone": "keras_hub.src.models.llama3.llama3_backbone",
    "Llama3CausalLM": "keras_hub.src.models.llama3.llama3_causal_lm",
    "Llama3CausalLMPreprocessor": "keras_hub.src.models.llama3.llama3_causal_lm_preprocessor",
    "Llama3Tokenizer": "keras_hub.src.models.llama3.llama3_tokenizer",
}
# KerasHub's defaults for what its Llama 3 tokenizer config may carry.
_KERAS_HUB_LLAMA3_SPECIALS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}


def _names(obj):
    """``module``, ``class_name`` and ``registered_name`` for a serialized ``obj``: KerasHub's
    for the classes KerasHub has, ours for anything else (e.g. a user's subclass)."""
    name = type(obj).__name__
    if name in KERAS_HUB_MODULES and type(obj) in registry.registered_classes():
        return {"module": KERAS_HUB_MODULES[name], "class_name": name,
                "registered_name": f"keras_hub>{name}"}  # fmt: skip
    return {"module": type(obj).__module__, "class_name": name,
            "registered_name": f"keras_llama>{name}"}  # fmt: skip


def _serialize(obj, config, ours=None):
    names = _names(obj)
    serialized = {"module": names["module"], "class_name": names["class_name"], "config": config,
                  "registered_name": names["registered_name"]}  # fmt: skip
    if ours is not None:
        serialized[keras_format.OUR_CONFIG_KEY] = ours
    return serialized


def _layer_keys(obj, dtype):
    """The Keras layer keys KerasHub writes first in a tokenizer or preprocessor config."""
    # Keras' default layer name: LlamaCausalLMPreprocessor -> llama_causal_lm_preprocessor.
    name = re.sub(r"(.)([A-Z][a-z0-9]+)", r"\1_\2", type(obj).__name__)
    name = re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()
    policy = keras.saving.serialize_keras_object(keras.DTypePolicy(dtype))
    return {"name": name, "trainable": True, "dtype": policy}


def _serialize_tokenizer(tokenizer):
    """``tokenizer.json``: KerasHub's tokenizer config, plus our full config beside it."""
    config = {**_layer_keys(tokenizer, "int32"), "config_file": keras_format.TOKENIZER_FILE}
    if isinstance(tokenizer, BytePairTokenizer):
        config.update(
            sequence_length=None, add_prefix_space=False,
            unsplittable_tokens=list(tokenizer.special_tokens),
        )  # fmt: skip
        ours = tokenizer.get_config()
        for key, default in _KERAS_HUB_LLAMA3_SPECIALS.items():
            if ours.get(key, default) != default:
                config[key] = ours[key]
    else:  # SentencePiece
        config.update(proto=None, sequence_length=None, add_bos=False, add_eos=False)
    return _serialize(tokenizer, config, ours=tokenizer.get_config())


def _serialize_preprocessor(preprocessor):
    """``preprocessor.json``: KerasHub's preprocessor config (its tokenizer nested), plus ours."""
    ours = {k: v for k, v in preprocessor.get_config().items() if k != "tokenizer"}
    config = _layer_keys(preprocessor, "float32")
    if preprocessor.tokenizer is not None:
        config["tokenizer"] = _serialize_tokenizer(preprocessor.tokenizer)
    config["config_file"] = keras_format.PREPROCESSOR_FILE
    for key in ("sequence_length", "add_start_token", "add_end_token"):  # KerasHub's arguments
        if key in ours:
            config[key] = ours[key]
    return _serialize(preprocessor, config, ours=ours)


def _serialize_backbone(backbone):
    """``config.json``: the Keras serialization of the backbone under KerasHub's names (its
    constructor takes the same arguments)."""
    serialized = _without_build_config(keras.saving.serialize_keras_object(backbone))
    return _serialize(backbone, serialized["config"])


def _without_build_config(serialized):
    for key in ("build_config", "compile_config"):
        serialized.pop(key, None)
    return serialized


def _write_backbone(writer, backbone, max_shard_size=None):
    writer.write_json(keras_format.CONFIG_FILE, _serialize_backbone(backbone))
    writer.write_json(
        keras_format.METADATA_FILE,
        {
            "keras_version": keras.version(),
            "keras_llama_version": __version__,
            "parameter_count": backbone.count_params(),
            "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S"),
            "tasks": ["CausalLM"],
        },
    )
    writer.remove_weights()
    size_gb = (
        sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in backbone.weights) / 1024**3
    )
    if max_shard_size and size_gb > max_shard_size:
        backbone.save_weights(
            writer.path(keras_format.SHARDED_WEIGHTS_FILE), max_shard_size=max_shard_size
        )
    else:
        backbone.save_weights(writer.path(keras_format.WEIGHTS_FILE))


def _write_tokenizer(writer, tokenizer):
    writer.write_json(keras_format.TOKENIZER_FILE, _serialize_tokenizer(tokenizer))
    assets = writer.fresh_dir(keras_format.TOKENIZER_ASSETS_DIR)
    tokenizer.save_assets(assets)
    template = getattr(tokenizer, "chat_template", None)
    if template:
        writer.write_text(
            os.path.join(keras_format.TOKENIZER_ASSETS_DIR, keras_format.CHAT_TEMPLATE_FILE),
            template,
        )


def _write_preprocessor(writer, preprocessor):
    if preprocessor.tokenizer is not None:
        _write_tokenizer(writer, preprocessor.tokenizer)
    writer.write_json(keras_format.PREPROCESSOR_FILE, _serialize_preprocessor(preprocessor))


def save_backbone(backbone, preset_dir, max_shard_size=10):
    """Write ``config.json``, ``metadata.json`` and the weights (atomically)."""
    with keras_format.atomic_preset(preset_dir) as writer:
        _write_backbone(writer, backbone, max_shard_size)


@registry.register_tokenizer_preset_function
def save_tokenizer(tokenizer, preset_dir):
    """Write ``tokenizer.json`` and ``assets/tokenizer/`` (atomically)."""
    with keras_format.atomic_preset(preset_dir) as writer:
        _write_tokenizer(writer, tokenizer)


@registry.register_tokenizer_preset_function
def export_tokenizer(tokenizer, path, overwrite=False):
    """`Tokenizer.export_to_transformers` (tokenizers cannot import the exporters)."""
    from keras_llama.export import transformers  # export imports models: lazily

    transformers.export_tokenizer(tokenizer, path, overwrite)


def save_preprocessor(preprocessor, preset_dir):
    """Write ``preprocessor.json`` and its tokenizer (atomically)."""
    with keras_format.atomic_preset(preset_dir) as writer:
        _write_preprocessor(writer, preprocessor)


def save_task(task, preset_dir, max_shard_size=10):
    """Write a complete preset: backbone, preprocessor, tokenizer and ``task.json``
    (atomically: an existing preset is replaced only once everything is written)."""
    with keras_format.atomic_preset(preset_dir) as writer:
        _write_backbone(writer, task.backbone, max_shard_size)
        if task.preprocessor is not None:
            _write_preprocessor(writer, task.preprocessor)
        config = {
            "backbone": _serialize_backbone(task.backbone),
            "preprocessor": (
                _serialize_preprocessor(task.preprocessor)
                if task.preprocessor is not None
                else None
            ),
            "name": task.name,
        }
        limit = getattr(task, "_max_sequence_length", None)  # only a known context is written
        ours = {"max_sequence_length": limit} if limit else None
        writer.write_json(keras_format.TASK_FILE, _serialize(task, config, ours=ours))
