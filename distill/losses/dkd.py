"""Decoupled Knowledge Distillation (Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022).

With ``p = softmax(z / T)`` and ``t`` the label, the binary target / non-target masses are
``b = (p_t, 1 - p_t)`` and ``p_hat = p_{i != t} / (1 - p_t)`` is the distribution over the
non-target classes (Eq. 1-2). Then (Eq. 4-6)

    TCKD = KL(b^T || b^S),   NCKD = KL(p_hat^T || p_hat^S),   KD = TCKD + (1 - p_t^T) * NCKD,

and DKD = ``T^2 * (alpha * TCKD + beta * NCKD)`` (Eq. 7; the ``T^2`` as in mdistiller's
``dkd_loss``). Everything is computed from log-probabilities: ``log(1 - p_t)`` is the
logsumexp of the non-target log-probabilities, so no probability is ever logged or divided.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def dkd_parts(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor,
              temperature: float = 4.0) -> tuple[Tensor, Tensor]:
    """Per-sample ``(TCKD, NCKD)``, each ``(B,)``, without the ``T^2`` factor.

    ``student_logits``, ``teacher_logits``: ``(B, C)``; ``labels``: ``(B,)`` class indices.
    Computed in float32 at least (float64 inputs stay float64).
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    target = F.one_hot(labels, student_logits.shape[1]).bool()  # (B, C)

    def split(logits: Tensor) -> tuple[Tensor, Tensor]:
        """``log b`` (B, 2) and ``log p_hat`` (B, C), the target column of the latter unused."""
        log_p = F.log_softmax(logits.to(dtype) / temperature, dim=1)
        log_pt = log_p.gather(1, labels[:, None]).squeeze(1)  # (B,)
        log_rest = log_p.masked_fill(target, float("-inf")).logsumexp(dim=1)  # log(1 - p_t)
        return torch.stack([log_pt, log_rest], dim=1), log_p - log_rest[:, None]

    log_b_s, log_hat_s = split(student_logits)
    log_b_t, log_hat_t = split(teacher_logits.detach())
    tckd = (log_b_t.exp() * (log_b_t - log_b_s)).sum(dim=1)
    weight = log_hat_t.exp().masked_fill(target, 0.0)  # p_hat^T, 0 at the target class
    nckd = (weight * (log_hat_t - log_hat_s).masked_fill(target, 0.0)).sum(dim=1)
    return tckd, nckd


def decoupled_kd(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, alpha: float = 1.0,
                 beta: float = 8.0, temperature: float = 4.0) -> Tensor:
    """``T^2 * (alpha * TCKD + beta * NCKD)`` averaged over the batch; a scalar.

    ``student_logits``, ``teacher_logits``: ``(B, C)``; ``labels``: ``(B,)``.
    """
    tckd, nckd = dkd_parts(student_logits, teacher_logits, labels, temperature)
    return (alpha * tckd + beta * nckd).mean() * temperature**2


def dkd_warmup(epoch: int, warmup: int) -> float:
    """The DKD weight's linear warm-up: ``min(epoch / warmup, 1)`` with 1-based ``epoch``
    (mdistiller's ``DKD.forward_train``: 1/warmup in the first epoch, 1 from epoch ``warmup``).
    Pass Lightning's 0-based ``current_epoch + 1``. ``warmup <= 0``: no warm-up."""
    return 1.0 if warmup <= 0 else min(epoch / warmup, 1.0)
