"""Shared DataModule base: argument checks, train/val splitting, subsets (random, or ``per_class``
images of every class), the shortcut cue (:mod:`distill.data.shortcut`) and dataloaders."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from distill.data.on_device import DeviceBatches, UInt8Images
from distill.data.resumable import ResumableLoader, training_position
from distill.data.seeding import EpochShuffleSampler
from distill.data.shortcut import ConflictingCue, Shortcut, StampedTraining
from distill.errors import ConfigError


class TransformSubset(Dataset):
    """A view of ``base`` restricted to ``indices`` (all if None) with its own transform.

    ``base[i]`` must return ``(image, label)`` with an untransformed image, so that the
    training and held-out validation views of one dataset can use different transforms.
    """

    def __init__(
        self,
        base: Any,
        indices: Sequence[int] | None = None,
        transform: Callable | None = None,
    ):
        self.base = base
        self.indices = None if indices is None else [int(i) for i in indices]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base) if self.indices is None else len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image, label = self.base[i if self.indices is None else self.indices[i]]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(label)


def seeded_subset(n: int, k: int, seed: int, what: str, items: str) -> list[int]:
    """``k`` sorted indices out of ``range(n)`` ``items``, fixed by ``seed``, for ``data.<what>``."""
    if k > n:
        raise ConfigError(f"data.{what}={k} exceeds the {n} {items}; lower it or set data.{what}=null")
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist())


def per_class_subset(labels: Sequence[int], indices: Sequence[int], per_class: int, seed: int,
                     num_classes: int | None = None, class_names: Sequence[str] | None = None) -> list[int]:
    """``per_class`` items of every class among ``indices`` (sorted), drawn with ``seed`` alone:
    class-balanced, and the same for every training seed. ``labels``: the class of every item."""
    by_class: dict[int, list[int]] = {c: [] for c in range(num_classes or 0)}
    for i in indices:
        by_class.setdefault(int(labels[i]), []).append(i)
    smallest = min(by_class, key=lambda c: (len(by_class[c]), c))
    if per_class > len(by_class[smallest]):
        name = class_names[smallest] if class_names and smallest < len(class_names) else f"class {smallest}"
        raise ConfigError(f"data.per_class={per_class} exceeds the {len(by_class[smallest])} training images of "
                          f"{name}, the smallest class; lower data.per_class or set it to null")
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for c in sorted(by_class):
        items = by_class[c]
        picked += [items[j] for j in torch.randperm(len(items), generator=gen)[:per_class].tolist()]
    return sorted(picked)


def dataset_labels(dataset: Any) -> list[int] | None:
    """The single-label class of every item of ``dataset``, read without loading images, or
    None when it cannot be known that way (multi-label data, unknown dataset types)."""
    if isinstance(dataset, Subset | TransformSubset):
        base = dataset_labels(dataset.dataset if isinstance(dataset, Subset) else dataset.base)
        indices = getattr(dataset, "indices", None)
        if base is None or indices is None:
            return base
        return [base[i] for i in indices]
    if isinstance(dataset, TensorDataset):
        labels = dataset.tensors[1]
    elif isinstance(dataset, UInt8Images):
        labels = dataset.labels
    else:
        labels = getattr(dataset, "targets", None)  # torchvision's ImageFolder, CIFAR10
    if labels is None:
        return None
    labels = torch.as_tensor(labels)
    return labels.tolist() if labels.dim() == 1 else None


def class_interleaved_order(n: int, labels: Sequence[int] | None, seed: int) -> list[int]:
    """A fixed order of ``range(n)`` whose every prefix is a stratified sample of the classes.

    Each class's items are shuffled (seeded); item ``j`` of a class of size ``n_c`` gets the key
    ``j / n_c`` and the items are sorted by key (ties in a seeded random order): every class
    keeps its share of any prefix (systematic stratified sampling), and the first ``C`` items
    are one of each class. So the first batches (``limit_val_batches``, ``limit_test_batches``)
    and the first ``k`` items (``val_subset``, ``test_subset``) see every class. Without
    ``labels``: a seeded random permutation.
    """
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen).tolist()
    if labels is None:
        return perm
    by_class: dict[int, list[int]] = {}
    for i in perm:
        by_class.setdefault(int(labels[i]), []).append(i)
    tiebreak = {i: rank for rank, i in enumerate(torch.randperm(n, generator=gen).tolist())}
    keyed = [(j / len(items), tiebreak[i], i) for items in by_class.values() for j, i in enumerate(items)]
    return [i for _, _, i in sorted(keyed)]


def auto_num_workers(local_world_size: int = 1, cap: int = 8) -> int:
    """``data.num_workers=null``: the CPUs this process may use per device, one left for the
    training process (Lightning's own suggestion, so it never warns about too few workers),
    at most ``cap``."""
    from lightning.fabric.utilities.data import suggested_max_num_workers

    return min(cap, suggested_max_num_workers(max(1, local_world_size)))


def _check_int(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"data.{what} must be an integer >= {minimum}, got {value!r}")
    return value


class BaseDataModule(pl.LightningDataModule):
    """Common constructor arguments and behaviour of the project's DataModules.

    Subclasses set ``image_size``, ``mean``, ``std`` and ``class_names`` and implement
    :meth:`_build`, which returns ``(train_full, train_transform, eval_transform, test)``:
    the full training dataset *without* transform (items ``(image, label)``), the two
    transforms, and the ready-to-use test dataset. For ``on_device=True`` they implement
    :meth:`_build_uint8` (see :mod:`distill.data.on_device`).
    """

    multilabel = False  # the labels: one class per image; True: multi-hot (B, C) targets

    def __init__(
        self,
        *,
        name: str,
        num_classes: int | None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        seed: int = 0,
        train_subset: int | None = None,
        val_split: float = 0.0,
        val_subset: int | None = None,
        test_subset: int | None = None,
        augment: bool = True,
        on_device: bool = False,
        per_class: int | None = None,
        subset_seed: int = 0,
        shortcut: dict | None = None,
    ):
        super().__init__()
        self.name = str(name)
        # None: the subclass infers it (image folders count their class folders)
        self.num_classes = None if num_classes is None else _check_int(num_classes, "num_classes", 2)
        self.batch_size = _check_int(batch_size, "batch_size", 1)
        self.eval_batch_size = (
            self.batch_size
            if eval_batch_size is None
            else _check_int(eval_batch_size, "eval_batch_size", 1)
        )
        # None: auto_num_workers() when a loader is built (it knows the devices per machine then)
        self.num_workers = None if num_workers is None else _check_int(num_workers, "num_workers", 0)
        self.seed = _check_int(seed, "seed", 0)
        self.train_subset = (
            None if train_subset is None else _check_int(train_subset, "train_subset", 1)
        )
        try:
            val_split = float(val_split)
        except (TypeError, ValueError):
            raise ConfigError(
                f"data.val_split must be a number in [0, 1), got {val_split!r}"
            ) from None
        if not 0.0 <= val_split < 1.0:
            raise ConfigError(
                f"data.val_split must be in [0, 1) (0 = validate on the test split), "
                f"got {val_split!r}"
            )
        self.val_split = val_split
        self.val_subset = None if val_subset is None else _check_int(val_subset, "val_subset", 1)
        self.test_subset = None if test_subset is None else _check_int(test_subset, "test_subset", 1)
        self.augment = bool(augment)
        self.on_device = bool(on_device)  # uint8 images on the training device, no workers
        # the few-shot set and the shortcut cue: drawn from subset_seed, the same for every training seed
        self.per_class = None if per_class is None else _check_int(per_class, "per_class", 1)
        self.subset_seed = _check_int(subset_seed, "subset_seed", 0)
        self.shortcut = None if shortcut is None else dict(shortcut)
        self.check_shortcut()
        if self.per_class is not None and self.train_subset is not None:
            raise ConfigError("data.per_class and data.train_subset both subset the training images; set one of "
                              "them to null")
        if self.multilabel and (self.per_class is not None or self.cue_config() is not None):
            raise ConfigError(f"data.per_class and data.shortcut need one class per image; data={self.name} is "
                              "multi-label: set them to null")
        self.cue: Shortcut | None = None  # the shortcut cue, known after setup()
        self.class_names: list[str] | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    # -- subclass hook -------------------------------------------------------------------
    def _build(self) -> tuple[Any, Callable | None, Callable | None, Dataset]:
        raise NotImplementedError

    def _build_uint8(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """For ``on_device``: ``(train images uint8 (N, 3, H, W), train labels (N,), test images,
        test labels)``, all at ``image_size``."""
        raise ConfigError(f"data.on_device=true is not supported for data={self.name}; set data.on_device=false")

    # -- the shortcut cue ----------------------------------------------------------------
    def cue_config(self) -> dict | None:
        """The ``data.shortcut`` node when the cue is on (``p`` not null), else None."""
        return self.shortcut if self.shortcut is not None and self.shortcut.get("p") is not None else None

    def check_shortcut(self) -> None:
        """``data.shortcut``'s values, checked before anything is read (one line when wrong)."""
        Shortcut.from_config(self.shortcut, num_classes=2, image_size=(32, 32), mean=(0.0,) * 3, std=(1.0,) * 3)

    def make_cue(self) -> Shortcut | None:
        """The :class:`~distill.data.shortcut.Shortcut` of ``data.shortcut`` for this data (None: off)."""
        return Shortcut.from_config(self.shortcut, num_classes=int(self.num_classes),
                                    image_size=tuple(self.image_size), mean=tuple(self.mean),
                                    std=tuple(self.std), seed=self.subset_seed)

    # -- splitting -----------------------------------------------------------------------
    def split_indices(self, n: int, labels: Sequence[int] | None = None) -> tuple[list[int], list[int] | None]:
        """Seeded ``(train, val)`` indices into ``n`` training items (val None if no split).

        ``val_split`` holds out ``round(val_split * n)`` items; ``train_subset`` then keeps
        a fixed random subset of the rest, or ``per_class`` (with ``labels``, the class of every
        item) ``per_class`` images of every class. All are sorted and depend only on ``seed``,
        except with ``per_class``: then on ``subset_seed`` alone (the same images for every seed).
        """
        gen = torch.Generator().manual_seed(self.seed if self.per_class is None else self.subset_seed)
        val_idx: list[int] | None = None
        train_idx = list(range(n))
        if self.val_split > 0:
            n_val = round(self.val_split * n)
            if n_val < 1 or n_val >= n:
                raise ConfigError(
                    f"data.val_split={self.val_split} of {n} training images leaves "
                    f"{n_val} for validation and {n - n_val} for training; choose a value "
                    f"that keeps both non-empty (or 0 to validate on the test split)"
                )
            perm = torch.randperm(n, generator=gen).tolist()
            val_idx = sorted(perm[:n_val])
            train_idx = sorted(perm[n_val:])
        if self.train_subset is not None:
            pick = seeded_subset(len(train_idx), self.train_subset, self.seed + 1, "train_subset",
                                 "available training images")
            train_idx = [train_idx[i] for i in pick]
        if self.per_class is not None:
            if labels is None:
                raise ConfigError(f"data.per_class needs the class of every training image, which data={self.name} "
                                  "does not give; set data.per_class=null")
            train_idx = per_class_subset(labels, train_idx, self.per_class, self.subset_seed + 1,
                                         self.num_classes, self.class_names)
        return train_idx, val_idx

    # -- Lightning hooks -----------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.on_device:
            train_x, train_y, test_x, test_y = self._build_uint8()
            train_idx, val_idx = self.split_indices(len(train_x), train_y.tolist())
            self.cue = self.make_cue()
            self.train_set = UInt8Images(train_x, train_y, self.mean, self.std, train_idx)
            if self.cue is not None:  # stamped batch-wise by DeviceBatches
                self.train_set.cue = self.cue, self.cue.present(len(train_x))[torch.as_tensor(train_idx)]
            self.test_set = UInt8Images(test_x, test_y, self.mean, self.std)
            self.val_set = self.test_set if val_idx is None else UInt8Images(train_x, train_y, self.mean,
                                                                              self.std, val_idx)
            return
        train_full, train_tf, eval_tf, test = self._build()
        labels = dataset_labels(train_full) if self.per_class is not None else None
        train_idx, val_idx = self.split_indices(len(train_full), labels)
        self.train_set = TransformSubset(train_full, train_idx, train_tf)
        self.cue = self.make_cue()
        if self.cue is not None:
            self.train_set = StampedTraining(self.train_set, self.cue, self.cue.present(len(train_full)), train_idx)
        self.val_set = test if val_idx is None else TransformSubset(train_full, val_idx, eval_tf)
        self.test_set = test

    def _loader(self, dataset: Dataset, batch_size: int, train: bool,
                collate_fn: Callable | None = None) -> DataLoader | DeviceBatches:
        """Training: a :class:`~distill.data.resumable.ResumableLoader` in the order of an
        :class:`~distill.data.seeding.EpochShuffleSampler` (or on-device batches seeded the same way);
        evaluation: a plain loader in order. ``collate_fn``: the DataLoader's (default: default_collate)."""
        if isinstance(dataset, UInt8Images):  # data.on_device=true
            padding = max(1, round(min(self.image_size) / 8))  # as cifar_train_transform
            return DeviceBatches.for_trainer(dataset, batch_size, self.trainer, train=train,
                                             augment=self.augment, seed=self.seed, padding=padding)
        sampler = EpochShuffleSampler(len(dataset), self.seed) if train else None
        resumable = {"position": lambda: training_position(self.trainer)} if train else {}
        return (ResumableLoader if train else DataLoader)(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            generator=sampler.generator if train else None,
            drop_last=train,
            num_workers=self.loader_workers(),
            persistent_workers=self.loader_workers() > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=collate_fn,
            **resumable,
        )

    def loader_workers(self) -> int:
        """``num_workers``, or with ``num_workers=None`` what the machine has (:func:`auto_num_workers`)."""
        if self.num_workers is not None:
            return self.num_workers
        devices = getattr(self.trainer, "num_devices", 1) if self.trainer is not None else 1
        return auto_num_workers(devices)

    def check_sizes(self) -> None:
        """A full training batch fits the training images and ``test_subset`` the test images;
        ``train.py`` calls it before any training work (a teacher trained first included)."""
        self.setup("fit")
        assert self.train_set is not None
        if len(self.train_set) < self.batch_size:
            raise ConfigError(
                f"data.batch_size={self.batch_size} exceeds the {len(self.train_set)} training "
                f"images, so no full batch fits (the last incomplete batch is dropped); "
                f"lower data.batch_size or use more training data"
            )
        if self.test_set is not None:  # before training, not after it
            self.check_subset(self.test_subset, len(self.test_set), "test_subset", "test images")

    def train_dataloader(self) -> DataLoader:
        self.check_sizes()
        return self._loader(self.train_set, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.validation_images(), self.eval_batch_size, train=False)

    def validation_images(self) -> Dataset:
        """``val_set`` in a fixed class-interleaved order (:func:`class_interleaved_order`), or with
        ``val_subset`` the first ``val_subset`` of that order. Unlike a plain ``limit_val_batches``
        on a class-sorted folder (the first classes only), both cover every class."""
        self.setup("validate")
        assert self.val_set is not None
        return self.evaluation_view(self.val_set, self.val_subset, self.seed + 2, "val_subset", "validation images")

    def test_images(self) -> Dataset:
        """``test_set`` in a fixed class-interleaved order, or its first ``test_subset`` (as
        :meth:`validation_images`)."""
        self.setup("test")
        assert self.test_set is not None
        return self.evaluation_view(self.test_set, self.test_subset, self.seed + 3, "test_subset", "test images")

    @staticmethod
    def check_subset(subset: int | None, n: int, what: str, items: str) -> None:
        if subset is not None and subset > n:
            raise ConfigError(f"data.{what}={subset} exceeds the {n} {items}; lower it or set data.{what}=null")

    @classmethod
    def evaluation_view(cls, dataset: Dataset, subset: int | None, seed: int, what: str, items: str) -> Dataset:
        n = len(dataset)
        cls.check_subset(subset, n, what, items)
        order = class_interleaved_order(n, dataset_labels(dataset), seed)[:subset]
        if isinstance(dataset, UInt8Images):  # data.on_device=true reads whole tensors
            return UInt8Images(dataset.images, dataset.labels, dataset.mean, dataset.std, order)
        return Subset(dataset, order)

    def conflict_images(self) -> Dataset:
        """:meth:`test_images` with a conflicting cue (:class:`~distill.data.shortcut.ConflictingCue`:
        items ``(image, label, cue class, cue box)``), in the same order; only with ``data.shortcut``.
        The cue of a test image is fixed by ``subset_seed`` whatever the training seed."""
        self.setup("test")
        stamped = ConflictingCue(self.test_set, self.cue, dataset_labels(self.test_set))
        return self.evaluation_view(stamped, self.test_subset, self.seed + 3, "test_subset", "test images")

    def panel_images(self) -> Dataset:
        """The images the explanation panel draws: :meth:`validation_images`, with ``data.shortcut``
        stamped with a conflicting cue (so the panel shows whether a map follows the cue)."""
        images = self.validation_images()
        if self.cue is None:
            return images
        stamped = ConflictingCue(self.val_set, self.cue, dataset_labels(self.val_set))
        return self.evaluation_view(stamped, self.val_subset, self.seed + 2, "val_subset", "validation images")

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        """The test images; with ``data.shortcut`` a second loader of them with a conflicting cue
        (``dataloader_idx`` 1, :meth:`conflict_images`)."""
        clean = self._loader(self.test_images(), self.eval_batch_size, train=False)
        if self.cue is None:
            return clean
        return [clean, self._loader(self.conflict_images(), self.eval_batch_size, train=False)]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, num_classes={self.num_classes}, "
            f"batch_size={self.batch_size}, val_split={self.val_split}, "
            f"train_subset={self.train_subset}, per_class={self.per_class}, val_subset={self.val_subset}, "
            f"test_subset={self.test_subset}, shortcut={self.cue_config()})"
        )
