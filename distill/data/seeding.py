"""One scheme of reproducible shuffling: every random draw of a training epoch is seeded from ``(seed, epoch)``.

:func:`epoch_seed` is the only place a seed and an epoch become a generator seed. It is used by
:class:`EpochShuffleSampler` (the order of every training loader, file-backed, on-device and VOC,
and the DataLoader generator that seeds their workers), by the on-device batches' crops and
flips (:mod:`distill.data.on_device`, drawn after the order from the same generator) and by
``distill.callbacks.EpochSeeding`` (torch, numpy and ``random`` at each epoch start). So epoch
``k`` sees the same order and augmentation whether the run got there straight or was resumed
from a checkpoint (:mod:`distill.data.resumable`), and two loaders with one seed agree.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import Sampler

# A prime larger than any epoch count: ``seed * SEED_STRIDE + epoch`` is then one-to-one on
# (seed, epoch), so the epochs of one seed never reach the generator seeds of the next seed
# (``seed * 1000 + epoch`` gives seed 0's epoch 1000 the seeds of seed 1's epoch 0).
SEED_STRIDE = 1_000_003
SEED_MODULUS = 2**32  # numpy's (and so Lightning's seed_everything's) seed range [0, 2**32)


def epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed of ``epoch`` of a run seeded with ``seed``: ``(seed * SEED_STRIDE + epoch)
    mod 2**32`` (one-to-one for seeds below 4294 and epochs below ``SEED_STRIDE``)."""
    return (int(seed) * SEED_STRIDE + int(epoch)) % SEED_MODULUS


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A fresh CPU generator seeded with :func:`epoch_seed` (the same draws on every device type)."""
    return torch.Generator().manual_seed(epoch_seed(seed, epoch))


class EpochShuffleSampler(Sampler[int]):
    """A random order of ``range(num_items)`` that depends only on ``(seed, epoch)``.

    Lightning calls :meth:`set_epoch` before every training epoch (as for a ``DistributedSampler``),
    and a DataLoader given ``generator=sampler.generator`` draws its worker seeds from it, reseeded
    there too. The order is the first draw of :func:`epoch_generator` (:meth:`order`).
    """

    def __init__(self, num_items: int, seed: int) -> None:
        self.num_items, self.seed, self.epoch = int(num_items), int(seed), 0
        self.generator = torch.Generator()
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.generator.manual_seed(epoch_seed(self.seed, self.epoch))

    def order(self, epoch: int | None = None) -> tuple[Tensor, torch.Generator]:
        """``(permutation (num_items,), generator)`` of ``epoch`` (default: the current one); the
        generator goes on with that epoch's stream (the on-device batches draw their crops from it)."""
        gen = epoch_generator(self.seed, self.epoch if epoch is None else epoch)
        return torch.randperm(self.num_items, generator=gen), gen

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[0].tolist())


__all__ = ["SEED_STRIDE", "EpochShuffleSampler", "epoch_generator", "epoch_seed"]
