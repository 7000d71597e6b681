"""Atomic file writes: write ``<path>.tmp``, fsync, rename over ``path``; hard links for a second name.

A kill or a full disk mid-write never leaves a torn file: the previous ``path`` (if any) stays
as it was, and the ``*.tmp`` is removed on any failure (the error is re-raised unchanged, so each
caller words its own message). Parent folders are created.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from distill.errors import CheckpointError, remove_quietly


@contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open ``<path>.tmp`` for writing (``mode`` ``"w"`` or ``"wb"``); on a clean exit flush, fsync
    and rename it to ``path``; on any exception remove it and re-raise."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_file(path) as f:
        f.write(text)
    return Path(path)


def write_json(path: str | Path, payload: dict) -> Path:
    """Write ``payload`` as indented JSON with sorted keys, atomically."""
    return write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def copy_file(source: str | Path, target: str | Path) -> Path:
    """Copy ``source`` to ``target`` atomically."""
    with open(source, "rb") as src, atomic_file(target, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return Path(target)


def check_checkpoint_file(path: str | Path, what: str = "checkpoint") -> None:
    """Raise ``CheckpointError`` (one line) unless ``path`` is a readable regular file: a directory,
    a missing file, a symlink loop or a link to nothing, or an unreadable file each say so."""
    path = Path(path)
    try:
        path.stat()
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise CheckpointError(f"{what} '{path}' is a symlink loop (its links lead back to themselves): point to "
                                  "the .ckpt file itself, or fix the link") from None
        if path.is_symlink():
            raise CheckpointError(f"{what} '{path}' is a symbolic link to '{os.readlink(path)}', which does not "
                                  "exist: fix the link or point to the .ckpt file") from None
    if path.is_dir():
        raise CheckpointError(f"{what} '{path}' is a directory, not a checkpoint file: point to a .ckpt file")
    if not path.exists():
        raise CheckpointError(f"{what} '{path}' does not exist: check the path")
    if not path.is_file():
        raise CheckpointError(f"{what} '{path}' is not a regular file: point to a .ckpt file")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{what} '{path}' cannot be read (permission denied): fix its permissions")


def link(source: str | Path, target: str | Path) -> bool:
    """Make ``target`` a hard link to ``source`` atomically (one copy on disk, two names); ``False``
    (``target`` left as it was) where a link cannot be made: another file system, no link support.
    The files written here are only ever replaced, never changed in place, so the two names never
    diverge silently: writing a new ``source`` leaves ``target`` holding the old content."""
    source, target = Path(source), Path(target)
    tmp = target.with_name(target.name + ".tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_quietly(tmp)
        os.link(source, tmp)
        os.replace(tmp, target)
    except OSError:
        remove_quietly(tmp)
        return False
    return True


def link_or_copy(source: str | Path, target: str | Path) -> Path:
    """``target`` as a hard link to ``source`` (:func:`link`), else as an atomic copy."""
    return Path(target) if link(source, target) else copy_file(source, target)
