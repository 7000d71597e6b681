"""A tiny learnable synthetic dataset for smoke runs and tests (no files needed).

Each class has a fixed random low-frequency colour template (a 4x4 grid of random values
upsampled bilinearly to ``image_size``); an image is its class template plus pixel noise,
mapped to ``[0, 1]`` "pixel" values and normalised with ``mean``/``std``. Everything is
drawn from one generator seeded with ``seed``, so the data is identical for equal seeds,
and a small network learns it within a few steps.

The ``num_val`` images form the test split; validation uses it too unless ``val_split``
holds out part of the training images. ``augment`` is accepted for interface
compatibility and has no effect (the images already carry noise).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from distill.data.base import BaseDataModule, _check_int
from distill.data.transforms import to_size
from distill.errors import ConfigError


class SyntheticDataModule(BaseDataModule):
    """``num_train`` / ``num_val`` images of ``num_classes`` noisy class templates."""

    def __init__(
        self,
        num_train: int = 256,
        num_val: int = 64,
        image_size: int | Sequence[int] = 32,
        noise: float = 0.5,
        *,
        name: str = "synthetic",
        num_classes: int = 10,
        **common: Any,
    ):
        common.setdefault("num_workers", 0)
        super().__init__(name=name, num_classes=num_classes, **common)
        self.num_train = _check_int(num_train, "num_train", 1)
        self.num_val = _check_int(num_val, "num_val", 1)
        try:
            self.image_size: tuple[int, int] = to_size(image_size)
        except ValueError as e:
            raise ConfigError(f"data.{e}") from None
        if not float(noise) >= 0:
            raise ConfigError(f"data.noise must be >= 0, got {noise!r}")
        self.noise = float(noise)
        self.mean = (0.5, 0.5, 0.5)
        self.std = (0.25, 0.25, 0.25)
        self.class_names = [f"class_{i}" for i in range(self.num_classes)]

    def prepare_data(self) -> None:
        pass

    def generate(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_train, y_train, x_val, y_val)``: normalised float32 images, int64 labels."""
        gen = torch.Generator().manual_seed(self.seed)
        h, w = self.image_size
        coarse = torch.randn(self.num_classes, 3, 4, 4, generator=gen)
        templates = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        templates = templates / templates.flatten(1).std(dim=1).clamp_min(1e-6)[:, None, None, None]
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)

        def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            labels = torch.arange(n) % self.num_classes  # balanced: every class appears
            labels = labels[torch.randperm(n, generator=gen)]
            noise = torch.randn(n, 3, h, w, generator=gen) * self.noise
            pixels = (0.5 + 0.25 * (templates[labels] + noise)).clamp(0.0, 1.0)
            return ((pixels - mean) / std).float(), labels.long()

        x_train, y_train = draw(self.num_train)
        x_val, y_val = draw(self.num_val)
        return x_train, y_train, x_val, y_val

    def _build(self):
        x_train, y_train, x_val, y_val = self.generate()
        return TensorDataset(x_train, y_train), None, None, TensorDataset(x_val, y_val)
