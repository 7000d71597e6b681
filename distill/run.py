"""What ``train.py`` does: build data, models, logger and trainer from the Hydra config, then
train a teacher, a student alone, or distill a student from a teacher.

Every run writes into its output directory (``paths.output_dir``): ``checkpoints/best.ckpt``
and ``checkpoints/last.ckpt`` (saved atomically), ``metrics.json`` at the end, and, for W&B,
``wandb_run_id`` so that ``resume=<output dir>`` continues the same W&B run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
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
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from distill import console
from distill.callbacks import EpochSeeding, EpochTimer, ExplanationPanel
from distill.callbacks_localization import localization_callbacks
from distill.checkpoints import AtomicCheckpointIO, load_network
from distill.ddp import ddp_barrier, ddp_job
from distill.errors import ConfigError, DistillError
from distill.models import build_model, is_explainable
from distill.module import ClassifierModule, DistillModule, ExplainSettings, LossWeights
from distill.tasks import build_task

log = logging.getLogger("distill")

STAGES = ("teacher", "baseline", "distill")
WANDB_ID_FILE = "wandb_run_id"


# ---------------------------------------------------------------------------- config helpers
def instantiate(node: DictConfig, what: str, **kwargs) -> Any:
    """``hydra.utils.instantiate`` with a one-line error naming the config group at fault."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ or err
        if isinstance(cause, DistillError):
            raise cause from None
        raise ConfigError(f"could not build {what} from its config: {cause}") from None


def output_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.output_dir)


def resume_config(cfg: DictConfig) -> DictConfig:
    """``resume=<run dir>``: that run's saved config, its output dir and its last checkpoint."""
    run_dir = Path(cfg.resume)
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise ConfigError(
            f"resume={run_dir}: no .hydra/config.yaml there. Pass the output directory of the run "
            "to resume, e.g. resume=logs/train/runs/2026-01-01_12-00-00"
        )
    resumed = OmegaConf.load(saved)
    last = run_dir / "checkpoints" / "last.ckpt"
    with open_dict(resumed):
        resumed.paths.output_dir = str(run_dir.resolve())
        resumed.ckpt_path = str(last) if last.is_file() else None
        resumed.resume = None
    log.info("Resuming %s from %s", run_dir, resumed.ckpt_path or "the start (no checkpoint yet)")
    return resumed


# ---------------------------------------------------------------------------- logger
def wandb_credentials_present() -> bool:
    """True when W&B can log online: an API key in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc().authenticators("api.wandb.ai") is not None
    except Exception:  # no ~/.netrc, or one netrc cannot parse
        return False


def build_logger(cfg: DictConfig, run_name: str, run_dir: Path | None = None) -> Logger | None:
    """The configured logger. W&B goes offline by itself without credentials, and a run that
    is resumed in ``run_dir`` continues its W&B run (id kept in ``run_dir/wandb_run_id``)."""
    if not cfg.get("logger"):
        return None
    node = OmegaConf.to_container(cfg.logger, resolve=True)
    if node["_target_"].endswith("WandbLogger"):
        if node.get("offline") == "auto":
            forced = os.environ.get("WANDB_MODE")
            no_credentials = forced != "online" and not wandb_credentials_present()
            node["offline"] = forced in ("offline", "dryrun") or no_credentials
        node["name"] = node.get("name") or run_name
        id_file = run_dir / WANDB_ID_FILE if run_dir is not None else None
        if id_file is not None and id_file.is_file():
            node["id"], node["resume"] = id_file.read_text().strip(), "allow"
        Path(node["save_dir"]).mkdir(parents=True, exist_ok=True)
        logger = instantiate(OmegaConf.create(node), "the logger (logger=...)",
                             **console.wandb_settings(node["offline"]))
        return console.without_anonymous(logger)
    return instantiate(OmegaConf.create(node), "the logger (logger=...)")


def remember_wandb_run(logger: Logger | None, run_dir: Path) -> None:
    if isinstance(logger, WandbLogger) and rank_zero_only.rank == 0:  # DDP ranks > 0 have no W&B run
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / WANDB_ID_FILE).write_text(str(logger.experiment.id))  # starts the run


def finish_logger(logger: Logger | None) -> None:
    if not isinstance(logger, WandbLogger) or rank_zero_only.rank != 0:  # DDP ranks > 0 have no W&B run
        return
    logger.experiment.finish()  # offline: the run's summary prints the sync command (distill.console)


# ---------------------------------------------------------------------------- trainer
def build_trainer(cfg: DictConfig, logger: Logger | None, callbacks: list[pl.Callback]) -> pl.Trainer:
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg.pop("skip_nonfinite", None)  # read by the LightningModule, not the Trainer
    if logger is not None:
        callbacks = [*callbacks, LearningRateMonitor(logging_interval="epoch")]
    return instantiate(
        OmegaConf.create(trainer_cfg), "the trainer (trainer=...)",
        logger=logger if logger is not None else False,
        callbacks=[*callbacks, EpochTimer(), EpochSeeding(int(cfg.seed)), console.CountTestImages()],
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(output_dir(cfg)),
    )


def checkpoint_callback(run_dir: Path, monitor: str) -> ModelCheckpoint:
    """``best.ckpt`` (by ``monitor``) and ``last.ckpt`` in ``run_dir/checkpoints``."""
    return ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="best", monitor=monitor, mode="max",
        save_last=True, auto_insert_metric_name=False, enable_version_counter=False,
    )


# ---------------------------------------------------------------------------- models
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
    options = getattr(datamodule, "task_options", {})  # e.g. VOC's max_map_targets
    return build_task(getattr(datamodule, "task", "multiclass"), num_classes, **options)


def optimization(cfg: DictConfig) -> dict:
    optim = cfg.optim
    return {
        "optimizer": instantiate(optim.optimizer, "the optimizer (optim=...)"),
        "scheduler": instantiate(optim.scheduler, "the scheduler (optim=...)") if optim.get("scheduler") else None,
        "scheduler_interval": optim.get("interval", "epoch"),
    }


def default_teacher_checkpoint(cfg: DictConfig) -> Path:
    return Path(cfg.paths.checkpoint_dir) / f"{cfg.teacher.name}_{cfg.data.name}.ckpt"


def run_name(cfg: DictConfig, stage: str) -> str:
    if stage == "teacher":
        return f"teacher-{cfg.teacher.name}-s{cfg.seed}"
    if stage == "baseline":
        return f"baseline-{cfg.student.name}-s{cfg.seed}"
    return f"distill-{cfg.student.name}-explain_{cfg.explain.name}-kd_{cfg.kd.name}-s{cfg.seed}"


def model_hparams(cfg: DictConfig, role: str, stage: str) -> dict:
    return {
        "model_name": cfg[role].name,
        "num_classes": int(cfg.data.num_classes),
        "data_name": cfg.data.name,
        "stage": stage,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


# ---------------------------------------------------------------------------- outputs
def metrics_to_floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in sorted(metrics.items())}


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)


def publish(source: str | Path, target: Path) -> None:
    """Copy a finished checkpoint to ``target`` atomically (tmp file, then rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)


# ---------------------------------------------------------------------------- stages
def fit_and_test(cfg: DictConfig, module: pl.LightningModule, datamodule: pl.LightningDataModule,
                 stage: str, run_dir: Path, extra_callbacks: list[pl.Callback] = ()) -> dict:
    """Fit (resuming from ``cfg.ckpt_path`` if set), test the final weights, return the metrics."""
    logger = build_logger(cfg, run_name(cfg, stage), run_dir)
    remember_wandb_run(logger, run_dir)
    ckpt = checkpoint_callback(run_dir, monitor=f"val/{module.task.score_name}")
    extra_callbacks = [*extra_callbacks, *localization_callbacks(datamodule)]  # VOC box localisation
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
    finish_logger(logger)
    return {"stage": stage, "metrics": metrics, **paths}


def train_classifier(cfg: DictConfig, datamodule: pl.LightningDataModule, role: str, stage: str,
                     run_dir: Path) -> dict:
    """Cross-entropy training of ``cfg[role]`` alone (a teacher, or the baseline student)."""
    module = ClassifierModule(
        network(cfg, role), task=task_of(datamodule, int(cfg.data.num_classes)),
        hparams=model_hparams(cfg, role, stage), skip_nonfinite=cfg.trainer.get("skip_nonfinite", False),
        **optimization(cfg),
    )
    return fit_and_test(cfg, module, datamodule, stage, run_dir)


def train_teacher(cfg: DictConfig, datamodule: pl.LightningDataModule, target: Path, run_dir: Path) -> dict:
    """Train the teacher in ``run_dir``; only a finished run is published to ``target``
    (best) and ``<target stem>-last.ckpt``, so a killed run never leaves a half-trained teacher."""
    result = train_classifier(cfg, datamodule, "teacher", "teacher", run_dir)
    if rank_zero_only.rank == 0:  # under DDP rank 0 publishes, the other ranks wait for it
        publish(result["checkpoint/best"] or result["checkpoint/last"], target)
        publish(result["checkpoint/last"], target.with_name(f"{target.stem}-last.ckpt"))
    ddp_barrier()
    log.info("teacher saved to %s", target)
    return {**result, "teacher_checkpoint": str(target)}


def resolve_teacher(cfg: DictConfig, datamodule: pl.LightningDataModule) -> tuple[torch.nn.Module, Path]:
    """Load the teacher; train it first when the default checkpoint does not exist yet.

    An explicit ``teacher.checkpoint`` must exist; only the default path is trained if absent.
    """
    options = {k: v for k, v in OmegaConf.to_container(cfg.teacher, resolve=True).items()
               if k not in ("name", "checkpoint", "compile", "pretrained")}
    num_classes = int(cfg.data.num_classes)
    if cfg.teacher.checkpoint is not None:
        path = Path(cfg.teacher.checkpoint)
        return load_network(path, cfg.teacher.name, num_classes, **options), path
    path = default_teacher_checkpoint(cfg)
    if not path.is_file():
        log.info("No teacher checkpoint at %s: training the %s teacher first (same data and "
                 "trainer settings), then distilling.", path, cfg.teacher.name)
        teacher_cfg = cfg.copy()
        with open_dict(teacher_cfg):
            teacher_cfg.ckpt_path = None
            teacher_cfg.trainer.enable_model_summary = False  # one model summary per run: the student's
        train_teacher(teacher_cfg, datamodule, path, output_dir(cfg) / "teacher")
    return load_network(path, cfg.teacher.name, num_classes, **options), path


def distill(cfg: DictConfig, datamodule: pl.LightningDataModule) -> dict:
    teacher, teacher_path = resolve_teacher(cfg, datamodule)
    student = network(cfg, "student")
    for role, model in (("teacher", teacher), ("student", student)):
        if cfg.explain.method and not is_explainable(model):
            raise ConfigError(
                f"explain={cfg.explain.name} needs a {role} with forward_features/forward_head; "
                f"{cfg[role].name} has none: use explain=none or an explainable model"
            )
    for role, model in (("teacher", teacher), ("student", student)):  # the backbone only; the head
        if cfg[role].get("compile"):  # stays eager, so the maps' double backward never enters compiled code
            model.forward_features = torch.compile(model.forward_features)
    weights = LossWeights(ce=cfg.kd.ce_weight, kd=cfg.kd.kd_weight, temperature=cfg.kd.temperature,
                          at=cfg.kd.at_weight, explain=cfg.explain.weight)
    settings = ExplainSettings(method=cfg.explain.method, loss=cfg.explain.loss, target=cfg.explain.target,
                               eval_method=cfg.explain.eval_method, closed_form=cfg.explain.closed_form)
    hparams = model_hparams(cfg, "student", "distill")
    hparams["teacher_checkpoint"] = str(teacher_path)
    module = DistillModule(
        student, teacher, weights=weights, explain=settings, hparams=hparams,
        task=task_of(datamodule, int(cfg.data.num_classes)),
        skip_nonfinite=cfg.trainer.get("skip_nonfinite", False), **optimization(cfg),
    )
    run_dir = output_dir(cfg)
    panel = ExplanationPanel(**cfg.explanation_panel, out_dir=run_dir / "explanations")
    panels = [panel] if module.task.name == "multiclass" else []  # the panel explains one class per image
    result = fit_and_test(cfg, module, datamodule, "distill", run_dir, panels)
    return {**result, "teacher_checkpoint": str(teacher_path)}


def check_data(datamodule: pl.LightningDataModule) -> None:
    """Fail on missing or malformed data before any logger run or checkpoint is created."""
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        datamodule.prepare_data()


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
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")  # the frozen teacher
    console.quiet_libraries()


def run(cfg: DictConfig) -> dict:
    """Run the configured stage; write ``metrics.json`` in the output directory and return it."""
    quiet_lightning()
    if cfg.get("resume"):
        cfg = resume_config(cfg)
    if cfg.stage not in STAGES:
        raise ConfigError(f"stage '{cfg.stage}' is unknown; choose one of {STAGES}")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data, "the data (data=...)")
    check_data(datamodule)
    console.quiet_choices(datamodule, cfg.trainer.get("accelerator"))
    run_dir = output_dir(cfg)
    if cfg.stage == "teacher":
        target = Path(cfg.teacher.checkpoint) if cfg.teacher.checkpoint else default_teacher_checkpoint(cfg)
        result = train_teacher(cfg, datamodule, target, run_dir)
    elif cfg.stage == "baseline":
        result = train_classifier(cfg, datamodule, "student", "baseline", run_dir)
    else:
        result = distill(cfg, datamodule)
    result["config"] = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
                        for k in ("stage", "seed", "teacher", "student", "explain", "kd")}
    result["test_images"] = console.test_images_record(result["metrics"], datamodule)
    if rank_zero_only.rank == 0:  # one writer under DDP
        write_json(run_dir / "metrics.json", result)
        console.report_run(result, run_dir)
    return result


def main(cfg: DictConfig) -> float | None:
    """Hydra entry point: a ``DistillError`` becomes one line on stderr and exit status 2."""
    try:
        with ddp_job():
            result = run(cfg)
    except DistillError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    return result["metrics"].get("test/acc")
