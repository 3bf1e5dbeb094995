"""`from_preset` / `save_to_preset` for every class: preset data -> model objects, and back.

The readers in `keras_llama.presets` return plain data: a `KerasPreset` (serialized configs
and a Keras weight file) for KerasHub-layout folders, or a `Checkpoint` (backbone kwargs, a
weight iterator, a tokenizer spec) for Hugging Face, GGUF and Meta checkpoints. This module
picks the classes, builds the objects and loads the weights.

Classes are chosen from a fixed table by *name* and by the checkpoint's family ("llama":
SentencePiece vocabulary, "llama3": byte-level BPE). Calling ``from_preset`` on a base class
(``CausalLM``, ``Backbone``, ``Tokenizer``, ``Preprocessor``) or on ``LlamaCausalLM`` for a
Llama 3 preset returns the matching subclass; asking a class that cannot hold the preset
(``Llama3CausalLM`` for a SentencePiece model) is an error.
"""

import datetime
import inspect
import math
import os
import re
import sys

import keras
import numpy as np

from keras_llama.models import weights as _weights
from keras_llama.presets import gguf_format, handles, huggingface, keras_format, meta_format
from keras_llama.presets.checkpoint import Checkpoint
from keras_llama.tokenizers import tokenizer as _tokenizer_module

# KerasHub writes these keys into layer configs; our plain-Python tokenizers and preprocessors
# have no such arguments.
_KERAS_LAYER_KEYS = ("name", "trainable", "dtype", "config_file", "tokenizer")


# --- class tables ------------------------------------------------------------------------------
def _families():
    """``{family: {role: class}}``: which classes serve a checkpoint of each family."""
    from keras_llama.models.llama.llama_backbone import LlamaBackbone
    from keras_llama.models.llama.llama_causal_lm import LlamaCausalLM
    from keras_llama.models.llama.llama_causal_lm_preprocessor import LlamaCausalLMPreprocessor
    from keras_llama.models.llama.llama_tokenizer import LlamaTokenizer
    from keras_llama.models.llama3.llama3_backbone import Llama3Backbone
    from keras_llama.models.llama3.llama3_causal_lm import Llama3CausalLM
    from keras_llama.models.llama3.llama3_causal_lm_preprocessor import (
        Llama3CausalLMPreprocessor,
    )
    from keras_llama.models.llama3.llama3_tokenizer import Llama3Tokenizer

    return {
        "llama": {
            "backbone": LlamaBackbone,
            "task": LlamaCausalLM,
            "preprocessor": LlamaCausalLMPreprocessor,
            "tokenizer": LlamaTokenizer,
        },
        "llama3": {
            "backbone": Llama3Backbone,
            "task": Llama3CausalLM,
            "preprocessor": Llama3CausalLMPreprocessor,
            "tokenizer": Llama3Tokenizer,
        },
    }


def _family_of_class_name(name, file, source):
    """The family of a backbone class name written by KerasHub or by us."""
    for family, classes in _families().items():
        if classes["backbone"].__name__ == name:
            return family
    known = sorted(c["backbone"].__name__ for c in _families().values())
    raise ValueError(
        f"The preset {source!r} holds a {name!r} model ({file}); keras-llama loads the Llama "
        f"architecture only: {known}. Received: class_name={name!r}"
    )


def _pick_class(cls, family, role, source):
    target = _families()[family][role]
    if issubclass(target, cls):
        return target
    raise ValueError(
        f"The preset {source!r} holds a {target.__name__.replace('Backbone', '')}-family model "
        f"({'SentencePiece' if family == 'llama' else 'byte-level BPE'} vocabulary), which "
        f"{cls.__name__} cannot hold. Load it with {target.__name__} or with the base class."
    )


# --- built-in presets --------------------------------------------------------------------------
def builtin_presets():
    """All built-in presets: ``{name: {"metadata": {...}, "kaggle_handle": ...}}``."""
    from keras_llama.models.llama.llama_presets import backbone_presets as llama
    from keras_llama.models.llama3.llama3_presets import backbone_presets as llama3

    return {**llama, **llama3}


def presets_for(cls):
    """The built-in presets whose classes are ``cls`` or one of its subclasses."""
    families = _families()
    out = {}
    for name, preset in builtin_presets().items():
        classes = families[preset["metadata"]["path"]].values()
        if any(issubclass(c, cls) for c in classes):
            out[name] = preset
    return out


# --- opening a preset --------------------------------------------------------------------------
def open_preset(preset):
    """Resolve ``preset`` and read it: a `KerasPreset` or a `Checkpoint` (no weights loaded)."""
    if isinstance(preset, (keras_format.KerasPreset, Checkpoint)):
        return preset
    path = handles.resolve(preset, builtin_presets())
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


def _family(src):
    if isinstance(src, Checkpoint):
        return src.family
    return _family_of_class_name(keras_format.class_name(src.backbone), "config.json", src.source)


# --- backbone ----------------------------------------------------------------------------------
def load_backbone(cls, preset, load_weights=True, progress=None, **kwargs):
    """``cls.from_preset(preset, load_weights, **kwargs)`` for backbones. ``progress``: show a
    progress bar while converting weights (see `show_progress`)."""
    src = open_preset(preset)
    backbone_cls = _pick_class(cls, _family(src), "backbone", src.source)
    if isinstance(src, Checkpoint):
        config = {**src.backbone_config, **kwargs}
    else:
        config = dict(src.backbone["config"])
        config["dtype"] = _resolve_dtype(config.get("dtype"), kwargs.pop("dtype", None))
        config.update(kwargs)
    if not load_weights:
        return backbone_cls(**config)  # random initialization, as the constructor does
    # Weights will overwrite every variable: skip drawing random initial values.
    backbone = _weights.build_uninitialized(backbone_cls, **config)
    if isinstance(src, Checkpoint):
        named_arrays = with_progress(
            src.read_weights(config),
            total=len(backbone.weights),
            description=f"Converting {_FORMAT_NAMES.get(src.format, src.format)} weights",
            progress=progress,
        )
        _weights.assign_weights(backbone, named_arrays, source=f"checkpoint {src.source!r}")
    else:
        _load_keras_weights(backbone, src)
    return backbone


# --- progress ------------------------------------------------------------------------------
PROGRESS_ENV = "KERAS_LLAMA_PROGRESS"
_FORMAT_NAMES = {"gguf": "GGUF", "huggingface": "Hugging Face", "meta": "Meta"}


def show_progress(progress=None):
    """Whether to draw a progress bar: ``progress`` if given (True/False); else the
    ``KERAS_LLAMA_PROGRESS`` environment variable (``1``/``0``); else only when stderr is a
    terminal (so logs, pipes and tests stay quiet)."""
    if progress is not None:
        return bool(progress)
    setting = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if setting in ("1", "true", "yes", "on"):
        return True
    if setting in ("0", "false", "no", "off"):
        return False
    return sys.stderr is not None and sys.stderr.isatty()


def with_progress(iterable, total, description, progress=None):
    """``iterable``, drawing a tqdm bar on stderr as it is consumed when `show_progress`."""
    if not show_progress(progress):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=description, unit="tensor", file=sys.stderr)


def _resolve_dtype(saved, requested):
    """The backbone dtype: the caller's; else a saved quantization map (int8 presets need its
    structure); a saved plain float policy gives way to Keras' default (as KerasHub does)."""
    if isinstance(saved, dict):
        saved = _deserialize_dtype(saved)
    if isinstance(saved, keras.dtype_policies.DTypePolicyMap):
        if requested is not None:
            # Quantized layers keep their mode and compute in the requested dtype.
            saved.default_policy = keras.dtype_policies.get(requested)
            for key in list(saved):
                policy = saved[key]
                if getattr(policy, "quantization_mode", None):
                    saved[key] = type(policy)(policy.quantization_mode, source_name=requested)
        return saved
    return requested


# Dtype policies are the only objects a preset's backbone config may deserialize (by name,
# from Keras' own classes).
_DTYPE_POLICY_CLASSES = (
    "DTypePolicy",
    "FloatDTypePolicy",
    "QuantizedDTypePolicy",
    "QuantizedFloat8DTypePolicy",
    "Int4DTypePolicy",
    "GPTQDTypePolicy",
    "AWQDTypePolicy",
    "DTypePolicyMap",
    "Int8WeightOnlyDTypePolicy",  # keras_llama.quantization: int8 weights, float activations
)


def _deserialize_dtype(config):
    if config is None or isinstance(config, str):
        return config
    if not isinstance(config, dict) or config.get("class_name") not in _DTYPE_POLICY_CLASSES:
        raise ValueError(
            f"A preset's `dtype` must be a dtype name or a serialized Keras dtype policy "
            f"({', '.join(_DTYPE_POLICY_CLASSES)}). Received: dtype={config!r}"
        )
    if config["class_name"] == "DTypePolicyMap":
        inner = config.get("config", {})
        for policy in (inner.get("policy_map") or {}).values():
            _deserialize_dtype(policy)  # validates every entry
    if not str(config.get("module", "keras")).startswith("keras"):
        raise ValueError(f"A dtype policy must come from Keras. Received: dtype={config!r}")
    return keras.dtype_policies.deserialize(config)


def _load_keras_weights(backbone, src):
    if src.weights_path is None:
        raise FileNotFoundError(
            f"The preset {src.source!r} has no weights: expected {keras_format.WEIGHTS_FILE} or "
            f"{keras_format.SHARDED_WEIGHTS_FILE} in {src.path!r}. Use load_weights=False for "
            "a randomly initialised model."
        )
    # Keras' loader assigns into existing values: start from zeros rather than random draws.
    _weights.fill_uninitialized(backbone)
    try:
        backbone.load_weights(src.weights_path)
    except Exception as e:  # h5py OSError for truncated files, Keras ValueError for mismatches
        raise ValueError(
            f"Could not load the weights of preset {src.source!r} from "
            f"{src.weights_path!r} (truncated, corrupt, or of another configuration?): "
            f"{type(e).__name__}: {e}"
        ) from e


# --- tokenizer ---------------------------------------------------------------------------------
def load_tokenizer(cls, preset, **kwargs):
    """``cls.from_preset(preset, **kwargs)`` for tokenizers."""
    src = open_preset(preset)
    tokenizer_cls = _pick_class(cls, _family(src), "tokenizer", src.source)
    if isinstance(src, Checkpoint):
        if src.tokenizer is None:
            raise FileNotFoundError(f"The checkpoint {src.source!r} has no tokenizer files.")
        tokenizer = _build_tokenizer(tokenizer_cls, src.tokenizer, **kwargs)
    else:
        if src.tokenizer is None:
            raise FileNotFoundError(
                f"The preset {src.source!r} has no {keras_format.TOKENIZER_FILE}."
            )
        config = {**_our_config(src.tokenizer), **kwargs}
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
    from keras_llama.tokenizers import build_sentencepiece_proto

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


# --- preprocessor and task ---------------------------------------------------------------------
def load_preprocessor(cls, preset, **kwargs):
    """``cls.from_preset(preset, **kwargs)`` for preprocessors; ``kwargs`` override the
    saved settings (``sequence_length``, ``add_start_token``, ...)."""
    src = open_preset(preset)
    preprocessor_cls = _pick_class(cls, _family(src), "preprocessor", src.source)
    tokenizer = kwargs.pop("tokenizer", None) or load_tokenizer(preprocessor_cls.tokenizer_cls, src)
    if isinstance(src, Checkpoint):
        config = dict(src.preprocessor)
    elif src.preprocessor is not None:
        config = _our_config(src.preprocessor)
        config = {k: v for k, v in config.items() if k not in _KERAS_LAYER_KEYS}
    else:
        config = {}
    params = inspect.signature(preprocessor_cls.__init__).parameters
    config = {k: v for k, v in config.items() if k in params}
    config.update(kwargs)
    return preprocessor_cls(tokenizer=tokenizer, **config)


def load_task(cls, preset, load_weights=True, **kwargs):
    """``cls.from_preset(preset, load_weights, **kwargs)`` for tasks. ``kwargs`` go to the
    backbone (its constructor arguments, ``dtype`` and ``progress``), the preprocessor (its
    arguments, e.g. ``sequence_length``) or the task; ``preprocessor=None`` skips the
    preprocessor."""
    src = open_preset(preset)
    task_cls = _pick_class(cls, _family(src), "task", src.source)
    backbone_kwargs = _take(kwargs, task_cls.backbone_cls, extra=("dtype", "progress"))
    preprocessor_kwargs = _take(kwargs, task_cls.preprocessor_cls, skip=("tokenizer", "self"))
    if "backbone" not in kwargs:
        kwargs["backbone"] = load_backbone(
            task_cls.backbone_cls, src, load_weights=load_weights, **backbone_kwargs
        )
    if "preprocessor" not in kwargs:
        has_tokenizer = src.tokenizer is not None
        kwargs["preprocessor"] = (
            load_preprocessor(task_cls.preprocessor_cls, src, **preprocessor_kwargs)
            if has_tokenizer
            else None
        )
    return task_cls(**kwargs)


def _take(kwargs, target_cls, extra=(), skip=("self",)):
    """Pop the entries of ``kwargs`` that ``target_cls.__init__`` accepts."""
    params = set(inspect.signature(target_cls.__init__).parameters) | set(extra)
    params -= set(skip)
    return {k: kwargs.pop(k) for k in list(kwargs) if k in params}


# --- saving ------------------------------------------------------------------------------------
# Presets we write name KerasHub's classes exactly as KerasHub's own presets do
# (``"registered_name": "keras_hub>LlamaBackbone"``, KerasHub's module paths and configs), so
# that ``keras_hub.models.CausalLM.from_preset(folder)`` loads them. Reading maps the names back
# to our classes through `_families()` by class name; the ``module`` field is never imported.
# Settings of ours that KerasHub's configs cannot hold (a tokenizer's special tokens, ...) go
# under `OUR_CONFIG_KEY` beside ``config``, a key Keras' deserializer ignores.
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
OUR_CONFIG_KEY = "keras_llama_config"
# KerasHub's defaults for what its Llama 3 tokenizer config may carry.
_KERAS_HUB_LLAMA3_SPECIALS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}


def _names(obj):
    """``module``, ``class_name`` and ``registered_name`` for a serialized ``obj``: KerasHub's
    for the classes KerasHub has, ours for anything else (e.g. a user's subclass)."""
    name = type(obj).__name__
    if name in KERAS_HUB_MODULES and type(obj) in _families_classes():
        return {"module": KERAS_HUB_MODULES[name], "class_name": name,
                "registered_name": f"keras_hub>{name}"}  # fmt: skip
    return {"module": type(obj).__module__, "class_name": name,
            "registered_name": f"keras_llama>{name}"}  # fmt: skip


def _families_classes():
    return {c for classes in _families().values() for c in classes.values()}


def _serialize(obj, config, ours=None):
    names = _names(obj)
    serialized = {"module": names["module"], "class_name": names["class_name"], "config": config,
                  "registered_name": names["registered_name"]}  # fmt: skip
    if ours is not None:
        serialized[OUR_CONFIG_KEY] = ours
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
    from keras_llama.tokenizers.byte_pair_tokenizer import BytePairTokenizer

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


def _our_config(serialized):
    """The config to build our class from: ours when we wrote the file, else KerasHub's."""
    ours = serialized.get(OUR_CONFIG_KEY)
    return dict(ours) if isinstance(ours, dict) else dict(serialized["config"])


def _without_build_config(serialized):
    for key in ("build_config", "compile_config"):
        serialized.pop(key, None)
    return serialized


def _write_backbone(writer, backbone, max_shard_size=None):
    from keras_llama.version import __version__

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


def save_tokenizer(tokenizer, preset_dir):
    """Write ``tokenizer.json`` and ``assets/tokenizer/`` (atomically)."""
    with keras_format.atomic_preset(preset_dir) as writer:
        _write_tokenizer(writer, tokenizer)


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
        writer.write_json(keras_format.TASK_FILE, _serialize(task, config))


# Tokenizers cannot import this module (imports flow tokenizers -> models); hand it to them.
_tokenizer_module.register_preset_api(sys.modules[__name__])
