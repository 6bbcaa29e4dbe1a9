"""Atomic writes: build in a temp file/dir beside the target, fsync, rename. An interrupted write
leaves nothing at the target path.

Example:
    >>> with atomic_path("model.pt") as tmp:
    ...     torch.save(sd, tmp)
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from bridge.errors import ExportError


def _check_parent(target: Path) -> Path:
    parent = target.parent
    if not parent.is_dir():
        raise ExportError(f"cannot write {target}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {target}: directory {parent} is not writable")
    return parent


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, directory: bool = False):
    """Yield a temp path next to `target`; on success fsync it and rename it onto `target`."""
    target = Path(target)
    parent = _check_parent(target)
    try:
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
        else:
            fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
            os.close(fd)
            tmp = Path(name)
    except OSError as e:
        raise ExportError(f"cannot write {target}: {e.strerror}") from e
    try:
        yield tmp
        _set_mode(tmp, directory)
        files = [p for p in tmp.rglob("*") if p.is_file()] if directory else [tmp]
        for f in files:
            fsync_path(f)
        _replace(tmp, target, directory)
        fsync_path(parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True) if directory else tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):   # a full disk, a quota: named, where the bare error names no file
            raise ExportError(f"cannot write {target}: {e.strerror or e}") from e
        raise


def _set_mode(tmp: Path, directory: bool) -> None:
    """The permissions a plain open/mkdir would give under the umask (temp files are private: 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, (0o777 if directory else 0o666) & ~umask)


def _replace(tmp: Path, target: Path, directory: bool) -> None:
    if directory and target.exists():  # a directory cannot be renamed over a non-empty one: swap
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


@contextlib.contextmanager
def staging_dir(target: str | os.PathLike):
    """A temp dir beside `target` for multi-file outputs; always removed afterwards."""
    target = Path(target)
    parent = _check_parent(target)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".staging", dir=parent))
    except OSError as e:
        raise ExportError(f"cannot write {target}: {e.strerror}") from e
    try:
        yield tmp
    except OSError as e:
        raise ExportError(f"cannot write {target}: {e.strerror or e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(staged: Path, names: list[str], dest: Path) -> None:
    """fsync staged files and rename them into `dest` in order (put the index last); all or none.

    Files they replace are first moved aside into `staged`, an index first: until the new index is in
    place no loader can pair it with shards of the other export. A failed rename puts them all back; a
    process killed midway leaves the old ones in the `.staging` folder beside `dest`.
    """
    for name in names:
        fsync_path(staged / name)
    aside, moved = staged / ".replaced", []
    replaced = sorted((n for n in names if (dest / n).exists()), key=lambda n: not n.endswith(".index.json"))
    try:
        for name in replaced:
            (aside / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(dest / name, aside / name)
        for name in names:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged / name, dest / name)
            moved.append(dest / name)
        fsync_path(dest)
    except OSError as e:
        for p in moved:
            p.unlink(missing_ok=True)
        for name in replaced:
            if (aside / name).exists():
                os.replace(aside / name, dest / name)
        raise ExportError(f"cannot write into {dest}: {e.strerror or e}") from e
