"""LightningDataModules: CIFAR-10/100, image folders (ImageNet), VOC 2007 and a synthetic smoke-test set.

Each is built by ``hydra.utils.instantiate(cfg.data)`` from a flat config (configs/data/)
and yields ``(images float32 (B, 3, H, W) normalised, labels int64 (B,))`` batches
(VOC 2007: multi-hot ``(B, 20)`` targets, and the boxes in evaluation batches; see voc.py).
"""

from distill.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from distill.data.image_folder import ImageFolderDataModule, ImageNetDataModule
from distill.data.synthetic import SyntheticDataModule
from distill.data.voc import VOC2007DataModule

__all__ = [
    "CIFAR100DataModule",
    "CIFAR10DataModule",
    "ImageFolderDataModule",
    "ImageNetDataModule",
    "SyntheticDataModule",
    "VOC2007DataModule",
]
