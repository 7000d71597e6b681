"""Networks by name, all behind one contract (``distill.models.contract.Network``).

``build_model("wrn40_2", 10)``, ``build_model("resnet8x4", 100)`` (the CIFAR zoo of the KD benchmarks,
docs/cifar100.md), ``build_model("timm", 100, arch="convnext_atto")``,
``build_model("torchvision", 1000, arch="resnet34", weights="IMAGENET1K_V1")``; ``register_model``
adds your own factory ``f(num_classes, **options)``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from distill.errors import ConfigError
from distill.models.adapters import SplitNetwork, TimmNetwork, timm_network, torchvision_network
from distill.models.cifar_resnet import (
    CifarResNet,
    resnet8,
    resnet8x4,
    resnet14,
    resnet20,
    resnet32,
    resnet32x4,
    resnet44,
    resnet56,
    resnet110,
)
from distill.models.cifar_vgg import CifarVGG, vgg8, vgg11, vgg13, vgg16_cifar, vgg19
from distill.models.contract import (
    Network,
    NetworkSpec,
    eval_mode,
    map_head,
    map_logits,
    require_network,
)
from distill.models.mobilenetv2 import MobileNetV2, mobilenetv2
from distill.models.shufflenet import ShuffleNet, shufflenetv1, shufflenetv2
from distill.models.vgg import VGG, vgg11_student, vgg16
from distill.models.wrn import WideResNet, wrn16_1, wrn16_2, wrn40_2

BUILD_ATTRIBUTE = "distill_build"  # what build_model was called with, kept on the network

MODELS: dict[str, Callable[..., nn.Module]] = {
    "wrn16_1": wrn16_1,
    "wrn16_2": wrn16_2,
    "wrn40_2": wrn40_2,
    "vgg16": vgg16,
    "vgg11_student": vgg11_student,
    # The CIFAR zoo of the KD benchmarks (RepDistiller's names; its CIFAR vgg16 is vgg16_cifar here).
    "resnet8": resnet8,
    "resnet14": resnet14,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet8x4": resnet8x4,
    "resnet32x4": resnet32x4,
    "vgg8": vgg8,
    "vgg11": vgg11,
    "vgg13": vgg13,
    "vgg16_cifar": vgg16_cifar,
    "vgg19": vgg19,
    "mobilenetv2": mobilenetv2,
    "shufflenetv1": shufflenetv1,
    "shufflenetv2": shufflenetv2,
    "timm": timm_network,
    "torchvision": torchvision_network,
}


def register_model(name: str):
    """Decorator: make a model factory ``f(num_classes, **options)`` buildable by name."""

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS[name] = factory
        return factory

    return wrap


# Keys of a teacher / student config node that are not options of the model factory.
RUN_KEYS = ("name", "checkpoint", "compile", "as_is")


def model_options(node: dict, weights_from_checkpoint: bool = False) -> dict:
    """The factory options of a ``teacher`` / ``student`` config node. With
    ``weights_from_checkpoint`` no pretrained weights are fetched (the checkpoint has them)."""
    options = {k: v for k, v in node.items() if k not in RUN_KEYS}
    if weights_from_checkpoint:
        options.update({k: False if k == "pretrained" else None for k in ("pretrained", "weights") if k in options})
    return options


def build_model(name: str, num_classes: int, **options) -> nn.Module:
    """Build the registered network ``name`` with a ``num_classes``-way head."""
    if name not in MODELS:
        raise ConfigError(f"unknown model '{name}'; registered models: {', '.join(sorted(MODELS))}")
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    model = MODELS[name](num_classes=num_classes, **options)
    object.__setattr__(model, BUILD_ATTRIBUTE, {"name": name, "num_classes": num_classes, **options})
    return model


def build_spec(model: nn.Module) -> dict | None:
    """The ``build_model`` arguments that made ``model`` (``name``, ``num_classes``, options), or
    None for a network built otherwise: what a checkpoint records to rebuild it."""
    spec = getattr(model, BUILD_ATTRIBUTE, None)
    return dict(spec) if spec is not None else None


__all__ = [
    "BUILD_ATTRIBUTE",
    "MODELS",
    "CifarResNet",
    "CifarVGG",
    "MobileNetV2",
    "ShuffleNet",
    "VGG",
    "Network",
    "NetworkSpec",
    "SplitNetwork",
    "TimmNetwork",
    "WideResNet",
    "build_model",
    "build_spec",
    "eval_mode",
    "map_head",
    "map_logits",
    "model_options",
    "register_model",
    "require_network",
]
