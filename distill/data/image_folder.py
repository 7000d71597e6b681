"""An image-folder tree ``root/{train,test}/<class>/*.jpg`` on ``torchvision.datasets.ImageFolder``.

Class indices follow the sorted class-folder names (ImageFolder's rule); for the CIFAR-10
JPEG copy (``cifar10-jpeg/``) that order equals CIFAR-10's label order.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from torchvision.datasets import ImageFolder

from distill.data.base import BaseDataModule
from distill.data.on_device import images_to_uint8
from distill.data.transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    cifar_train_transform,
    eval_transform,
    to_size,
    to_stats,
)
from distill.errors import ConfigError, DataError

LAYOUT = "ROOT/train/<class>/*.jpg and ROOT/test/<class>/*.jpg (one folder per class)"


def load_rgb(path: str) -> Image.Image:
    """PIL loader that turns an unreadable file into a DataError naming it."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except OSError as e:  # includes PIL.UnidentifiedImageError
        raise DataError(f"cannot read image {path} ({e}); remove or replace the file") from None


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


class ImageFolderDataModule(BaseDataModule):
    """Train/test image folders; validation is the test split or a held-out part of train."""

    def __init__(
        self,
        root: str | Path,
        image_size: int | Sequence[int] = 32,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        *,
        name: str = "image_folder",
        num_classes: int,
        **common: Any,
    ):
        super().__init__(name=name, num_classes=num_classes, **common)
        try:
            self.image_size: tuple[int, int] = to_size(image_size)
            self.mean = to_stats(mean, "mean")
            self.std = to_stats(std, "std")
        except ValueError as e:
            raise ConfigError(f"data.{e}") from None
        self.root = Path(root).expanduser().resolve()
        self.class_names = None  # known after setup()/prepare_data()

    def _error(self, problem: str) -> DataError:
        return DataError(
            f"image folder: {problem}. Expected the layout {LAYOUT} with ROOT={self.root}; "
            f"fix the folder or set data.root=DIR"
        )

    def _check_layout(self) -> list[str]:
        """Check the tree without reading images; return the class names."""
        if not self.root.is_dir():
            raise self._error(f"{self.root} does not exist or is not a folder")
        classes: dict[str, list[str]] = {}
        for split in ("train", "test"):
            split_dir = self.root / split
            if not split_dir.is_dir():
                raise self._error(f"{split_dir} is missing")
            classes[split] = _class_dirs(split_dir)
            if not classes[split]:
                raise self._error(f"{split_dir} has no class folders")
        if classes["train"] != classes["test"]:
            only_train = sorted(set(classes["train"]) - set(classes["test"]))
            only_test = sorted(set(classes["test"]) - set(classes["train"]))
            raise self._error(
                f"train/ and test/ have different class folders (only in train: "
                f"{only_train or 'none'}; only in test: {only_test or 'none'})"
            )
        names = classes["train"]
        if len(names) != self.num_classes:
            raise ConfigError(
                f"{self.root / 'train'} has {len(names)} class folders ({', '.join(names)}) "
                f"but data.num_classes={self.num_classes}; set data.num_classes={len(names)}"
            )
        return names

    def _folder(self, split: str) -> ImageFolder:
        split_dir = self.root / split
        try:
            return ImageFolder(str(split_dir), loader=load_rgb)
        except FileNotFoundError as e:  # "Found no valid file for the classes ..."
            raise self._error(f"{split_dir}: {e}") from None

    def prepare_data(self) -> None:
        self.class_names = self._check_layout()

    def _build(self):
        self.class_names = self._check_layout()
        train_full = self._folder("train")
        test = self._folder("test")
        eval_tf = eval_transform(self.mean, self.std, self.image_size)
        train_tf = (
            cifar_train_transform(self.mean, self.std, self.image_size) if self.augment else eval_tf
        )
        test.transform = eval_tf
        return train_full, train_tf, eval_tf, test

    def _build_uint8(self):  # data.on_device=true: every image decoded once, resized to image_size
        self.class_names = self._check_layout()
        train_x, train_y = images_to_uint8(self._folder("train"), self.image_size)
        test_x, test_y = images_to_uint8(self._folder("test"), self.image_size)
        return train_x, train_y, test_x, test_y
