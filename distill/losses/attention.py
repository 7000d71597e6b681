"""Attention transfer (Zagoruyko & Komodakis, 2017), the AT baseline of SPEC §2."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def attention_map(features: Tensor) -> Tensor:
    """``normalize(mean_k A_k^2)`` flattened: ``(B, K, h, w) -> (B, h*w)``, unit L2 per row."""
    return F.normalize(features.float().pow(2).mean(dim=1).flatten(1), dim=1)


def attention_transfer(student_groups: list[Tensor], teacher_groups: list[Tensor]) -> Tensor:
    """Sum over group outputs of the mean squared difference of the attention maps.

    As in the AT reference code, the squared difference is averaged over the batch and the
    spatial positions; multiply by ``beta / 2`` (beta = 1000) to get the AT paper's loss.
    Group outputs of different spatial size are resized to the teacher's (bilinear).
    """
    if len(student_groups) != len(teacher_groups):
        raise ValueError(
            f"attention transfer pairs group outputs: the student has {len(student_groups)} "
            f"groups, the teacher {len(teacher_groups)}"
        )
    total = student_groups[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student_groups, teacher_groups, strict=True):
        if s.shape[-2:] != t.shape[-2:]:
            s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
        total = total + (attention_map(s) - attention_map(t)).pow(2).mean()
    return total
