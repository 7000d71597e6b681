"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017), the AT baseline (docs/method.md §3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def attention_map(features: Tensor) -> Tensor:
    """``normalize(mean_k A_k^2)`` flattened: ``(B, K, h, w) -> (B, h*w)``, unit L2 per row."""
    return F.normalize(features.float().pow(2).mean(dim=1).flatten(1), dim=1)


def match_stages(student_stages: list[Tensor], teacher_stages: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """Pair stage outputs ``(B, K_i, h_i, w_i)`` by resolution, not by count: for every spatial
    size that both networks produce, the last student stage and the last teacher stage of that size."""
    def last_by_size(stages: list[Tensor]) -> dict[tuple[int, int], Tensor]:
        return {tuple(stage.shape[-2:]): stage for stage in stages}

    student, teacher = last_by_size(student_stages), last_by_size(teacher_stages)
    return [(student[size], teacher[size]) for size in teacher if size in student]


def attention_transfer(student_stages: list[Tensor], teacher_stages: list[Tensor]) -> Tensor:
    """Sum over matched stage outputs (``match_stages``) of the mean squared difference of the
    attention maps.

    As in the AT reference code, the squared difference is averaged over the batch and the
    spatial positions; multiply by ``beta / 2`` (beta = 1000) to get the AT paper's loss.
    """
    pairs = match_stages(student_stages, teacher_stages)
    if not pairs:
        student = sorted({tuple(s.shape[-2:]) for s in student_stages})
        teacher = sorted({tuple(t.shape[-2:]) for t in teacher_stages})
        raise ValueError(f"attention transfer: no stage resolution shared by student {student} and teacher {teacher}")
    total = student_stages[0].new_zeros((), dtype=torch.float32)
    for s, t in pairs:
        total = total + (attention_map(s) - attention_map(t)).pow(2).mean()
    return total
