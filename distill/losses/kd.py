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
