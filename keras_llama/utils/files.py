"""File moves shared by the preset writer and the exporters."""

import contextlib
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


def default_mode(base=0o666):
    """The mode ``open``/``mkdir`` give under the current umask (``base`` 0o666 for files,
    0o777 for folders): temporary files and folders are created 0600/0700, and what is renamed
    into place from them must get the user's normal modes."""
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


@contextlib.contextmanager
def staged_file(path):
    """Yield a temporary path beside ``path``; when the block succeeds it gets the user's
    normal file mode and replaces ``path``, when it fails it is removed (an existing ``path``
    stays as it was)."""
    target = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=f".{name}.staging-", dir=parent)
    os.close(fd)
    try:
        yield staging
        os.chmod(staging, default_mode())
        os.replace(staging, target)
    except BaseException:
        if os.path.exists(staging):
            os.remove(staging)
        raise
