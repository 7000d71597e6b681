"""Checkpoint I/O: safe loading, atomic writes, and loading a trained network back by name.

Every checkpoint the project reads goes through :func:`read_checkpoint`, which unpickles with
``torch.load(weights_only=True)``: tensors, numbers, strings and plain containers only, so a
crafted file cannot run code. The checkpoints train.py writes need nothing else (hyperparameters
are saved as plain dicts). A file that needs more is refused unless the user trusts it
(``trust_checkpoints=true``).
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from torch import nn

from distill.errors import CheckpointError, os_cause
from distill.files import atomic_file, check_checkpoint_file, link
from distill.identity import differences

TRUST_OPTION = "trust_checkpoints=true"


def _is_refusal(err: Exception) -> bool:
    """True when the safe unpickler met an object it does not allow (not a torn file)."""
    detail = str(err).rpartition("WeightsUnpickler error:")[2]
    return bool(re.search(r"GLOBAL |allowlist|allowed global|add_safe_globals", detail))


def _refusal(path: Path, what: str, err: Exception) -> CheckpointError:
    found = re.search(r"GLOBAL (\S+)", str(err))
    needs = f"the Python object {found.group(1)}" if found else "Python objects beyond tensors and plain containers"
    return CheckpointError(
        f"{what} '{path}' was refused: it needs {needs}, which the safe loader (torch.load weights_only=True) "
        f"does not allow because unpickling it could run code. Only if you trust this file, load it with "
        f"{TRUST_OPTION}"
    )


def read_checkpoint(path: str | Path, what: str = "checkpoint", trusted: bool = False) -> dict[str, Any]:
    """Load a Lightning checkpoint on the CPU with the safe loader, or raise ``CheckpointError``
    (one line) when it is missing, a directory, unreadable, truncated, corrupt or needs code.

    ``trusted=True`` (the user's explicit opt-in) allows full unpickling.
    """
    path = Path(path)
    check_checkpoint_file(path, what)
    try:
        with warnings.catch_warnings():  # torch warns about legacy / foreign files: the error says it
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as err:
        if not trusted and _is_refusal(err):
            raise _refusal(path, what, err) from None
        raise CheckpointError(f"{what} '{path}' could not be read (it could not be unpickled); it is truncated, "
                              "corrupt or not a PyTorch checkpoint: re-create it or point to another file") from None
    except PermissionError as err:
        raise CheckpointError(f"{what} '{path}' cannot be read ({os_cause(err)}): fix its permissions") from None
    except Exception as err:  # torch raises many types for a torn or foreign file
        first = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else ""
        raise CheckpointError(
            f"{what} '{path}' could not be read ({type(err).__name__}: {first}); it is truncated, corrupt or not "
            "a PyTorch checkpoint: re-create it or point to another file"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{what} '{path}' holds no 'state_dict': it is not a distill checkpoint")
    return checkpoint


def non_finite_keys(state: dict[str, Any]) -> list[str]:
    """The floating-point tensors of ``state`` that hold a NaN or an infinity."""
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]


def os_error_behind(err: BaseException) -> OSError | None:
    """``err`` if it is an ``OSError``, else the ``OSError`` it was raised while handling: torch's
    zip writer answers a full disk or a file-size limit with a ``RuntimeError`` ("unexpected pos")
    raised after the ``OSError`` of the failed write."""
    while err is not None and not isinstance(err, OSError):
        err = err.__cause__ or err.__context__
    return err


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to ``<path>.tmp``, fsync, then rename: a kill or a full disk mid-save never leaves a
    torn file, the previous checkpoint stays loadable and no ``*.tmp`` is left behind. Never writes
    non-finite weights. Loads (``resume=``) with :func:`read_checkpoint`."""

    def __init__(self, trusted: bool = False) -> None:
        super().__init__()
        self.trusted = trusted
        self.written: dict[Path, tuple] = {}  # file -> (epoch, step) of the weights it holds

    def share_weights(self, path: Path, step: tuple) -> None:
        """A file written before at the same training ``step`` (``best.ckpt``, then ``last.ckpt`` of the
        same epoch) holds the same weights: it becomes a hard link to ``path``, one copy on disk."""
        for other, when in self.written.items():
            if other != path and when == step and other.is_file():
                link(path, other)
        self.written[path] = step

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        bad = non_finite_keys(checkpoint.get("state_dict", {}))
        if bad:
            raise CheckpointError(
                f"not writing {path}: the weights became non-finite by step {checkpoint.get('global_step', '?')} "
                f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); lower the learning rate "
                "(optim.optimizer.lr) or the loss weights"
            )
        try:
            with atomic_file(path, "wb") as f:
                torch.save(checkpoint, f)
        except (OSError, RuntimeError) as err:
            fault = os_error_behind(err)
            if fault is None:
                raise
            kept = " (the previous checkpoint there is kept)" if path.is_file() else ""
            raise CheckpointError(f"could not write checkpoint {path.name} in folder {path.parent}: "
                                  f"{os_cause(fault)}{kept}; free disk space or raise the file-size limit") from None
        self.share_weights(path, (checkpoint.get("epoch"), checkpoint.get("global_step")))

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return read_checkpoint(path, "resume checkpoint", trusted=self.trusted)


def recorded_options(hparams: dict[str, Any]) -> dict[str, Any]:
    """The model options a checkpoint records for its network, with downloads switched off (the
    weights come from the file): from the module's saved build spec (``model`` / ``student``), or
    for a file written otherwise from the run's config node of the same name."""
    from distill.models import model_options

    spec = hparams.get("model") or hparams.get("student")
    if isinstance(spec, dict) and spec.get("name") == hparams.get("model_name"):
        node = {k: v for k, v in spec.items() if k not in ("num_classes", "checkpoint")}
    else:
        config = hparams.get("config") or {}
        node = config.get("teacher" if hparams.get("stage") == "teacher" else "student") or {}
        node = node if node.get("name") == hparams.get("model_name") else {}
    return model_options(node, weights_from_checkpoint=True)


def load_network(path: str | Path, what: str = "checkpoint", trusted: bool = False, *,
                 build: Callable[[], nn.Module] | None = None,
                 expected: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """``(network, hyper-parameters)`` of the distill checkpoint at ``path``, its ``model.*`` weights loaded.

    ``build()`` makes the network the config asks for; without it, the network the checkpoint
    records is rebuilt (``model_name``, ``num_classes`` and its recorded options). With
    ``expected`` (``name``, ``num_classes`` and optionally the ``identity`` of ``distill.identity``),
    a checkpoint of another architecture, number of classes, network or data is refused. Every
    failure is a ``CheckpointError``: one line saying what differs or is wrong with the file.
    """
    from distill.models import build_model

    checkpoint = read_checkpoint(path, what, trusted)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    name, classes = hparams.get("model_name"), hparams.get("num_classes")
    if name is None or classes is None:
        raise CheckpointError(f"{what} '{path}' records no model_name / num_classes in its hyper_parameters: "
                              "it was not written by train.py")
    if expected is not None:
        if (name, classes) != (expected["name"], expected["num_classes"]):
            raise CheckpointError(
                f"{what} '{path}' holds a {name} with {classes} classes, but the config asks for a "
                f"{expected['name']} with {expected['num_classes']} classes: choose the matching teacher=... / "
                "data=..., or another checkpoint")
        differ = differences(hparams.get("identity") or {}, expected.get("identity") or {})
        if differ:
            raise CheckpointError(f"{what} '{path}' was trained as another teacher: {'; '.join(differ)}. Point "
                                  "teacher.checkpoint to the matching file, or leave it null to train one")
    try:
        model = build() if build is not None else build_model(name, int(classes), **recorded_options(hparams))
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{what} '{path}': cannot rebuild its network ({err})") from None
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    bad = non_finite_keys(state)
    if bad:
        raise CheckpointError(f"{what} '{path}' holds non-finite weights (NaN or inf in {', '.join(bad[:3])}"
                              f"{', ...' if len(bad) > 3 else ''}): its training diverged; use a checkpoint of an "
                              "earlier epoch or train again with a lower learning rate")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{what} '{path}' does not fit a {name}: {str(err).splitlines()[0]}") from None
    return model, hparams
