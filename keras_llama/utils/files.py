"""File moves shared by the preset writer and the exporters."""

import os
import shutil
import tempfile


def link_or_copy(src, dst):
    """A hard link of ``src`` at ``dst`` (no bytes copied), or a copy where links fail."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def swap_into_place(staging, target):
    """Put ``staging`` at ``target``; an old ``target`` is moved aside first and removed last."""
    if not os.path.exists(target):
        os.rename(staging, target)
        return
    old = tempfile.mkdtemp(
        prefix=f".{os.path.basename(target)}.old-{os.getpid()}-", dir=os.path.dirname(target)
    )
    os.rmdir(old)
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
