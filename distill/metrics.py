"""Training and evaluation metrics: mean average precision for multi-label classification (PASCAL VOC 2007).

Targets ``(N, C)`` hold ``1`` (positive), ``0`` (negative) or ``-1`` (ignored: the class
appears in the image only as "difficult" objects). Ignored entries are neither true nor false
positives: they are dropped from the ranking of their class, as in the VOC devkit.

Two APs per class, both over the images ranked by decreasing score:

- ``area`` (the default): the step-wise area under the precision-recall curve,
  ``sum_k (R_k - R_{k-1}) P_k`` over the distinct scores (scikit-learn's
  ``average_precision_score``, torchmetrics' ``MultilabelAveragePrecision``);
- ``11point``: the VOC 2007 interpolated AP, ``1/11 sum_{t in 0, 0.1, ..., 1} max_{R >= t} P``
  (0 when no point has recall ``>= t``). The thresholds are ``k / 10`` exactly; the common
  ``np.arange(0, 1.1, 0.1)`` has ``0.30000000000000004``, which drops a point with recall
  exactly 0.3 — a floating-point artefact this implementation does not copy.

Tied scores form one point (precision and recall taken after the whole tie group). mAP is the
mean over the classes that have at least one positive; a class with none has no defined AP
and is left out (torchmetrics would count it as 0).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor
from torchmetrics.classification import MultilabelAveragePrecision
from torchmetrics.utilities.data import dim_zero_cat

INTERPOLATIONS = ("area", "11point")


def _ranked_curves(scores: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-class precision/recall after each rank: ``(N, C)`` each, float64, plus the mask of
    the rows that close a tie group on a non-ignored image, and the positives per class."""
    scores = scores.to(torch.float64)
    order = scores.argsort(dim=0, descending=True, stable=True)
    s = scores.gather(0, order)
    t = target.gather(0, order)
    tp = (t == 1).to(torch.float64).cumsum(0)
    fp = (t == 0).to(torch.float64).cumsum(0)
    positives = tp[-1]
    # A point closes a tie group: the next score is different (or it is the last row).
    last_of_tie = torch.ones_like(s, dtype=torch.bool)
    last_of_tie[:-1] = s[:-1] != s[1:]
    counted = tp + fp
    point = last_of_tie & (counted > 0)
    precision = torch.where(counted > 0, tp / counted.clamp_min(1.0), torch.zeros_like(tp))
    recall = tp / positives.clamp_min(1.0)
    return precision, recall, point, positives


def average_precision_11point(scores: Tensor, target: Tensor) -> Tensor:
    """VOC 2007 11-point interpolated AP per class: ``(N, C)`` scores and targets -> ``(C,)``.

    NaN for a class without positives. Vectorised over classes and thresholds.
    """
    if scores.dim() == 1:
        return average_precision_11point(scores[:, None], target[:, None])[0]
    precision, recall, point, positives = _ranked_curves(scores, target)
    thresholds = torch.arange(11, dtype=torch.float64, device=scores.device) / 10  # k/10 exactly
    reach = point[None] & (recall[None] >= thresholds[:, None, None])  # (11, N, C)
    best = torch.where(reach, precision[None], torch.zeros_like(precision)[None]).amax(dim=1)  # (11, C)
    ap = best.mean(dim=0)
    return torch.where(positives > 0, ap, torch.full_like(ap, float("nan")))


def mean_over_defined(ap: Tensor) -> Tensor:
    """Mean of the per-class APs that are defined (not NaN); NaN if none is."""
    defined = ~torch.isnan(ap)
    return torch.where(defined, ap, torch.zeros_like(ap)).sum() / defined.sum()


class MultilabelMeanAP(MultilabelAveragePrecision):
    """mAP over ``num_labels`` classes with ``-1`` = ignored, torchmetrics-based.

    ``interpolation="area"`` uses torchmetrics' exact (``thresholds=None``) per-class AP;
    ``"11point"`` computes the VOC 2007 AP from the same stored scores. Either way the classes
    without a positive are left out of the mean. Accepts logits or probabilities (torchmetrics
    applies a sigmoid to values outside [0, 1]; the ranking is the same). States are
    concatenated across processes under DDP.
    """

    def __init__(self, num_labels: int, interpolation: str = "area", **kwargs) -> None:
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation '{interpolation}' is unknown; choose one of {INTERPOLATIONS}")
        super().__init__(num_labels=num_labels, average="none", thresholds=None, ignore_index=-1, **kwargs)
        self.interpolation = interpolation

    def update(self, preds: Tensor, target: Tensor) -> None:
        # float64: a float32 sigmoid saturates at 1.0 for logits above ~17, which would tie
        # confident images in the ranking.
        super().update(preds.to(torch.float64), target)

    def per_class(self) -> Tensor:
        """``(C,)`` AP of every class (NaN where a class has no positive)."""
        scores, target = dim_zero_cat(self.preds), dim_zero_cat(self.target)
        scores, target = scores.reshape(-1, self.num_labels), target.reshape(-1, self.num_labels)
        has_positive = (target == 1).any(dim=0)
        if self.interpolation == "11point":
            return average_precision_11point(scores, target)
        with warnings.catch_warnings():  # classes without positives are left out below
            warnings.filterwarnings("ignore", message=".*No positive samples.*")
            ap = super().compute().to(torch.float64)
        return torch.where(has_positive, ap, torch.full_like(ap, float("nan")))

    def compute(self) -> Tensor:  # type: ignore[override]
        return mean_over_defined(self.per_class()).to(torch.float32)


__all__ = [
    "INTERPOLATIONS",
    "MultilabelMeanAP",
    "average_precision_11point",
    "mean_over_defined",
]


# ---------------------------------------------------------------------------- chance level
CHANCE_Z = 3.0  # standard errors above 1/C that a top-1 accuracy must reach to count as learned


def above_chance(accuracy: float, num_images: int, num_classes: int, z: float = CHANCE_Z) -> bool:
    """Whether a top-1 ``accuracy`` on ``num_images`` is above guessing one of ``num_classes``: more than
    ``z`` binomial standard errors above ``p = 1/C`` (one-sided; ``z = 3``: a guesser passes with
    probability ~0.1 %). Below that, agreement and map metrics of the model measure nothing."""
    p = 1.0 / num_classes
    return accuracy > p + z * math.sqrt(p * (1.0 - p) / max(num_images, 1))


def chance_flags(metrics: dict[str, float], num_classes: int | None, prefix: str = "test/") -> list[str]:
    """One line per model whose ``<prefix>acc`` / ``<prefix>teacher_acc`` is not above chance (multi-class)."""
    used = metrics.get(prefix + "num_images")
    if not num_classes or num_classes < 2 or not used:
        return []
    flags = []
    for role, key in (("student", prefix + "acc"), ("teacher", prefix + "teacher_acc")):
        if key in metrics and not above_chance(metrics[key], int(used), num_classes):
            flags.append(f"{role} at chance level: {100 * metrics[key]:.2f} % on {int(used):,} images is not above "
                         f"1/{num_classes} = {100 / num_classes:.2f} % by {CHANCE_Z:g} standard errors; its agreement "
                         "and map metrics measure nothing")
    return flags
