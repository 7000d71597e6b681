"""Class attention transfer (Guo et al., "Class Attention Transfer Based Knowledge Distillation",
CVPR 2023), the CAT-KD baseline (docs/baselines.md).

For a global-average-pool + linear head, ``logits = W mean_ij(A) + b``: the class activation maps
of *all* classes are the linear layer applied as a 1 x 1 convolution to the last feature map,
``CAM = W A`` (B, C, h, w), whose spatial mean is the logit less its bias (the CAT-KD code drops
the bias: its ``conv_test`` layer is ``bias=False``). Both networks' CAMs are average-pooled to a
``r x r`` grid and matched by mean squared error; the optional per-map L2 normalisation is the
code's ``IF_NORMALIZE`` (off in its configs for the ResNet, WRN and VGG students, on for the
ShuffleNet and MobileNet ones).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.explain.maps import float32_region
from distill.losses.explain import MAP_NORM_EPS


def class_activation_maps(features: Tensor, weight: Tensor) -> Tensor:
    """``CAM_c = sum_k W[c, k] A_k`` for every class: features ``(B, K, h, w)``, the linear head's
    weight ``(C, K)`` -> ``(B, C, h, w)``, in float32 at least (autocast off)."""
    dtype = torch.promote_types(features.dtype, torch.float32)
    with float32_region(features):
        return torch.einsum("ck,bkhw->bchw", weight.to(dtype), features.to(dtype))


def class_attention_transfer(student_cams: Tensor, teacher_cams: Tensor, resolution: int = 2,
                             normalize: bool = False) -> Tensor:
    """``mean (pool_r(CAM_S) - pool_r(CAM_T))^2`` over the batch, classes and the ``r x r`` cells
    (CAT-KD's ``CAT_loss``); a scalar, float32 at least. CAMs ``(B, C, h, w)``, the two sizes may differ.

    ``normalize``: each pooled map divided by its L2 norm over the ``r x r`` cells first (norm
    clamped at ``MAP_NORM_EPS``).
    """
    if student_cams.shape[:2] != teacher_cams.shape[:2]:
        raise ValueError(f"CAT-KD: student CAMs {tuple(student_cams.shape)} and teacher CAMs "
                         f"{tuple(teacher_cams.shape)} differ in batch or class count")
    dtype = torch.promote_types(student_cams.dtype, torch.float32)  # float64 stays float64
    pooled = [F.adaptive_avg_pool2d(cams.to(dtype), resolution) for cams in (student_cams, teacher_cams)]
    if normalize:
        pooled = [F.normalize(p.flatten(2), dim=2, eps=MAP_NORM_EPS) for p in pooled]
    return F.mse_loss(*pooled)


__all__ = ["class_activation_maps", "class_attention_transfer"]
