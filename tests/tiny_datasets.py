"""Tiny data sets in the real on-disk formats, for tests: CIFAR-100's pickles and image-folder
trees (``train/<class>/*.jpg`` next to ``test/`` or, ImageNet-style, ``val/<wnid>/*.JPEG``)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

WNIDS = ["n01440764", "n01443537", "n01484850"]  # ImageNet's first three class folders


def write_cifar100(root: Path, n_train: int = 120, n_test: int = 40, seed: int = 0) -> dict[str, np.ndarray]:
    """``root/cifar-100-python/{train,test,meta}`` as torchvision's ``CIFAR100`` reads them:
    Python pickles with ``data`` (N, 3072) uint8, ``fine_labels``, ``coarse_labels`` and the
    ``fine_label_names`` / ``coarse_label_names`` meta. Returns the raw arrays."""
    from distill.data.cifar import CIFAR100_CLASSES

    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, n)]
        entry = {"filenames": [f"img_{i}.png" for i in range(n)], "batch_label": f"{split}ing batch 1 of 1",
                 "fine_labels": fine, "coarse_labels": [f // 5 for f in fine], "data": x}
        with open(folder / split, "wb") as f:
            pickle.dump(entry, f, 2)
        out[f"{split}_x"], out[f"{split}_y"] = x, np.array(fine)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": list(CIFAR100_CLASSES),
                     "coarse_label_names": [f"super_{i}" for i in range(20)]}, f, 2)
    return out


def write_image_tree(root: Path, classes=WNIDS, eval_split: str = "val", n_train: int = 4, n_eval: int = 2,
                     size: tuple[int, int] = (40, 48), suffix: str = ".JPEG", seed: int = 0) -> None:
    """``root/train/<class>/*`` and ``root/<eval_split>/<class>/*``: random JPEGs of ``size`` (h, w)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), (eval_split, n_eval)):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{c}_{i:05d}{suffix}", format="JPEG", quality=90)
