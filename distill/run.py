"""What ``train.py`` does: build data, models, logger and trainer from the Hydra config, then
train a teacher, a student alone, or distill a student from a teacher.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from netrc import netrc
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.errors import InstantiationException
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from distill.callbacks import EpochTimer, ExplanationPanel
from distill.checkpoints import AtomicCheckpointIO, load_network
from distill.errors import ConfigError, DistillError
from distill.models import build_model, is_explainable
from distill.module import ClassifierModule, DistillModule, ExplainSettings, LossWeights
from distill.tasks import build_task

log = logging.getLogger("distill")

STAGES = ("teacher", "baseline", "distill")


# ---------------------------------------------------------------------------- building blocks
def instantiate(node: DictConfig, what: str, **kwargs) -> Any:
    """``hydra.utils.instantiate`` with a one-line error naming the config group at fault."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ or err
        if isinstance(cause, DistillError):
            raise cause from None
        raise ConfigError(f"could not build {what} from its config: {cause}") from None


def wandb_credentials_present() -> bool:
    """True when W&B can log online: an API key in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, OSError, Exception):
        return False


def build_logger(cfg: DictConfig, run_name: str) -> Logger | None:
    """The configured logger; W&B goes offline by itself when no credentials are set."""
    if not cfg.get("logger"):
        return None
    node = OmegaConf.to_container(cfg.logger, resolve=True)
    if node["_target_"].endswith("WandbLogger"):
        if node.get("offline") == "auto":
            forced = os.environ.get("WANDB_MODE")
            node["offline"] = forced in ("offline", "dryrun") or (
                forced != "online" and not wandb_credentials_present()
            )
        node["name"] = node.get("name") or run_name
        Path(node["save_dir"]).mkdir(parents=True, exist_ok=True)
    return instantiate(OmegaConf.create(node), "the logger (logger=...)")


def announce_wandb_sync(logger: Logger | None) -> None:
    if isinstance(logger, WandbLogger) and logger._offline:
        run_dir = Path(logger.experiment.dir).parent
        log.info("W&B ran offline (no credentials). Sync it later with: wandb sync %s", run_dir)
        logger.experiment.finish()
    elif isinstance(logger, WandbLogger):
        logger.experiment.finish()


def build_trainer(cfg: DictConfig, logger: Logger | None, callbacks: list[pl.Callback]) -> pl.Trainer:
    if logger is not None:
        callbacks = [*callbacks, LearningRateMonitor(logging_interval="epoch")]
    return instantiate(
        cfg.trainer, "the trainer (trainer=...)",
        logger=logger if logger is not None else False,
        callbacks=[*callbacks, EpochTimer()],
        plugins=[AtomicCheckpointIO()],
        default_root_dir=cfg.paths.output_dir,
    )


def checkpoint_callback(path: Path, last_name: str | None = None, monitor: str = "val/acc") -> ModelCheckpoint:
    """Best (by ``monitor``) at ``path``; last at ``<last_name>.ckpt`` (default ``<stem>-last``) beside it."""
    callback = ModelCheckpoint(
        dirpath=path.parent, filename=path.stem, monitor=monitor, mode="max",
        save_last=True, auto_insert_metric_name=False, enable_version_counter=False,
    )
    callback.CHECKPOINT_NAME_LAST = last_name or f"{path.stem}-last"
    return callback


def network(cfg: DictConfig, role: str) -> torch.nn.Module:
    """Build ``cfg[role]`` (teacher / student): its ``name`` plus any model options it sets
    (e.g. ``pretrained``, ``finetune``), for ``data.num_classes`` classes."""
    node = OmegaConf.to_container(cfg[role], resolve=True)
    options = {k: v for k, v in node.items() if k not in ("name", "checkpoint", "compile")}
    try:
        return build_model(node["name"], int(cfg.data.num_classes), **options)
    except TypeError as err:
        raise ConfigError(f"{role}={node['name']} does not take these options: {sorted(options)} ({err})") from None


def task_of(datamodule: pl.LightningDataModule, num_classes: int):
    return build_task(getattr(datamodule, "task", "multiclass"), num_classes)


def default_teacher_checkpoint(cfg: DictConfig) -> Path:
    return Path(cfg.paths.checkpoint_dir) / f"{cfg.teacher.name}_{cfg.data.name}.ckpt"


def run_name(cfg: DictConfig, stage: str) -> str:
    if stage == "teacher":
        return f"teacher-{cfg.teacher.name}-s{cfg.seed}"
    if stage == "baseline":
        return f"baseline-{cfg.student.name}-s{cfg.seed}"
    return f"distill-{cfg.student.name}-explain_{cfg.explain.name}-kd_{cfg.kd.name}-s{cfg.seed}"


def model_hparams(cfg: DictConfig, name: str, stage: str) -> dict:
    return {
        "model_name": name,
        "num_classes": int(cfg.data.num_classes),
        "data_name": cfg.data.name,
        "stage": stage,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def metrics_to_floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in sorted(metrics.items())}


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- stages
def fit_and_test(cfg: DictConfig, module: pl.LightningModule, datamodule: pl.LightningDataModule,
                 stage: str, ckpt: ModelCheckpoint, extra_callbacks: list[pl.Callback] = ()) -> dict:
    """Fit, test the final weights, log where the checkpoints went, return the final metrics."""
    logger = build_logger(cfg, run_name(cfg, stage))
    trainer = build_trainer(cfg, logger, [ckpt, *extra_callbacks])
    if logger is not None:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = metrics_to_floats(trainer.callback_metrics)
    if cfg.get("test_after_fit", True):
        tested = trainer.test(module, datamodule=datamodule, verbose=False)
        metrics.update(metrics_to_floats(tested[0] if tested else {}))
    paths = {"checkpoint/best": ckpt.best_model_path, "checkpoint/last": ckpt.last_model_path}
    if logger is not None:
        logger.log_hyperparams(paths)
    log.info("checkpoints: best %s, last %s", paths["checkpoint/best"], paths["checkpoint/last"])
    announce_wandb_sync(logger)
    return {"stage": stage, "metrics": metrics, **paths}


def train_classifier(cfg: DictConfig, datamodule: pl.LightningDataModule, role: str, stage: str,
                     best_path: Path, last_name: str | None = None) -> dict:
    model = network(cfg, role)
    task = task_of(datamodule, int(cfg.data.num_classes))
    module = ClassifierModule(
        model, task=task,
        optimizer=instantiate(cfg.optim.optimizer, "the optimizer (optim=...)"),
        scheduler=instantiate(cfg.optim.scheduler, "the scheduler (optim=...)") if cfg.optim.get("scheduler") else None,
        hparams=model_hparams(cfg, cfg[role].name, stage),
    )
    ckpt = checkpoint_callback(best_path, last_name, monitor=f"val/{task.score_name}")
    return fit_and_test(cfg, module, datamodule, stage, ckpt)


def resolve_teacher(cfg: DictConfig, datamodule: pl.LightningDataModule) -> tuple[torch.nn.Module, Path]:
    """Load the teacher; train it first when the default checkpoint does not exist yet."""
    num_classes = int(cfg.data.num_classes)
    if cfg.teacher.checkpoint is not None:
        path = Path(cfg.teacher.checkpoint)
        return load_network(path, cfg.teacher.name, num_classes), path
    path = default_teacher_checkpoint(cfg)
    if not path.is_file():
        log.warning("No teacher checkpoint at %s: training the %s teacher first (same data and "
                    "trainer settings), then distilling.", path, cfg.teacher.name)
        train_classifier(cfg, datamodule, "teacher", "teacher", path)
    return load_network(path, cfg.teacher.name, num_classes), path


def distill(cfg: DictConfig, datamodule: pl.LightningDataModule) -> dict:
    teacher, teacher_path = resolve_teacher(cfg, datamodule)
    student = network(cfg, "student")
    task = task_of(datamodule, int(cfg.data.num_classes))
    for role, model in (("teacher", teacher), ("student", student)):
        if cfg.explain.method and not is_explainable(model):
            raise ConfigError(f"explain={cfg.explain.name} needs a {role} with forward_features/forward_head")
    if cfg.teacher.get("compile"):
        teacher.forward_features = torch.compile(teacher.forward_features)
    weights = LossWeights(ce=cfg.kd.ce_weight, kd=cfg.kd.kd_weight, temperature=cfg.kd.temperature,
                          at=cfg.kd.at_weight, explain=cfg.explain.weight)
    settings = ExplainSettings(method=cfg.explain.method, loss=cfg.explain.loss, target=cfg.explain.target,
                               eval_method=cfg.explain.eval_method, closed_form=cfg.explain.closed_form)
    hparams = model_hparams(cfg, cfg.student.name, "distill")
    hparams["teacher_checkpoint"] = str(teacher_path)
    module = DistillModule(
        student, teacher,
        optimizer=instantiate(cfg.optim.optimizer, "the optimizer (optim=...)"),
        scheduler=instantiate(cfg.optim.scheduler, "the scheduler (optim=...)") if cfg.optim.get("scheduler") else None,
        weights=weights, explain=settings, hparams=hparams, task=task,
    )
    out = Path(cfg.paths.output_dir)
    panel = ExplanationPanel(every_n_epochs=cfg.get("panel_every_n_epochs", 10), out_dir=out / "explanations")
    ckpt = checkpoint_callback(out / "checkpoints" / "best.ckpt", "last", monitor=f"val/{task.score_name}")
    return fit_and_test(cfg, module, datamodule, "distill", ckpt, [panel])


def quiet_lightning() -> None:
    """One line per message: under Hydra, Lightning's own console handlers duplicate Hydra's."""
    if logging.getLogger().handlers:
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            logger.propagate = True
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage()
    )
    # The frozen teacher is in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")


def run(cfg: DictConfig) -> dict:
    """Run the configured stage; write and return ``{"metrics": ..., ...}``."""
    quiet_lightning()
    if cfg.stage not in STAGES:
        raise ConfigError(f"stage '{cfg.stage}' is unknown; choose one of {STAGES}")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data, "the data (data=...)")
    if int(cfg.data.num_classes) < 1:
        raise ConfigError(f"data.num_classes must be >= 1, got {cfg.data.num_classes}")
    if cfg.stage == "teacher":
        path = Path(cfg.teacher.checkpoint) if cfg.teacher.checkpoint else default_teacher_checkpoint(cfg)
        result = train_classifier(cfg, datamodule, "teacher", "teacher", path)
    elif cfg.stage == "baseline":
        out = Path(cfg.paths.output_dir)
        result = train_classifier(cfg, datamodule, "student", "baseline", out / "checkpoints" / "best.ckpt", "last")
    else:
        result = distill(cfg, datamodule)
    result["config"] = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
                        for k in ("stage", "seed", "teacher", "student", "explain", "kd")}
    write_json(Path(cfg.paths.output_dir) / "metrics.json", result)
    return result


def main(cfg: DictConfig) -> float | None:
    """Hydra entry point: a ``DistillError`` becomes one line on stderr and exit status 2."""
    try:
        result = run(cfg)
    except DistillError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    return result["metrics"].get("test/acc")
