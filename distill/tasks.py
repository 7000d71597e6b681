"""What depends on the kind of labels: single-label classification or multi-label.

A task says how the labels enter the loss, the soft-target KD, which classes get explained,
and how predictions are scored. The LightningModules are written against this interface, so
a new task (e.g. multi-label VOC) plugs in without touching the training step.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from distill.losses import hinton_kd


class MulticlassTask:
    """One label per image ``(B,)``; CE, Hinton KD, maps for one class per image."""

    name = "multiclass"
    score_name = "acc"  # the headline metric, and what checkpoints monitor (val/acc)

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits, labels)

    def kd(self, student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
        return hinton_kd(student_logits, teacher_logits, temperature)

    def map_targets(self, labels: Tensor, teacher_logits: Tensor, mode: str) -> Tensor:
        """Classes to explain: ``(B,)`` — the label, or the teacher's top-1."""
        return teacher_logits.detach().argmax(dim=1) if mode == "teacher_pred" else labels

    def score_metric(self) -> Metric:
        return MulticlassAccuracy(self.num_classes, average="micro")

    def agreement(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """``(B,)`` 1.0 where student and teacher predict the same top-1 class."""
        return (student_logits.argmax(dim=1) == teacher_logits.argmax(dim=1)).float()


TASKS = {"multiclass": MulticlassTask}


def build_task(name: str, num_classes: int):
    if name not in TASKS:
        raise ValueError(f"Unknown task '{name}'; choose one of {sorted(TASKS)}")
    return TASKS[name](num_classes)
