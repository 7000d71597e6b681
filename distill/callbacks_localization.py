"""Box localisation of explanation maps at evaluation (Grad-CAM++ §4; docs/method.md §4), for teacher and student.

Evaluation batches that carry boxes, ``(images, targets, boxes, box_labels, box_difficult)``
(the VOC DataModule's), get one explanation map per (image, ground-truth positive class) from
each network, scored by ``distill.evaluation.localization.localization_scores`` at every
``delta``. Logged at the end of the epoch as ``{val,test}/loc{100*delta:02d}_{role}``, e.g.
``test/loc50_student``: the mean over all (image, class) pairs with boxes.

Roles: the module's networks by role (``pl_module.networks()``: student and teacher when
distilling, else the one network trained). Batches without boxes (``task.split_batch``) are skipped.

The maps are recomputed here (the networks run once more on the batch, in eval mode, with
dropout off): the explained classes are the ground-truth positives, not the training
``explain.target``, so teacher and student are scored on the same pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor
from torchmetrics import MeanMetric

from distill.errors import ConfigError
from distill.evaluation.localization import localization_scores
from distill.explain import map_metrics_missing, network_maps


class LocalizationCallback(pl.Callback):
    """Mean ``Loc(delta)`` of the maps of every network at validation and test."""

    def __init__(self, method: str, deltas: Sequence[float] = (0.0, 0.25, 0.5), on_val: bool = True) -> None:
        self.deltas = tuple(float(d) for d in deltas)
        if any(not 0.0 <= d < 1.0 for d in self.deltas):
            raise ConfigError(f"callbacks.localization.deltas must lie in [0, 1), got {list(self.deltas)}")
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
        x, y, box_data = pl_module.task.split_batch(batch)
        if box_data is None or not self.deltas:
            return
        with torch.inference_mode(False):
            x, y = x.clone(), y.clone()  # normal tensors
            boxes, box_labels, difficult = (t.clone() for t in box_data)
            target = pl_module.task.map_targets(y, y, "label")  # the ground-truth positives
            target = target.reshape(target.shape[0], -1)
            for role, model in pl_module.networks().items():
                was_training = model.training
                model.eval()
                try:
                    maps = network_maps(model, x, target, self.method)
                finally:
                    model.train(was_training)
                if map_metrics_missing({role: tuple(maps.shape[-2:])}):  # too small a map: no score
                    continue
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


__all__ = ["LocalizationCallback"]
