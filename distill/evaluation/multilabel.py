"""Judging the explanations of multi-label (VOC) checkpoints, batched.

Every (image, ground-truth positive class) pair is explained: the maps of all positives of a
batch come from one batched call per method (``(B, T)`` targets, -1 padding, as in training).
Per pair, with ``Y^c`` = the *sigmoid* score of class ``c`` on the full image and ``O^c`` on the
explanation image ``E^c`` (built as for single-label data, see
:func:`distill.evaluation.faithfulness.explanation_images`):

- Average Drop % ``= 100 * mean(max(0, Y - O) / Y)``, Increase in Confidence %
  ``= 100 * mean(1[Y < O])`` and Win % of Grad-CAM++ over Grad-CAM, averaged over the pairs;
- the box localisation ``Loc^c(delta)`` of :mod:`distill.evaluation.localization`, averaged over
  the pairs whose class has a non-difficult box;
- with a teacher: the cosine of the two maps per pair, and the per-image share of classes with
  the same ``logit > 0`` decision (agreement).

Scores are ``(value, weight)`` pairs of flat tensors for :class:`ScoreAccumulator` (weight 0 =
padding), so nothing synchronises with the host per batch. mAP is accumulated separately
(:class:`distill.metrics.MultilabelMeanAP`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from distill.evaluation.faithfulness import (
    METHOD_PAIR,
    confidence_increase,
    explanation_images,
    forward_explainable,
    relative_drop,
    wins,
)
from distill.evaluation.localization import localization_scores
from distill.explain import EVAL_METHOD, head_maps
from distill.losses import map_cosine
from distill.losses.explain import cosine_weights

ML_CONVENTIONS = {
    "explained_classes": "every ground-truth positive class of each image (pairs; -1 padding left out)",
    "average_drop_pct": "100 * mean over pairs of max(0, Y - O) / Y; Y, O = sigmoid of the class on x and E",
    "increase_in_confidence_pct": "100 * mean over pairs of 1[Y < O] (strict)",
    "loc_pct": "100 * mean over pairs with a non-difficult box of IoU(map >= delta * max, boxes)",
    "map": "mean over classes with a positive of the AP (difficult-only entries ignored)",
    "agreement_pct": "100 * mean share of classes with the same decision (logit > 0) by student and teacher",
    "map_cosine": "mean over pairs of the cosine of teacher and student Grad-CAM++ maps (pairs with an all-zero "
                  "map left out)",
}


def positive_targets(labels: Tensor, max_targets: int | None = None) -> Tensor:
    """``(B, C)`` multi-hot labels (1 / 0 / -1) -> ``(B, T)`` positive classes, in class order,
    -1 padding; ``T = max_targets`` (default ``C``)."""
    num_classes = labels.shape[1]
    t = min(max_targets or num_classes, num_classes)
    classes = torch.arange(num_classes, device=labels.device)
    key = torch.where(labels == 1, num_classes - classes, torch.zeros_like(classes))
    top, index = key.topk(t, dim=1)
    return torch.where(top > 0, index, torch.full_like(index, -1))


def sigmoid_scores(logits: Tensor, target: Tensor) -> Tensor:
    """Sigmoid of ``logits`` ``(B, C)`` at ``target`` ``(B, T)`` (-1 -> class 0), float32 or wider."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.sigmoid(z.gather(1, target.clamp_min(0)))


def multilabel_faithfulness(
    model: nn.Module,
    images: Tensor,
    target: Tensor,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    outputs: tuple[Tensor, Tensor],
    methods: Sequence[str] = METHOD_PAIR,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Per-pair drops / increases ``(B*T,)`` of each method (and Win), and the maps ``(B, T, h, w)``.

    ``target`` ``(B, T)`` positives with -1 padding; ``outputs`` = ``forward_explainable``.
    """
    features, logits = outputs
    b, t = target.shape
    full = sigmoid_scores(logits, target)  # (B, T)
    maps = {m: head_maps(model, features, target, m) for m in methods}
    explained = explanation_images(images, torch.cat([maps[m] for m in methods], dim=1), mean, std)
    with torch.no_grad():
        out_logits = model(explained.flatten(0, 1)).reshape(b, len(methods), t, -1)
    scores, drops = {}, {}
    for i, method in enumerate(methods):
        out = sigmoid_scores(out_logits[:, i].reshape(b * t, -1), target.reshape(-1, 1))[:, 0]
        drops[method] = relative_drop(full.flatten(), out)
        scores[f"{method}/average_drop"] = drops[method]
        scores[f"{method}/increase_in_confidence"] = confidence_increase(full.flatten(), out)
    if tuple(methods) == METHOD_PAIR:
        scores["win_gradcampp_vs_gradcam"] = wins(drops["gradcampp"], drops["gradcam"])
    return scores, maps


def evaluate_multilabel_batch(
    model: nn.Module,
    batch: Sequence[Tensor],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    teacher: nn.Module | None = None,
    deltas: Sequence[float] = (0.0, 0.25, 0.5),
    explain_teacher: bool = True,
    max_targets: int | None = None,
    similarity_method: str = EVAL_METHOD,
) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, Tensor]]:
    """Scores of one VOC batch ``(images, targets, [boxes, box_labels, box_difficult])``.

    Returns ``scores`` ``{key: (value, weight)}`` (flat tensors; keys as for single-label data,
    ``loc{100 delta:02d}`` for the localisation, ``teacher/`` for the teacher) and ``logits``
    ``{"": student, "teacher/": teacher}`` ``(B, C)`` for the mAP. ``max_targets`` caps the
    classes explained per image (``task.max_map_targets``); ``None``: the batch's largest count.
    """
    images, labels = batch[0], batch[1].long()
    if max_targets is None:  # pad to the batch's largest number of positives (one host sync per batch)
        max_targets = max(int((labels == 1).sum(dim=1).max()), 1)
    target = positive_targets(labels, max_targets)
    weight = (target >= 0).flatten().to(torch.float32)
    roles = [("", model)] + ([("teacher/", teacher)] if teacher is not None else [])
    scores: dict[str, tuple[Tensor, Tensor]] = {}
    logits_of, maps_of = {}, {}
    for prefix, net in roles:
        outputs = forward_explainable(net, images)
        logits_of[prefix] = outputs[1]
        if prefix and not explain_teacher:
            maps_of[prefix] = {similarity_method: head_maps(net, outputs[0], target, similarity_method)}
            continue
        per_pair, maps_of[prefix] = multilabel_faithfulness(net, images, target, mean, std, outputs)
        if similarity_method not in maps_of[prefix]:  # the faithfulness pair is Grad-CAM / Grad-CAM++
            maps_of[prefix][similarity_method] = head_maps(net, outputs[0], target, similarity_method)
        scores.update({f"{prefix}{k}": (v, weight) for k, v in per_pair.items()})
        if len(batch) >= 5 and deltas:
            loc, valid = localization_scores(maps_of[prefix][similarity_method], batch[2], batch[3].long(),
                                             batch[4].bool(), target, tuple(images.shape[-2:]), deltas)
            for delta, value in zip(deltas, loc, strict=True):
                scores[f"{prefix}loc{round(100 * delta):02d}"] = (value.flatten(), valid.flatten().to(torch.float32))
    if teacher is not None:
        s_maps, t_maps = maps_of[""][similarity_method], maps_of["teacher/"][similarity_method]
        cosine = map_cosine(s_maps.flatten(0, 1), t_maps.flatten(0, 1))
        scores["map_cosine"] = cosine_weights(cosine, weight)  # all-zero maps (and padding) left out
        same = ((logits_of[""] > 0) == (logits_of["teacher/"] > 0)).float().mean(dim=1)
        scores["agreement"] = (same, torch.ones_like(same))
    return scores, logits_of


__all__ = [
    "ML_CONVENTIONS",
    "evaluate_multilabel_batch",
    "multilabel_faithfulness",
    "positive_targets",
    "sigmoid_scores",
]
