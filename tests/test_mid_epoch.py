"""Mid-epoch resume pieces: stateful training loaders, the saved RNG states, the config keys.

The end-to-end check (SIGKILL after a mid-epoch checkpoint, resume, same weights) is in
tests/test_robustness.py.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.fabric.utilities.types import _Stateful
from torch.utils.data import TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from distill.config_schema import check_config
from distill.data.on_device import DeviceBatches
from distill.data.resumable import ResumableLoader, resume_point
from distill.data.seeding import EpochShuffleSampler
from distill.errors import ConfigError
from distill.mid_epoch import MidEpochState


def _loader(workers: int = 0, position=None) -> ResumableLoader:
    sampler = EpochShuffleSampler(20, seed=3)
    return ResumableLoader(TensorDataset(torch.arange(20)), batch_size=4, sampler=sampler, generator=sampler.generator,
                           drop_last=True, num_workers=workers, persistent_workers=workers > 0, position=position)


def _batches(loader) -> list[list[int]]:
    return [batch[0].tolist() for batch in loader]


@pytest.mark.parametrize("workers", [0, 2])
def test_loaded_loader_continues_the_epoch_after_its_trained_batches_then_runs_whole_epochs(workers):
    straight = _loader()
    _set_sampler_epoch(straight, 1)
    epoch1 = _batches(straight)
    _set_sampler_epoch(straight, 2)
    epoch2 = _batches(straight)
    assert sorted(sum(epoch1, [])) == list(range(20)) and epoch1 != epoch2  # a new order every epoch

    resumed = _loader(workers)  # a fresh process: its sampler starts at epoch 0
    assert isinstance(resumed, _Stateful)  # what Lightning checks to save / load it
    resumed.load_state_dict({"epoch": 1, "batches": 2, "per_epoch": 5})
    assert _batches(resumed) == epoch1[2:]  # neither replayed nor skipped
    _set_sampler_epoch(resumed, 2)
    assert _batches(resumed) == epoch2  # the skip applies once (also with persistent workers)


def test_a_position_after_the_last_batch_continues_at_the_next_epoch():
    assert resume_point({"epoch": 3, "batches": 5, "per_epoch": 5}) == (4, 0)
    assert resume_point({"epoch": 3, "batches": 4, "per_epoch": 5}) == (3, 4)
    loader = _loader()
    _set_sampler_epoch(loader, 4)
    epoch4 = _batches(loader)
    resumed = _loader()
    resumed.load_state_dict({"epoch": 3, "batches": 5, "per_epoch": 5})
    assert _batches(resumed) == epoch4


def test_loader_state_is_the_trainers_position():
    progress = SimpleNamespace(current=SimpleNamespace(processed=7))
    trainer = SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)),
                              current_epoch=2, num_training_batches=9)
    from distill.data.resumable import training_position

    assert training_position(trainer) == {"epoch": 2, "batches": 7, "per_epoch": 9}
    assert _loader().state_dict() == {"epoch": 0, "batches": 0, "per_epoch": 0}  # no trainer: the start


def test_on_device_batches_resume_mid_epoch():
    g = torch.Generator().manual_seed(1)
    images, labels = torch.randint(0, 256, (40, 3, 8, 8), generator=g, dtype=torch.uint8), torch.arange(40) % 10
    make = lambda: DeviceBatches(images, labels, 8, (0.5,) * 3, (0.25,) * 3, train=True, seed=1, padding=1)  # noqa: E731
    straight = make()
    _set_sampler_epoch(straight, 1)
    epoch1 = list(straight)
    resumed = make()
    resumed.load_state_dict({"epoch": 1, "batches": 3, "per_epoch": 5})
    rest = list(resumed)
    assert len(rest) == 2
    for (x, y), (x0, y0) in zip(rest, epoch1[3:], strict=True):
        assert torch.equal(x, x0) and torch.equal(y, y0)  # the same images with the same crops / flips
    assert len(list(resumed)) == 5  # then whole epochs


def test_rng_and_train_metric_states_are_restored_on_a_mid_epoch_restart_only():
    def trainer(mid_epoch: bool):
        fit_loop = SimpleNamespace(restarted_mid_epoch=mid_epoch, _combined_loader_states_to_load=[],
                                   _data_fetcher=None,
                                   epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(
                                       current=SimpleNamespace(processed=1))))
        return SimpleNamespace(fit_loop=fit_loop, current_epoch=0, global_rank=0)

    def draws():
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]

    module = SimpleNamespace(train_score=MulticlassAccuracy(3, average="micro"))
    module.train_score(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 1]))  # 2 of 4 right so far
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    checkpoint = {}
    MidEpochState().on_save_checkpoint(None, module, checkpoint)
    expected = draws()
    for mid_epoch in (True, False):
        torch.manual_seed(1), np.random.seed(1), random.seed(1)
        resumed = SimpleNamespace(train_score=MulticlassAccuracy(3, average="micro"))
        callback = MidEpochState()
        callback.on_load_checkpoint(None, resumed, checkpoint)
        callback.on_train_start(trainer(mid_epoch), resumed)
        assert (draws() == expected) is mid_epoch
        resumed.train_score(torch.tensor([1, 1]), torch.tensor([1, 1]))  # the epoch's remaining batch: 2 of 2
        assert resumed.train_score.compute().item() == pytest.approx(4 / 6 if mid_epoch else 1.0)


@pytest.mark.parametrize(("override", "message"), [
    ("trainer.checkpoint_every_n_steps=0", "checkpoint_every_n_steps=0 is not allowed"),
    ("trainer.checkpoint_every_minutes=-1", "checkpoint_every_minutes=-1 is not allowed"),
])
def test_bad_checkpoint_intervals_are_one_line(override, message, compose):
    with pytest.raises(ConfigError, match=message):
        check_config(compose(["experiment=smoke", override]))


def test_loader_remade_for_ddp_keeps_its_position_and_each_rank_resumes_its_own_shard():
    """Under DDP Lightning remakes the loader with a ``DistributedSamplerWrapper``: each rank's
    resumed batches must be that rank's untrained batches of the epoch."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import BatchSampler, DataLoader

    def rank_loader(rank: int) -> ResumableLoader:
        with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
            loader = _loader(position=where)  # as Lightning requests it (train_dataloader())
        sampler = DistributedSamplerWrapper(loader.sampler, num_replicas=2, rank=rank, shuffle=False, drop_last=False)
        return _update_dataloader(loader, sampler, mode=RunningStage.TRAINING)

    def where():
        return {"epoch": 1, "batches": 1, "per_epoch": 2}

    full = _loader()
    _set_sampler_epoch(full, 1)
    order = sum(_batches(full), [])  # the epoch's global order: rank r takes order[r::2]
    for rank in (0, 1):
        straight = rank_loader(rank)
        assert isinstance(straight, ResumableLoader) and straight.state_dict() == where()  # position kept
        _set_sampler_epoch(straight, 1)
        shard = _batches(straight)
        assert sum(shard, []) == order[rank::2][: len(shard) * 4]
        resumed = rank_loader(rank)
        resumed.load_state_dict({"epoch": 1, "batches": 1, "per_epoch": len(shard)})
        assert _batches(resumed) == shard[1:]
