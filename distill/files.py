"""Atomic file writes: write ``<path>.tmp``, fsync, rename over ``path``.

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
