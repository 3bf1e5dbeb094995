"""Which classes serve a checkpoint family, the built-in presets, and the tokenizer preset hooks.

A leaf module (it imports nothing from keras_llama), so that everything else can read it without
importing anything above it. It is filled in at import time, as KerasHub's ``register_presets``:

- each concrete class registers itself: ``@registry.register_class("llama3", "tokenizer")``;
- each model package registers its presets: ``registry.register_presets(backbone_presets)``
  (``keras_llama/models/llama/__init__.py``);
- the tokenizer preset loader, saver and transformers exporter register themselves
  (``@registry.register_tokenizer_preset_function``), because tokenizers sit below models and
  cannot import them.

The preset loaders read the tables (`classes_of`, `builtin_presets`, `presets_for`); they and the
base classes never import a concrete class. ``import keras_llama`` imports every registering
module (through ``keras_llama.models``), so the tables are complete before anyone reads them.

Families: ``"llama"`` (SentencePiece vocabulary: LlamaBackbone, LlamaTokenizer, ...) and
``"llama3"`` (byte-level BPE: Llama3Backbone, Llama3Tokenizer, ...); the networks are identical.
"""

ROLES = ("backbone", "task", "preprocessor", "tokenizer")

_CLASSES = {}  # {family: {role: class}}
_PRESETS = {}  # {name: {"metadata": {..., "path": family}, "kaggle_handle": handle}}
_TOKENIZER_PRESET_FUNCTIONS = {}  # {"load_tokenizer" | "save_tokenizer" | "export_tokenizer": f}


def register_class(family, role):
    """Class decorator: ``cls`` serves checkpoints of ``family`` in ``role`` (one of `ROLES`)."""
    if role not in ROLES:
        raise ValueError(f"`role` must be one of {ROLES}. Received: role={role!r}")

    def register(cls):
        _CLASSES.setdefault(family, {})[role] = cls
        return cls

    return register


def register_presets(presets):
    """Add built-in presets: ``{name: {"metadata": {"path": family, ...}, "kaggle_handle": ...}}``."""
    _PRESETS.update(presets)


def register_tokenizer_preset_function(function):
    """Decorator for ``load_tokenizer(cls, preset, **kwargs)`` and
    ``save_tokenizer(tokenizer, preset_dir)``, which `Tokenizer.from_preset` and
    `Tokenizer.save_to_preset` call."""
    _TOKENIZER_PRESET_FUNCTIONS[function.__name__] = function
    return function


def tokenizer_preset_function(name):
    """The registered ``"load_tokenizer"``, ``"save_tokenizer"`` or ``"export_tokenizer"``."""
    if name not in _TOKENIZER_PRESET_FUNCTIONS:
        raise RuntimeError("Presets need `keras_llama.models`: run `import keras_llama` first.")
    return _TOKENIZER_PRESET_FUNCTIONS[name]


def families():
    """``{family: {role: class}}`` of every registered class."""
    return {family: dict(classes) for family, classes in _CLASSES.items()}


def classes_of(family):
    """``{role: class}`` serving ``family``."""
    return dict(_CLASSES[family])


def registered_classes():
    """Every registered class."""
    return {cls for classes in _CLASSES.values() for cls in classes.values()}


def family_of_backbone_name(name):
    """The family whose backbone class is named ``name``, or None."""
    for family, classes in _CLASSES.items():
        if "backbone" in classes and classes["backbone"].__name__ == name:
            return family
    return None


def builtin_presets():
    """All built-in presets: ``{name: {"metadata": {...}, "kaggle_handle": ...}}``."""
    return dict(_PRESETS)


def presets_for(cls):
    """The built-in presets whose classes are ``cls`` or one of its subclasses."""
    out = {}
    for name, preset in _PRESETS.items():
        classes = _CLASSES.get(preset["metadata"]["path"], {}).values()
        if any(issubclass(c, cls) for c in classes):
            out[name] = preset
    return out
