"""A data path without DataLoader workers: the whole uint8 image set on the training device.

``data.on_device=true`` keeps every training image as one ``uint8`` tensor ``(N, 3, H, W)``
on the device that trains (a GPU, or the CPU), and makes each batch with a few batched
tensor ops: gather the batch's images, random padded crop + horizontal flip as one index
gather, then scale + normalise. CIFAR-10's 50,000 training images take 150 MB.

Reproducible from the seed: the shuffling order and the crop offsets / flips of an epoch are
drawn on the CPU from the generator of :mod:`distill.data.seeding` for ``(seed, epoch)`` (so
they are the same on every device type and do not depend on the global RNG), for the whole data
set at once: the order is the one a file-backed loader with the same seed draws
(:class:`~distill.data.seeding.EpochShuffleSampler`), the crops and flips come after it. Lightning
passes the epoch through ``sampler.set_epoch`` as it does for a ``DistributedSampler``, so a
resumed run replays its epochs. Under DDP every rank draws the same global permutation and
takes its own shard of it (``rank::world_size``, as ``DistributedSampler`` does), and an image
gets the same augmentation whichever rank sees it.

The augmentation equals ``distill.data.transforms.cifar_train_transform`` (torchvision's
``RandomCrop(padding=size/8)`` with zero fill, then ``RandomHorizontalFlip``, ``ToDtype``,
``Normalize``) up to float rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from distill.data.resumable import resume_point, training_position
from distill.data.seeding import EpochShuffleSampler


def crop_flip(images: Tensor, dy: Tensor, dx: Tensor, flip: Tensor, padding: int) -> Tensor:
    """Padded random crop and horizontal flip of a batch, as one gather (no padded copy).

    ``images`` ``(B, C, H, W)`` (any dtype); ``dy``, ``dx`` ``(B,)`` integer offsets in
    ``[0, 2 * padding]`` into the zero-padded image; ``flip`` ``(B,)`` bool. Returns ``(B, C, H, W)``:
    ``out[b, :, i, j] = pad(images)[b, :, i + dy, j' + dx]`` with ``j' = W - 1 - j`` where flipped.
    """
    b, c, h, w = images.shape
    rows = torch.arange(h, device=images.device)[None, :] + (dy[:, None] - padding)  # (B, H)
    cols = torch.arange(w, device=images.device)[None, :].expand(b, w)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + (dx[:, None] - padding)  # (B, W)
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]  # (B, H, W)
    index = rows.clamp(0, h - 1)[:, :, None] * w + cols.clamp(0, w - 1)[:, None, :]  # (B, H, W)
    out = images.flatten(2).gather(2, index.flatten(1)[:, None, :].expand(b, c, h * w)).view(b, c, h, w)
    return torch.where(inside[:, None], out, torch.zeros((), dtype=out.dtype, device=out.device))


def normalize_uint8(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``uint8 (B, C, H, W)`` -> ``float32 ((x / 255) - mean) / std`` (``mean``, ``std`` ``(C,)``)."""
    x = images.to(torch.float32).div_(255.0)
    return x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))


@contextlib.contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """On the CPU, make a batch with one thread: the ops are small and memory-bound, and an
    OpenMP thread team costs more than it saves (much more when training keeps the cores busy)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class UInt8Images(Dataset):
    """A split held as ``uint8`` tensors: ``images`` ``(N, 3, H, W)``, ``labels`` ``(N,)``.

    ``indices`` selects a subset (copied once). Items are ``(normalised float32 image, label)``
    as the evaluation transform gives them; training reads whole batches via
    :class:`DeviceBatches`. :meth:`on` keeps one copy on the last device asked for.
    """

    def __init__(self, images: Tensor, labels: Tensor, mean: Sequence[float], std: Sequence[float],
                 indices: Sequence[int] | None = None) -> None:
        if indices is not None:
            index = torch.as_tensor(list(indices), dtype=torch.long)
            images, labels = images[index], labels[index]
        self.images, self.labels = images, labels.long()
        self.mean, self.std = tuple(mean), tuple(std)
        self.cue = None  # data.shortcut on a training split: (Shortcut, present (N,) bool), stamped per batch
        self._on: tuple[Tensor, Tensor] | None = None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        mean, std = torch.tensor(self.mean), torch.tensor(self.std)
        return normalize_uint8(self.images[i: i + 1], mean, std)[0], int(self.labels[i])

    def on(self, device: torch.device | str) -> tuple[Tensor, Tensor]:
        """``(images, labels)`` on ``device`` (moved once, then cached)."""
        device = torch.device(device)
        if self._on is None or self._on[0].device != device:
            self._on = (self.images.to(device), self.labels.to(device))
        return self._on


class DeviceBatches:
    """Batches ``(x float32 (B, 3, H, W) normalised, y int64 (B,))`` from images held on a device.

    ``train=True``: shuffled every epoch, padded random crop + flip when ``augment``, last
    incomplete batch dropped. ``train=False``: in order, no augmentation, every image once
    (the last batch may be smaller); under DDP rank ``r`` gets images ``r, r + W, ...`` (so
    no image is evaluated twice; ranks may then differ by one batch, which is fine as long as
    evaluation does no per-step collective, e.g. ``self.log(..., sync_dist=True)`` per step).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        train: bool,
        augment: bool = True,
        seed: int = 0,
        padding: int = 4,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
        cue: tuple | None = None,
    ) -> None:
        """``cue``: ``(Shortcut, present (N,) bool)`` of ``distill.data.shortcut``: the label's cue is
        stamped, after the augmentation, into the images where ``present``."""
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape[:1] != images.shape[:1]:
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        device = torch.device(device) if device is not None else images.device
        self.images = images.to(device)
        self.labels = labels.to(device=device, dtype=torch.long)
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=device)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=device)
        self.batch_size = int(batch_size)
        self.train = bool(train)
        self.augment = bool(augment) and self.train
        self.seed = int(seed)
        self.padding = int(padding)
        self.rank, self.world_size = int(rank), int(world_size)
        # Lightning calls sampler.set_epoch(epoch) before every epoch; the order is the sampler's
        self.sampler = EpochShuffleSampler(len(self.images), self.seed)
        self.batch_sampler = None  # what Lightning reads next to `sampler` (a DataLoader's attributes)
        self.position = None  # for a mid-epoch resume (distill.data.resumable): set by for_trainer
        self._skip = 0
        self.cue = None if cue is None else (cue[0], cue[1].to(device))

    @classmethod
    def for_trainer(cls, dataset: UInt8Images, batch_size: int, trainer=None, **kwargs) -> DeviceBatches:
        """Batches of ``dataset`` on the ``trainer``'s device and for its rank (CPU, rank 0 of 1 without one)."""
        if trainer is None:
            device, rank, world_size = torch.device("cpu"), 0, 1
        else:
            device, rank, world_size = trainer.strategy.root_device, trainer.global_rank, trainer.world_size
        images, labels = dataset.on(device)
        batches = cls(images, labels, batch_size, dataset.mean, dataset.std, rank=rank, world_size=world_size,
                      cue=dataset.cue, **kwargs)
        batches.position = lambda: training_position(trainer)
        return batches

    def state_dict(self) -> dict[str, int]:
        """Where training stands (Lightning saves it with each checkpoint: a mid-epoch resume)."""
        return self.position() if self.position is not None else training_position(None)

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at the saved epoch and batch (:func:`distill.data.resumable.resume_point`)."""
        epoch, self._skip = resume_point(state)
        self.sampler.set_epoch(epoch)

    @property
    def device(self) -> torch.device:
        return self.images.device

    def _per_rank(self) -> int:
        n = len(self.images)
        return n // self.world_size if self.train else len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        per_rank = self._per_rank()
        return per_rank // self.batch_size if self.train else -(-per_rank // self.batch_size)

    def epoch_draws(self, epoch: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(permutation, dy, dx, flip)`` of the whole data set for ``epoch`` (CPU tensors)."""
        n = len(self.images)
        perm, gen = self.sampler.order(epoch)
        offsets = torch.randint(0, 2 * self.padding + 1, (2, n), generator=gen)
        flip = torch.randint(0, 2, (n,), generator=gen).bool()
        return perm, offsets[0], offsets[1], flip

    def indices(self, epoch: int, perm: Tensor | None = None) -> Tensor:
        """This rank's image indices for ``epoch``, in batch order (CPU)."""
        n = len(self.images)
        if not self.train:
            return torch.arange(self.rank, n, self.world_size)
        perm = self.epoch_draws(epoch)[0] if perm is None else perm
        return perm[self.rank: (n // self.world_size) * self.world_size: self.world_size]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch = self.sampler.epoch
        perm, dy, dx, flip = self.epoch_draws(epoch) if self.train else (None, None, None, None)
        index = self.indices(epoch, perm)
        if self.augment:
            # One small host-to-device copy per epoch; nothing per batch goes through the host.
            draws = torch.stack([dy[index], dx[index], flip[index].long()]).to(self.device, non_blocking=True)
        index = index.to(self.device, non_blocking=True)
        skip, self._skip = self._skip, 0  # a mid-epoch resume starts at the saved batch (once)
        for i in range(skip, len(self)):
            batch = slice(i * self.batch_size, (i + 1) * self.batch_size)
            with one_cpu_thread(self.device):
                idx = index[batch]
                images = self.images[idx]
                if self.augment:
                    dy, dx, flip = draws[:, batch]
                    images = crop_flip(images, dy, dx, flip.bool(), self.padding)
                out = normalize_uint8(images, self.mean, self.std), self.labels[idx]
                if self.cue is not None:
                    out = self.cue[0].stamp(out[0], out[1], self.cue[1][idx]), out[1]
            yield out

    def __repr__(self) -> str:
        return (f"DeviceBatches({len(self.images)} images on {self.device}, batch_size={self.batch_size}, "
                f"train={self.train}, augment={self.augment}, rank={self.rank}/{self.world_size})")


def images_to_uint8(dataset, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Decode every ``(PIL image, label)`` item of ``dataset`` once: ``uint8 (N, 3, H, W)``, ``int64 (N,)``.

    Images not at ``size`` are resized as the evaluation transform does (``ToImage`` then
    ``Resize(antialias=True)`` on the uint8 tensor).
    """
    import numpy as np
    from torchvision.transforms.v2 import functional as TF

    h, w = size
    images = torch.empty((len(dataset), 3, h, w), dtype=torch.uint8)
    labels = torch.empty(len(dataset), dtype=torch.long)
    for i in range(len(dataset)):
        image, label = dataset[i]
        pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
        if pixels.shape[1:] != (h, w):
            pixels = TF.resize(pixels, [h, w], antialias=True)
        images[i] = pixels
        labels[i] = int(label)
    return images, labels


def hwc_to_chw(array) -> Tensor:
    """``uint8 (N, H, W, 3)`` array (torchvision's CIFAR10.data) -> contiguous ``uint8 (N, 3, H, W)``."""
    return torch.as_tensor(array).permute(0, 3, 1, 2).contiguous()


__all__ = ["DeviceBatches", "UInt8Images", "crop_flip", "hwc_to_chw", "images_to_uint8",
           "normalize_uint8"]
