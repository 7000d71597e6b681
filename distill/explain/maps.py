"""Batched, differentiable CAM / Grad-CAM / Grad-CAM++ / HiResCAM / XGrad-CAM / LayerCAM maps.

Pure tensor functions: they take the logits and the explained activations of one forward
pass and return one map per (sample, target class). No hooks, no host synchronisation, no
Python loop over samples or classes. Map arithmetic runs in at least float32 even under
autocast.

Shapes: ``A`` activations ``(B, K, h, w)``; ``logits`` ``(B, C)``; targets ``(B,)`` or ``(B, T)``
(a negative target marks padding and gets an all-zero map); maps ``(B, h, w)`` or
``(B, T, h, w)``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.errors import ConfigError

METHODS = ("cam", "gradcam", "gradcampp", "hirescam", "xgradcam", "layercam")
EVAL_METHOD = "gradcampp"  # what evaluation explains with unless told otherwise (config key eval_method)
FLOAT16_PRECISIONS = ("16-mixed", "16-true", "16")


def check_map_precision(precision: str | int | None, autograd_maps: bool) -> None:
    """Refuse float16 training when a map needs an inner gradient ``dS/dA`` (autograd path).

    Under ``16-mixed`` the GradScaler scales the loss, not the inner ``autograd.grad``, whose
    float16 values (``W[c] / Z`` ~ 1e-4 and smaller) lose their precision or flush to zero.
    Closed-form maps have no inner gradient, so float16 is fine with them.
    """
    if autograd_maps and str(precision) in FLOAT16_PRECISIONS:
        raise ConfigError(
            f"trainer.precision={precision} is refused: these explanation maps go through an inner "
            "autograd gradient dS/dA, which float16 autocast does not loss-scale (it underflows). Use "
            "trainer.precision=bf16-mixed (or 32-true), or closed-form maps (explain.closed_form=true "
            "with global-average-pool + linear heads, e.g. the WRNs)"
        )


def float32_region(tensor: Tensor) -> contextlib.AbstractContextManager:
    """Autocast off on ``tensor``'s device, so the map arithmetic really runs in float32.

    Casting the inputs to float32 is not enough under ``torch.autocast``: it would cast them
    back down for autocast's low-precision ops (``einsum`` among them, also on the CPU).
    """
    device_type = tensor.device.type
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- weights
def gradcam_weights(grads: Tensor) -> Tensor:
    """Grad-CAM channel weights ``w_k = mean_ij g_kij``: ``(B, T, K, h, w) -> (B, T, K)``."""
    return grads.mean(dim=(-2, -1))


def gradcampp_alpha(grads: Tensor, activation_sums: Tensor) -> Tensor:
    """Grad-CAM++ ``alpha = g^2 / (2 g^2 + (sum_ab A) g^3)``, 0 where the denominator is 0.

    ``grads`` ``(B, T, K, ...)``; ``activation_sums`` broadcastable to it, e.g. ``(B, 1, K, 1, 1)``.
    No epsilon: CIFAR last-layer gradients are ~1e-3, so any fixed epsilon would bias alpha.
    The ``g^2`` is cancelled (``alpha = 1 / (2 + S g)`` for ``g != 0``): same values, but the
    backward no longer overflows in float32 for tiny ``g`` (``g^2`` subnormal).
    """
    inner = 2.0 + activation_sums * grads
    defined = (grads != 0) & (inner != 0)
    # Double `where` keeps the gradient finite where the unused branch would divide by zero.
    return torch.where(defined, 1.0 / torch.where(defined, inner, torch.ones_like(inner)), 0.0)


def gradcampp_weights(grads: Tensor, activations: Tensor) -> Tensor:
    """Grad-CAM++ weights ``w_k = sum_ij alpha_kij ReLU(g_kij)``.

    ``grads`` ``(B, T, K, h, w)``, ``activations`` ``(B, K, h, w)`` -> ``(B, T, K)``.
    """
    sums = activations.sum(dim=(-2, -1))[:, None, :, None, None]
    alpha = gradcampp_alpha(grads, sums)
    return (alpha * F.relu(grads)).sum(dim=(-2, -1))


def xgradcam_weights(grads: Tensor, activations: Tensor) -> Tensor:
    """XGrad-CAM weights ``w_k = sum_ij (A_kij / sum_ab A_kab) g_kij`` (Fu et al., BMVC 2020, Eq. 8).

    ``grads`` ``(B, T, K, h, w)``, ``activations`` ``(B, K, h, w)`` -> ``(B, T, K)``; 0 for a
    channel whose activations sum to 0 (no epsilon; an all-zero channel adds nothing anyway).
    """
    sums = activations.sum(dim=(-2, -1), keepdim=True)  # (B, K, 1, 1)
    defined = sums != 0
    share = torch.where(defined, activations / torch.where(defined, sums, torch.ones_like(sums)), 0.0)
    return (grads * share[:, None]).sum(dim=(-2, -1))


def hirescam_maps(grads: Tensor, activations: Tensor) -> Tensor:
    """HiResCAM ``ReLU(sum_k g_k * A_k)``, element-wise (Draelos & Carin, 2020, Eq. 4):
    ``(B, T, K, h, w)`` x ``(B, K, h, w)`` -> ``(B, T, h, w)``."""
    return F.relu((grads * activations[:, None]).sum(dim=2))


def layercam_maps(grads: Tensor, activations: Tensor) -> Tensor:
    """LayerCAM ``ReLU(sum_k ReLU(g_k) * A_k)``, element-wise (Jiang et al., TIP 2021, Eqs. 5-6):
    ``(B, T, K, h, w)`` x ``(B, K, h, w)`` -> ``(B, T, h, w)``."""
    return F.relu((F.relu(grads) * activations[:, None]).sum(dim=2))


def gradient_maps(grads: Tensor, activations: Tensor, method: str) -> Tensor:
    """The map of ``method`` from the gradients ``(B, T, K, h, w)`` and activations ``(B, K, h, w)``."""
    if method == "hirescam":
        return hirescam_maps(grads, activations)
    if method == "layercam":
        return layercam_maps(grads, activations)
    if method == "gradcam":
        weights = gradcam_weights(grads)
    elif method == "xgradcam":
        weights = xgradcam_weights(grads, activations)
    else:
        weights = gradcampp_weights(grads, activations)
    return weighted_maps(weights, activations)


def weighted_maps(weights: Tensor, activations: Tensor) -> Tensor:
    """``ReLU(sum_k w_k A_k)``: ``(B, T, K)`` x ``(B, K, h, w)`` -> ``(B, T, h, w)``."""
    return F.relu(torch.einsum("btk,bkhw->bthw", weights, activations))


# --------------------------------------------------------------------------- gradients
def class_gradients(
    logits: Tensor, activations: Tensor, target: Tensor, create_graph: bool = False
) -> Tensor:
    """``dS^c / dA`` for every (sample, target) pair in one batched autograd call.

    ``logits`` ``(B, C)``, ``activations`` ``(B, K, h, w)``, ``target`` ``(B, T)`` (negative =
    padding, zero gradient) -> ``(B, T, K, h, w)``. Summing the selected logits over the batch
    is exact because samples do not interact inside the head (eval-mode BN, no dropout).
    """
    valid = (target >= 0).to(logits.dtype)
    index = target.clamp_min(0)
    num_targets = target.shape[1]
    if num_targets == 1:
        selected = logits.gather(1, index)
        (grads,) = torch.autograd.grad(
            selected, activations, grad_outputs=valid, create_graph=create_graph
        )
        return grads.unsqueeze(1)
    # (T, B, C) one-hot rows: autograd vmaps the backward over T in one call. A comparison,
    # not F.one_hot, which checks the index range with a host synchronisation on the CPU.
    classes = torch.arange(logits.shape[1], device=index.device)
    one_hot = (index.t()[..., None] == classes).to(logits.dtype) * valid.t()[..., None]
    (grads,) = torch.autograd.grad(
        logits, activations, grad_outputs=one_hot, is_grads_batched=True, create_graph=create_graph
    )
    return grads.transpose(0, 1)


# --------------------------------------------------------------------------- closed form
def closed_form_weights(
    linear_weight: Tensor, activations: Tensor, target: Tensor, method: str
) -> Tensor:
    """Channel weights ``(B, T, K)`` when the head is global-average-pool + linear.

    There ``g_kij = W[c, k] / Z`` is constant over space, so Grad-CAM's weights are ``W[c] / Z``,
    CAM's are ``W[c]``, and Grad-CAM++'s are ``Z * alpha_k * ReLU(g_k)`` with the scalar
    ``alpha_k = g_k^2 / (2 g_k^2 + (sum_ab A_kab) g_k^3)``. HiResCAM's element-wise
    ``sum_k g_k A_k`` is then Grad-CAM's map; XGrad-CAM's ``sum_ij A_kij g_k / sum_ab A_kab`` is
    ``g_k`` (0 where the channel sums to 0); LayerCAM's ``sum_k ReLU(g_k) A_k`` is a weighted map
    with weights ``ReLU(W[c] / Z)``. No autograd call.
    """
    area = activations.shape[-2] * activations.shape[-1]
    valid = (target >= 0).to(linear_weight.dtype)[..., None]
    class_weights = linear_weight[target.clamp_min(0)] * valid  # (B, T, K)
    if method == "cam":
        return class_weights
    return constant_gradient_weights(class_weights / area, activations, method)


def constant_gradient_weights(grads: Tensor, activations: Tensor, method: str) -> Tensor:
    """Channel weights ``(B, T, K)`` when ``g_kij = grads[b, t, k]`` at every position ``(i, j)``.

    This holds for every head that starts with global average pooling, ``S = f(mean_ij A)``:
    ``g_kij = (1/Z) dS/dp_k`` with ``p = mean_ij A``. Grad-CAM's and HiResCAM's weights are then
    ``g_k``, XGrad-CAM's ``g_k`` (0 where the channel sums to 0), LayerCAM's ``ReLU(g_k)``, and
    Grad-CAM++'s ``Z * alpha_k * ReLU(g_k)`` with the scalar ``alpha_k = 1 / (2 + (sum_ab A_kab) g_k)``.
    """
    if method in ("gradcam", "hirescam"):
        return grads
    if method == "layercam":
        return F.relu(grads)
    area = activations.shape[-2] * activations.shape[-1]
    sums = activations.sum(dim=(-2, -1))[:, None, :]
    if method == "xgradcam":
        return grads * (sums != 0).to(grads.dtype)
    return area * gradcampp_alpha(grads, sums) * F.relu(grads)


# --------------------------------------------------------------------------- entry point
def _check_inputs(logits: Tensor, activations: Tensor, target: Tensor, method: str,
                  linear_weight: Tensor | None) -> None:
    if method not in METHODS:
        raise ValueError(f"Unknown explanation method '{method}'; choose one of {METHODS}")
    if activations.dim() != 4:
        raise ValueError(f"activations must be (B, K, h, w), got shape {tuple(activations.shape)}")
    if logits.dim() != 2 or logits.shape[0] != activations.shape[0]:
        raise ValueError(
            f"logits must be (B, C) with the activations' batch size {activations.shape[0]}, "
            f"got shape {tuple(logits.shape)}"
        )
    if target.dim() not in (1, 2) or target.shape[0] != logits.shape[0]:
        raise ValueError(f"target must be (B,) or (B, T), got shape {tuple(target.shape)}")
    if linear_weight is not None and (linear_weight.dim() != 2 or linear_weight.shape[1] != activations.shape[1]):
        raise ValueError(
            f"linear_weight must be (C, K) with K = {activations.shape[1]} activation channels, "
            f"got shape {tuple(linear_weight.shape)}"
        )
    if linear_weight is None and method != "cam" and not activations.requires_grad:
        raise ValueError(
            "activations do not require grad, so no gradient reaches them: compute them with "
            "autograd enabled (under Lightning: Trainer(inference_mode=False)), call "
            "activations.requires_grad_() before the head, or pass linear_weight for a "
            "global-average-pool + linear head"
        )
    if target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")


def explanation_maps(
    logits: Tensor,
    activations: Tensor,
    target: Tensor,
    method: str = "gradcampp",
    create_graph: bool = False,
    linear_weight: Tensor | None = None,
) -> Tensor:
    """Class-discriminative maps ``L^c`` (non-negative, unnormalised) for a batch.

    Args:
        logits: ``(B, C)`` pre-softmax scores, computed from ``activations``.
        activations: ``(B, K, h, w)`` explained-layer activations (needs a graph to ``logits``
            unless ``linear_weight`` is given).
        target: ``(B,)`` or ``(B, T)`` class indices; negative entries are padding.
        method: one of :data:`METHODS`: ``"gradcam"``, ``"gradcampp"``, ``"hirescam"``,
            ``"xgradcam"``, ``"layercam"`` or ``"cam"`` (needs ``linear_weight``).
        create_graph: keep the graph so the maps can be backpropagated (second order).
        linear_weight: ``(C, K)`` weight of a global-average-pool + linear head; enables the
            closed form (no autograd call; ``logits`` are then not used).

    Returns:
        ``(B, h, w)`` for a ``(B,)`` target, ``(B, T, h, w)`` for a ``(B, T)`` target.
    """
    _check_inputs(logits, activations, target, method, linear_weight)
    squeeze = target.dim() == 1
    target = target.long().reshape(target.shape[0], -1)
    if linear_weight is None and method == "cam":
        raise ValueError(
            "method='cam' needs a global-average-pool + linear head: pass linear_weight "
            "(the model's cam_linear.weight), or use 'gradcam'"
        )
    # Autocast off: the map arithmetic runs in float32 (float64 stays float64). The inner
    # gradient's backward ops, which autocast would otherwise also run in low precision, run
    # in the dtype of the head's forward pass (bf16 where the head ran under autocast).
    dtype = torch.promote_types(activations.dtype, torch.float32)
    with float32_region(activations):
        acts = activations.to(dtype)
        if linear_weight is not None:
            maps = weighted_maps(closed_form_weights(linear_weight.to(dtype), acts, target, method), acts)
        else:
            grads = class_gradients(logits, activations, target, create_graph).to(dtype)
            maps = gradient_maps(grads, acts, method)
    return maps[:, 0] if squeeze else maps
