"""A shortcut benchmark: a class-coded cue stamped into the distillation images.

``data.shortcut.p`` (null: off) stamps a small square of a class's colour into the top-left
corner of a training image of that class, with probability ``p`` per image. The cue is drawn on
the normalised tensor *after* augmentation, so a crop or flip never moves it. Which training
images carry it is fixed per image (its index in the full training set) by ``data.subset_seed``:
the same images in every epoch and for every training seed, like a spurious feature of the data
set itself (a Waterbirds background), whatever subset (``data.per_class``) is drawn.

The test set is evaluated twice: clean, and with a *conflicting* cue, every image stamped with
the cue of another class (also fixed by ``data.subset_seed``). The teacher trains on clean
images (``distill.teacher``). The colours are evenly spaced hues at full saturation and value;
the square is ``size`` pixels at 32 pixels, scaled with the image.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from distill.errors import ConfigError

CUE_SEED_OFFSET = 7_919  # the cue's draws never reuse the few-shot draw's stream (same subset_seed)


@dataclass(frozen=True)
class Shortcut:
    """The cue of ``num_classes`` classes on images of ``image_size`` ``(H, W)`` normalised by ``mean`` / ``std``."""

    p: float
    size: int
    num_classes: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    seed: int = 0

    @classmethod
    def from_config(cls, node: dict[str, Any] | None, **data: Any) -> Shortcut | None:
        """The ``data.shortcut`` node ``{p, size}``, or None when it is absent or ``p`` is null."""
        if node is None or node.get("p") is None:
            return None
        unknown = sorted(set(node) - {"p", "size"})
        if unknown:
            raise ConfigError(f"data.shortcut has unknown keys {unknown}; it takes p and size")
        p, size = node["p"], node.get("size", 4)
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p <= 1:
            raise ConfigError(f"data.shortcut.p must be a probability in [0, 1] (or null: off), got {p!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"data.shortcut.size must be an integer >= 1 (pixels at 32 px), got {size!r}")
        return cls(p=float(p), size=size, **data)

    @property
    def side(self) -> int:
        """The square's side in pixels: ``size`` at 32 pixels, scaled with the image's shorter side."""
        return max(1, min(min(self.image_size), round(self.size * min(self.image_size) / 32)))

    def box(self) -> Tensor:
        """``(4,)`` int64 ``(y0, x0, y1, x1)``, end exclusive: where the cue is drawn (the top-left square)."""
        return torch.tensor([0, 0, self.side, self.side])

    def colours(self) -> Tensor:
        """``(C, 3)`` pixel colours in ``[0, 1]``: evenly spaced hues."""
        return torch.tensor([colorsys.hsv_to_rgb(c / self.num_classes, 1.0, 1.0) for c in range(self.num_classes)])

    @cached_property
    def normalised_colours(self) -> Tensor:
        """``(C, 3)``: :meth:`colours` as the normalised tensors hold them."""
        return (self.colours() - torch.tensor(self.mean)) / torch.tensor(self.std)

    def generator(self, offset: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 2 + CUE_SEED_OFFSET + offset)

    def present(self, n: int) -> Tensor:
        """``(n,)`` bool: which of the ``n`` training images (full-set indices) carry the cue."""
        return torch.rand(n, generator=self.generator(0)) < self.p

    def conflicting(self, labels: Sequence[int] | Tensor) -> Tensor:
        """``(n,)`` int64: for every test image a cue class other than its label (uniform over the others)."""
        labels = torch.as_tensor(labels, dtype=torch.long)
        shift = torch.randint(1, self.num_classes, labels.shape, generator=self.generator(1))
        return (labels + shift) % self.num_classes

    def stamp(self, images: Tensor, cue: Tensor, present: Tensor | None = None) -> Tensor:
        """``images`` ``(B, 3, H, W)`` normalised, with the square of class ``cue`` ``(B,)`` drawn where
        ``present`` ``(B,)`` (all if None). Returns a new tensor."""
        colours = self.normalised_colours.to(images)[cue.to(images.device)]  # (B, 3)
        square = colours[:, :, None, None].expand(-1, -1, self.side, self.side)
        out = images.clone()
        corner = out[:, :, : self.side, : self.side]
        keep = torch.ones(len(images), dtype=torch.bool, device=images.device) if present is None else present
        out[:, :, : self.side, : self.side] = torch.where(keep.to(images.device)[:, None, None, None], square, corner)
        return out


    def stamp_one(self, image: Tensor, cue: int) -> Tensor:
        """One ``(3, H, W)`` normalised image with the square of class ``cue`` drawn (a new tensor)."""
        out = image.clone()
        out[:, : self.side, : self.side] = self.normalised_colours[cue].to(out)[:, None, None]
        return out


class StampedTraining(Dataset):
    """``dataset`` (items ``(image tensor (3, H, W), label)``, after augmentation) with the cue of the
    label stamped into the items whose full-set index ``base_index[i]`` has ``present`` True."""

    def __init__(self, dataset: Dataset, shortcut: Shortcut, present: Tensor, base_index: Sequence[int]):
        self.dataset, self.shortcut = dataset, shortcut
        self.present = present[torch.as_tensor(list(base_index), dtype=torch.long)]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image, label = self.dataset[i]
        if self.present[i]:
            image = self.shortcut.stamp_one(torch.as_tensor(image), int(label))
        return image, label


class ConflictingCue(Dataset):
    """``dataset`` (evaluation items ``(image, label)``) with every image stamped with the cue of
    another class: items ``(image, label, cue class, cue box (4,))`` (:meth:`Shortcut.box`)."""

    def __init__(self, dataset: Dataset, shortcut: Shortcut, labels: Sequence[int]):
        self.dataset, self.shortcut = dataset, shortcut
        self.targets = [int(c) for c in labels]  # what distill.data.base.dataset_labels reads
        self.cue = shortcut.conflicting(self.targets)  # per image of dataset, whatever order it is read in

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int, Tensor]:
        image, label = self.dataset[i][:2]
        cue = int(self.cue[i])
        return self.shortcut.stamp_one(torch.as_tensor(image), cue), int(label), cue, self.shortcut.box()


__all__ = ["ConflictingCue", "Shortcut", "StampedTraining"]
