"""Preset folders in KerasHub's layout, read and written as plain data.

::

    config.json           the backbone, serialized: {"module", "class_name", "config", "registered_name"}
    metadata.json         versions, parameter count, date saved
    tokenizer.json        the tokenizer's config; its vocabulary lives in assets/tokenizer/
    preprocessor.json     the preprocessor's config (with the tokenizer's nested in it)
    task.json             the task's config (backbone and preprocessor nested)
    model.weights.h5      the backbone's weights (Keras' weight file)
      or model.weights.json + model_00000.weights.h5, ...   (sharded: a weight map + shards)
    assets/tokenizer/     vocabulary.spm (SentencePiece) or vocabulary.json + merges.txt (BPE),
                          and chat_template.jinja when the model has a chat template

KerasHub writes the same files, so its presets load here and ours load in KerasHub. Classes are
found by their *name* (``class_name``) in `keras_llama.utils.registry`; the ``module`` field
is never imported.

Saving is atomic: files are written into a temporary folder beside the target, which then
replaces it; a failed save leaves an existing preset as it was.
"""

import contextlib
import dataclasses
import json
import os
import re
import shutil
import stat
import tempfile
import time as _time
from typing import Optional

from keras_llama.presets.handles import load_json, require_file, safe_join
from keras_llama.utils.files import default_mode, link_or_copy, swap_into_place

CONFIG_FILE = "config.json"
METADATA_FILE = "metadata.json"
TOKENIZER_FILE = "tokenizer.json"
PREPROCESSOR_FILE = "preprocessor.json"
TASK_FILE = "task.json"
WEIGHTS_FILE = "model.weights.h5"
SHARDED_WEIGHTS_FILE = "model.weights.json"
# LoRA adapters kept beside the base weights (`keras-llama finetune --keep-adapter`); loaded
# onto the backbone with the weights. Not part of KerasHub's layout (KerasHub ignores it).
ADAPTER_FILE = "adapter.lora.h5"
TOKENIZER_ASSETS_DIR = os.path.join("assets", "tokenizer")
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# Settings of ours that KerasHub's configs cannot hold (a tokenizer's special tokens, ...) are
# written under this key beside ``config``, a key Keras' deserializer ignores.
OUR_CONFIG_KEY = "keras_llama_config"


@dataclasses.dataclass
class KerasPreset:
    """A KerasHub-layout preset folder, as plain data (serialized configs and file paths)."""

    source: str
    path: str
    backbone: dict
    weights_path: Optional[str]
    tokenizer: Optional[dict] = None
    preprocessor: Optional[dict] = None
    task: Optional[dict] = None
    metadata: Optional[dict] = None
    tokenizer_assets: Optional[str] = None
    chat_template: Optional[str] = None


def is_keras_preset(folder):
    """A folder whose ``config.json`` is a serialized Keras object (KerasHub's layout)."""
    config = _load_json(folder, CONFIG_FILE, missing_ok=True)
    return isinstance(config, dict) and "class_name" in config and "config" in config


def read(folder, source=None):
    """Read a KerasHub-layout preset folder (configs and file locations; weights stay on disk)."""
    source = source or folder
    backbone = _load_json(folder, CONFIG_FILE)
    _check_serialized(backbone, CONFIG_FILE, source)
    preset = KerasPreset(
        source=source,
        path=folder,
        backbone=backbone,
        weights_path=_weights_path(folder),
        metadata=_load_json(folder, METADATA_FILE, missing_ok=True),
    )
    for field, name in [
        ("tokenizer", TOKENIZER_FILE),
        ("preprocessor", PREPROCESSOR_FILE),
        ("task", TASK_FILE),
    ]:
        value = _load_json(folder, name, missing_ok=True)
        if value is not None:
            _check_serialized(value, name, source)
        setattr(preset, field, value)
    if preset.tokenizer is not None:
        # KerasHub names the asset folder after the tokenizer's config file ("tokenizer").
        config_file = preset.tokenizer.get("config", {}).get("config_file") or TOKENIZER_FILE
        safe_join(folder, config_file)
        assets = safe_join(folder, os.path.join("assets", config_file.split(".")[0]))
        preset.tokenizer_assets = assets if os.path.isdir(assets) else None
        template = os.path.join(assets, CHAT_TEMPLATE_FILE)
        if os.path.isfile(template):
            with open(template, encoding="utf-8") as f:
                preset.chat_template = f.read()
    return preset


def class_name(serialized):
    """The class name of a serialized object (``"keras_hub>LlamaBackbone"`` -> LlamaBackbone)."""
    registered = serialized.get("registered_name") or ""
    return registered.split(">")[-1] or serialized["class_name"]


def our_config(serialized):
    """The config to build our class from: ours (`OUR_CONFIG_KEY`) when we wrote the file,
    else KerasHub's ``config``."""
    ours = serialized.get(OUR_CONFIG_KEY)
    return dict(ours) if isinstance(ours, dict) else dict(serialized["config"])


def _check_serialized(value, name, source):
    if not (
        isinstance(value, dict)
        and isinstance(value.get("config"), dict)
        and value.get("class_name")
    ):
        raise ValueError(
            f"{name} of the preset {source!r} is not a serialized Keras object "
            "(expected keys 'class_name' and 'config'). "
            f"Received keys: {sorted(value) if isinstance(value, dict) else type(value).__name__}"
        )


def _weights_path(folder):
    """``model.weights.h5``, or ``model.weights.json`` after checking every shard it lists."""
    single = os.path.join(folder, WEIGHTS_FILE)
    if os.path.isfile(single):
        return single
    index = os.path.join(folder, SHARDED_WEIGHTS_FILE)
    if not os.path.isfile(index):
        return None
    weight_map = (_load_json(folder, SHARDED_WEIGHTS_FILE) or {}).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index!r} has no 'weight_map' dict.")
    files = set()
    for value in weight_map.values():
        files.update(value if isinstance(value, list) else [value])
    for file in sorted(files):
        if os.path.basename(file) != file:
            raise ValueError(
                "A preset may only reference files inside its own folder; weight shards must "
                f"sit beside {SHARDED_WEIGHTS_FILE}. Received the shard path {file!r}"
            )
        require_file(folder, file, f"weight shard (listed in {SHARDED_WEIGHTS_FILE})")
    return index


def stored_layer_count(weights_path, layer_name):
    """How many layers named ``layer_name`` (Keras's names in the weights file:
    ``llama_transformer_decoder``, ``..._1``, ...) the weights file or shard index holds,
    read from its names only (no tensor is read); None when the file cannot be read (the
    weights loader then reports it).
    """
    pattern = re.compile(rf"^{re.escape(layer_name)}(_\d+)?$")
    if weights_path.endswith(".json"):
        folder, name = os.path.split(weights_path)
        keys = _load_json(folder, name)["weight_map"]
        names = {k.strip("/").split("/")[1] for k in keys if k.strip("/").startswith("layers/")}
    else:
        import h5py

        try:
            with h5py.File(weights_path, "r") as f:
                layers = f.get("layers")
                names = set(layers.keys()) if isinstance(layers, h5py.Group) else set()
        except OSError:
            return None
    return sum(1 for name in names if pattern.match(name))


def _load_json(folder, name, missing_ok=False):
    return load_json(folder, name, missing_ok, what="preset folder")


# --- writing -----------------------------------------------------------------------------------
class PresetWriter:
    """Writes preset files into a staging folder (see `atomic_preset`).

    Each writer call first removes what it replaces, so files carried over from an existing
    preset (hard links to the old files) are never written through.
    """

    def __init__(self, folder):
        self.folder = folder

    def path(self, name):
        """A fresh path for ``name`` (any old file there is removed first)."""
        path = safe_join(self.folder, name)
        if os.path.lexists(path):
            os.remove(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def write_json(self, name, value):
        with open(self.path(name), "w", encoding="utf-8") as f:
            json.dump(value, f, indent=4)
            f.write("\n")

    def write_text(self, name, text):
        with open(self.path(name), "w", encoding="utf-8") as f:
            f.write(text)

    def fresh_dir(self, name):
        """An empty folder for ``name`` (replacing an old one)."""
        path = safe_join(self.folder, name)
        if os.path.lexists(path):
            shutil.rmtree(path)
        os.makedirs(path)
        return path

    def remove_weights(self):
        """Remove any weight files (single or sharded) before new ones are written."""
        for name in os.listdir(self.folder):
            if name in (WEIGHTS_FILE, SHARDED_WEIGHTS_FILE) or (
                name.startswith("model_") and name.endswith(".weights.h5")
            ):
                os.remove(os.path.join(self.folder, name))


@contextlib.contextmanager
def atomic_preset(target):
    """Stage a preset in a temporary folder beside ``target``, then swap it into place.

    Files of an existing preset at ``target`` are carried over (hard-linked, or copied where
    links are not possible), so saving a tokenizer into a folder that holds a backbone keeps
    the backbone, as in KerasHub. If the block raises, ``target`` is untouched.

    Yields:
        a `PresetWriter` on the staging folder.
    """
    target = os.path.abspath(os.fspath(target))
    parent, name = os.path.split(target)
    if os.path.exists(target) and not os.path.isdir(target):
        raise ValueError(f"Cannot save a preset to {target!r}: it exists and is not a folder.")
    if os.path.isdir(target) and os.listdir(target) and not _looks_like_preset(target):
        raise ValueError(
            f"Cannot save a preset to {target!r}: the folder is not empty and holds no preset "
            f"({CONFIG_FILE}, {TOKENIZER_FILE} or {PREPROCESSOR_FILE}). Choose a new or empty "
            "folder; an existing preset folder is replaced atomically."
        )
    os.makedirs(parent, exist_ok=True)
    remove_stale_staging(parent, name)
    # The PID in the name tells a later save whether the process writing here is gone.
    staging = tempfile.mkdtemp(prefix=f".{name}.saving-{os.getpid()}-", dir=parent)
    try:
        # mkdtemp makes a private (0700) folder; a preset gets the user's usual modes.
        os.chmod(staging, _folder_mode(target))
        if os.path.isdir(target):
            shutil.copytree(target, staging, dirs_exist_ok=True, copy_function=link_or_copy)
        yield PresetWriter(staging)
        swap_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


STALE_AFTER_S = 24 * 3600  # leftovers whose writer cannot be told (no PID in the name)


def remove_stale_staging(parent, name):
    """Remove ``.NAME.saving-*`` and ``.NAME.old-*`` folders left in ``parent`` by saves that
    were killed (``kill -9``, power loss): those whose writing process no longer runs, or,
    when the name holds no PID, that have not changed for `STALE_AFTER_S`. A save still in
    progress in another process keeps its folder."""
    for prefix in (f".{name}.saving-", f".{name}.old-"):
        for entry in os.listdir(parent):
            path = os.path.join(parent, entry)
            if not entry.startswith(prefix) or not os.path.isdir(path):
                continue
            pid = entry[len(prefix) :].split("-", 1)[0]
            if pid.isdigit() and "-" in entry[len(prefix) :]:
                stale = int(pid) != os.getpid() and not _process_exists(int(pid))
            else:
                stale = _time.time() - os.path.getmtime(path) > STALE_AFTER_S
            if stale:
                shutil.rmtree(path, ignore_errors=True)


def _process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or cannot be told: keep its folder
    return True


def _folder_mode(target):
    """An existing preset folder's mode, else what ``mkdir`` gives under the current umask."""
    if os.path.isdir(target):
        return stat.S_IMODE(os.stat(target).st_mode)
    return default_mode(0o777)


def _looks_like_preset(folder):
    return any(
        os.path.exists(os.path.join(folder, n))
        for n in (CONFIG_FILE, TOKENIZER_FILE, PREPROCESSOR_FILE)
    )
