"""``from_preset`` for backbones, preprocessors and tasks: preset data -> model objects.

`keras_llama.models.preset_reading` opens the preset and picks the class; this module builds
the objects and loads the weights. Tokenizers: `keras_llama.models.tokenizer_loading`; saving:
`keras_llama.models.preset_saving`.
"""

import inspect
import os
import re
import sys

import keras

from keras_llama.models import weights as _weights
from keras_llama.models.preset_reading import open_preset, pick_class
from keras_llama.models.tokenizer_loading import load_tokenizer
from keras_llama.presets import keras_format
from keras_llama.presets.checkpoint import Checkpoint

# KerasHub writes these keys into layer configs; our plain-Python tokenizers and preprocessors
# have no such arguments.
# How Keras names `LlamaTransformerDecoder` layers in a weights file (its class name in snake
# case, then ``_1``, ``_2``, ...), in KerasHub's presets and ours alike.
DECODER_LAYER_NAME = "llama_transformer_decoder"
_KERAS_LAYER_KEYS = ("name", "trainable", "dtype", "config_file", "tokenizer")


# --- backbone ----------------------------------------------------------------------------------
def load_backbone(cls, preset, load_weights=True, progress=None, **kwargs):
    """``cls.from_preset(preset, load_weights, **kwargs)`` for backbones. ``progress``: show a
    progress bar while converting weights (see `show_progress`)."""
    src = open_preset(preset)
    backbone_cls = pick_class(cls, src, "backbone")
    if isinstance(src, Checkpoint):
        config = {**src.backbone_config, **kwargs}
    else:
        config = dict(src.backbone["config"])
        config["dtype"] = _resolve_dtype(config.get("dtype"), kwargs.pop("dtype", None))
        config.update(kwargs)
        _check_arguments(backbone_cls, config, src)
    if not load_weights:
        return _construct(backbone_cls, config, src)  # random initialization
    if not isinstance(src, Checkpoint):
        _check_keras_layer_count(config, src)
    # Opens the weight files (missing ones fail here, before the model is built); the arrays
    # are read one at a time as they are assigned.
    tensors = src.read_weights(config) if isinstance(src, Checkpoint) else None
    # Weights will overwrite every variable: skip drawing random initial values.
    backbone = _construct(_weights.build_uninitialized, config, src, backbone_cls)
    if isinstance(src, Checkpoint):
        named_arrays = with_progress(
            tensors,
            total=len(backbone.weights),
            description=f"Converting {_FORMAT_NAMES.get(src.format, src.format)} weights",
            progress=progress,
        )
        _weights.assign_weights(backbone, named_arrays, source=f"checkpoint {src.source!r}")
    else:
        _load_keras_weights(backbone, src)
        adapter = os.path.join(src.path, keras_format.ADAPTER_FILE)
        if os.path.isfile(adapter):
            backbone.load_lora_weights(adapter)
    return backbone


def _check_arguments(backbone_cls, config, src):
    """A preset's ``config.json`` must give every required constructor argument (else Python's
    ``TypeError`` would name neither the file nor the field)."""
    params = inspect.signature(backbone_cls.__init__).parameters
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    for name, param in params.items():
        if name != "self" and param.kind in kinds and param.default is param.empty:
            if name not in config:
                raise ValueError(
                    f"{keras_format.CONFIG_FILE} of the preset {src.source!r} has no `{name}`, "
                    f"which {backbone_cls.__name__} needs. Received keys: {sorted(config)}"
                )


def _construct(function, config, src, *args):
    """``function(*args, **config)``, with the preset named in any error its config causes."""
    if isinstance(src, Checkpoint):  # its reader checked the config field by field
        return function(*args, **config)
    try:
        return function(*args, **config)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"{keras_format.CONFIG_FILE} of the preset {src.source!r} is invalid: {e}"
        ) from e


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
                    config = {**policy.get_config(), "source_name": requested}
                    saved[key] = type(policy).from_config(config)
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
    "Int8ActivationsDTypePolicy",  # keras_llama.quantization: W8A8, chosen explicitly
    "BlockDTypePolicy",  # keras_llama.quantization: GGUF's Q8_0 / Q4_0 / Q4_1 blocks
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


def _check_keras_layer_count(config, src):
    """A Keras preset's weights must hold every decoder layer its config claims, checked from
    the file's names before any layer is built (a config claiming 100000 layers would
    otherwise build them all, for minutes and gigabytes, before the weights fail)."""
    if src.weights_path is None:
        return  # `_load_keras_weights` names the missing file
    claimed = config.get("num_layers")
    stored = keras_format.stored_layer_count(src.weights_path, DECODER_LAYER_NAME)
    if stored is None or not isinstance(claimed, int) or isinstance(claimed, bool):
        return  # the loader names an unreadable file, the constructor a bad num_layers
    if claimed > stored:
        raise ValueError(
            f"{keras_format.CONFIG_FILE} of the preset {src.source!r} claims num_layers="
            f"{claimed}, but its weights {src.weights_path!r} hold {stored} decoder layers."
        )


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
            f"{type(e).__name__}: {_plain_shapes(str(e))}"
        ) from e


def _plain_shapes(message):
    """Keras's message with torch's ``torch.Size([32, 64])`` written as on every other backend,
    ``(32, 64)``, so a shape mismatch reads the same whatever the backend."""

    def plain(match):
        dims = [d.strip() for d in match.group(1).split(",") if d.strip()]
        return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"

    return re.sub(r"torch\.Size\(\[([^\]]*)\]\)", plain, message)


# --- preprocessor and task ---------------------------------------------------------------------
def load_preprocessor(cls, preset, **kwargs):
    """``cls.from_preset(preset, **kwargs)`` for preprocessors; ``kwargs`` override the
    saved settings (``sequence_length``, ``add_start_token``, ...)."""
    src = open_preset(preset)
    preprocessor_cls = pick_class(cls, src, "preprocessor")
    tokenizer = kwargs.pop("tokenizer", None) or load_tokenizer(preprocessor_cls.tokenizer_cls, src)
    if isinstance(src, Checkpoint):
        config = dict(src.preprocessor)
    elif src.preprocessor is not None:
        config = keras_format.our_config(src.preprocessor)
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
    task_cls = pick_class(cls, src, "task")
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
    task = task_cls(**kwargs)
    if hasattr(task_cls, "max_sequence_length"):  # causal LMs: the context known to the preset
        task.max_sequence_length = _context_length(src)
    return task


def _context_length(src):
    if isinstance(src, Checkpoint):
        return src.context_length
    ours = (src.task or {}).get(keras_format.OUR_CONFIG_KEY)
    value = ours.get("max_sequence_length") if isinstance(ours, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _take(kwargs, target_cls, extra=(), skip=("self",)):
    """Pop the entries of ``kwargs`` that ``target_cls.__init__`` accepts."""
    params = set(inspect.signature(target_cls.__init__).parameters) | set(extra)
    params -= set(skip)
    return {k: kwargs.pop(k) for k in list(kwargs) if k in params}
