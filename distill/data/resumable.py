"""Training loaders that Lightning can resume in the middle of an epoch.

Lightning saves the state of every training loader that has ``state_dict`` / ``load_state_dict``
(its ``_Stateful`` protocol) with each checkpoint, and on a resume loads it back before the
interrupted epoch's iterator is made. The state here is :func:`training_position`: the epoch and
how many of its batches were trained, read from the trainer's batch progress rather than counted
by the loader (Lightning fetches one batch ahead, so a count of the batches handed out would skip
one). Loading it sets the sampler's epoch (its order and worker seeds are drawn from
``(seed, epoch)``) and makes the next iteration start at that batch. Only the batch *indices* of
the trained batches are skipped: no image of them is read again.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

from lightning.fabric.utilities.data import _set_sampler_epoch
from torch.utils.data import DataLoader

Position = dict[str, int]


def training_position(trainer: Any) -> Position:
    """``{"epoch", "batches", "per_epoch"}``: the current training epoch, its batches trained so
    far and its number of batches (zeros outside ``trainer.fit``)."""
    if trainer is None or getattr(trainer, "fit_loop", None) is None:
        return {"epoch": 0, "batches": 0, "per_epoch": 0}
    per_epoch = trainer.num_training_batches
    return {"epoch": int(trainer.current_epoch),
            "batches": int(trainer.fit_loop.epoch_loop.batch_progress.current.processed),
            "per_epoch": int(per_epoch) if per_epoch != float("inf") else -1}


def resume_point(state: Position) -> tuple[int, int]:
    """``(epoch, batches to skip)`` to continue from the saved ``state``: a state saved after the
    epoch's last batch continues at the start of the next epoch."""
    epoch, done, per_epoch = int(state["epoch"]), int(state["batches"]), int(state.get("per_epoch", -1))
    if per_epoch >= 0 and done >= per_epoch:
        return epoch + 1, 0
    return epoch, done


class SkipFirst:
    """A batch sampler whose next iteration starts ``skip`` batches in (then whole epochs again).

    Its length stays the epoch's full length: Lightning counts the resumed epoch's batches from
    the restored batch index."""

    def __init__(self, batches: Any) -> None:
        self.batches, self.skip = batches, 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        # Taken at the first draw, not at iter(): DataLoader iterators call iter() twice when made.
        skip, self.skip = self.skip, 0
        yield from itertools.islice(iter(self.batches), skip, None)


class ResumableLoader(DataLoader):
    """A ``DataLoader`` that resumes mid-epoch (see the module docstring).

    ``position``: a callable returning :func:`training_position` of the trainer that uses the
    loader (the DataModule passes one; without it the saved position is the start).
    """

    def __init__(self, *args, position: Callable[[], Position] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.position = position
        self._skip_first = SkipFirst(super()._index_sampler)

    @property
    def _index_sampler(self):  # what DataLoader iterators draw their batch indices from
        return self._skip_first

    def state_dict(self) -> Position:
        return self.position() if self.position is not None else training_position(None)

    def load_state_dict(self, state: Position) -> None:
        epoch, self._skip_first.skip = resume_point(state)
        _set_sampler_epoch(self, epoch)  # before the iterator is made: it draws the order and seeds


__all__ = ["Position", "ResumableLoader", "SkipFirst", "resume_point", "training_position"]
