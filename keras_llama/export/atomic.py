"""Atomic exports: everything is written to a temporary path beside the target, then renamed
into place, so a failed export leaves nothing behind. An existing target is refused unless
``overwrite=True``; the error names the path."""

import contextlib
import fnmatch
import os
import shutil
import tempfile

from keras_llama.utils.files import default_mode, link_or_copy, staged_file, swap_into_place


class OutputExistsError(FileExistsError, ValueError):
    """The export target exists and ``overwrite`` was not asked for."""


def check_target(path, overwrite, folder):
    """Raise `OutputExistsError` when ``path`` holds something and ``overwrite`` is False."""
    if folder and os.path.isfile(path):
        raise OutputExistsError(f"Cannot export to {path!r}: it is a file, expected a folder.")
    if not folder and os.path.isdir(path):
        raise OutputExistsError(f"Cannot export to {path!r}: it is a folder, expected a file.")
    taken = os.path.isfile(path) or (os.path.isdir(path) and os.listdir(path))
    if taken and not overwrite:
        what = "folder is not empty" if folder else "file exists"
        raise OutputExistsError(
            f"Cannot export to {path!r}: the {what}. Pass overwrite=True (--overwrite) to "
            "replace it, or choose another path."
        )


@contextlib.contextmanager
def atomic_folder(path, overwrite=False, replaces=("*",)):
    """Stage a folder export beside ``path`` and swap it in when the block succeeds.

    With ``overwrite=True`` an existing folder's files are carried over except those matching
    ``replaces`` (glob patterns of the files this export owns), so a tokenizer exported into a
    model folder keeps the model, and a new export never leaves stale weight shards.

    Yields:
        the staging folder (write the files there).
    """
    target = os.path.abspath(os.fspath(path))
    check_target(target, overwrite, folder=True)
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.export-", dir=parent)
    os.chmod(staging, default_mode(0o777))
    try:
        if os.path.isdir(target):
            for entry in os.listdir(target):
                source = os.path.join(target, entry)
                if os.path.isfile(source) and not any(fnmatch.fnmatch(entry, p) for p in replaces):
                    link_or_copy(source, os.path.join(staging, entry))
        yield staging
        swap_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path, overwrite=False):
    """Yield a temporary file path beside ``path``; it becomes ``path`` when the block
    succeeds and is removed when it fails."""
    check_target(os.path.abspath(os.fspath(path)), overwrite, folder=False)
    with staged_file(path) as staging:
        yield staging
