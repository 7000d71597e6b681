"""Checkpoints inside an epoch, and resuming from them exactly.

``trainer.checkpoint_every_n_steps=N`` / ``trainer.checkpoint_every_minutes=M`` add Lightning
``ModelCheckpoint`` callbacks that write ``checkpoints/last.ckpt`` (atomically, through
``AtomicCheckpointIO``) every N optimizer steps / M minutes of training, so ``last.ckpt`` is
always the latest state and ``resume=<run dir>`` continues from it as from an end-of-epoch one.

What a mid-epoch resume needs beyond Lightning's own loop state (the fit loop's batch progress):

- the training loader starts at the next untrained batch of the same epoch order
  (:mod:`distill.data.resumable`: Lightning saves and loads the loader's state);
- the global RNGs (torch CPU and CUDA, numpy, ``random``) continue where they were, since
  :class:`distill.callbacks.EpochSeeding` only reseeds at epoch starts, and the epoch's training
  metric goes on from the batches already trained: :class:`MidEpochState` saves both with every
  checkpoint and restores them when the run restarts mid-epoch.
"""

from __future__ import annotations

import logging
import random
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torchmetrics import Metric

log = logging.getLogger("distill")

KEYS = ("checkpoint_every_n_steps", "checkpoint_every_minutes")  # trainer.* keys read here, not by the Trainer


# The adapter: the only reads and writes of Lightning's private loop attributes in distill, tested
# with the lightning versions pinned in pyproject.toml (tests/test_mid_epoch.py).
def inside_accumulation(trainer: pl.Trainer) -> bool:
    """Whether the batch just trained leaves gradients accumulating (no optimizer step yet)."""
    return trainer.fit_loop.epoch_loop._should_accumulate()


def load_pending_loader_states(trainer: pl.Trainer) -> None:
    """Load the training loader's saved position that Lightning left pending, and remake the iterator."""
    fit_loop = trainer.fit_loop
    pending = getattr(fit_loop, "_combined_loader_states_to_load", None)
    if pending and fit_loop._combined_loader is not None and fit_loop._data_fetcher is not None:
        fit_loop._combined_loader._load_state_dicts(pending)
        fit_loop._combined_loader_states_to_load = []
        iter(fit_loop._data_fetcher)  # remade from the loaded position (it prefetches again)


def safe_to_save_mid_epoch(trainer: pl.Trainer) -> bool:
    """At a training batch end: neither the epoch's last batch (the end-of-epoch ``last.ckpt`` is
    written right after) nor inside a gradient-accumulation window (the accumulated gradients are
    not in a checkpoint)."""
    return not (trainer.fit_loop.epoch_loop.batch_progress.is_last_batch or inside_accumulation(trainer))


class MidEpochCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that saves only where :func:`safe_to_save_mid_epoch`: a time-based save
    otherwise waits for the next optimizer step."""

    def on_train_batch_end(self, trainer: pl.Trainer, *args, **kwargs) -> None:
        if safe_to_save_mid_epoch(trainer):
            super().on_train_batch_end(trainer, *args, **kwargs)


def mid_epoch_checkpoints(run_dir: Path, every_n_steps: int | None,
                          every_minutes: float | None) -> list[ModelCheckpoint]:
    """One :class:`MidEpochCheckpoint` writing ``run_dir/checkpoints/last.ckpt`` per option set."""
    common = {"dirpath": run_dir / "checkpoints", "filename": "last", "monitor": None, "save_top_k": 1,
              "auto_insert_metric_name": False, "enable_version_counter": False}
    callbacks = []
    if every_n_steps:
        callbacks.append(MidEpochCheckpoint(every_n_train_steps=int(every_n_steps), **common))
    if every_minutes:
        callbacks.append(MidEpochCheckpoint(train_time_interval=timedelta(minutes=float(every_minutes)), **common))
    return callbacks


def rng_states() -> dict[str, Any]:
    """The global RNG states, as tensors and plain containers only (the safe loader reads them)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def metric_states(metric: Metric) -> dict[str, Any]:
    """``metric``'s accumulated states, summed over the DDP ranks (a collective: every rank calls it)."""
    with metric.sync_context(should_sync=True):
        return {name: value.detach().cpu().clone() if isinstance(value, torch.Tensor) else
                [v.detach().cpu().clone() for v in value] for name, value in metric.metric_state.items()}


def set_metric_states(metric: Metric, states: dict[str, Any]) -> None:
    for name, value in states.items():
        on = value.to(metric.device) if isinstance(value, torch.Tensor) else [v.to(metric.device) for v in value]
        setattr(metric, name, on)
    metric._update_count = max(metric._update_count, 1)
    metric._computed = None


class MidEpochState(pl.Callback):
    """Save, with every checkpoint, what the loop state does not hold, and restore it when
    training restarts in the middle of an epoch (at an epoch start,
    :class:`~distill.callbacks.EpochSeeding` reseeds and the epoch's metrics start empty):

    - the global RNG states (torch CPU and CUDA, numpy, ``random``);
    - the module's ``train_score`` metric (logged per epoch), accumulated over the epoch's
      trained batches (summed over DDP ranks; restored on rank 0).

    Also loads the training loader's saved position where Lightning 2.6 does not: from an
    end-of-epoch checkpoint (Lightning loads loader states only when restarting inside an epoch,
    but its first iterator was already made, and the first batches drawn, before the sampler
    was told the epoch), and when ``configure_optimizers`` asks for
    ``trainer.estimated_stepping_batches`` (per-step schedulers: the loader is made before the
    checkpoint is restored, Lightning-AI/pytorch-lightning#20550). The iterator is then remade.
    """

    KEY = "distill_mid_epoch"

    def __init__(self) -> None:
        self._saved: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        saved: dict[str, Any] = {"rng": rng_states()}
        metric = getattr(pl_module, "train_score", None)
        if isinstance(metric, Metric):
            saved["train_score"] = metric_states(metric)
        checkpoint[self.KEY] = saved

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._saved = checkpoint.get(self.KEY)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        saved, self._saved = self._saved or {}, None
        load_pending_loader_states(trainer)
        fit_loop = trainer.fit_loop
        if not fit_loop.restarted_mid_epoch:
            return
        metric = getattr(pl_module, "train_score", None)
        if "train_score" in saved and isinstance(metric, Metric) and trainer.global_rank == 0:
            set_metric_states(metric, saved["train_score"])
        if "rng" in saved:
            set_rng_states(saved["rng"])
        log.info("Resumed mid-epoch: epoch %d after batch %d", trainer.current_epoch,
                 fit_loop.epoch_loop.batch_progress.current.processed)


__all__ = ["KEYS", "MidEpochCheckpoint", "MidEpochState", "metric_states", "mid_epoch_checkpoints", "rng_states",
           "safe_to_save_mid_epoch", "set_metric_states", "set_rng_states"]
