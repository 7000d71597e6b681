"""An image-folder tree ``root/{train,test}/<class>/*.jpg`` on ``torchvision.datasets.ImageFolder``,
and ImageNet in its usual layout ``root/{train,val}/<wnid>/*.JPEG``.

Class indices follow the sorted class-folder names (ImageFolder's rule); for the CIFAR-10
JPEG copy (``cifar10-jpeg/``) that order equals CIFAR-10's label order. ``num_classes=None``
(the configs' default) counts the class folders; a given number must match them.
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
    IMAGENET_MEAN,
    IMAGENET_STD,
    cifar_train_transform,
    eval_transform,
    imagenet_eval_transform,
    imagenet_train_transform,
    to_size,
    to_stats,
)
from distill.errors import ConfigError, DataError


def load_rgb(path: str) -> Image.Image:
    """PIL loader that turns an unreadable or oversized file into a DataError naming it."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except OSError as e:  # includes PIL.UnidentifiedImageError
        raise DataError(f"cannot read image {path} ({e}); remove or replace the file") from None
    except Image.DecompressionBombError as e:  # PIL refuses images over 2 * Image.MAX_IMAGE_PIXELS pixels
        raise DataError(f"image {path} is too large to decode ({e}): resize it (the networks see data.image_size "
                        "pixels a side) or remove it") from None


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


class ImageFolderDataModule(BaseDataModule):
    """Train/test image folders; validation is the test split or a held-out part of train."""

    eval_split = "test"  # the folder next to train/ that evaluates (ImageNet: val/)

    def __init__(
        self,
        root: str | Path,
        image_size: int | Sequence[int] = 32,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        *,
        name: str = "image_folder",
        num_classes: int | None = None,
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

    @property
    def num_classes(self) -> int:
        """The given ``num_classes``, or (``None``) the number of class folders: a cheap scan
        of the folder names, no image read."""
        if self._num_classes is None:
            self._check_layout()
        return self._num_classes

    @num_classes.setter
    def num_classes(self, value: int | None) -> None:
        self._num_classes = value

    @property
    def layout(self) -> str:
        return (f"ROOT/train/<class>/*.jpg and ROOT/{self.eval_split}/<class>/*.jpg (one folder per class)")

    def _error(self, problem: str) -> DataError:
        return DataError(
            f"{self.name}: {problem}. Expected the layout {self.layout} with ROOT={self.root}; "
            f"fix the folder or set data.root=DIR"
        )

    def _check_layout(self) -> list[str]:
        """Check the tree without reading images; return the class names (and set
        ``num_classes`` from them when it was not given)."""
        if not self.root.is_dir():
            raise self._error(f"{self.root} does not exist or is not a folder")
        classes: dict[str, list[str]] = {}
        evaluated = self.eval_split
        for split in ("train", evaluated):
            split_dir = self.root / split
            if not split_dir.is_dir():
                raise self._error(f"{split_dir} is missing")
            classes[split] = _class_dirs(split_dir)
            if not classes[split]:
                raise self._error(f"{split_dir} has no class folders")
        if classes["train"] != classes[evaluated]:
            only_train = sorted(set(classes["train"]) - set(classes[evaluated]))
            only_eval = sorted(set(classes[evaluated]) - set(classes["train"]))
            raise self._error(
                f"train/ and {evaluated}/ have different class folders (only in train: "
                f"{only_train or 'none'}; only in {evaluated}: {only_eval or 'none'})"
            )
        names = classes["train"]
        if len(names) < 2:
            raise self._error(f"{self.root / 'train'} has one class folder ({names[0]}); "
                              "a classifier needs two or more")
        if self._num_classes is None:
            self._num_classes = len(names)
        elif len(names) != self._num_classes:
            shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            raise ConfigError(
                f"{self.root / 'train'} has {len(names)} class folders ({shown}) "
                f"but data.num_classes={self._num_classes}; set data.num_classes={len(names)} "
                f"or null (= count the folders)"
            )
        return names

    def train_transform(self):
        return cifar_train_transform(self.mean, self.std, self.image_size)

    def eval_transform(self):
        return eval_transform(self.mean, self.std, self.image_size)

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
        test = self._folder(self.eval_split)
        eval_tf = self.eval_transform()
        train_tf = self.train_transform() if self.augment else eval_tf
        test.transform = eval_tf
        return train_full, train_tf, eval_tf, test

    def _build_uint8(self):  # data.on_device=true: every image decoded once, resized to image_size
        self.class_names = self._check_layout()
        train_x, train_y = images_to_uint8(self._folder("train"), self.image_size)
        test_x, test_y = images_to_uint8(self._folder(self.eval_split), self.image_size)
        return train_x, train_y, test_x, test_y


class ImageNetDataModule(ImageFolderDataModule):
    """ImageNet (ILSVRC-2012) as ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG``
    (the validation images sorted into class folders, as torchvision's reference scripts expect).

    Training: random-resized crop ``image_size`` (224) + horizontal flip; evaluation: resize the
    shorter side to ``resize`` (256) + center crop ``image_size``; ImageNet mean/std. The
    number of classes is counted from the folders (1000 for the full set). Without
    ``augment``, training images get the evaluation transform.
    """

    eval_split = "val"

    def __init__(
        self,
        root: str | Path,
        image_size: int | Sequence[int] = 224,
        resize: int = 256,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        *,
        name: str = "imagenet",
        **common: Any,
    ):
        super().__init__(root, image_size, mean, std, name=name, **common)
        if isinstance(resize, bool) or not isinstance(resize, int) or resize < min(self.image_size):
            raise ConfigError(f"data.resize must be an integer >= image_size {self.image_size}, got {resize!r}")
        self.resize = resize

    def train_transform(self):
        return imagenet_train_transform(self.mean, self.std, self.image_size)

    def eval_transform(self):
        return imagenet_eval_transform(self.mean, self.std, self.image_size, self.resize)

    def _build_uint8(self):
        raise ConfigError(
            "data.on_device=true would decode every ImageNet image into device memory (1.28 M x 224 x 224 x 3 "
            "bytes = 193 GB, and no random-resized crop); set data.on_device=false"
        )
