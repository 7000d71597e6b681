"""Hinton et al. (2015) knowledge distillation on soft targets."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def hinton_kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """``T^2 * KL(softmax(z_T / T) || softmax(z_S / T))``, averaged over the batch.

    ``student_logits``, ``teacher_logits``: ``(B, C)``. Returns a scalar.
    """
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


# Logit standardisation's epsilon, added to the standard deviation (not under the square root), as
# in the reference code (sunshangquan/logit-standardization-KD, mdistiller/distillers/KD.py: normalize).
STANDARDIZE_EPS = 1e-7


def standardize_logits(logits: Tensor) -> Tensor:
    """Each sample's logits z-scored, ``(z - mean(z)) / (std(z) + 1e-7)`` over the classes, with the
    unbiased standard deviation (``C - 1`` in the denominator, ``torch.std``'s default, as in the
    reference code): ``(B, C) -> (B, C)`` (Sun et al., "Logit Standardization in Knowledge
    Distillation", CVPR 2024)."""
    mean = logits.mean(dim=1, keepdim=True)
    return (logits - mean) / (logits.std(dim=1, keepdim=True) + STANDARDIZE_EPS)
