"""Objects built from the Hydra config: networks, the task, the LightningModules' arguments,
callbacks and the trainer. Each function reads the config groups it names and nothing else."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.errors import InstantiationException
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from distill import console, mid_epoch
from distill.callbacks import EpochSeeding
from distill.checkpoints import AtomicCheckpointIO
from distill.errors import ConfigError, DistillError
from distill.explain import inspect_network, map_grid, map_metrics_missing, meaningful_grid
from distill.explain.resolution import degenerate_grid_fix, grids_line
from distill.identity import data_identity, network_identity
from distill.interrupt import StopOnSignal
from distill.labels import model_label
from distill.models import build_model, model_options, require_network
from distill.tasks import build_task

log = logging.getLogger("distill")

MODULE_TRAINER_KEYS = ("skip_nonfinite", "max_skipped_steps")  # trainer.* keys the LightningModule reads
REQUIRED_CALLBACKS = ("best_checkpoint", "last_checkpoint")  # the run's result and what resume= continues


def distill_trainer_keys() -> tuple[str, ...]:
    """``trainer.*`` keys that distill reads and Lightning's ``Trainer`` does not take."""
    return (*MODULE_TRAINER_KEYS, *mid_epoch.KEYS)


def instantiate(node: DictConfig, what: str, **kwargs) -> Any:
    """``hydra.utils.instantiate`` with a one-line error naming the config group at fault."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ or err
        if isinstance(cause, DistillError):
            raise cause from None
        raise ConfigError(f"could not build {what} from its config: {cause}") from None


# ---------------------------------------------------------------------------- networks
def network(cfg: DictConfig, role: str, weights_from_checkpoint: bool = False) -> torch.nn.Module:
    """Build ``cfg[role]`` (teacher / student): its ``name`` plus any model options it sets
    (e.g. ``arch``, ``pretrained``, ``finetune``), for ``data.num_classes`` classes."""
    node = OmegaConf.to_container(cfg[role], resolve=True)
    options = model_options(node, weights_from_checkpoint)
    try:
        return build_model(node["name"], int(cfg.data.num_classes), **options)
    except TypeError as err:
        raise ConfigError(f"{role}={node['name']} does not take these options: {sorted(options)} ({err})") from None


def example_images(cfg: DictConfig) -> torch.Tensor:
    """Two random images of the data's size, to check a network against the model contract."""
    size = int(cfg.data.get("image_size") or 32)
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def check_contract(cfg: DictConfig, role: str, model: torch.nn.Module) -> torch.nn.Module:
    """``model`` follows the model contract and its head is measured; else one line, before any training."""
    require_network(model, role, model_label(cfg[role]), stages=cfg.loss.at > 0)
    inspect_network(model, example_images(cfg))
    return model


def map_grids(cfg: DictConfig, teacher: torch.nn.Module, student: torch.nn.Module) -> str | None:
    """State each network's explained grid at the data's image size (one line, before any training;
    ``check_contract`` measured it). With an explanation loss (``loss.explain > 0``) a grid below
    ``MIN_MAP_GRID`` stops the run with one line naming the network, its grid and the fixes; without
    one the run goes on, and the reason its map metrics are left out is returned (else ``None``)."""
    grids = {f"{role} {model_label(cfg[role])}": map_grid(model)
             for role, model in (("teacher", teacher), ("student", student))}
    size = example_images(cfg).shape[-1]
    log.info("explained map grids at %dx%d pixels: %s", size, size, grids_line(grids))
    missing = map_metrics_missing(grids)
    if missing and float(cfg.loss.explain) > 0:
        name, grid = next((name, grid) for name, grid in grids.items() if not meaningful_grid(grid))
        raise ConfigError(degenerate_grid_fix(name, grid, size))
    if missing:
        log.warning("%s: no map metric (map cosine, pointing game, localisation, panels) is reported for it", missing)
    return missing


def compiled(cfg: DictConfig, role: str, model: torch.nn.Module) -> torch.nn.Module:
    """With ``<role>.compile=true``, ``model``'s backbone (``forward_features``, and
    ``forward_stages`` for ``kd=at``) runs under ``torch.compile``; the head stays eager, so the
    maps' double backward never enters compiled code. A network without ``forward_features``
    (trained alone, e.g. a ViT) is compiled whole."""
    if not cfg[role].get("compile"):
        return model
    parts = [name for name in ("forward_features", "forward_stages") if callable(getattr(model, name, None))]
    for name in parts:
        setattr(model, name, torch.compile(getattr(model, name)))
    return model if parts else torch.compile(model)


def identity(cfg: DictConfig, role: str, datamodule: pl.LightningDataModule) -> dict:
    """The network of ``cfg[role]`` and the data it is trained on (``distill.identity``)."""
    names = getattr(datamodule, "class_names", None)  # a DataModule of the user's own may not name its classes
    data = data_identity(OmegaConf.to_container(cfg.data, resolve=True), names, int(cfg.seed))
    return {"network": network_identity(OmegaConf.to_container(cfg[role], resolve=True)), "data": data}


# ---------------------------------------------------------------------------- module arguments
def task(cfg: DictConfig, datamodule: pl.LightningDataModule | None = None):
    """The task of ``cfg.task`` (``configs/task/``), checked against the data's labels."""
    multilabel = getattr(datamodule, "multilabel", None)  # None (unknown, e.g. the user's own DataModule): not checked
    return build_task(OmegaConf.to_container(cfg.task, resolve=True), int(cfg.data.num_classes), multilabel)


def optimization(cfg: DictConfig) -> dict:
    """The module's ``optimizer`` / ``scheduler`` config nodes (it builds them, and a checkpoint
    records them), each checked here to build, so that a mistake is one line naming its group."""
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    instantiate(OmegaConf.create(optim["optimizer"]), "the optimizer (optim=...)")
    if optim.get("scheduler"):
        instantiate(OmegaConf.create(optim["scheduler"]), "the scheduler (optim=...)")
    return {"optimizer": optim["optimizer"], "scheduler": optim.get("scheduler") or None,
            "scheduler_interval": optim.get("interval", "epoch")}


def nonfinite_options(cfg: DictConfig) -> dict:
    return {"skip_nonfinite": bool(cfg.trainer.get("skip_nonfinite", False)),
            "max_skipped_steps": int(cfg.trainer.get("max_skipped_steps", 10))}


def run_record(cfg: DictConfig, role: str, stage: str, datamodule: pl.LightningDataModule) -> dict:
    """What a checkpoint records of its network, data and run (``distill.module.RECORD_KEYS``,
    read back by the evaluation scripts and the teacher identity checks)."""
    return {
        "model_name": cfg[role].name,
        "num_classes": int(cfg.data.num_classes),
        "data_name": cfg.data.name,
        "stage": stage,
        "identity": identity(cfg, role, datamodule),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def run_name(cfg: DictConfig, stage: str) -> str:
    if stage == "teacher":
        return f"teacher-{model_label(cfg.teacher)}-s{cfg.seed}"
    if stage == "baseline":
        return f"baseline-{model_label(cfg.student)}-s{cfg.seed}"
    return (f"distill-{model_label(cfg.teacher)}-to-{model_label(cfg.student)}-explain_{cfg.explain.name}"
            f"-kd_{cfg.kd.name}-s{cfg.seed}")


# ---------------------------------------------------------------------------- callbacks and trainer
def callbacks(cfg: DictConfig, with_logger: bool) -> dict[str, pl.Callback]:
    """The callbacks of ``cfg.callbacks`` (``configs/callbacks/``) by name, plus the mid-epoch
    ``last.ckpt`` writers of ``trainer.checkpoint_every_*``. ``lr_monitor`` is left out without
    a logger (Lightning refuses it then)."""
    nodes = cfg.get("callbacks") or {}
    missing = [name for name in REQUIRED_CALLBACKS if not nodes.get(name)]
    if missing:
        raise ConfigError(f"callbacks.{missing[0]} is required (it writes the run's checkpoints); "
                          "configure it, do not drop it")
    built = {name: instantiate(node, f"the callback callbacks.{name}") for name, node in nodes.items()
             if node and node.get("_target_") and (with_logger or name != "lr_monitor")}
    run_dir = Path(cfg.paths.output_dir)
    for i, writer in enumerate(mid_epoch.mid_epoch_checkpoints(run_dir, cfg.trainer.get("checkpoint_every_n_steps"),
                                                                cfg.trainer.get("checkpoint_every_minutes"))):
        built[f"mid_epoch_checkpoint_{i}"] = writer
    return built


def trainer(cfg: DictConfig, logger: Logger | None, configured: dict[str, pl.Callback]) -> pl.Trainer:
    """Lightning's ``Trainer`` from ``cfg.trainer`` with the configured callbacks and the ones every
    run needs: epoch seeding, mid-epoch resume state, the test image count, stopping on SIGTERM /
    SIGINT with a saved ``last.ckpt``, atomic checkpoint writes."""
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    for key in distill_trainer_keys():  # read by the LightningModule / distill, not the Trainer
        trainer_cfg.pop(key, None)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    machinery = [EpochSeeding(int(cfg.seed)), mid_epoch.MidEpochState(), console.CountTestImages(), StopOnSignal(last)]
    return instantiate(
        OmegaConf.create(trainer_cfg), "the trainer (trainer=...)",
        logger=logger if logger is not None else False,
        callbacks=[*configured.values(), *machinery],
        plugins=[AtomicCheckpointIO(trusted=bool(cfg.get("trust_checkpoints", False)))],
        default_root_dir=str(cfg.paths.output_dir),
    )
