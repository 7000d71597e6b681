"""The model contract: what the trainer needs of a network, and what it finds out about its head.

Every teacher and student follows ``Network``: ``num_classes``, ``forward_features(x) -> (B, K, h, w)``
(the explained layer, channels first) and ``forward_head(a) -> (B, C)`` (timm's convention). The
optional capabilities are declared, not probed with ``getattr`` at every call:

- ``forward_stages(x) -> (features, [stage outputs (B, K_i, h_i, w_i)])``: stage outputs for
  attention transfer (WRN groups, timm ``forward_intermediates``).
- ``map_head(a) -> (B, C)``: a deterministic head for maps (dropout off). Without it, a head whose
  train-mode output is random (dropout) or batch-dependent (BatchNorm) is run in eval mode for maps.

What the head does with the features is *measured* once per model by
``distill.explain.inspect_network`` on a random batch, never assumed from the class: whether it
pools first (``head(A) == head(mean_ij A)``, so ``dS/dA`` is the same at every position and maps
follow from the gradient w.r.t. the pooled vector, Grad-CAM++ paper eq. 19 with a constant
gradient), whether that pooled head is one linear layer (closed form, no autograd call), and
whether its train mode is deterministic. The chosen path is checked against the general autograd
path on the same batch. The measurement is recorded on the model (``known_spec``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from torch import Tensor, nn

from distill.errors import ConfigError

MapPath = Literal["linear", "pooled", "general"]
CONTRACT_ATTRIBUTE = "distill_spec"  # the attribute that holds what the inspection measured


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
            f"the {role} ({label}) lacks {', '.join(missing)}: see docs/your_own_model.md "
            "for the model contract, or use teacher=/student=timm|torchvision"
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
    spec = known_spec(model)
    if not model.training or (spec is not None and spec.deterministic_head):
        return logits
    return map_head(model, features)


def pooled_head(model: nn.Module, pooled: Tensor) -> Tensor:
    """``(B, K) -> (B, C)`` for a pool-first head: global average pooling of a 1 x 1 map is the
    identity, so the head runs on ``pooled[..., None, None]`` (valid when ``path != "general"``)."""
    return map_head(model, pooled[:, :, None, None])


def known_spec(model: nn.Module) -> NetworkSpec | None:
    """The spec measured so far, or None before the first inspection."""
    return getattr(model, CONTRACT_ATTRIBUTE, None)


__all__ = [
    "MapPath",
    "Network",
    "NetworkSpec",
    "eval_mode",
    "has_capability",
    "map_head",
    "map_logits",
    "known_spec",
    "pooled_head",
    "require_network",
]
