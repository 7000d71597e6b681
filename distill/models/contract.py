"""The model contract: what the trainer needs of a network, and what it finds out about its head.

Every teacher and student follows ``Network``: ``num_classes``, ``forward_features(x) -> (B, K, h, w)``
(the explained layer, channels first) and ``forward_head(a) -> (B, C)`` (timm's convention). The
optional capabilities are declared, not probed with ``getattr`` at every call:

- ``forward_stages(x) -> (features, [stage outputs (B, K_i, h_i, w_i)])``: stage outputs for
  attention transfer (WRN groups, timm ``forward_intermediates``).
- ``map_head(a) -> (B, C)``: a deterministic head for maps (dropout off). Without it, a head whose
  train-mode output is random (dropout) or batch-dependent (BatchNorm) is run in eval mode for maps.

What the head does with the features is *measured* once per model by ``inspect_network`` on a
random batch, never assumed from the class: whether it pools first (``head(A) == head(mean_ij A)``,
so ``dS/dA`` is the same at every position and maps follow from the gradient w.r.t. the pooled
vector, Grad-CAM++ paper eq. 19 with a constant gradient), whether that pooled head is one linear
layer (closed form, no autograd call), and whether its train mode is deterministic. The chosen
path is checked against the general autograd path on the same batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from distill.errors import ConfigError

MapPath = Literal["linear", "pooled", "general"]
_CONTRACT_ATTRIBUTE = "distill_spec"  # the attribute that holds what inspect_network measured


@runtime_checkable
class Network(Protocol):
    """What every teacher and student provides (timm's ``forward_features`` / ``forward_head``)."""

    num_classes: int

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W) -> (B, K, h, w)``: the explained layer, channels first."""

    def forward_head(self, a: Tensor) -> Tensor:
        """``(B, K, h, w) -> (B, C)`` logits."""


@dataclass(frozen=True)
class NetworkSpec:
    """What ``inspect_network`` measured about a network's head.

    ``path``: how maps are computed. ``"linear"``: global average pool then one linear layer
    (``linear``): maps in closed form, no autograd call. ``"pooled"``: global average pool then
    anything: one autograd call through the head from the pooled ``(B, K)`` vector.
    ``"general"``: the gradient ``(B, T, K, h, w)`` w.r.t. the explained activations.
    ``deterministic_head``: the head gives the same logits in train and eval mode, so the
    training logits can be differentiated for maps as they are.
    """

    path: MapPath
    deterministic_head: bool
    linear_name: str | None = None  # the ``nn.Linear`` of a ``"linear"`` head, by module name

    def linear(self, model: nn.Module) -> nn.Linear:
        return model.get_submodule(self.linear_name)


def has_capability(model: nn.Module, name: str) -> bool:
    return callable(getattr(model, name, None))


def require_network(model: nn.Module, role: str, what: str, stages: bool = False) -> None:
    """Stop with one line when ``model`` lacks what the configured losses need."""
    missing = [name for name in ("forward_features", "forward_head") if not has_capability(model, name)]
    if stages and not has_capability(model, "forward_stages"):
        missing.append("forward_stages")
    if not isinstance(getattr(model, "num_classes", None), int):
        missing.append("num_classes")
    if missing:
        label = what if what == type(model).__name__ else f"{what}, {type(model).__name__}"
        raise ConfigError(
            f"the {role} ({label}) lacks {', '.join(missing)}: see 'Your own model' in "
            "the README for the model contract, or use teacher=/student=timm|torchvision"
        )


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode (dropout off, BN on running statistics), restored after."""
    training = [m for m in model.modules() if m.training]
    for m in training:
        m.training = False
    try:
        yield
    finally:
        for m in training:
            m.training = True


def map_head(model: nn.Module, features: Tensor) -> Tensor:
    """``(B, K, h, w) -> (B, C)``: the deterministic head that maps are differentiated through."""
    if has_capability(model, "map_head"):
        return model.map_head(features)
    spec = known_spec(model)
    if not model.training or (spec is not None and spec.deterministic_head):
        return model.forward_head(features)
    with eval_mode(model):
        return model.forward_head(features)


def map_logits(model: nn.Module, features: Tensor, logits: Tensor) -> Tensor:
    """The logits to differentiate for maps: ``logits`` if the head is deterministic in its
    current mode, else a deterministic head pass on ``features`` (e.g. VGG or timm dropout)."""
    if not model.training or network_spec(model).deterministic_head:
        return logits
    return map_head(model, features)


def pooled_head(model: nn.Module, pooled: Tensor) -> Tensor:
    """``(B, K) -> (B, C)`` for a pool-first head: global average pooling of a 1 x 1 map is the
    identity, so the head runs on ``pooled[..., None, None]`` (valid when ``path != "general"``)."""
    return map_head(model, pooled[:, :, None, None])


def known_spec(model: nn.Module) -> NetworkSpec | None:
    """The spec measured so far, or None before the first inspection."""
    return getattr(model, _CONTRACT_ATTRIBUTE, None)


def network_spec(model: nn.Module, features: Tensor | None = None) -> NetworkSpec:
    """The model's ``NetworkSpec``; inspected on first use from ``features`` ``(B, K, h, w)``
    (their shape only) when ``inspect_network`` was not called at build time."""
    spec = getattr(model, _CONTRACT_ATTRIBUTE, None)
    if spec is None:
        if features is None:
            raise ConfigError(f"{type(model).__name__} was not inspected: call distill.models.inspect_network first")
        check_map_features(model, features)
        spec = inspect_head(model, _random_like(_at_least_float32(features.detach())))
    return spec


# --------------------------------------------------------------------------- inspection
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
    from distill.explain.maps import float32_region
    from distill.explain.network import fast_path_agrees  # explain builds on this module

    with float32_region(features):
        path, linear_name = choose_path(model, features)
        spec = NetworkSpec(path, _deterministic_head(model, features), linear_name)
        if path != "general" and not fast_path_agrees(model, features, spec):
            spec = NetworkSpec("general", spec.deterministic_head)
    object.__setattr__(model, _CONTRACT_ATTRIBUTE, spec)
    return spec


def use_general_path(model: nn.Module, features: Tensor) -> NetworkSpec:
    """Measure ``model``'s head on ``features`` ``(B, K, h, w)``, then give it the general autograd path
    whatever its head allows (as ``explain.closed_form=false`` does for one call)."""
    spec = NetworkSpec("general", network_spec(model, features).deterministic_head)
    object.__setattr__(model, _CONTRACT_ATTRIBUTE, spec)
    return spec


def inspect_network(model: nn.Module, images: Tensor) -> NetworkSpec:
    """Check ``model`` against the contract on ``images`` ``(B>=2, 3, H, W)`` and inspect its head."""
    require_network(model, "network", type(model).__name__)
    with torch.no_grad(), eval_mode(model):
        features = model.forward_features(images)
    check_map_features(model, features)
    return inspect_head(model, _random_like(_at_least_float32(features)))


__all__ = [
    "MapPath",
    "Network",
    "NetworkSpec",
    "choose_path",
    "eval_mode",
    "has_capability",
    "inspect_network",
    "map_head",
    "map_logits",
    "network_spec",
    "inspect_head",
    "known_spec",
    "pooled_head",
    "require_network",
    "use_general_path",
]
