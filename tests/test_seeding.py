"""One scheme of reproducible shuffling (distill.data.seeding): its seeds, and that the file-backed
loaders, the on-device batches and the epoch reseeding callback all draw from it.

The VOC training loader's order is checked in tests/test_voc_data.py.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from torch.utils.data import TensorDataset

from distill.callbacks import EpochSeeding
from distill.data.base import BaseDataModule
from distill.data.on_device import DeviceBatches
from distill.data.resumable import ResumableLoader
from distill.data.seeding import SEED_STRIDE, EpochShuffleSampler, epoch_seed


def test_epoch_seed_is_the_strided_sum_one_to_one_and_in_numpys_range():
    assert epoch_seed(0, 0) == 0 and epoch_seed(0, 7) == 7
    assert epoch_seed(3, 5) == 3 * 1_000_003 + 5  # hand-worked
    assert epoch_seed(0, 1000) != epoch_seed(1, 0)  # the old `seed * 1000 + epoch` collided here
    seeds = {epoch_seed(s, e) for s in range(50) for e in range(300)}
    assert len(seeds) == 50 * 300  # no two (seed, epoch) pairs share a generator seed
    assert epoch_seed(5000, 3) == (5000 * SEED_STRIDE + 3) % 2**32 < 2**32  # seed_everything accepts it


def test_sampler_order_is_a_permutation_fixed_by_seed_and_epoch():
    sampler = EpochShuffleSampler(30, seed=2)
    first = list(sampler)
    assert sorted(first) == list(range(30))
    gen = torch.Generator().manual_seed(2 * 1_000_003 + 0)  # independent: the documented seed
    assert first == torch.randperm(30, generator=gen).tolist()
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first == list(EpochShuffleSampler(30, seed=2))
    assert list(EpochShuffleSampler(30, seed=3)) != first


class _Indexed(BaseDataModule):
    """``n`` images whose label is their index, file-backed or (``on_device``) as uint8 tensors."""

    def __init__(self, n: int = 24, **kw) -> None:
        super().__init__(name="indexed", num_classes=2, batch_size=4, num_workers=0, **kw)
        self.n, self.image_size, self.mean, self.std = n, (4, 4), (0.5,) * 3, (0.25,) * 3
        self.images = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 3, 4, 4).contiguous()

    def _build(self):
        data = TensorDataset(self.images.float(), torch.arange(self.n))
        return data, None, None, data

    def _build_uint8(self):
        return self.images, torch.arange(self.n), self.images, torch.arange(self.n)


def _order(loader, epoch: int) -> list[int]:
    _set_sampler_epoch(loader, epoch)  # what Lightning's fit loop calls every epoch
    return torch.cat([y for _, y in loader]).tolist()


def test_file_backed_loader_and_on_device_batches_draw_the_same_order():
    files = _Indexed(seed=4).train_dataloader()
    device = _Indexed(seed=4, on_device=True, augment=False).train_dataloader()
    assert isinstance(files, ResumableLoader) and isinstance(device, DeviceBatches)
    for epoch in (0, 3):
        expected = EpochShuffleSampler(24, seed=4).order(epoch)[0].tolist()  # 24 = 6 whole batches
        assert _order(files, epoch) == _order(device, epoch) == expected
    assert _order(files, 1) != _order(files, 0)


def test_epoch_seeding_reseeds_the_global_generators_with_epoch_seed(monkeypatch):
    for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):  # seed_everything sets them: restored afterwards
        monkeypatch.delenv(name, raising=False)
    EpochSeeding(seed=3).on_train_epoch_start(SimpleNamespace(current_epoch=5), None)
    assert torch.initial_seed() == 3 * 1_000_003 + 5
    drawn = torch.rand(2), np.random.rand(), random.random()
    s = epoch_seed(3, 5)
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)
    assert torch.equal(drawn[0], torch.rand(2)) and drawn[1] == np.random.rand() and drawn[2] == random.random()
