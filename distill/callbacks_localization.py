"""Box localisation of explanation maps at evaluation (Grad-CAM++ §4; docs/method.md §4), for teacher and student.

Evaluation batches that carry boxes, ``(images, targets, boxes, box_labels, box_difficult)``
(the VOC DataModule's), get one explanation map per (image, ground-truth positive class) from
each network, scored by ``distill.evaluation.localization.localization_scores`` at every
``delta``. Logged at the end of the epoch as ``{val,test}/loc{100*delta:02d}_{role}``, e.g.
``test/loc50_student``: the mean over all (image, class) pairs with boxes.

Roles: under the distiller ``student`` (``pl_module.model``) and ``teacher``
(``pl_module.teacher``); under the plain classifier the one network, named after the stage
(``teacher`` when training the teacher, else ``student``).

The maps are recomputed here (the networks run once more on the batch, in eval mode, with
dropout off): the explained classes are the ground-truth positives, not the training
``explain.target``, so teacher and student are scored on the same pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from distill.evaluation.localization import localization_scores
from distill.explain import network_maps


def roles(pl_module: pl.LightningModule) -> list[tuple[str, nn.Module]]:
    teacher = getattr(pl_module, "teacher", None)
    if isinstance(teacher, nn.Module):
        return [("student", pl_module.model), ("teacher", teacher)]
    stage = (getattr(pl_module, "hparams", None) or {}).get("stage", "student")
    return [("teacher" if stage == "teacher" else "student", pl_module.model)]


class LocalizationCallback(pl.Callback):
    """Mean ``Loc(delta)`` of the maps of every network at validation and test."""

    def __init__(self, deltas: Sequence[float] = (0.0, 0.25, 0.5), method: str = "gradcampp",
                 on_val: bool = True) -> None:
        self.deltas = tuple(float(d) for d in deltas)
        self.method = method
        self.on_val = on_val
        self.metrics: dict[str, MeanMetric] = {}

    @staticmethod
    def metric_name(stage: str, delta: float, role: str) -> str:
        return f"{stage}/loc{round(100 * delta):02d}_{role}"

    def _metric(self, name: str, device: torch.device) -> MeanMetric:
        if name not in self.metrics:
            self.metrics[name] = MeanMetric().to(device)
        return self.metrics[name]

    def update(self, pl_module: pl.LightningModule, batch: Sequence[Tensor], stage: str) -> None:
        if len(batch) < 5:
            return  # no boxes in this batch
        with torch.inference_mode(False):
            x, y, boxes, box_labels, difficult = (t.clone() for t in batch[:5])  # normal tensors
            target = pl_module.task.map_targets(y, y, "label")  # the ground-truth positives
            target = target.reshape(target.shape[0], -1)
            for role, model in roles(pl_module):
                was_training = model.training
                model.eval()
                try:
                    maps = network_maps(model, x, target, self.method)
                finally:
                    model.train(was_training)
                scores, valid = localization_scores(maps, boxes, box_labels, difficult, target,
                                                    tuple(x.shape[-2:]), self.deltas)
                weight = valid.to(scores.dtype)
                for delta, score in zip(self.deltas, scores, strict=True):
                    self._metric(self.metric_name(stage, delta, role), x.device).update(score, weight)

    def log_epoch(self, pl_module: pl.LightningModule, stage: str) -> None:
        for name, metric in self.metrics.items():
            if name.startswith(f"{stage}/") and metric.update_called:
                pl_module.log(name, metric.compute())
                metric.reset()

    # -- hooks -------------------------------------------------------------------------------
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self.on_val and not trainer.sanity_checking:
            self.update(pl_module, batch, "val")

    def on_validation_epoch_end(self, trainer, pl_module):
        if self.on_val and not trainer.sanity_checking:
            self.log_epoch(pl_module, "val")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.update(pl_module, batch, "test")

    def on_test_epoch_end(self, trainer, pl_module):
        self.log_epoch(pl_module, "test")


def localization_callbacks(datamodule) -> list[pl.Callback]:
    """``[LocalizationCallback]`` for a DataModule with boxes (``loc_deltas`` non-empty), else ``[]``."""
    deltas = getattr(datamodule, "loc_deltas", None)
    if not deltas:
        return []
    return [LocalizationCallback(deltas, getattr(datamodule, "loc_method", "gradcampp"),
                                 getattr(datamodule, "loc_on_val", True))]


__all__ = ["LocalizationCallback", "localization_callbacks", "roles"]
