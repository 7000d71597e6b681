"""PASCAL VOC 2007 multi-label classification on ``torchvision.datasets.VOCDetection``.

Layout (what the official tars extract to, and what torchvision downloads)::

    <root>/VOCdevkit/VOC2007/JPEGImages/<id>.jpg
    <root>/VOCdevkit/VOC2007/Annotations/<id>.xml        (objects with name, difficult, bndbox)
    <root>/VOCdevkit/VOC2007/ImageSets/Main/{trainval,test}.txt

``trainval`` (5,011 images) trains, ``test`` (4,952) evaluates; validation uses the test split
unless ``val_split`` holds out part of trainval (as the CIFAR module does).

Targets are ``(20,)`` int64 vectors: ``1`` when the class has a non-difficult object in the
image, ``-1`` when it has only "difficult" ones (ignored in the loss and in AP, the VOC
convention), ``0`` otherwise. Training batches are ``(images, targets)``. Evaluation batches
are ``(images, targets, boxes, box_labels, box_difficult)``: the ground-truth boxes of every
object, in pixels of the transformed image, ``(B, Nmax, 4)`` xyxy float32 padded with zeros,
``(B, Nmax)`` int64 class indices padded with -1, ``(B, Nmax)`` bool difficult flags.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.datasets import VOCDetection
from torchvision.transforms import v2

from distill.data.base import BaseDataModule
from distill.data.image_folder import load_rgb
from distill.data.transforms import to_size
from distill.download import download_timeout
from distill.errors import ConfigError, DataError, DistillError

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
SPLITS = ("trainval", "test")
EVAL_RESIZE_RATIO = 256 / 224  # resize the shorter side to size * 256/224, then center-crop


@dataclass(frozen=True)
class VOCRecord:
    """One annotated image: multi-hot labels and every object's box (0-based pixel edges)."""

    image: str
    labels: Tensor  # (C,) int64 in {1, 0, -1}
    boxes: Tensor  # (N, 4) float32 xyxy: [xmin - 1, ymin - 1, xmax, ymax] of VOC's 1-based pixels
    box_labels: Tensor  # (N,) int64
    difficult: Tensor  # (N,) bool


def parse_annotation(path: str | Path, image: str, classes: Sequence[str] = VOC_CLASSES) -> VOCRecord:
    """Read one VOC annotation XML; a ``DataError`` names the file when it is broken."""
    index = {name: i for i, name in enumerate(classes)}
    try:
        root = ET.parse(path).getroot()
        boxes, box_labels, difficult = [], [], []
        for obj in root.iter("object"):
            name = obj.findtext("name", "").strip()
            if name not in index:
                raise ValueError(f"unknown class '{name}' (VOC classes: {', '.join(classes)})")
            bb = obj.find("bndbox")
            if bb is None:
                raise ValueError(f"object '{name}' has no bndbox")
            xmin, ymin, xmax, ymax = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            boxes.append([xmin - 1.0, ymin - 1.0, xmax, ymax])
            box_labels.append(index[name])
            difficult.append(obj.findtext("difficult", "0").strip() == "1")
    except (ET.ParseError, OSError, ValueError, TypeError) as err:
        raise DataError(
            f"VOC annotation {path} cannot be read ({type(err).__name__}: {err}); fix or replace it"
        ) from None
    box_labels_t = torch.tensor(box_labels, dtype=torch.int64)
    difficult_t = torch.tensor(difficult, dtype=torch.bool)
    labels = torch.zeros(len(classes), dtype=torch.int64)
    labels[box_labels_t[difficult_t]] = -1
    labels[box_labels_t[~difficult_t]] = 1  # one easy object makes the class a positive
    return VOCRecord(image, labels, torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), box_labels_t,
                     difficult_t)


class VOCMultiLabel(Dataset):
    """Images and targets of ``records``; with ``with_boxes`` also the transformed boxes."""

    def __init__(self, records: Sequence[VOCRecord], transform, with_boxes: bool) -> None:
        self.records = list(records)
        self.transform = transform
        self.with_boxes = with_boxes

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        rec = self.records[i]
        image = load_rgb(rec.image)
        if not self.with_boxes:
            return self.transform(image), rec.labels
        boxes = tv_tensors.BoundingBoxes(rec.boxes, format="XYXY", canvas_size=(image.height, image.width))
        image, boxes = self.transform(image, boxes)
        return image, rec.labels, boxes.as_subclass(Tensor), rec.box_labels, rec.difficult


def voc_collate(items: Sequence[tuple]) -> tuple[Tensor, ...]:
    """Stack images and targets; pad boxes to the batch's largest object count."""
    images = torch.stack([it[0] for it in items])
    labels = torch.stack([it[1] for it in items])
    if len(items[0]) == 2:
        return images, labels
    n = max(1, max(len(it[3]) for it in items))
    boxes = torch.zeros(len(items), n, 4, dtype=torch.float32)
    box_labels = torch.full((len(items), n), -1, dtype=torch.int64)
    difficult = torch.zeros(len(items), n, dtype=torch.bool)
    for b, it in enumerate(items):
        k = len(it[3])
        boxes[b, :k], box_labels[b, :k], difficult[b, :k] = it[2], it[3], it[4]
    return images, labels, boxes, box_labels, difficult


def voc_train_transform(size: tuple[int, int], mean, std) -> v2.Compose:
    """Random-resized crop to ``size`` + horizontal flip + ImageNet normalisation."""
    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(size, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])


def voc_eval_transform(size: tuple[int, int], mean, std) -> v2.Compose:
    """Resize the shorter side to ``size * 256/224`` + center crop ``size`` + normalisation;
    boxes (if given) follow the image and are clamped to it."""
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(round(min(size) * EVAL_RESIZE_RATIO), antialias=True),
        v2.CenterCrop(size),
        v2.ClampBoundingBoxes(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])


class VOC2007DataModule(BaseDataModule):
    """PASCAL VOC 2007 (20 classes) for multi-label classification: multi-hot targets ``(B, 20)``.

    ``root`` holds (or will hold) ``VOCdevkit/VOC2007``; with ``download=True``
    :meth:`prepare_data` fetches a missing split with torchvision. Evaluation batches also carry
    the boxes, ``(images, targets, boxes, box_labels, box_difficult)`` (:func:`voc_collate`).
    How the labels are trained and scored is the task's (``configs/task/multilabel*.yaml``).
    """

    multilabel = True

    def __init__(
        self,
        root: str | Path = "data/voc",
        download: bool = True,
        image_size: int | Sequence[int] = 224,
        *,
        name: str = "voc2007",
        num_classes: int = 20,
        **common: Any,
    ):
        if num_classes != len(VOC_CLASSES):
            raise ConfigError(
                f"PASCAL VOC has 20 classes but data.num_classes={num_classes!r}; set data.num_classes=20"
            )
        common.setdefault("batch_size", 32)
        super().__init__(name=name, num_classes=num_classes, **common)
        try:
            self.image_size: tuple[int, int] = to_size(image_size)
        except ValueError as e:
            raise ConfigError(f"data.{e}") from None
        self.root = Path(root).expanduser().resolve()
        self.download = bool(download)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.class_names = list(VOC_CLASSES)

    # -- layout and errors ----------------------------------------------------------------
    @property
    def voc_root(self) -> Path:
        return self.root / "VOCdevkit" / "VOC2007"

    def _error(self, problem: str) -> DataError:
        return DataError(
            f"PASCAL VOC 2007: {problem}. Looked in {self.root} (expected "
            f"{self.voc_root}/ with JPEGImages/, Annotations/ and ImageSets/Main/trainval.txt, test.txt). "
            f"Fix: download VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar on a machine with "
            f"internet and extract both into {self.root} (they create VOCdevkit/VOC2007/; "
            f"data.download=true does it), or set data.root=DIR to the folder that contains VOCdevkit/"
        )

    def missing(self, split: str) -> str | None:
        """What is missing for ``split`` (None when its files are in place)."""
        if not self.voc_root.is_dir():
            if (self.root / "JPEGImages").is_dir() or (self.root / "VOC2007").is_dir():
                return f"{self.voc_root} does not exist (data.root must be the folder that contains VOCdevkit/)"
            return f"{self.voc_root} does not exist"
        for sub in ("JPEGImages", "Annotations"):
            if not (self.voc_root / sub).is_dir():
                return f"{self.voc_root / sub} is missing"
        listing = self.voc_root / "ImageSets" / "Main" / f"{split}.txt"
        if not listing.is_file():
            return f"{listing} is missing (the {split} split is not there)"
        return None

    def prepare_data(self) -> None:
        for split in SPLITS:
            problem = self.missing(split)
            if problem is None:
                continue
            if not self.download:
                raise self._error(f"{problem}, and downloading is disabled (data.download=false)")
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                with download_timeout():
                    VOCDetection(str(self.root), year="2007", image_set=split, download=True)
            except DistillError:
                raise
            except Exception as e:  # urllib/socket/tarfile/md5 errors: never a deep traceback
                raise self._error(f"{problem}, and the download failed ({type(e).__name__}: {e})") from None
            if self.missing(split) is not None:
                raise self._error(f"{self.missing(split)} even after the download")

    def records(self, split: str) -> list[VOCRecord]:
        """Parse the annotations of ``split`` (checks that every listed image exists)."""
        problem = self.missing(split)
        if problem is not None:
            raise self._error(problem)
        try:
            dataset = VOCDetection(str(self.root), year="2007", image_set=split, download=False)
        except (RuntimeError, OSError) as e:
            raise self._error(f"torchvision cannot open the {split} split ({type(e).__name__}: {e})") from None
        if not dataset.images:
            raise self._error(f"ImageSets/Main/{split}.txt lists no images")
        out = []
        for image, annotation in zip(dataset.images, dataset.annotations, strict=True):
            if not Path(image).is_file():
                raise self._error(f"{image} (listed in ImageSets/Main/{split}.txt) is missing")
            if not Path(annotation).is_file():
                raise self._error(f"{annotation} (listed in ImageSets/Main/{split}.txt) is missing")
            out.append(parse_annotation(annotation, image, self.class_names))
        return out

    # -- Lightning hooks ------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        trainval, test = self.records("trainval"), self.records("test")
        eval_tf = voc_eval_transform(self.image_size, self.mean, self.std)
        if self.augment:
            train_tf = voc_train_transform(self.image_size, self.mean, self.std)
        else:  # the eval pipeline on the image alone
            train_tf = eval_tf
        train_idx, val_idx = self.split_indices(len(trainval))
        self.train_set = VOCMultiLabel([trainval[i] for i in train_idx], train_tf, with_boxes=False)
        self.test_set = VOCMultiLabel(test, eval_tf, with_boxes=True)
        self.val_set = (self.test_set if val_idx is None
                        else VOCMultiLabel([trainval[i] for i in val_idx], eval_tf, with_boxes=True))

    def _loader(self, dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
        """The base loaders (training: seeded from ``(seed, epoch)`` and resumable mid-epoch) with
        :func:`voc_collate`."""
        return super()._loader(dataset, batch_size, train, collate_fn=voc_collate)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VOC2007DataModule",
    "VOCMultiLabel",
    "VOCRecord",
    "VOC_CLASSES",
    "parse_annotation",
    "voc_collate",
    "voc_eval_transform",
    "voc_train_transform",
]
