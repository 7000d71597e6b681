"""Schedules over the run's length: optim=sgd_cosine anneals the lr to 0 by the run's last step."""

from __future__ import annotations

import math
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distill.build import optimization
from distill.errors import ConfigError
from distill.module import ClassifierModule
from distill.optim import cosine_annealing
from tests.support import compose_config


class TinyNet(nn.Module):
    num_classes = 3

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x)


class LearningRates(pl.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(trainer.optimizers[0].param_groups[0]["lr"])


def fit_lrs(tmp_path, scheduler, interval: str, epochs: int = 3, batches: int = 4, optimizer=None) -> list[float]:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(8 * batches, 4), torch.randint(0, 3, (8 * batches,)))
    module = ClassifierModule(TinyNet(), optimizer=optimizer or partial(torch.optim.SGD, lr=0.1),
                              scheduler=scheduler, scheduler_interval=interval)
    recorder = LearningRates()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         limit_val_batches=0, callbacks=[recorder])
    trainer.fit(module, DataLoader(data, batch_size=8))
    return recorder.seen


def test_cosine_over_every_step_of_the_run(tmp_path):
    seen = fit_lrs(tmp_path, partial(cosine_annealing), "step")
    total = 12  # 3 epochs x 4 batches, found by the Trainer
    expected = [0.05 * (1 + math.cos(math.pi * t / total)) for t in range(total)]
    assert seen == pytest.approx(expected, abs=1e-12)
    assert seen[-1] < 0.002  # the last step runs at ~0, not at the initial lr


def test_sgd_cosine_config_is_wired_per_step(tmp_path):
    factories = optimization(compose_config(tmp_path, ["optim=sgd_cosine"]))
    seen = fit_lrs(tmp_path, factories["scheduler"], factories["scheduler_interval"], epochs=2, batches=3,
                   optimizer=factories["optimizer"])
    assert seen == pytest.approx([0.05 * (1 + math.cos(math.pi * t / 6)) for t in range(6)], abs=1e-12)


def test_epoch_schedules_step_once_per_epoch(tmp_path):
    seen = fit_lrs(tmp_path, partial(torch.optim.lr_scheduler.MultiStepLR, milestones=[1, 2], gamma=0.5), "epoch")
    assert seen == pytest.approx([0.1] * 4 + [0.05] * 4 + [0.025] * 4)


def test_epoch_interval_gives_max_epochs_to_a_run_length_schedule(tmp_path):
    seen = fit_lrs(tmp_path, partial(cosine_annealing), "epoch", epochs=2)
    assert seen == pytest.approx([0.1] * 4 + [0.05] * 4)  # cos over 2 epochs: 0.1, then 0.05


def test_unknown_interval_is_refused():
    with pytest.raises(ConfigError, match="epoch or step"):
        ClassifierModule(TinyNet(), optimizer=partial(torch.optim.SGD, lr=0.1), scheduler_interval="batch")
