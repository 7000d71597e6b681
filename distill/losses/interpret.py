"""Interpretability losses between student and teacher explanation maps (Grad-CAM++ §5; docs/method.md §3)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

INTERPRET_LOSSES = ("paper", "normalized", "cosine")
NORM_EPS = 1e-6


def match_size(student_maps: Tensor, teacher_maps: Tensor) -> Tensor:
    """Resize student maps ``(..., h, w)`` to the teacher's spatial size (bilinear)."""
    if student_maps.shape[-2:] == teacher_maps.shape[-2:]:
        return student_maps
    lead = student_maps.shape[:-2]
    flat = student_maps.reshape(-1, 1, *student_maps.shape[-2:])
    resized = F.interpolate(flat, size=teacher_maps.shape[-2:], mode="bilinear", align_corners=False)
    return resized.reshape(*lead, *teacher_maps.shape[-2:])


def interpret_loss(
    student_maps: Tensor, teacher_maps: Tensor, kind: str = "paper", mask: Tensor | None = None
) -> Tensor:
    """Distance between maps ``(B, h, w)`` or ``(B, T, h, w)``, averaged over the maps.

    - ``paper``: ``|| L_S - L_T ||_2^2`` summed over pixels of the raw maps (Grad-CAM++ §5);
    - ``normalized``: the same on L2-normalised flattened maps (attention-transfer style);
    - ``cosine``: ``1 - cos(L_S, L_T)``.

    ``mask`` ``(B,)`` or ``(B, T)`` marks the maps that count (multi-label padding); ``None`` =
    all. Returns a float32 scalar. The norms are clamped at ``NORM_EPS`` so a near-zero student
    map does not get an exploding gradient.
    """
    if kind not in INTERPRET_LOSSES:
        raise ValueError(f"Unknown interpretability loss '{kind}'; choose one of {INTERPRET_LOSSES}")
    s = match_size(student_maps, teacher_maps).float().flatten(-2)
    t = teacher_maps.float().flatten(-2)
    if kind == "paper":
        per_map = (s - t).pow(2).sum(-1)
    elif kind == "normalized":
        per_map = (F.normalize(s, dim=-1, eps=NORM_EPS) - F.normalize(t, dim=-1, eps=NORM_EPS)).pow(2).sum(-1)
    else:
        per_map = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=NORM_EPS)
    if mask is None:
        return per_map.mean()
    weights = mask.to(per_map.dtype)
    weights = weights.reshape(*weights.shape, *[1] * (per_map.dim() - weights.dim())).expand_as(per_map)
    return (per_map * weights).sum() / weights.sum().clamp_min(1.0)


def map_cosine(student_maps: Tensor, teacher_maps: Tensor) -> Tensor:
    """Cosine similarity of each pair of maps: ``(..., h, w) -> (...)``; 0 for an all-zero map."""
    s = match_size(student_maps, teacher_maps).float().flatten(-2)
    return F.cosine_similarity(s, teacher_maps.float().flatten(-2), dim=-1, eps=1e-12)


__all__ = ["INTERPRET_LOSSES", "interpret_loss", "map_cosine", "match_size"]
