"""Atomic files: every file pear writes appears complete or not at all.

A temporary file is written beside the target, then renamed onto it (``os.replace`` is atomic
within a folder); on any error, Ctrl-C included, the temporary file is removed and the
target is untouched. The finished file gets the permissions a plain ``open()`` would give
(0o666 minus the umask; ``mkstemp`` creates files 0o600). Folders: `atomic_dir`, the same with
a temporary sibling folder; the finished folder and everything in it get ``mkdir``/``open``
permissions too.

A process killed outright (kill -9, power loss) cannot clean up: its temporary names carry its
process id (``.NAME.tmp-PID-XXXX``), and the next write of the same target removes those whose
process is gone (`remove_stale`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def umask() -> int:
    """The process umask (reading it means setting it; it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _prefix(path: Path) -> str:
    return f".{path.name}.tmp-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale(path: str | os.PathLike) -> list[Path]:
    """Remove temporary siblings of `path` left by processes that no longer run; return them."""
    path = Path(path)
    removed = []
    try:
        siblings = list(path.parent.glob(f".{glob_escape(path.name)}.tmp-*"))
    except OSError:
        return removed
    for p in siblings:
        pid = p.name[len(f".{path.name}.tmp-"):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue  # an older pear's name (no pid), or a process still writing
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def glob_escape(name: str) -> str:
    import glob

    return glob.escape(name)


def plain_permissions(folder: str | os.PathLike) -> None:
    """Give `folder` and everything under it the permissions mkdir/open would (umask applies):
    temporary folders and files are created private (0700/0600)."""
    mask = umask()
    folder = Path(folder)
    os.chmod(folder, 0o777 & ~mask)
    for p in folder.rglob("*"):
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def open_atomic(path: str | os.PathLike, mode: str = "w", **kw):
    """``with open_atomic(path, "wb") as f: ...`` -- `f` is a temporary file beside `path`,
    renamed onto it when the block ends without an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_prefix(path), suffix=path.suffix)
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


def json_text(obj, level: int = 0) -> str:
    """`obj` as JSON indented by two spaces like ``json.dumps(obj, indent=2)``, except that a list
    of plain values stays on one line. Why: a fit with one scale per channel lists head_dim
    numbers per head, which ``indent=2`` spreads over 20,000 lines (Qwen2.5-0.5B: 336 heads x 64);
    this way the file reads one head per line, at two thirds of the size."""
    pad, end = "  " * (level + 1), "  " * level
    if isinstance(obj, dict) and obj:
        return "{\n" + ",\n".join(f"{pad}{json.dumps(k if isinstance(k, str) else json.dumps(k))}: {json_text(v, level + 1)}"
                                   for k, v in obj.items()) + f"\n{end}}}"
    if isinstance(obj, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in obj):
        return "[\n" + ",\n".join(pad + json_text(v, level + 1) for v in obj) + f"\n{end}]"
    return json.dumps(obj)


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
    remove_stale(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_prefix(path)))
    try:
        yield tmp
        plain_permissions(tmp)
        if path.exists() and not keep_existing:
            old = path.with_name(f"{_prefix(path)}old")  # a stale-looking name if we are killed here
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


def write_gzip(path, lines) -> Path:
    """Text lines into a gzip file, atomically; mtime 0 in the header: same content, same bytes."""
    import gzip

    with open_atomic(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        for line in lines:
            f.write(line.encode())
    return Path(path)
