"""Maps of a network that follows the model contract (``distill.models.contract``).

``explain_network`` is the one model-level entry point: the training step, validation, the
callbacks, evaluation and the pictures all get their maps from it. It picks the path that the
network's head allows (measured once by ``inspect_head``):

- ``"linear"`` (global average pool + one linear layer): closed form in the linear weights, no
  autograd call;
- ``"pooled"`` (global average pool, then anything): ``g_kij = (1/Z) dS/dp_k`` with ``p = mean_ij A``,
  so one autograd call through the head from the pooled ``(B, K)`` vector, never a
  ``(B, T, K, h, w)`` gradient;
- ``"general"``: the gradient w.r.t. the explained activations (``explanation_maps``).

Maps go through the deterministic head (dropout off; ``map_logits``), so a student's map in train
mode is not random.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distill.explain.maps import (
    class_gradients,
    closed_form_weights,
    constant_gradient_weights,
    explanation_maps,
    float32_region,
    weighted_maps,
)
from distill.models.contract import NetworkSpec, map_head, map_logits, network_spec, pooled_head


def _as_targets(target: Tensor) -> tuple[Tensor, bool]:
    squeeze = target.dim() == 1
    return target.long().reshape(target.shape[0], -1), squeeze


def _pooled_maps(model: nn.Module, features: Tensor, target: Tensor, method: str, create_graph: bool) -> Tensor:
    """``(B, T, h, w)`` maps of a pool-first head from ``dS/dp`` ``(B, T, K)``."""
    pooled = features.mean(dim=(-2, -1))
    if not pooled.requires_grad:  # a frozen teacher's features: the gradient starts at the pooled vector
        pooled = pooled.detach().requires_grad_(True)
    logits = pooled_head(model, pooled)
    area = features.shape[-2] * features.shape[-1]
    dtype = torch.promote_types(features.dtype, torch.float32)
    with float32_region(features):
        grads = class_gradients(logits, pooled, target, create_graph).to(dtype) / area
        acts = features.to(dtype)
        return weighted_maps(constant_gradient_weights(grads, acts, method), acts)


def _linear_maps(spec: NetworkSpec, model: nn.Module, features: Tensor, target: Tensor, method: str) -> Tensor:
    dtype = torch.promote_types(features.dtype, torch.float32)
    with float32_region(features):
        acts = features.to(dtype)
        weight = spec.linear(model).weight.to(dtype)
        return weighted_maps(closed_form_weights(weight, acts, target, method), acts)


def _maps(model: nn.Module, spec: NetworkSpec, path: str, features: Tensor, target: Tensor, method: str,
          logits: Tensor | None, create_graph: bool) -> Tensor:
    """``(B, T, h, w)`` maps by ``path`` for ``target`` ``(B, T)``."""
    with torch.enable_grad():
        if path == "linear":
            return _linear_maps(spec, model, features, target, method)
        if path == "pooled":
            return _pooled_maps(model, features, target, method, create_graph)
        if not features.requires_grad:  # features from a pass without a graph: the head runs on a leaf
            features, logits = features.detach().requires_grad_(True), None
        logits = map_logits(model, features, logits) if logits is not None else map_head(model, features)
        return explanation_maps(logits, features, target, method, create_graph)


def explain_network(
    model: nn.Module,
    features: Tensor,
    target: Tensor,
    method: str = "gradcampp",
    *,
    logits: Tensor | None = None,
    create_graph: bool = False,
    closed_form: bool = True,
) -> Tensor:
    """Maps ``(B, h, w)`` / ``(B, T, h, w)`` of ``model`` for ``target`` ``(B,)`` / ``(B, T)``.

    ``features`` ``(B, K, h, w)`` are ``model.forward_features(x)``: with a graph (the student's
    training step) or without one (then the head runs again on them as a leaf).
    ``logits``: the head's output on ``features`` if already computed (reused when the head is
    deterministic). ``create_graph``: differentiable maps (the student's). ``closed_form=False``
    forces the general path.
    """
    spec = network_spec(model, features)
    if method == "cam" and spec.path != "linear":
        raise ValueError("method='cam' needs a global-average-pool + linear head; use 'gradcam'")
    path = "linear" if method == "cam" else spec.path if closed_form else "general"
    targets, squeeze = _as_targets(target)
    maps = _maps(model, spec, path, features, targets, method, logits, create_graph)
    return maps[:, 0] if squeeze else maps


def fast_path_agrees(model: nn.Module, features: Tensor, spec: NetworkSpec, rtol: float = 1e-3) -> bool:
    """True if ``spec``'s fast path gives the general path's Grad-CAM and Grad-CAM++ maps on
    ``features`` ``(B, K, h, w)`` for random classes (checked once per model)."""
    num_classes = map_head(model, features).shape[1]
    target = torch.randint(0, num_classes, (features.shape[0], 2), device=features.device)
    leaf = features.detach().requires_grad_(True)
    for method in ("gradcam", "gradcampp"):
        fast = _maps(model, spec, spec.path, leaf, target, method, None, False).detach()
        general = _maps(model, spec, "general", leaf, target, method, None, False).detach()
        scale = general.abs().amax().clamp_min(1e-12).item()
        if not torch.allclose(fast, general, rtol=rtol, atol=rtol * scale):
            return False
    return True


# --------------------------------------------------------------------------- outside the training step
def leaf_features(model: nn.Module, x: Tensor) -> Tensor:
    """Features ``(B, K, h, w)`` of images ``x`` from a backbone pass without a graph, as a leaf
    that requires grad, so that maps work for any head, also for frozen models."""
    with torch.no_grad():
        features = model.forward_features(x)
    return features.detach().requires_grad_(True)


def head_maps(model: nn.Module, features: Tensor, target: Tensor, method: str) -> Tensor:
    """Detached maps from ``leaf_features``: several maps can come from one backbone pass."""
    return explain_network(model, features, target, method).detach()


def network_maps(model: nn.Module, x: Tensor, target: Tensor, method: str) -> Tensor:
    """Detached maps of ``model`` for ``target`` ``(B,)`` / ``(B, T)``, from images ``(B, 3, H, W)``.
    For callbacks and pictures, not the training step."""
    return head_maps(model, leaf_features(model, x), target, method)


def model_maps(model: nn.Module, logits: Tensor, activations: Tensor, target: Tensor, method: str = "gradcampp",
               create_graph: bool = False, closed_form: bool = True) -> Tensor:
    """``explain_network`` with the logits already computed from ``activations``."""
    return explain_network(model, activations, target, method, logits=logits, create_graph=create_graph,
                           closed_form=closed_form)
