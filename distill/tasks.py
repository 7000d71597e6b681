"""What depends on the kind of labels: single-label classification or multi-label.

A task says how the labels enter the loss, the soft-target KD, which classes get explained,
and how predictions are scored. The LightningModules are written against this interface, so
a new task (e.g. multi-label VOC) plugs in without touching the training step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from distill.errors import ConfigError
from distill.losses import hinton_kd, masked_bce, multilabel_kd
from distill.metrics import MultilabelMeanAP


def split_batch(batch: Sequence[Tensor]) -> tuple[Tensor, Tensor, tuple[Tensor, ...] | None]:
    """``(images, labels, boxes)`` of a batch; ``boxes`` = ``(boxes, box_labels, box_difficult)``
    where evaluation batches carry them (VOC's), else ``None``."""
    return batch[0], batch[1], tuple(batch[2:5]) if len(batch) >= 5 else None


class MulticlassTask:
    """One label per image ``(B,)``; CE, Hinton KD, maps for one class per image."""

    name = "multiclass"
    score_name = "acc"  # the headline metric, and what checkpoints monitor (val/acc)
    multilabel = False

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    @property
    def spec(self) -> dict[str, Any]:
        """The ``task`` config node of this task (what a checkpoint records to rebuild it)."""
        return {"name": self.name, "score": self.score_name}

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits, labels)

    def kd(self, student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
        return hinton_kd(student_logits, teacher_logits, temperature)

    def map_targets(self, labels: Tensor, teacher_logits: Tensor, mode: str) -> Tensor:
        """Classes to explain: ``(B,)`` — the label, or the teacher's top-1."""
        return teacher_logits.detach().argmax(dim=1) if mode == "teacher_pred" else labels

    def score_metric(self) -> Metric:
        return MulticlassAccuracy(self.num_classes, average="micro")

    split_batch = staticmethod(split_batch)

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
    multilabel = True
    interpolation = "area"
    split_batch = staticmethod(split_batch)

    def __init__(self, num_classes: int, max_map_targets: int | None = None) -> None:
        self.num_classes = num_classes
        self.max_map_targets = min(max_map_targets or num_classes, num_classes)
        self._options = {"max_map_targets": max_map_targets}

    @property
    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "score": self.score_name, **self._options}

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


def build_task(node: Mapping[str, Any], num_classes: int, multilabel_data: bool | None = None):
    """The task of the config node ``task`` (``configs/task/``: ``name``, ``score`` and the
    task's options, e.g. ``max_map_targets``) for ``num_classes`` classes. With
    ``multilabel_data``, the task must fit the data's labels (one class, or multi-hot)."""
    options = dict(node)
    name, score = options.pop("name"), options.pop("score", None)
    if name not in TASKS:
        raise ConfigError(f"task={name} is unknown; choose one of {sorted(TASKS)}")
    task_class = TASKS[name]
    if score is not None and score != task_class.score_name:
        raise ConfigError(f"task.score={score} but the {name} task scores {task_class.score_name}: "
                          f"set task.score={task_class.score_name}")
    if multilabel_data is not None and multilabel_data != task_class.multilabel:
        labels = "multi-hot labels" if multilabel_data else "one label per image"
        fits = "multilabel or multilabel_voc11" if multilabel_data else "multiclass"
        raise ConfigError(f"task={name} does not fit this data's {labels}: use task={fits}")
    return task_class(num_classes, **options)
