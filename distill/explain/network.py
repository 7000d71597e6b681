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

from distill.errors import ConfigError
from distill.explain.maps import (
    class_gradients,
    closed_form_weights,
    constant_gradient_weights,
    explanation_maps,
    float32_region,
    weighted_maps,
)
from distill.explain.resolution import record_grid
from distill.models.contract import (
    CONTRACT_ATTRIBUTE,
    MapPath,
    NetworkSpec,
    eval_mode,
    map_head,
    map_logits,
    pooled_head,
    require_network,
)


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


# --------------------------------------------------------------------------- which path a head takes
def _close(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5 * (1 + b.abs().max().item()))


def _linear_candidate(model: nn.Module) -> str | None:
    """Name of the layer that a pool-then-linear head would end in: the model's last ``nn.Linear``."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


class _Head(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: Tensor) -> Tensor:
        return self.model.forward_head(features)


def _train_mode_head(model: nn.Module, features: Tensor) -> Tensor:
    """The train-mode head on ``features``, run on copies of the buffers: probing must not move
    BatchNorm statistics (nor bump their version inside a training step's graph)."""
    buffers = {f"model.{name}": b.clone() for name, b in model.named_buffers()}
    was_training = model.training
    model.train()
    try:
        return torch.func.functional_call(_Head(model), buffers, (features,))
    finally:
        model.train(was_training)


def _deterministic_head(model: nn.Module, features: Tensor) -> bool:
    """True if the train-mode head gives the eval-mode logits (no active dropout, no batch-stat BN)."""
    with torch.no_grad():
        train_logits = (_train_mode_head(model, features), _train_mode_head(model, features))
        eval_logits = map_head(model, features)
    return all(_close(t, eval_logits) for t in train_logits)


def check_map_features(model: nn.Module, features: Tensor) -> None:
    if features.dim() != 4:
        raise ConfigError(
            f"{type(model).__name__}.forward_features gives shape {tuple(features.shape)}, not a (B, K, h, w) map: "
            "token models (ViT, DeiT) have no spatial map to explain here: distill with CNN teachers and "
            "students, and train a ViT alone with stage=teacher|baseline"
        )


def _at_least_float32(features: Tensor) -> Tensor:
    return features.to(torch.promote_types(features.dtype, torch.float32))


def _random_like(features: Tensor) -> Tensor:
    """A random non-negative batch like ``features``, with per-sample differences in scale."""
    scale = torch.rand(features.shape[0], 1, 1, 1, dtype=features.dtype, device=features.device)
    return torch.randn_like(features).abs() * (0.5 + 2 * scale)


def choose_path(model: nn.Module, features: Tensor) -> tuple[MapPath, str | None]:
    """Measure whether the head pools first and whether it is pool + one linear layer."""
    with torch.no_grad():
        logits = map_head(model, features)
        pooled = features.mean(dim=(-2, -1))
        try:
            pooled_logits = pooled_head(model, pooled)
        except RuntimeError:  # e.g. a head with a 7 x 7 convolution (timm's VGG ConvMlp)
            return "general", None
        if not _close(pooled_logits, logits):
            return "general", None
        name = _linear_candidate(model)
        linear = model.get_submodule(name) if name is not None else None
        if linear is not None and linear.in_features == pooled.shape[1] and _close(linear(pooled), logits):
            return "linear", name
    return "pooled", None


def inspect_head(model: nn.Module, features: Tensor) -> NetworkSpec:
    """Measure ``model``'s head on random ``features`` ``(B>=2, K, h, w)``; store and return its spec.

    The chosen fast path is verified against the general autograd path on the same batch; a head
    whose fast path would differ gets the general path (never silently wrong).
    """
    with float32_region(features):
        path, linear_name = choose_path(model, features)
        spec = NetworkSpec(path, _deterministic_head(model, features), linear_name)
        if path != "general" and not fast_path_agrees(model, features, spec):
            spec = NetworkSpec("general", spec.deterministic_head)
    object.__setattr__(model, CONTRACT_ATTRIBUTE, spec)
    return spec


def use_general_path(model: nn.Module, features: Tensor) -> NetworkSpec:
    """Measure ``model``'s head on ``features`` ``(B, K, h, w)``, then give it the general autograd path
    whatever its head allows (as ``explain.closed_form=false`` does for one call)."""
    spec = NetworkSpec("general", network_spec(model, features).deterministic_head)
    object.__setattr__(model, CONTRACT_ATTRIBUTE, spec)
    return spec


def inspect_network(model: nn.Module, images: Tensor) -> NetworkSpec:
    """Check ``model`` against the contract on ``images`` ``(B>=2, 3, H, W)`` (the data's size) and
    inspect its head; the explained grid at that size is recorded (``distill.explain.resolution``)."""
    require_network(model, "network", type(model).__name__)
    with torch.no_grad(), eval_mode(model):
        features = model.forward_features(images)
    check_map_features(model, features)
    record_grid(model, features)
    return inspect_head(model, _random_like(_at_least_float32(features)))


def network_spec(model: nn.Module, features: Tensor | None = None) -> NetworkSpec:
    """The model's ``NetworkSpec``; inspected on first use from ``features`` ``(B, K, h, w)``
    (their shape only) when ``inspect_network`` was not called at build time."""
    spec = getattr(model, CONTRACT_ATTRIBUTE, None)
    if spec is None:
        if features is None:
            raise ConfigError(f"{type(model).__name__} was not inspected: call distill.explain.inspect_network first")
        check_map_features(model, features)
        record_grid(model, features)
        spec = inspect_head(model, _random_like(_at_least_float32(features.detach())))
    return spec


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
