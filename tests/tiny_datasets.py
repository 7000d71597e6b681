"""Tiny data sets in the real on-disk formats, for tests: CIFAR-100's pickles, image-folder
trees (``train/<class>/*.jpg`` next to ``test/`` or, ImageNet-style, ``val/<wnid>/*.JPEG``) and
PASCAL VOC 2007 trees (JPEGImages, Annotations XML with difficult flags, ImageSets/Main)."""

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


# --------------------------------------------------------------------------- PASCAL VOC 2007
COLOURS = {0: (255, 0, 0), 1: (0, 255, 0), 2: (0, 0, 255)}  # aeroplane, bicycle, bird


def write_voc_image(voc: Path, name: str, size: tuple[int, int], objects: list[tuple]) -> None:
    """``objects``: ``(class index, xmin, ymin, xmax, ymax, difficult)`` in VOC's 1-based pixels."""
    from distill.data.voc import VOC_CLASSES

    w, h = size
    img = np.full((h, w, 3), 40, dtype=np.uint8)
    xml = [f"<annotation><folder>VOC2007</folder><filename>{name}.jpg</filename>"
           f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>"]
    for c, x1, y1, x2, y2, difficult in objects:
        img[y1 - 1:y2, x1 - 1:x2] = COLOURS[c % 3]
        xml.append(f"<object><name>{VOC_CLASSES[c]}</name><pose>Unspecified</pose><truncated>0</truncated>"
                   f"<difficult>{difficult}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
                   f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")
    xml.append("</annotation>")
    Image.fromarray(img).save(voc / "JPEGImages" / f"{name}.jpg", quality=95)
    (voc / "Annotations" / f"{name}.xml").write_text("".join(xml))


def make_voc_tree(root: Path, n_trainval: int = 12, n_test: int = 8, seed: int = 0) -> Path:
    """``root/VOCdevkit/VOC2007`` with random coloured boxes of classes 0-2; every third object
    is difficult. Image 0 of trainval has a difficult-only bird. Returns the VOC2007 folder."""
    rng = np.random.default_rng(seed)
    voc = root / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    names: dict[str, list[str]] = {"trainval": [], "test": []}
    k = 0
    for split, n in (("trainval", n_trainval), ("test", n_test)):
        for _ in range(n):
            name = f"{k:06d}"
            if k == 0:
                objects = [(0, 3, 4, 30, 40, 0), (2, 40, 10, 70, 50, 1)]
            else:
                objects = []
                for j in range(int(rng.integers(1, 4))):
                    x1, y1 = int(rng.integers(1, 36)), int(rng.integers(1, 28))
                    x2, y2 = int(rng.integers(x1 + 8, 73)), int(rng.integers(y1 + 8, 57))
                    objects.append((int(rng.integers(0, 3)), x1, y1, x2, y2, int(j == 2)))
            write_voc_image(voc, name, (72, 56), objects)
            names[split].append(name)
            k += 1
    for split, ids in names.items():
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return voc
