"""data.on_device=true: uint8 images on the training device, batched crop/flip/normalise, no
DataLoader workers, reproducible from the seed, one shard per DDP rank (issue 6)."""

from __future__ import annotations

import pickle
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar
from lightning.fabric.utilities.data import _set_sampler_epoch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from distill.data import CIFAR10DataModule, ImageFolderDataModule
from distill.data.base import BaseDataModule
from distill.data.on_device import DeviceBatches, crop_flip, normalize_uint8
from distill.errors import ConfigError
from distill.models import build_model
from distill.module import ClassifierModule

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


# --------------------------------------------------------------------------- tensor ops
@pytest.mark.parametrize(("size", "padding"), [((32, 32), 4), ((24, 20), 3)])
def test_crop_flip_equals_torchvision_pad_crop_flip(size, padding):
    g = torch.Generator().manual_seed(0)
    n = 12
    images = torch.randint(0, 256, (n, 3, *size), generator=g, dtype=torch.uint8)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=g)
    flip = torch.arange(n) % 2 == 0
    dy[0], dx[0], dy[1], dx[1] = 0, 2 * padding, 2 * padding, 0  # the extreme corners
    out = crop_flip(images, dy, dx, flip, padding)
    for i in range(n):
        ref = TF.crop(TF.pad(images[i], [padding] * 4, fill=0), int(dy[i]), int(dx[i]), *size)
        ref = TF.horizontal_flip(ref) if flip[i] else ref
        assert torch.equal(out[i], ref), i


def test_normalize_equals_torchvision():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    ref = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(MEAN), list(STD))])(images)
    out = normalize_uint8(images, torch.tensor(MEAN), torch.tensor(STD))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- the loader
def _images(n: int = 50, size: int = 8):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8), torch.arange(n) % 10


def _loader(seed: int = 0, rank: int = 0, world_size: int = 1, train: bool = True, n: int = 50, **kw):
    images, labels = _images(n)
    return DeviceBatches(images, labels, 8, MEAN, STD, train=train, seed=seed, padding=1, rank=rank,
                         world_size=world_size, **kw)


def _epoch(loader: DeviceBatches, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    _set_sampler_epoch(loader, epoch)  # what Lightning's fit loop calls every epoch
    return list(loader)


def test_train_epochs_are_permutations_reproducible_from_the_seed():
    loader = _loader()
    assert not isinstance(loader, DataLoader) and len(loader) == 50 // 8
    first = _epoch(loader, 0)
    assert len(first) == 6 and all(x.shape == (8, 3, 8, 8) and x.dtype == torch.float32 for x, _ in first)
    assert all(y.dtype == torch.int64 for _, y in first)
    index = loader.indices(0)
    assert len(set(index.tolist())) == 50 and loader.sampler.epoch == 0
    again = _epoch(_loader(), 0)
    assert all(torch.equal(a, b) and torch.equal(c, d) for (a, c), (b, d) in zip(first, again, strict=True))
    assert not torch.equal(_epoch(loader, 1)[0][0], first[0][0])  # another epoch: another order
    assert not torch.equal(_epoch(_loader(seed=1), 0)[0][0], first[0][0])  # another seed
    assert torch.equal(_epoch(loader, 0)[0][0], first[0][0])  # epoch 0 replayed (resume)


def test_augmentation_is_the_padded_crop_and_flip_of_each_image():
    images, labels = _images()
    loader = _loader()
    _, dy, dx, flip = loader.epoch_draws(3)
    index = loader.indices(3)[:8]
    x, y = _epoch(loader, 3)[0]
    expected = normalize_uint8(crop_flip(images[index], dy[index], dx[index], flip[index], 1),
                               torch.tensor(MEAN), torch.tensor(STD))
    torch.testing.assert_close(x, expected)
    assert torch.equal(y, labels[index])
    assert not torch.equal(x, normalize_uint8(images[index], torch.tensor(MEAN), torch.tensor(STD)))
    plain = _loader(augment=False)
    x0, _ = _epoch(plain, 3)[0]
    torch.testing.assert_close(x0, normalize_uint8(images[index], torch.tensor(MEAN), torch.tensor(STD)))


def test_ddp_ranks_get_disjoint_shards_with_the_same_augmentation():
    single = _loader()
    ranks = [_loader(rank=r, world_size=2) for r in range(2)]
    shards = [set(r.indices(2).tolist()) for r in ranks]
    assert len(shards[0]) == len(shards[1]) == 25 and not shards[0] & shards[1]
    assert all(len(r) == 25 // 8 for r in ranks)

    def by_image(loader: DeviceBatches) -> dict[int, torch.Tensor]:
        index = loader.indices(2).tolist()
        xs = torch.cat([x for x, _ in _epoch(loader, 2)])
        return dict(zip(index[: len(xs)], xs, strict=True))

    alone, sharded = by_image(single), {**by_image(ranks[0]), **by_image(ranks[1])}
    common = set(alone) & set(sharded)
    assert len(common) > 10
    assert all(torch.equal(alone[i], sharded[i]) for i in common)  # an image's augmentation: whoever sees it


def test_eval_batches_in_order_every_image_once():
    images, labels = _images(50)
    loader = _loader(train=False)
    batches = list(loader)
    assert len(loader) == len(batches) == 7 and len(batches[-1][0]) == 2
    torch.testing.assert_close(torch.cat([x for x, _ in batches]),
                               normalize_uint8(images, torch.tensor(MEAN), torch.tensor(STD)))
    ranks = [_loader(train=False, rank=r, world_size=2) for r in range(2)]
    assert [r.indices(0).tolist() for r in ranks] == [list(range(0, 50, 2)), list(range(1, 50, 2))]
    assert torch.equal(torch.cat([y for _, y in ranks[1]]), labels[1::2])


def test_argument_checks():
    images, labels = _images(10)
    with pytest.raises(ValueError, match="uint8"):
        DeviceBatches(images.float(), labels, 4, MEAN, STD, train=True)
    with pytest.raises(ValueError, match="labels"):
        DeviceBatches(images, labels[:5], 4, MEAN, STD, train=True)
    with pytest.raises(ValueError, match="rank"):
        DeviceBatches(images, labels, 4, MEAN, STD, train=True, rank=2, world_size=2)


# --------------------------------------------------------------------------- data modules
@pytest.fixture
def cifar_root(tmp_path, monkeypatch) -> tuple[Path, np.ndarray, np.ndarray]:
    """Tiny CIFAR-10 in torchvision's format (60 train / 20 test images); md5 check bypassed."""
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train = []
    for i in range(1, 6):
        x = rng.integers(0, 256, (12, 3072), dtype=np.uint8)
        train.append(x)
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({"labels": [int(v) for v in rng.integers(0, 10, 12)], "data": x}, f, 2)
    test = rng.integers(0, 256, (20, 3072), dtype=np.uint8)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"labels": [int(v) for v in rng.integers(0, 10, 20)], "data": test}, f, 2)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f, 2)
    return tmp_path / "cifar10", np.concatenate(train), test


def _cifar(root: Path, **kw) -> CIFAR10DataModule:
    return CIFAR10DataModule(root, download=False, **{"batch_size": 8, "num_workers": 0, **kw})


def test_cifar_on_device_gives_the_dataloader_path_batches(cifar_root):
    root, train_raw, test_raw = cifar_root
    on, off = _cifar(root, on_device=True), _cifar(root, on_device=False)
    on.setup("fit")
    off.setup("fit")
    assert on.train_set.images.dtype == torch.uint8 and on.train_set.images.shape == (60, 3, 32, 32)
    assert torch.equal(on.train_set.images, torch.from_numpy(train_raw.reshape(60, 3, 32, 32)))
    loader = on.test_dataloader()
    assert isinstance(loader, DeviceBatches) and loader.device == torch.device("cpu")
    for (a, ya), (b, yb) in zip(loader, off.test_dataloader(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert torch.equal(ya, yb)
    train = on.train_dataloader()
    assert isinstance(train, DeviceBatches) and train.augment and train.padding == 4 and len(train) == 60 // 8
    x, y = next(iter(train))
    assert x.shape == (8, 3, 32, 32) and y.shape == (8,)


def test_cifar_on_device_split_and_subset(cifar_root):
    root, _, _ = cifar_root
    dm = _cifar(root, on_device=True, val_split=0.25, train_subset=30)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (30, 15, 20)
    off = _cifar(root, on_device=False, val_split=0.25, train_subset=30)
    off.setup("fit")
    xs_on = torch.cat([x for x, _ in dm.val_dataloader()])
    xs_off = torch.cat([x for x, _ in off.val_dataloader()])
    torch.testing.assert_close(xs_on, xs_off, rtol=1e-6, atol=1e-6)  # the same held-out images
    on_sub, off_sub = (_cifar(root, on_device=flag, val_subset=7) for flag in (True, False))
    xs_on = torch.cat([x for x, _ in on_sub.val_dataloader()])
    xs_off = torch.cat([x for x, _ in off_sub.val_dataloader()])
    assert len(xs_on) == 7
    torch.testing.assert_close(xs_on, xs_off, rtol=1e-6, atol=1e-6)  # the same subset of the test split


def test_image_folder_on_device(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 3)):
        for c in ("cat", "dog", "eel"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                size = (32, 32) if i else (40, 36)  # one image per class needs a resize
                Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
                    tmp_path / split / c / f"{i}.jpg", quality=95)
    kw = {"num_classes": 3, "batch_size": 4, "num_workers": 0}
    on, off = ImageFolderDataModule(tmp_path, on_device=True, **kw), ImageFolderDataModule(tmp_path, **kw)
    on.setup("fit")
    off.setup("fit")
    assert on.class_names == ["cat", "dog", "eel"] and len(on.train_set) == 18
    for (a, ya), (b, yb) in zip(on.test_dataloader(), off.test_dataloader(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert torch.equal(ya, yb)


def test_on_device_unsupported_is_a_config_error():
    class NoUInt8(BaseDataModule):
        def _build(self):
            raise AssertionError("not reached")

    with pytest.raises(ConfigError, match="on_device"):
        NoUInt8(name="other", num_classes=10, on_device=True).setup("fit")


def test_data_configs_have_on_device_off():
    from omegaconf import OmegaConf

    from tests.support import CONFIG_DIR

    for name in ("cifar10", "image_folder"):
        assert OmegaConf.load(CONFIG_DIR / "data" / f"{name}.yaml").on_device is False


# --------------------------------------------------------------------------- through Lightning
class BatchRecorder(pl.Callback):
    def __init__(self) -> None:
        self.batches: list[tuple[int, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append((trainer.current_epoch, batch[0].sum(dim=(1, 2, 3)).clone()))


def _fit(root: Path, seed: int) -> tuple[pl.Trainer, BatchRecorder]:
    pl.seed_everything(0, verbose=False)
    dm = _cifar(root, on_device=True, batch_size=8, seed=seed)
    module = ClassifierModule(build_model("wrn16_1", 10), optimizer=lambda params: torch.optim.SGD(params, lr=0.01))
    recorder = BatchRecorder()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_train_batches=2,
                         limit_val_batches=0, num_sanity_val_steps=0, callbacks=[recorder])
    trainer.fit(module, datamodule=dm)
    return trainer, recorder


def test_trainer_fit_on_device_is_reproducible_and_reshuffles(cifar_root):
    """Through Lightning: no DataLoader, the epoch reaches the loader, equal seeds replay."""
    root, _, _ = cifar_root
    trainer, first = _fit(root, seed=5)
    assert isinstance(trainer.train_dataloader, DeviceBatches)
    assert [e for e, _ in first.batches] == [0, 0, 1, 1]
    _, second = _fit(root, seed=5)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(first.batches, second.batches, strict=True))
    assert not torch.equal(first.batches[0][1], first.batches[2][1])  # epoch 1 is another draw


@pytest.mark.slow
def test_train_py_with_data_on_device(tmp_path):
    """data.on_device=true from the command line, end to end (student alone, image folder)."""
    import json
    import math

    from tests.support import run_train

    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 2)):
        for c in ("cat", "dog", "eel"):
            (tmp_path / "tree" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    tmp_path / "tree" / split / c / f"{i}.png")
    proc = run_train(["stage=baseline", "student=wrn16_1", "data=image_folder", f"data.root={tmp_path / 'tree'}",
                      "data.num_classes=3", "data.on_device=true", "data.batch_size=4", "trainer=cpu",
                      "trainer.max_epochs=1", "logger=csv", "trainer.enable_progress_bar=false"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (metrics,) = (tmp_path / "logs").rglob("metrics.json")
    assert math.isfinite(json.loads(metrics.read_text())["metrics"]["test/acc"])
