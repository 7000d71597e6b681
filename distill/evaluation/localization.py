"""Localisation of explanation maps against ground-truth boxes (Grad-CAM++ §4; docs/method.md §4).

For an image and a class ``c`` with boxes: upsample the map ``L^c`` to the image (bilinear),
scale it by its maximum, and keep the pixels ``M = {L >= delta * max L} ∩ {L > 0}``. With
``Bx`` the union of the image's non-difficult boxes of class ``c``, the score is

    Loc^c(delta) = |M ∩ Bx| / (|Bx| + |M \\ Bx|)

(the Grad-CAM++ paper's "internal pixels over box area plus external pixels", which is also the
IoU of ``M`` and ``Bx``). 1 when the kept pixels fill the boxes exactly; 0 for an all-zero map.

A pixel ``(i, j)`` (row, column) lies in a box ``[x1, y1, x2, y2]`` (pixel edges, 0-based)
when its centre does: ``x1 <= j + 0.5 < x2`` and ``y1 <= i + 0.5 < y2``.

Everything is batched over images and classes; no host synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def box_masks(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """``(B, N, 4)`` xyxy boxes -> ``(B, N, H, W)`` bool masks of the pixels whose centre is inside."""
    h, w = size
    ys = torch.arange(h, device=boxes.device, dtype=boxes.dtype) + 0.5
    xs = torch.arange(w, device=boxes.device, dtype=boxes.dtype) + 0.5
    x1, y1, x2, y2 = (boxes[..., k, None] for k in range(4))  # (B, N, 1)
    inside_x = (xs >= x1) & (xs < x2)  # (B, N, W)
    inside_y = (ys >= y1) & (ys < y2)  # (B, N, H)
    return inside_y[..., :, None] & inside_x[..., None, :]


def class_regions(boxes: Tensor, box_labels: Tensor, box_difficult: Tensor, target: Tensor,
                  size: tuple[int, int]) -> Tensor:
    """``(B, T, H, W)`` bool: union of the non-difficult boxes of class ``target[b, t]``.

    ``box_labels`` ``(B, N)`` (-1 = padding), ``box_difficult`` ``(B, N)``, ``target`` ``(B, T)``
    (-1 = padding: empty region).
    """
    masks = box_masks(boxes, size).to(torch.float32)  # (B, N, H, W)
    match = (box_labels[:, None, :] == target[:, :, None]) & (target[:, :, None] >= 0)
    match = match & ~box_difficult[:, None, :] & (box_labels[:, None, :] >= 0)  # (B, T, N)
    return torch.einsum("btn,bnhw->bthw", match.to(torch.float32), masks) > 0


def normalized_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """``(B, T, h, w)`` -> ``(B, T, H, W)`` upsampled (bilinear), clamped at 0, scaled to max 1
    (an all-zero map stays 0)."""
    b, t = maps.shape[:2]
    up = F.interpolate(maps.float().reshape(b * t, 1, *maps.shape[-2:]), size=size, mode="bilinear",
                       align_corners=False).reshape(b, t, *size).clamp_min(0)
    peak = up.amax(dim=(-2, -1), keepdim=True)
    return torch.where(peak > 0, up / peak.clamp_min(torch.finfo(up.dtype).tiny), torch.zeros_like(up))


def localization_scores(maps: Tensor, boxes: Tensor, box_labels: Tensor, box_difficult: Tensor, target: Tensor,
                        size: tuple[int, int], deltas: Sequence[float] = (0.5,)) -> tuple[Tensor, Tensor]:
    """``Loc^c(delta)`` for every (image, target class) pair.

    Args:
        maps: ``(B, T, h, w)`` explanation maps for the classes ``target``.
        boxes, box_labels, box_difficult: ``(B, N, 4)``, ``(B, N)``, ``(B, N)`` ground truth in the
            pixels of the ``size`` image (padding: label -1).
        target: ``(B, T)`` class indices, -1 = padding.
        size: ``(H, W)`` of the image the boxes refer to.
        deltas: thresholds, as fractions of each map's maximum.

    Returns:
        ``scores`` ``(D, B, T)`` float32 and ``valid`` ``(B, T)`` bool (a real target whose class
        has at least one non-difficult box pixel in the image).
    """
    region = class_regions(boxes, box_labels, box_difficult, target, size)
    area = region.sum(dim=(-2, -1)).to(torch.float32)
    valid = (target >= 0) & (area > 0)
    norm = normalized_maps(maps, size)
    scores = []
    for delta in deltas:
        kept = (norm >= delta) & (norm > 0)
        internal = (kept & region).sum(dim=(-2, -1)).to(torch.float32)
        external = (kept & ~region).sum(dim=(-2, -1)).to(torch.float32)
        scores.append(internal / (area + external).clamp_min(1.0))
    return torch.stack(scores), valid


__all__ = ["box_masks", "class_regions", "localization_scores", "normalized_maps"]
