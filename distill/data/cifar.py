"""CIFAR-10 and CIFAR-100 on ``torchvision.datasets.CIFAR10`` / ``CIFAR100`` (the python-pickle batches)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torchvision.datasets import CIFAR10, CIFAR100

from distill.data.base import BaseDataModule
from distill.data.on_device import hwc_to_chw
from distill.data.transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    cifar_train_transform,
    eval_transform,
)
from distill.download import download_timeout
from distill.errors import ConfigError, DataError, DistillError

CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]

# The fine labels, in the order of CIFAR-100's meta file (alphabetical).
CIFAR100_CLASSES = """
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can
castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin
elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster
man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck
pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk
skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger
tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm
""".split()

class CIFAR10DataModule(BaseDataModule):
    """CIFAR-10 (50,000 train / 10,000 test, 32x32 RGB, 10 classes).

    ``root`` is the folder that holds (or will hold) ``cifar-10-batches-py/``. With
    ``download=True`` :meth:`prepare_data` downloads it when missing; when the data is
    missing or corrupt and cannot be downloaded, a :class:`DataError` says where it looked
    and how to fix it.
    """

    dataset_class: type[CIFAR10] = CIFAR10
    title = "CIFAR-10"
    classes: list[str] = CIFAR10_CLASSES
    stats = (CIFAR10_MEAN, CIFAR10_STD)

    def __init__(
        self,
        root: str | Path = "data/cifar10",
        download: bool = True,
        *,
        name: str = "cifar10",
        num_classes: int | None = None,
        **common: Any,
    ):
        n = len(self.classes)
        if num_classes is None:
            num_classes = n
        if num_classes != n:
            raise ConfigError(
                f"{self.title} has {n} classes but data.num_classes={num_classes!r}; "
                f"set data.num_classes={n}"
            )
        super().__init__(name=name, num_classes=num_classes, **common)
        self.root = Path(root).expanduser().resolve()
        self.download = bool(download)
        self.image_size: tuple[int, int] = (32, 32)
        self.mean, self.std = self.stats
        self.class_names = list(self.classes)

    # -- errors --------------------------------------------------------------------------
    def _error(self, problem: str) -> DataError:
        ds = self.dataset_class
        files = ", ".join(name for name, _ in ds.train_list + ds.test_list) + ", " + ds.meta["filename"]
        return DataError(
            f"{self.title}: {problem}. Looked in {self.root} (expected "
            f"{self.root / ds.base_folder}/ with {files}). Fix: download {self.title} on a "
            f"machine with internet into {self.root} (torchvision creates {ds.base_folder}/ "
            f"there; data.download=true does it), or set data.root=DIR to the folder that "
            f"contains {ds.base_folder}/, or use an image-folder copy with "
            f"data=image_folder data.root=DIR"
        )

    def _missing_problem(self) -> str:
        folder = self.root / self.dataset_class.base_folder
        if folder.is_dir():
            return (
                f"{folder} exists but its files are missing or corrupt (md5 check failed; "
                f"delete that folder and download again)"
            )
        archive = self.root / self.dataset_class.filename
        if archive.is_file():
            return (
                f"the dataset is not extracted ({archive} exists: "
                f"data.download=true extracts it without downloading if its md5 is right)"
            )
        return "the dataset was not found"

    def _load(self, train: bool) -> CIFAR10:
        try:
            return self.dataset_class(str(self.root), train=train, download=False)
        except (RuntimeError, OSError, EOFError, ValueError) as e:
            # torchvision: "Dataset not found or corrupted" / "metadata file ... corrupted";
            # pickle/IO errors for truncated files that happened to pass no md5 check.
            problem = self._missing_problem()
            if not isinstance(e, RuntimeError):
                problem += f" ({type(e).__name__}: {e})"
            raise self._error(problem) from None

    def _load_both(self) -> tuple[CIFAR10, CIFAR10]:
        train_full = self._load(train=True)
        test_raw = self._load(train=False)
        if list(train_full.classes) != self.classes:
            raise self._error(
                f"{self.dataset_class.meta['filename']} lists classes {train_full.classes}, "
                f"not {self.title}'s {self.classes}"
            )
        return train_full, test_raw

    # -- Lightning hooks -----------------------------------------------------------------
    def prepare_data(self) -> None:
        probe = self.dataset_class.__new__(self.dataset_class)  # integrity check without loading the arrays
        probe.root = str(self.root)
        if probe._check_integrity():
            return
        if not self.download:
            raise self._error(
                self._missing_problem() + " and downloading is disabled (data.download=false)"
            )
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with download_timeout():
                probe.download()
        except DistillError:
            raise
        except Exception as e:  # urllib/socket/tarfile/md5 errors: never a deep traceback
            raise self._error(
                f"{self._missing_problem()} and the download failed ({type(e).__name__}: {e})"
            ) from None
        if not probe._check_integrity():
            raise self._error("the downloaded files failed the md5 check")

    def _build(self):
        train_full, test_raw = self._load_both()
        eval_tf = eval_transform(self.mean, self.std, self.image_size)
        train_tf = (
            cifar_train_transform(self.mean, self.std, self.image_size) if self.augment else eval_tf
        )
        test_raw.transform = eval_tf
        return train_full, train_tf, eval_tf, test_raw

    def _build_uint8(self):  # data.on_device=true: the arrays as they are stored, (N, 32, 32, 3) uint8
        train, test = self._load_both()
        return (hwc_to_chw(train.data), torch.as_tensor(train.targets), hwc_to_chw(test.data),
                torch.as_tensor(test.targets))


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (50,000 train / 10,000 test, 32x32 RGB, 100 fine-label classes): the same
    augmentation as CIFAR-10 with CIFAR-100's own mean/std. ``root`` holds (or will hold)
    ``cifar-100-python/``."""

    dataset_class = CIFAR100
    title = "CIFAR-100"
    classes = CIFAR100_CLASSES
    stats = (CIFAR100_MEAN, CIFAR100_STD)

    def __init__(self, root: str | Path = "data/cifar100", download: bool = True, *, name: str = "cifar100",
                 **kwargs: Any):
        super().__init__(root, download, name=name, **kwargs)
