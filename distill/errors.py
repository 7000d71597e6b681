"""User-facing errors: a short message that names the problem and the fix.

``train.py`` and every script run inside :func:`exit_on_user_error`: a ``DistillError`` (or a
disk / folder fault) prints its message without a traceback and exits with status 2.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import Iterator


def _worker_message(message: object) -> object:
    """The original message of an error re-raised by a DataLoader worker.

    A worker's exception reaches the main process as ``type(err)(text)`` where ``text`` is
    "Caught DataError in DataLoader worker process 0.\\nOriginal Traceback ...\\n<type>: <message>";
    keep ``<message>``, so that the error reads the same with and without workers.
    """
    if isinstance(message, str) and message.startswith("Caught ") and "Original Traceback" in message:
        last = message.rstrip().splitlines()[-1]
        _, sep, text = last.partition(": ")
        return text if sep else last
    return message


class DistillError(Exception):
    """A mistake in the user's config, files or data, with the fix in the message."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(_worker_message(a) for a in args))


class DataError(DistillError):
    """Data that is missing, empty or not in the expected format."""


class ConfigError(DistillError):
    """A config value that cannot work (negative weight, mismatched models, ...)."""


class CheckpointError(DistillError):
    """A checkpoint that is missing, corrupt, or of another architecture."""


def os_cause(err: OSError) -> str:
    """``No space left on device (ENOSPC)``: the cause of an OS error in a few words."""
    name = errno.errorcode.get(err.errno or -1)
    text = err.strerror or str(err).splitlines()[0]
    return f"{text} ({name})" if name else text


def os_error_message(err: OSError) -> str:
    """One line for a disk or folder fault: the file or folder, and the cause."""
    where = f"'{err.filename}'" if err.filename else "a file"
    return f"could not write or read {where}: {os_cause(err)}; check the folder's permissions and free disk space"


def remove_quietly(path: str | os.PathLike) -> None:
    """Delete ``path`` if it is there (a half-written ``*.tmp``); never raise."""
    with contextlib.suppress(OSError):
        os.unlink(path)


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """``error: <message>`` on stderr and exit status 2 for a ``DistillError`` or an ``OSError``
    (a folder that cannot be created or written, a full disk); anything else is a bug and keeps
    its traceback."""
    try:
        yield
    except DistillError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        print(f"error: {os_error_message(err)}", file=sys.stderr)
        sys.exit(2)
