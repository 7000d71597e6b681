"""SIGTERM and SIGINT: stop with a resumable ``last.ckpt``, say how to resume, exit ``128 + signal``.

SIGTERM is what SLURM and Kubernetes send before they stop a job; SIGINT is Ctrl-C. While
:func:`stop_on_signals` is active (the whole of a ``train.py`` run) either one is recorded:

- during training, :class:`StopOnSignal` acts on it at the end of the current training batch: it
  writes ``checkpoints/last.ckpt`` there (the state a mid-epoch checkpoint holds, so ``resume=``
  continues with the next batch) and stops the run. On an epoch's last batch or inside a
  gradient-accumulation window it waits for the next batch end (as mid-epoch checkpoints do);
  in validation it stops at once, ``last.ckpt`` then holding the latest end-of-epoch or
  mid-epoch save. Lightning stops itself on SIGTERM at those points too (``trainer.received_sigterm``);
- anywhere else (data preparation, testing, publishing a teacher) the run stops at once: every
  file is written atomically, so nothing is torn;
- a second signal stops the run at once.

Then one line says how to continue (``resume=<run dir>``) and the process exits with status 143
(SIGTERM) or 130 (SIGINT), as a shell reports a process stopped by that signal; never 0, so a
scheduler does not count the job as finished.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from distill.mid_epoch import safe_to_save_mid_epoch

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """The run was stopped by signal ``signum``. A ``BaseException`` (as ``KeyboardInterrupt``), so
    that no ``except Exception`` on the way up swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Requests:
    """The first signal received (``None``: none), and whether it waits for a safe point."""

    signum: int | None = None
    deferred: bool = False


_requests = _Requests()


def requested() -> int | None:
    """The signal received while :func:`stop_on_signals` is active, or ``None``."""
    return _requests.signum


def _on_signal(signum: int, frame: Any) -> None:
    repeated = _requests.signum is not None
    if not repeated:
        _requests.signum = signum
    if repeated or not _requests.deferred:
        raise Interrupted(_requests.signum)


def resume_line(signum: int, run_dir: str | Path) -> str:
    """One line: which signal stopped the run, what it kept, and the command that continues it."""
    saved = any(Path(run_dir).glob("**/checkpoints/last.ckpt"))  # the run's, or its teacher's (teacher/)
    kept = "its last.ckpt saved" if saved else "before its first checkpoint (it will start from the beginning)"
    return f"interrupted by {signal.Signals(signum).name}: the run stopped, {kept}; continue it with: " \
           f"python train.py resume={run_dir}"


@contextlib.contextmanager
def stop_on_signals(run_dir: str | Path) -> Iterator[None]:
    """Record SIGTERM / SIGINT (see the module's docstring); when the run stops because of one,
    print :func:`resume_line` on stderr and exit with ``128 + signal``. The previous handlers are
    put back afterwards. Outside the main thread (signals cannot be handled there) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    _requests.signum, _requests.deferred = None, False
    for signum in SIGNALS:
        signal.signal(signum, _on_signal)
    try:
        yield
    except BaseException as err:
        # Interrupted, Lightning's SIGTERMException (a SystemExit with no status: exit 0), or whatever
        # failed because of the signal (e.g. a DataLoader worker it stopped)
        signum = err.signum if isinstance(err, Interrupted) else _requests.signum
        if signum is None:
            raise
        if os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0":
            print(resume_line(signum, run_dir), file=sys.stderr, flush=True)
        sys.exit(128 + signum)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _requests.signum, _requests.deferred = None, False


class StopOnSignal(pl.Callback):
    """Act on a signal recorded by :func:`stop_on_signals` at the next safe point of training:
    write ``last`` (``checkpoints/last.ckpt``, through the trainer's atomic checkpoint writer)
    and raise :class:`Interrupted`. Under DDP the ranks agree on the decision at every batch end
    (every rank must take part in a save)."""

    def __init__(self, last: str | Path) -> None:
        self.last = Path(last)

    def _stop_requested(self, trainer: pl.Trainer) -> bool:
        signum = requested()
        if trainer.world_size > 1:
            return trainer.strategy.reduce_boolean_decision(signum is not None, all=False)
        return signum is not None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _requests.deferred = True
        if self._stop_requested(trainer):  # received while the trainer set up: stop before the first batch
            raise Interrupted(requested() or signal.SIGTERM)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if not self._stop_requested(trainer) or not safe_to_save_mid_epoch(trainer):
            return
        trainer.save_checkpoint(self.last)
        raise Interrupted(requested() or signal.SIGTERM)

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if _requests.deferred and self._stop_requested(trainer):
            raise Interrupted(requested() or signal.SIGTERM)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _requests.deferred = False
        if self._stop_requested(trainer):  # after the last epoch's checkpoint: stop before testing
            raise Interrupted(requested() or signal.SIGTERM)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        _requests.deferred = False
