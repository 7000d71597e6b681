"""Model registry. Every network exposes ``forward_features`` / ``forward_head`` (timm style).

``forward_features(x) -> (B, K, h, w)`` are the activations that explanations are computed
on; ``forward_head(a) -> (B, C)`` are the logits; ``forward(x)`` chains the two. A model whose
head is global-average-pool + linear also exposes ``cam_linear`` (the ``nn.Linear``), which
lets the explanation maps be computed in closed form.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from distill.models.vgg import VGG, vgg11_student, vgg16
from distill.models.wrn import WideResNet, wrn16_1, wrn16_2, wrn28_10, wrn40_2

MODELS: dict[str, Callable[..., nn.Module]] = {
    "wrn16_1": wrn16_1,
    "wrn16_2": wrn16_2,
    "wrn28_10": wrn28_10,
    "wrn40_2": wrn40_2,
    "vgg16": vgg16,
    "vgg11_student": vgg11_student,
}


def register_model(name: str):
    """Decorator: make a model factory ``f(num_classes, **kwargs)`` buildable by name."""

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS[name] = factory
        return factory

    return wrap


def build_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build the registered network ``name`` with a ``num_classes``-way head."""
    if name not in MODELS:
        raise ValueError(f"Unknown model '{name}'. Registered models: {', '.join(sorted(MODELS))}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return MODELS[name](num_classes=num_classes, **kwargs)


def is_explainable(model: nn.Module) -> bool:
    """True if the model exposes ``forward_features`` and ``forward_head``."""
    return callable(getattr(model, "forward_features", None)) and callable(
        getattr(model, "forward_head", None)
    )


__all__ = ["MODELS", "VGG", "WideResNet", "build_model", "is_explainable", "register_model"]
