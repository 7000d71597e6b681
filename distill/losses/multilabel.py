"""Multi-label losses (PASCAL VOC): masked binary cross-entropy and per-class sigmoid KD.

Targets are ``(B, C)`` with ``1`` = positive, ``0`` = negative and ``-1`` = ignored (a class
present in the image only as "difficult" objects, the VOC convention). Both losses are
plain tensor functions: no host synchronisation, no branch on a tensor's value.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

IGNORE = -1


def masked_bce(logits: Tensor, target: Tensor, ignore_index: int = IGNORE) -> Tensor:
    """Binary cross-entropy with logits, averaged over the non-ignored (image, class) entries.

    ``logits`` ``(B, C)``; ``target`` ``(B, C)`` in ``{1, 0, ignore_index}`` (any dtype).
    Entries equal to ``ignore_index`` contribute nothing, neither to the sum nor to the count.
    Returns a float32 scalar (0 when every entry is ignored).
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must have the same shape")
    valid = (target != ignore_index).to(logits.dtype)
    labels = target.clamp_min(0).to(logits.dtype)
    per_entry = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
    valid = valid.float()
    return (per_entry * valid).sum() / valid.sum().clamp_min(1.0)


def multilabel_kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Hinton KD for independent sigmoid outputs: ``T^2 * mean_{b,c} KL(Ber(p_T) || Ber(p_S))``
    with ``p = sigmoid(z / T)``.

    The per-class Bernoulli KL is ``p_T (log p_T - log p_S) + (1 - p_T) (log(1 - p_T) -
    log(1 - p_S))`` (0 when the two agree; its student gradient is that of the BCE of the
    student on the soft teacher targets). Averaged over the ``B * C`` entries, like
    :func:`masked_bce`, so ``loss.kd=1`` weighs both terms alike; ``T^2`` keeps the
    gradient scale independent of ``T`` as in the single-label KD. Returns a float32 scalar.
    """
    zs = student_logits.float() / temperature
    zt = teacher_logits.float() / temperature
    log_ps, log_1ms = F.logsigmoid(zs), F.logsigmoid(-zs)
    log_pt, log_1mt = F.logsigmoid(zt), F.logsigmoid(-zt)
    pt = log_pt.exp()
    kl = pt * (log_pt - log_ps) + (1.0 - pt) * (log_1mt - log_1ms)
    return kl.mean() * temperature**2


__all__ = ["IGNORE", "masked_bce", "multilabel_kd"]
