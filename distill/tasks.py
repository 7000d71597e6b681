"""What depends on the kind of labels: single-label classification or multi-label.

A task says how the labels enter the loss, the soft-target KD, which classes get explained,
and how predictions are scored. The LightningModules are written against this interface, so
a new task (e.g. multi-label VOC) plugs in without touching the training step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from distill.losses import hinton_kd, masked_bce, multilabel_kd
from distill.metrics import MultilabelMeanAP


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


class MultilabelTask:
    """Multi-hot targets ``(B, C)``: 1 positive, 0 negative, -1 ignored (VOC "difficult"-only).

    - loss: binary cross-entropy with logits over the non-ignored entries;
    - kd: per-class sigmoid KD with temperature (``distill.losses.multilabel_kd``);
    - map targets: ``(B, T)`` class indices with -1 padding and a fixed ``T`` (no host sync).
      ``T = max_map_targets`` (default: all ``C`` classes, so no positive is ever dropped);
      the positives of each image come first, in class order, then -1. With
      ``mode="teacher_pred"`` the positives are the teacher's ``logit > 0`` classes;
    - score: mAP over the classes (``score_name = "map"``; :class:`MultilabelVOC11Task` uses the
      VOC 2007 11-point AP, ``"map11"``), ignored entries left out;
    - agreement: per image, the share of classes on which student and teacher make the same
      thresholded (``logit > 0``) decision.
    """

    name = "multilabel"
    score_name = "map"
    interpolation = "area"

    def __init__(self, num_classes: int, max_map_targets: int | None = None) -> None:
        self.num_classes = num_classes
        self.max_map_targets = min(max_map_targets or num_classes, num_classes)

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return masked_bce(logits, labels)

    def kd(self, student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
        return multilabel_kd(student_logits, teacher_logits, temperature)

    def map_targets(self, labels: Tensor, teacher_logits: Tensor, mode: str) -> Tensor:
        """``(B, T)`` classes to explain: every positive of each image, -1 padding."""
        positive = teacher_logits.detach() > 0 if mode == "teacher_pred" else labels == 1
        classes = torch.arange(self.num_classes, device=positive.device)
        # Positives rank first, in class order: key C - c for a positive, 0 for the rest.
        key = torch.where(positive, self.num_classes - classes, torch.zeros_like(classes))
        top, index = key.topk(self.max_map_targets, dim=1)
        return torch.where(top > 0, index, torch.full_like(index, -1))

    def score_metric(self) -> Metric:
        return MultilabelMeanAP(self.num_classes, interpolation=self.interpolation)

    def agreement(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """``(B,)`` share of classes with the same decision (``logit > 0``) by both."""
        return ((student_logits > 0) == (teacher_logits > 0)).float().mean(dim=1)


class MultilabelVOC11Task(MultilabelTask):
    """:class:`MultilabelTask` scored by the VOC 2007 11-point interpolated mAP."""

    name = "multilabel_voc11"
    score_name = "map11"
    interpolation = "11point"


TASKS = {"multiclass": MulticlassTask, "multilabel": MultilabelTask, "multilabel_voc11": MultilabelVOC11Task}


def build_task(name: str, num_classes: int, **options):
    """The task ``name`` for ``num_classes`` classes; ``options`` go to its constructor
    (e.g. ``max_map_targets`` for the multi-label tasks)."""
    if name not in TASKS:
        raise ValueError(f"Unknown task '{name}'; choose one of {sorted(TASKS)}")
    return TASKS[name](num_classes, **options)
