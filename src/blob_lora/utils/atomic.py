"""Atomic writes: results and checkpoints must never be seen half-written.

Every writer goes to a temporary sibling first, fsyncs it, then ``os.replace``s it over the
target, so a crash, a full disk or a kill leaves either the old file or the new one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers never see a partial file."""
    return atomic_write_with(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_with(path: str | os.PathLike[str], writer: Callable[[Any], Any]) -> Path:
    """Call ``writer(binary_file)`` on a temp file, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from other users
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


@contextmanager
def atomic_directory(path: str | os.PathLike[str], keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` only if the block succeeds.

    An existing ``path`` is kept until the new one is complete; it is then swapped out and
    removed, so at every moment one complete version exists on disk. ``keep_existing``: a
    ``path`` that is there when the block ends (another process made it meanwhile) is kept and
    the new one dropped, so a reader never finds ``path`` missing between the swaps.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb") as f:
                    os.fsync(f.fileno())
        if keep_existing:
            try:
                os.rename(tmp, path)  # fails on a non-empty folder that is there
            except OSError:
                if not path.is_dir():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
                return
            _fsync_dir(path.parent)
            return
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_remove(path: str | os.PathLike[str]) -> None:
    """Remove the file or folder ``path`` (if it is there) so that nobody sees it half removed.

    A folder is first renamed to a hidden sibling (``.<name>.removed``), then deleted: a kill
    in the middle leaves only that sibling, which the next removal of ``path`` deletes too.
    """
    path = Path(path)
    trash = path.with_name(f".{path.name}.removed")
    if path.is_dir() and not path.is_symlink():
        if trash.exists():
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(path, trash)
        _fsync_dir(path.parent)
    elif path.exists() or path.is_symlink():
        path.unlink()
        _fsync_dir(path.parent)
    if trash.is_dir():
        shutil.rmtree(trash, ignore_errors=True)
