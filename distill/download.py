"""A socket timeout for downloads (datasets, pretrained weights).

torchvision's and timm's downloaders call ``urlopen`` without a timeout; behind a firewall that
drops packets that blocks for minutes. Inside :func:`download_timeout` each socket operation
gives up after ``DOWNLOAD_TIMEOUT_S`` seconds, so no network means a quick, clear failure.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

DOWNLOAD_TIMEOUT_S = 30.0


@contextmanager
def download_timeout(seconds: float = DOWNLOAD_TIMEOUT_S) -> Iterator[None]:
    """Set the default socket timeout to ``seconds`` for the block, then restore the previous one."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)
