"""Checkpoint I/O: atomic writes, and loading a trained network back by name."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from torch import nn

from distill.errors import CheckpointError
from distill.identity import differences


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to ``<path>.tmp``, fsync, then rename: a kill mid-save never leaves a torn file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def read_checkpoint(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    """Load a Lightning checkpoint on the CPU, with a clear error when it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} '{path}' does not exist: check the path")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for a torn or foreign file
        raise CheckpointError(
            f"{what} '{path}' could not be read ({type(err).__name__}: {err}); it is corrupt or not "
            "a PyTorch checkpoint: re-create it or point to another file"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{what} '{path}' holds no 'state_dict': it is not a distill checkpoint")
    return checkpoint


def load_network(path: str | Path, build: Callable[[], nn.Module], name: str, num_classes: int,
                 identity: dict | None = None, what: str = "teacher checkpoint") -> nn.Module:
    """The network ``build()`` with the ``model.*`` weights of the distill checkpoint at ``path``.

    Raises ``CheckpointError`` when the file is missing or corrupt, or when it holds another
    architecture, number of classes, or (where both record one) another network or data
    ``identity`` (``distill.identity``): one line saying what differs.
    """
    checkpoint = read_checkpoint(path, what)
    hparams = checkpoint.get("hyper_parameters", {})
    saved_name, saved_classes = hparams.get("model_name"), hparams.get("num_classes")
    if saved_name != name or saved_classes != num_classes:
        raise CheckpointError(
            f"{what} '{path}' holds a {saved_name} with {saved_classes} classes, but the config asks "
            f"for a {name} with {num_classes} classes: choose the matching teacher=... / data=..., "
            "or another checkpoint"
        )
    differ = differences(hparams.get("identity") or {}, identity or {})
    if differ:
        raise CheckpointError(f"{what} '{path}' was trained as another teacher: {'; '.join(differ)}. Point "
                              "teacher.checkpoint to the matching file, or leave it null to train one")
    model = build()
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{what} '{path}' does not fit a {name}: {str(err).splitlines()[0]}") from None
    return model
