"""Tests for distill.data: CIFAR-10 (tiny set in the real on-disk format), image folders,
the synthetic set and the Hydra data configs. All CPU, single-process, a few seconds."""

from __future__ import annotations

import pickle
import socket
import tarfile
import urllib.error
from pathlib import Path

import hydra.utils
import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar
from omegaconf import OmegaConf
from PIL import Image

from distill.data import CIFAR10DataModule, ImageFolderDataModule, SyntheticDataModule
from distill.download import DOWNLOAD_TIMEOUT_S
from distill.errors import ConfigError, DataError
from tests.support import REPO, SHARED_CIFAR

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # independent of distill.data.transforms
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
JPEG_TAR = SHARED_CIFAR
N_PER_BATCH = 20  # 5 train batches -> 100 train images
N_TEST = 40


# ----------------------------------------------------------------------------------------
# CIFAR-10
# ----------------------------------------------------------------------------------------
def _write_cifar(root: Path) -> dict[str, np.ndarray]:
    """Tiny CIFAR-10 in torchvision's on-disk format; returns the raw arrays.

    The real files are Python 2 pickles whose str keys load as str with
    ``encoding="latin1"`` (torchvision's choice); pickling str keys from Python 3 gives the
    same result on load.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_x, train_y = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (N_PER_BATCH, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, N_PER_BATCH)]
        train_x.append(x)
        train_y += y
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({"batch_label": f"training batch {i} of 5", "labels": y, "data": x}, f, 2)
    test_x = rng.integers(0, 256, (N_TEST, 3072), dtype=np.uint8)
    test_y = [int(v) for v in rng.integers(0, 10, N_TEST)]
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"batch_label": "testing batch 1 of 1", "labels": test_y, "data": test_x}, f, 2)
    names = ["airplane", "automobile", "bird", "cat", "deer"]
    names += ["dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(
            {"num_cases_per_batch": N_PER_BATCH, "label_names": names, "num_vis": 3072}, f, 2
        )
    return {
        "train_x": np.concatenate(train_x),
        "train_y": np.array(train_y),
        "test_x": test_x,
        "test_y": np.array(test_y),
    }


@pytest.fixture
def skip_md5(monkeypatch):
    """Our tiny files cannot match CIFAR-10's md5 sums (test-only bypass)."""
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)


@pytest.fixture
def cifar(tmp_path, skip_md5):
    root = tmp_path / "cifar10"
    raw = _write_cifar(root)
    return root, raw


def _cifar_dm(root, **kw) -> CIFAR10DataModule:
    kw = {"download": False, "batch_size": 8, "num_workers": 0, **kw}
    return CIFAR10DataModule(root, **kw)


def _normalise(x_uint8_chw: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(x_uint8_chw.astype(np.float32) / 255.0)
    mean = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(3, 1, 1)
    return (x - mean) / std


def test_cifar_batches_shapes_dtypes_normalisation(cifar):
    root, raw = cifar
    dm = _cifar_dm(root)
    assert (dm.name, dm.num_classes, dm.multilabel) == ("cifar10", 10, False)
    assert dm.image_size == (32, 32) and dm.mean == CIFAR10_MEAN and dm.std == CIFAR10_STD
    assert dm.class_names is not None and dm.class_names[0] == "airplane"
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == 5 * N_PER_BATCH and len(dm.test_set) == N_TEST
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        x, y = next(iter(loader))
        assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
        assert y.shape == (8,) and y.dtype == torch.int64
    # the test loader goes through a fixed (seeded) order of the test images, each normalised exactly
    order = dm.test_dataloader().dataset.indices
    assert sorted(order) == list(range(N_TEST))
    x, y = next(iter(dm.test_dataloader()))
    expected = _normalise(raw["test_x"][order[0]].reshape(3, 32, 32))
    torch.testing.assert_close(x[0], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x[0].mean(dim=(1, 2)), expected.mean(dim=(1, 2)), atol=1e-5, rtol=0)
    assert y.tolist() == raw["test_y"][order[:8]].tolist()
    # val_split = 0 validates on the test split; train drops the last incomplete batch
    assert dm.val_set is dm.test_set
    assert len(dm.train_dataloader()) == (5 * N_PER_BATCH) // 8


def test_cifar_train_augmentation_changes_images_keeps_shape(cifar):
    root, raw = cifar
    dm = _cifar_dm(root)
    dm.setup("fit")
    clean = _normalise(raw["train_x"][0].reshape(3, 32, 32))
    torch.manual_seed(0)
    views = [dm.train_set[0][0] for _ in range(8)]
    assert all(v.shape == (3, 32, 32) and v.dtype == torch.float32 for v in views)
    assert any(not torch.allclose(v, clean, atol=1e-5) for v in views)
    assert dm.train_set[0][1] == int(raw["train_y"][0])

    plain = _cifar_dm(root, augment=False)
    plain.setup("fit")
    torch.testing.assert_close(plain.train_set[0][0], clean, atol=1e-5, rtol=1e-5)


def test_cifar_val_split_disjoint_and_eval_transform(cifar):
    root, _ = cifar
    dm = _cifar_dm(root, val_split=0.2, seed=3)
    dm.setup("fit")
    n = 5 * N_PER_BATCH
    assert len(dm.val_set) == round(0.2 * n) and len(dm.train_set) == n - round(0.2 * n)
    train_idx, val_idx = set(dm.train_set.indices), set(dm.val_set.indices)
    assert not train_idx & val_idx and train_idx | val_idx == set(range(n))
    assert dm.val_set is not dm.test_set and len(dm.test_set) == N_TEST
    torch.testing.assert_close(dm.val_set[0][0], dm.val_set[0][0])  # no augmentation
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (8, 3, 32, 32) and y.dtype == torch.int64

    same = _cifar_dm(root, val_split=0.2, seed=3)
    same.setup()
    assert same.val_set.indices == dm.val_set.indices
    other = _cifar_dm(root, val_split=0.2, seed=4)
    other.setup()
    assert other.val_set.indices != dm.val_set.indices


def test_cifar_train_subset_reproducible(cifar):
    root, _ = cifar
    dm = _cifar_dm(root, train_subset=30, seed=1)
    dm.setup("fit")
    assert len(dm.train_set) == 30 and len(set(dm.train_set.indices)) == 30
    again = _cifar_dm(root, train_subset=30, seed=1)
    again.setup("fit")
    assert again.train_set.indices == dm.train_set.indices
    other = _cifar_dm(root, train_subset=30, seed=2)
    other.setup("fit")
    assert other.train_set.indices != dm.train_set.indices
    # subset of the non-held-out part when both are set
    both = _cifar_dm(root, train_subset=30, val_split=0.5, seed=1)
    both.setup("fit")
    assert len(both.train_set) == 30 and not set(both.train_set.indices) & set(both.val_set.indices)
    too_big = _cifar_dm(root, train_subset=1000)
    with pytest.raises(ConfigError, match="train_subset"):
        too_big.setup("fit")


def test_cifar_missing_without_download(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("download attempted although download=False")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", no_network)
    root = tmp_path / "nowhere" / "cifar10"
    dm = _cifar_dm(root, download=False)
    with pytest.raises(DataError) as info:
        dm.prepare_data()
    msg = str(info.value)
    assert str(root.resolve()) in msg and "data.root" in msg and "data.download=false" in msg
    assert not root.exists()  # nothing created when download is off
    with pytest.raises(DataError, match="not found"):
        dm.setup("fit")  # setup without prepare_data gives the same kind of error


def test_cifar_download_failure_is_one_clear_error(tmp_path, monkeypatch):
    seen = []

    def offline(*args, **kwargs):
        seen.append(socket.getdefaulttimeout())
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    root = tmp_path / "cifar10"
    dm = _cifar_dm(root, download=True)
    before = socket.getdefaulttimeout()
    with pytest.raises(DataError) as info:
        dm.prepare_data()
    msg = str(info.value)
    assert "download failed" in msg and "URLError" in msg and str(root.resolve()) in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__
    # the download ran under the short socket timeout, and the previous one is back after the failure
    assert seen == [DOWNLOAD_TIMEOUT_S] and socket.getdefaulttimeout() == before != DOWNLOAD_TIMEOUT_S


def test_cifar_corrupt_folder(tmp_path):
    root = tmp_path / "cifar10"
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in ["data_batch_1", "test_batch", "batches.meta"]:
        (folder / name).write_bytes(b"not a pickle")
    dm = _cifar_dm(root, download=False)
    with pytest.raises(DataError, match="corrupt") as info:
        dm.prepare_data()
    assert str(folder.resolve()) in str(info.value)
    with pytest.raises(DataError, match="corrupt"):
        dm.setup("fit")


def test_cifar_argument_checks(tmp_path):
    with pytest.raises(ConfigError, match="num_classes=10"):
        CIFAR10DataModule(tmp_path, num_classes=100)
    with pytest.raises(ConfigError, match="batch_size"):
        CIFAR10DataModule(tmp_path, batch_size=0)
    with pytest.raises(ConfigError, match="val_split"):
        CIFAR10DataModule(tmp_path, val_split=1.0)
    with pytest.raises(ConfigError, match="num_workers"):
        CIFAR10DataModule(tmp_path, num_workers=-1)
    dm = CIFAR10DataModule(tmp_path, batch_size=16)
    assert dm.eval_batch_size == 16


# ----------------------------------------------------------------------------------------
# Image folder
# ----------------------------------------------------------------------------------------
CLASSES = ["cat", "dog", "eel"]


def _write_tree(root: Path, classes=CLASSES, n_train=4, n_test=2, size=32) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i:04d}.jpg", quality=95)


def _folder_dm(root, **kw) -> ImageFolderDataModule:
    kw = {"num_classes": len(CLASSES), "batch_size": 4, "num_workers": 0, **kw}
    return ImageFolderDataModule(root, **kw)


def test_image_folder_loads(tmp_path):
    _write_tree(tmp_path)
    dm = _folder_dm(tmp_path)
    assert dm.class_names is None and dm.image_size == (32, 32)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.class_names == CLASSES
    assert len(dm.train_set) == 12 and len(dm.test_set) == 6
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    x, y = next(iter(dm.test_dataloader()))
    assert set(y.tolist()) == {0, 1, 2}  # the first batch holds every class, not 4 cats
    first = dm.test_dataloader().dataset.indices[0]  # the test loader's first image, a file of test/
    path, label = dm.test_set.samples[first]
    assert int(y[0]) == label
    pixels = np.asarray(Image.open(path).convert("RGB"))
    expected = _normalise(pixels.transpose(2, 0, 1).copy())
    torch.testing.assert_close(x[0], expected, atol=1e-5, rtol=1e-5)


def test_val_subset_covers_every_class_of_a_sorted_folder(tmp_path):
    _write_tree(tmp_path, n_test=6)  # test images sorted by class: 6 cats, 6 dogs, 6 eels
    first = next(iter(_folder_dm(tmp_path, eval_batch_size=6).val_dataloader()))[1]
    assert sorted(first.tolist()) == [0, 0, 1, 1, 2, 2]  # what limit_val_batches=1 validates on
    dm = _folder_dm(tmp_path, val_subset=6, seed=3, eval_batch_size=6)
    labels = torch.cat([y for _, y in dm.val_dataloader()])
    assert len(labels) == 6 and set(labels.tolist()) == {0, 1, 2}
    again = _folder_dm(tmp_path, val_subset=6, seed=3, eval_batch_size=6)
    assert again.validation_images().indices == dm.validation_images().indices
    assert len(dm.test_set) == 18 and len(dm.test_dataloader().dataset) == 18  # the test keeps every image
    with pytest.raises(ConfigError, match="val_subset=19 exceeds the 18"):
        _folder_dm(tmp_path, val_subset=19).val_dataloader()


def test_test_subset_covers_every_class_of_a_sorted_folder(tmp_path):
    _write_tree(tmp_path, n_test=6)  # 6 cats, 6 dogs, 6 eels, sorted by class on disk
    dm = _folder_dm(tmp_path, test_subset=9, seed=1, eval_batch_size=3)
    batches = [y.tolist() for _, y in dm.test_dataloader()]
    assert [sorted(b) for b in batches] == [[0, 1, 2]] * 3  # every batch: limit_test_batches is honest too
    again = _folder_dm(tmp_path, test_subset=9, seed=1)
    assert again.test_images().indices == dm.test_images().indices  # fixed by the seed
    assert len(set(dm.test_images().indices)) == 9
    whole = _folder_dm(tmp_path, seed=1).test_images().indices
    assert sorted(whole) == list(range(18)) and whole[:9] == dm.test_images().indices  # a prefix of one order
    assert len(dm.validation_images()) == 18  # test_subset leaves validation alone
    with pytest.raises(ConfigError, match="test_subset=19 exceeds the 18"):
        _folder_dm(tmp_path, test_subset=19).test_dataloader()
    with pytest.raises(ConfigError, match="test_subset=19 exceeds the 18"):  # already when training starts
        _folder_dm(tmp_path, test_subset=19).train_dataloader()
    with pytest.raises(ConfigError, match="test_subset must be an integer >= 1"):
        _folder_dm(tmp_path, test_subset=0)


def test_class_interleaved_order_keeps_each_class_share_in_every_prefix():
    from distill.data.base import class_interleaved_order

    labels = [0] * 6 + [1] * 3  # class 0 has twice the images of class 1
    order = class_interleaved_order(9, labels, seed=5)
    assert sorted(order) == list(range(9))
    for k in range(1, 10):  # hand count: class 1 holds ceil(k / 3) of the first k... within one of k/3
        ones = sum(labels[i] for i in order[:k])
        assert abs(ones - k / 3) <= 1, (k, ones)
    assert {labels[i] for i in order[:2]} == {0, 1}  # the first C items: one of each class
    assert class_interleaved_order(9, labels, seed=5) == order
    assert class_interleaved_order(9, labels, seed=6) != order
    assert sorted(class_interleaved_order(5, None, seed=0)) == list(range(5))  # no labels: a permutation


def test_num_workers_null_uses_the_cpus_there_are(monkeypatch, tmp_path):
    import os

    from distill.data.base import auto_num_workers

    for cpus, devices, expected in ((2, 1, 1), (16, 1, 8), (16, 4, 3), (1, 1, 1)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)), raising=False)
        assert auto_num_workers(devices) == expected, (cpus, devices)
    _write_tree(tmp_path)
    dm = _folder_dm(tmp_path, num_workers=None)
    assert dm.num_workers is None and dm.loader_workers() == 1  # 2 CPUs (patched above: 1)


def test_image_folder_resizes_to_image_size(tmp_path):
    _write_tree(tmp_path, size=40)
    dm = _folder_dm(tmp_path, image_size=[24, 24], mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    dm.setup("fit")
    assert dm.train_set[0][0].shape == (3, 24, 24)
    assert dm.test_set[0][0].shape == (3, 24, 24)
    assert dm.mean == (0.5, 0.5, 0.5) and dm.std == (0.25, 0.25, 0.25)


def test_image_folder_class_count_mismatch(tmp_path):
    _write_tree(tmp_path)
    dm = _folder_dm(tmp_path, num_classes=10)
    with pytest.raises(ConfigError, match="3 class folders.*num_classes=10"):
        dm.setup("fit")


def test_image_folder_missing_root_and_train(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        _folder_dm(tmp_path / "absent").prepare_data()
    _write_tree(tmp_path)
    for p in sorted((tmp_path / "train").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (tmp_path / "train").rmdir()
    with pytest.raises(DataError) as info:
        _folder_dm(tmp_path).setup("fit")
    msg = str(info.value)
    assert str(tmp_path / "train") in msg and "missing" in msg and "ROOT/train/<class>" in msg


def test_image_folder_empty(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        _folder_dm(tmp_path).setup("fit")
    for split in ("train", "test"):
        for c in CLASSES:
            (tmp_path / split / c).mkdir()
    with pytest.raises(DataError, match="no valid file"):
        _folder_dm(tmp_path).setup("fit")


def test_image_folder_class_lists_differ(tmp_path):
    _write_tree(tmp_path)
    (tmp_path / "test" / "eel").rename(tmp_path / "test" / "fox")
    with pytest.raises(DataError, match=r"only in train: \['eel'\]; only in test: \['fox'\]"):
        _folder_dm(tmp_path).setup("fit")


def test_image_folder_unreadable_image(tmp_path):
    _write_tree(tmp_path)
    bad = tmp_path / "test" / "cat" / "0000.jpg"
    bad.write_bytes(b"garbage")
    dm = _folder_dm(tmp_path)
    dm.setup("test")
    with pytest.raises(DataError, match="cannot read image"):
        dm.test_set[0]


@pytest.mark.skipif(not JPEG_TAR.is_file(), reason=f"{JPEG_TAR} not available")
def test_image_folder_on_real_cifar10_jpeg(tmp_path):
    """A few real CIFAR-10 JPEGs from the shared archive (test/ comes first in it,
    then train/; classes in the order bird, frog, ...): 30 per class and split for the
    first two classes, streamed without extracting the whole archive."""
    per_split_class = 30
    wanted = {}
    with tarfile.open(JPEG_TAR, "r|gz") as tf:
        for member in tf:
            parts = Path(member.name).parts  # cifar10-jpeg/<split>/<class>/<file>
            if len(parts) != 4 or not member.isfile():
                continue
            _, split, cls, fname = parts
            key = (split, cls)
            if key not in wanted and len([k for k in wanted if k[0] == split]) == 2:
                if split == "train":
                    break
                continue
            wanted.setdefault(key, 0)
            if wanted[key] >= per_split_class:
                continue
            data = tf.extractfile(member).read()
            out = tmp_path / "cifar10-jpeg" / split / cls / fname
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
            wanted[key] += 1
    assert sorted(wanted) == [
        ("test", "bird"),
        ("test", "frog"),
        ("train", "bird"),
        ("train", "frog"),
    ]
    dm = _folder_dm(tmp_path / "cifar10-jpeg", num_classes=2, batch_size=16)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.class_names == ["bird", "frog"]
    assert len(dm.train_set) == 2 * per_split_class and len(dm.test_set) == 2 * per_split_class
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and set(y.tolist()) <= {0, 1}
    x, _ = next(iter(dm.test_dataloader()))
    # real photos normalised with CIFAR statistics: roughly zero mean, unit spread
    assert x.mean().abs() < 1.0 and 0.3 < x.std() < 2.0


# ----------------------------------------------------------------------------------------
# Synthetic
# ----------------------------------------------------------------------------------------
def test_synthetic_deterministic_shapes_and_classes():
    dm = SyntheticDataModule(num_train=64, num_val=20, num_classes=4, batch_size=16, seed=5)
    dm.prepare_data()
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(dm.train_dataloader()) == 4 and dm.val_set is dm.test_set and len(dm.test_set) == 20
    a = dm.generate()
    b = SyntheticDataModule(num_train=64, num_val=20, num_classes=4, seed=5).generate()
    c = SyntheticDataModule(num_train=64, num_val=20, num_classes=4, seed=6).generate()
    for t, u in zip(a, b, strict=True):
        assert torch.equal(t, u)
    assert not torch.equal(a[0], c[0])
    assert set(a[1].tolist()) == set(range(4)) and set(a[3].tolist()) == set(range(4))
    # pixels are valid after de-normalisation
    mean = torch.tensor(dm.mean).view(1, 3, 1, 1)
    std = torch.tensor(dm.std).view(1, 3, 1, 1)
    pixels = a[0] * std + mean
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6


def test_synthetic_is_learnable_and_splits():
    dm = SyntheticDataModule(num_train=200, num_val=100, num_classes=10, image_size=16, seed=0)
    x_tr, y_tr, x_va, y_va = dm.generate()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def acc() -> float:
        with torch.no_grad():
            return (model(x_va).argmax(1) == y_va).float().mean().item()

    before = acc()
    for _ in range(10):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x_tr), y_tr).backward()
        opt.step()
    assert acc() > max(0.5, before + 0.2)

    held = SyntheticDataModule(num_train=100, num_val=10, val_split=0.25, train_subset=50)
    held.setup()
    assert len(held.val_set) == 25 and len(held.train_set) == 50 and len(held.test_set) == 10


# ----------------------------------------------------------------------------------------
# Hydra configs
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cfg_name", "cls"),
    [
        ("cifar10", CIFAR10DataModule),
        ("image_folder", ImageFolderDataModule),
        ("synthetic", SyntheticDataModule),
    ],
)
def test_data_configs_instantiate(cfg_name, cls, tmp_path):
    data = OmegaConf.load(REPO / "configs" / "data" / f"{cfg_name}.yaml")
    assert data.name == cfg_name and data.num_classes == (None if cfg_name == "image_folder" else 10)
    cfg = OmegaConf.create({"paths": {"data_dir": str(tmp_path)}, "seed": 7, "data": data})
    if cfg_name == "image_folder":
        assert OmegaConf.is_missing(cfg.data, "root")
        cfg.data.root = str(tmp_path / "tree")
    dm = hydra.utils.instantiate(cfg.data)
    assert type(dm) is cls and dm.seed == 7 and dm.name == cfg_name
    assert dm.image_size == ((16, 16) if cfg_name == "synthetic" else (32, 32))
    assert len(dm.mean) == 3 and len(dm.std) == 3
    if cfg_name == "cifar10":
        assert dm.root == (tmp_path / "cifar10").resolve() and dm.batch_size == 128
    if cfg_name == "synthetic":
        assert (dm.num_train, dm.num_val, dm.batch_size, dm.num_workers) == (128, 64, 32, 0)
