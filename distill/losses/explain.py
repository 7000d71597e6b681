"""The explanation loss: a distance between student and teacher explanation maps (Grad-CAM++ §5;
docs/method.md §3), and the cosine of two maps used to compare them at evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DISTANCES = ("squared_l2", "normalized_squared_l2", "cosine")
# Every map norm is clamped at MAP_NORM_EPS (the normalised distance, the cosine distance, map_cosine).
# The gradient of s / max(||s||, eps) is ~ 1 / max(||s||, eps): the clamp bounds it at a near-zero
# student map (1e-12 would let it reach 1e12), and an all-zero map (every pixel cut by the ReLU)
# gives no NaN in the losses (map_cosine, a metric, marks it NaN on purpose). Real maps have norms
# far above it, where the clamp changes nothing.
MAP_NORM_EPS = 1e-6


def match_size(student_maps: Tensor, teacher_maps: Tensor) -> Tensor:
    """Resize student maps ``(..., h, w)`` to the teacher's spatial size (bilinear)."""
    if student_maps.shape[-2:] == teacher_maps.shape[-2:]:
        return student_maps
    lead = student_maps.shape[:-2]
    flat = student_maps.reshape(-1, 1, *student_maps.shape[-2:])
    resized = F.interpolate(flat, size=teacher_maps.shape[-2:], mode="bilinear", align_corners=False)
    return resized.reshape(*lead, *teacher_maps.shape[-2:])


def explain_loss(
    student_maps: Tensor, teacher_maps: Tensor, distance: str = "squared_l2", mask: Tensor | None = None
) -> Tensor:
    """Distance between maps ``(B, h, w)`` or ``(B, T, h, w)``, averaged over the maps.

    - ``squared_l2``: ``|| L_S - L_T ||_2^2`` summed over pixels of the raw maps (Grad-CAM++ §5);
    - ``normalized_squared_l2``: the same on L2-normalised flattened maps (attention-transfer style);
    - ``cosine``: ``1 - cos(L_S, L_T)``.

    ``mask`` ``(B,)`` or ``(B, T)`` marks the maps that count (multi-label padding); ``None`` =
    all. Returns a float32 scalar. Norms are clamped at ``MAP_NORM_EPS``.
    """
    if distance not in DISTANCES:
        raise ValueError(f"Unknown explanation distance '{distance}'; choose one of {DISTANCES}")
    s = match_size(student_maps, teacher_maps).float().flatten(-2)
    t = teacher_maps.float().flatten(-2)
    if distance == "squared_l2":
        per_map = (s - t).pow(2).sum(-1)
    elif distance == "normalized_squared_l2":
        per_map = (F.normalize(s, dim=-1, eps=MAP_NORM_EPS) - F.normalize(t, dim=-1, eps=MAP_NORM_EPS)).pow(2).sum(-1)
    else:
        per_map = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=MAP_NORM_EPS)
    if mask is None:
        return per_map.mean()
    weights = mask.to(per_map.dtype)
    weights = weights.reshape(*weights.shape, *[1] * (per_map.dim() - weights.dim())).expand_as(per_map)
    return (per_map * weights).sum() / weights.sum().clamp_min(1.0)


def map_cosine(student_maps: Tensor, teacher_maps: Tensor) -> Tensor:
    """Cosine similarity of each pair of maps: ``(..., h, w) -> (...)``; NaN where either map is all
    zero. A map without any positive evidence has no direction: its cosine with anything is
    undefined, so it is neither 0 nor 1 (a constant map of one value would give 1 with any other);
    average with :func:`cosine_weights`, which leaves such pairs out."""
    s = match_size(student_maps, teacher_maps).float().flatten(-2)
    t = teacher_maps.float().flatten(-2)
    cosine = F.cosine_similarity(s, t, dim=-1, eps=MAP_NORM_EPS)
    empty = (s == 0).all(-1) | (t == 0).all(-1)
    return cosine.masked_fill(empty, float("nan"))


def cosine_weights(cosine: Tensor, weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(values, weights)`` to average :func:`map_cosine` by: NaN pairs (an all-zero map) get value
    0 and weight 0, the others ``weight`` (default 1). No host synchronisation."""
    defined = ~cosine.isnan()
    weight = torch.ones_like(cosine) if weight is None else weight.to(cosine.dtype).expand_as(cosine)
    return cosine.nan_to_num(0.0), weight * defined


__all__ = ["DISTANCES", "MAP_NORM_EPS", "cosine_weights", "explain_loss", "map_cosine", "match_size"]
