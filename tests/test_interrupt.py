"""SIGTERM / SIGINT: last.ckpt saved at the batch end, one line naming resume=, exit 128 + signal.

The end-to-end check (train.py stopped by a signal, resumed, same weights) is in tests/test_robustness.py.
"""

from __future__ import annotations

import os
import signal
import time

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distill.checkpoints import AtomicCheckpointIO, read_checkpoint
from distill.interrupt import StopOnSignal, stop_on_signals


class SignalsItself(pl.LightningModule):
    """A linear classifier that sends its own process ``signum`` during training batch ``at``."""

    def __init__(self, signum: int, at: int) -> None:
        super().__init__()
        self.net, self.signum, self.at = nn.Linear(4, 2), signum, at

    def training_step(self, batch, batch_idx):
        if self.global_step == self.at:
            os.kill(os.getpid(), self.signum)  # its handler runs here, in the middle of the step
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(module: pl.LightningModule, last) -> None:
    data = TensorDataset(torch.randn(40, 4), torch.randint(0, 2, (40,)))
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[StopOnSignal(last)], plugins=[AtomicCheckpointIO()])
    trainer.fit(module, DataLoader(data, batch_size=4))


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["TERM", "INT"])
def test_a_signal_in_training_saves_last_ckpt_at_the_batch_end_says_how_to_resume_and_exits_128_plus_it(
        signum, status, tmp_path, capsys):
    before = signal.getsignal(signum)
    last = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(SystemExit) as info, stop_on_signals(tmp_path):
        fit(SignalsItself(signum, at=2), last)
    assert info.value.code == status
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (f"interrupted by {signal.Signals(signum).name}: the run stopped, its last.ckpt saved; continue "
                    f"it with: python train.py resume={tmp_path}")
    checkpoint = read_checkpoint(last)
    assert checkpoint["global_step"] == 3  # the signalled batch (the 3rd) finished its step, then the run stopped
    assert checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"] == 3
    assert not list(last.parent.glob("*.tmp"))
    assert signal.getsignal(signum) == before  # the previous handler is back


def test_a_signal_outside_training_stops_at_once(tmp_path, capsys):
    with pytest.raises(SystemExit) as info, stop_on_signals(tmp_path / "run"):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # e.g. preparing the data: never reached
    assert info.value.code == 143
    assert capsys.readouterr().err.strip() == ("interrupted by SIGTERM: the run stopped, before its first checkpoint "
                                               "(it will start from the beginning); continue it with: python train.py "
                                               f"resume={tmp_path / 'run'}")


def test_errors_without_a_signal_pass_through(tmp_path):
    with pytest.raises(ValueError, match="a bug"), stop_on_signals(tmp_path):
        raise ValueError("a bug")
