"""Image transforms: CIFAR-style training augmentation and the evaluation pipeline.

Both pipelines take a PIL image (or an HWC uint8 array) and return a normalised
``float32`` tensor of shape ``(3, H, W)``. They resize to ``size`` first; that is a no-op
for images already at ``size`` (CIFAR-10), so the same pipeline serves image folders whose
images have another size.

Training (the AT paper's protocol, Zagoruyko & Komodakis ICLR 2017; docs/method.md §5): random
crop with padding ``size / 8`` (4 pixels at 32x32, zero fill) and a random horizontal flip.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
# CIFAR-100's training-set statistics, as RepDistiller and mdistiller normalise.
CIFAR100_MEAN: tuple[float, float, float] = (0.5071, 0.4867, 0.4408)
CIFAR100_STD: tuple[float, float, float] = (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def to_size(size: int | Sequence[int]) -> tuple[int, int]:
    """``32`` or ``(32, 32)`` -> ``(32, 32)``; raises ``ValueError`` otherwise."""
    if isinstance(size, int) and not isinstance(size, bool):
        h = w = size
    else:
        try:
            h, w = (int(s) for s in size)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise ValueError(
                f"image_size must be an int or a pair (height, width), got {size!r}"
            ) from None
    if h < 1 or w < 1:
        raise ValueError(f"image_size must be positive, got {size!r}")
    return h, w


def to_stats(values: Sequence[float], what: str) -> tuple[float, float, float]:
    """Per-channel mean/std as a 3-tuple of floats (Hydra passes ListConfigs)."""
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(
            f"{what} must be 3 numbers (one per RGB channel), got {values!r}"
        ) from None
    if len(out) != 3:
        raise ValueError(f"{what} must be 3 numbers (one per RGB channel), got {values!r}")
    if what == "std" and any(v <= 0 for v in out):
        raise ValueError(f"std must be positive, got {values!r}")
    return out  # type: ignore[return-value]


def cifar_train_transform(
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    size: int | Sequence[int] = 32,
) -> v2.Compose:
    """Resize (no-op at ``size``) + padded random crop + horizontal flip + normalise."""
    h, w = to_size(size)
    padding = max(1, round(min(h, w) / 8))  # 4 pixels for 32x32
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize((h, w), antialias=True),
            v2.RandomCrop((h, w), padding=padding),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


def eval_transform(
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    size: int | Sequence[int] = 32,
) -> v2.Compose:
    """Resize (no-op at ``size``) + to float in [0, 1] + normalise."""
    h, w = to_size(size)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize((h, w), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


def imagenet_train_transform(
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    size: int | Sequence[int] = 224,
) -> v2.Compose:
    """The ImageNet training augmentation (torchvision's reference recipe): random-resized crop
    to ``size`` (scale 0.08-1, aspect 3/4-4/3) + horizontal flip + normalise."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(to_size(size), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


def imagenet_eval_transform(
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    size: int | Sequence[int] = 224,
    resize: int = 256,
) -> v2.Compose:
    """Resize the shorter side to ``resize`` (256) + center crop ``size`` (224) + normalise."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(int(resize), antialias=True),
            v2.CenterCrop(to_size(size)),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )
