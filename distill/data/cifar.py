"""CIFAR-10 on ``torchvision.datasets.CIFAR10`` (the python-pickle batches)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import torch
from torchvision.datasets import CIFAR10

from distill.data.base import BaseDataModule
from distill.data.on_device import hwc_to_chw
from distill.data.transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    cifar_train_transform,
    eval_transform,
)
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

# torchvision's downloader calls urlopen without a timeout; behind a firewall that drops
# packets that would block for minutes. Each socket operation gets this many seconds.
DOWNLOAD_TIMEOUT_S = 30.0


class CIFAR10DataModule(BaseDataModule):
    """CIFAR-10 (50,000 train / 10,000 test, 32x32 RGB, 10 classes).

    ``root`` is the folder that holds (or will hold) ``cifar-10-batches-py/``. With
    ``download=True`` :meth:`prepare_data` downloads it when missing; when the data is
    missing or corrupt and cannot be downloaded, a :class:`DataError` says where it looked
    and how to fix it.
    """

    def __init__(
        self,
        root: str | Path = "data/cifar10",
        download: bool = True,
        *,
        name: str = "cifar10",
        num_classes: int = 10,
        **common: Any,
    ):
        if num_classes != 10:
            raise ConfigError(
                f"CIFAR-10 has 10 classes but data.num_classes={num_classes!r}; "
                f"set data.num_classes=10"
            )
        super().__init__(name=name, num_classes=num_classes, **common)
        self.root = Path(root).expanduser().resolve()
        self.download = bool(download)
        self.image_size: tuple[int, int] = (32, 32)
        self.mean = CIFAR10_MEAN
        self.std = CIFAR10_STD
        self.class_names = list(CIFAR10_CLASSES)

    # -- errors --------------------------------------------------------------------------
    def _error(self, problem: str) -> DataError:
        return DataError(
            f"CIFAR-10: {problem}. Looked in {self.root} (expected "
            f"{self.root / CIFAR10.base_folder}/ with data_batch_1..5, test_batch, "
            f"batches.meta). Fix: download CIFAR-10 on a machine with internet into "
            f"{self.root} (torchvision creates {CIFAR10.base_folder}/ there; "
            f"data.download=true does it), or set data.root=DIR to the folder that contains "
            f"{CIFAR10.base_folder}/, or use an image-folder copy with "
            f"data=image_folder data.root=DIR"
        )

    def _missing_problem(self) -> str:
        folder = self.root / CIFAR10.base_folder
        if folder.is_dir():
            return (
                f"{folder} exists but its files are missing or corrupt (md5 check failed; "
                f"delete that folder and download again)"
            )
        if (self.root / CIFAR10.filename).is_file():
            return (
                f"the dataset is not extracted ({self.root / CIFAR10.filename} exists: "
                f"data.download=true extracts it without downloading if its md5 is right)"
            )
        return "the dataset was not found"

    def _load(self, train: bool) -> CIFAR10:
        try:
            return CIFAR10(str(self.root), train=train, download=False)
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
        if list(train_full.classes) != CIFAR10_CLASSES:
            raise self._error(
                f"batches.meta lists classes {train_full.classes}, not CIFAR-10's {CIFAR10_CLASSES}"
            )
        return train_full, test_raw

    # -- Lightning hooks -----------------------------------------------------------------
    def prepare_data(self) -> None:
        probe = CIFAR10.__new__(CIFAR10)  # integrity check without loading the arrays
        probe.root = str(self.root)
        if probe._check_integrity():
            return
        if not self.download:
            raise self._error(
                self._missing_problem() + " and downloading is disabled (data.download=false)"
            )
        old_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe.download()
        except DistillError:
            raise
        except Exception as e:  # urllib/socket/tarfile/md5 errors: never a deep traceback
            raise self._error(
                f"{self._missing_problem()} and the download failed ({type(e).__name__}: {e})"
            ) from None
        finally:
            socket.setdefaulttimeout(old_timeout)
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
