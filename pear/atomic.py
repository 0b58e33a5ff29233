"""Atomic files: every file pear writes appears complete or not at all.

A temporary file is written beside the target, then renamed onto it (``os.replace`` is atomic
within a folder); on any error, Ctrl-C included, the temporary file is removed and the
target is untouched. The finished file gets the permissions a plain ``open()`` would give
(0o666 minus the umask; ``mkstemp`` creates files 0o600). Folders: `atomic_dir`, the same with
a temporary sibling folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def umask() -> int:
    """The process umask (reading it means setting it; it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def open_atomic(path: str | os.PathLike, mode: str = "w", **kw):
    """``with open_atomic(path, "wb") as f: ...`` -- `f` is a temporary file beside `path`,
    renamed onto it when the block ends without an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, mode, **kw) as f:
            yield f
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    with open_atomic(path, "w") as f:
        f.write(text)
    return Path(path)


def savefig(fig, path: str | os.PathLike, **kw) -> Path:
    """A matplotlib figure, saved atomically in the format of `path`'s suffix."""
    with open_atomic(path, "wb") as f:
        fig.savefig(f, format=Path(path).suffix.lstrip(".") or "png", **kw)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, keep_existing: bool = False):
    """``with atomic_dir(path) as tmp: ...`` -- `tmp` is a temporary folder beside `path`, renamed
    onto it when the block ends without an error. An existing `path` is replaced, or, with
    `keep_existing` (a cache that processes started together may all fill), kept: the first
    rename wins and the others' copies are removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        if path.exists() and not keep_existing:
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
            return
        try:
            os.replace(tmp, path)
        except OSError:  # another process renamed its copy onto `path` first
            if not (keep_existing and path.is_dir()):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
