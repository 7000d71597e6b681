"""Learning-rate schedules whose length is the run's: built once the Trainer knows its step count."""
from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler

SchedulerFactory = Callable[..., LRScheduler]


def cosine_annealing(optimizer: torch.optim.Optimizer, total_steps: int, eta_min: float = 0.0) -> CosineAnnealingLR:
    """The lr falls from its initial value to ``eta_min`` along a half cosine over ``total_steps``
    scheduler steps, i.e. over the whole run (short budgets end at a small lr, not mid-plateau)."""
    return CosineAnnealingLR(optimizer, T_max=max(1, int(total_steps)), eta_min=eta_min)


def wants_total_steps(factory: SchedulerFactory) -> bool:
    """True when ``factory`` takes a ``total_steps`` argument that its config left open."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return "total_steps" in parameters and getattr(factory, "keywords", {}).get("total_steps") is None


def build_scheduler(factory: SchedulerFactory, optimizer: torch.optim.Optimizer, total_steps: int) -> LRScheduler:
    """Call ``factory`` on ``optimizer``; a schedule over the run's length (``cosine_annealing``,
    ``torch.optim.lr_scheduler.OneCycleLR``) gets ``total_steps``, the run's number of scheduler steps."""
    if wants_total_steps(factory):
        return factory(optimizer=optimizer, total_steps=int(total_steps))
    return factory(optimizer=optimizer)
