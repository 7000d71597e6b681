"""Where a map's mass lies: the share of its positive mass inside a box of the image.

Used by the shortcut benchmark (``distill.data.shortcut``): a map whose mass lies on the cue
explains a decision taken from the cue. As the grid pointing game's score
(``distill.evaluation.pointing``), with one box per map: a map spread uniformly scores the box's
share of the image's area; an all-zero map scores 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distill.explain.visual import resize_maps


def box_mass_share(maps: Tensor, boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """``sum ReLU(M) inside box / sum ReLU(M)`` per map: ``maps`` ``(B, h, w)`` upsampled bilinearly
    (``align_corners=False``) to ``image_size`` ``(H, W)``; ``boxes`` ``(B, 4)`` pixel ``(y0, x0, y1, x1)``,
    end exclusive. Returns ``(B,)`` float32 in ``[0, 1]`` (0 for a map with no positive mass)."""
    positive = resize_maps(maps.float(), image_size).clamp_min(0)  # (B, H, W)
    h, w = positive.shape[-2:]
    rows = torch.arange(h, device=positive.device)[None, :, None]
    cols = torch.arange(w, device=positive.device)[None, None, :]
    y0, x0, y1, x1 = (boxes.to(positive.device)[:, k, None, None] for k in range(4))
    inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)  # (B, H, W)
    total = positive.sum(dim=(1, 2))
    return (positive * inside).sum(dim=(1, 2)) / total.clamp_min(1e-30) * (total > 0)

