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

from distill import console, mid_epoch
from distill.callbacks import EpochSeeding, EpochTimer, ExplanationPanel
from distill.callbacks_localization import localization_callbacks
from distill.checkpoints import AtomicCheckpointIO, load_network
from distill.config_schema import check_config, check_model_options
from distill.ddp import ddp_barrier, ddp_job
from distill.errors import CheckpointError, ConfigError, DistillError, os_cause, os_error_message
from distill.files import copy_file, write_json
from distill.identity import checkpoint_stem, data_identity, network_identity
from distill.models import build_model, inspect_network, model_options, require_network
from distill.module import ClassifierModule, DistillModule, ExplainSettings, LossWeights
from distill.resume import hydra_overrides, last_checkpoint, resume_config
from distill.tasks import build_task

log = logging.getLogger("distill")

STAGES = ("teacher", "baseline", "distill")
MODULE_TRAINER_KEYS = ("skip_nonfinite", "max_skipped_steps")  # trainer.* keys the LightningModule reads


def distill_trainer_keys() -> tuple[str, ...]:
    """``trainer.*`` keys that distill reads and Lightning's ``Trainer`` does not take."""
    return (*MODULE_TRAINER_KEYS, *mid_epoch.KEYS)
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
    for key in distill_trainer_keys():  # read by the LightningModule / distill, not the Trainer
        trainer_cfg.pop(key, None)
    if logger is not None:
        callbacks = [*callbacks, LearningRateMonitor(logging_interval="epoch")]
    return instantiate(
        OmegaConf.create(trainer_cfg), "the trainer (trainer=...)",
        logger=logger if logger is not None else False,
        callbacks=[*callbacks, EpochTimer(), EpochSeeding(int(cfg.seed)), mid_epoch.MidEpochState(),
                   console.CountTestImages()],
        plugins=[AtomicCheckpointIO(trusted=bool(cfg.get("trust_checkpoints", False)))],
        default_root_dir=str(output_dir(cfg)),
    )


def checkpoint_callbacks(run_dir: Path, monitor: str) -> tuple[ModelCheckpoint, ModelCheckpoint]:
    """``best.ckpt`` (by ``monitor``) and ``last.ckpt`` (every epoch, improved or not) in
    ``run_dir/checkpoints``. Two callbacks: Lightning's ``save_last`` only writes when the monitor
    improved. Best first, so that ``last.ckpt`` records the best path of the same epoch."""
    best = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor=monitor, mode="max",
                           auto_insert_metric_name=False, enable_version_counter=False)
    last = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last", monitor=None, save_top_k=1,
                           auto_insert_metric_name=False, enable_version_counter=False)
    return best, last


# ---------------------------------------------------------------------------- models
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


def identity(cfg: DictConfig, role: str, datamodule: pl.LightningDataModule) -> dict:
    """The network of ``cfg[role]`` and the data it is trained on (``distill.identity``)."""
    data = data_identity(OmegaConf.to_container(cfg.data, resolve=True), getattr(datamodule, "class_names", None),
                         int(cfg.seed))
    return {"network": network_identity(OmegaConf.to_container(cfg[role], resolve=True)), "data": data}


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


def nonfinite_options(cfg: DictConfig) -> dict:
    return {"skip_nonfinite": bool(cfg.trainer.get("skip_nonfinite", False)),
            "max_skipped_steps": int(cfg.trainer.get("max_skipped_steps", 10))}


def default_teacher_checkpoint(cfg: DictConfig, datamodule: pl.LightningDataModule) -> Path:
    """``checkpoints/<network>_<data>-<hash of both identities>.ckpt``."""
    ident = identity(cfg, "teacher", datamodule)
    return Path(cfg.paths.checkpoint_dir) / f"{checkpoint_stem(ident['network'], ident['data'])}.ckpt"


def model_label(node: DictConfig) -> str:
    """``wrn16_2``, ``timm-resnet18``: the network's name in run names."""
    return f"{node.name}-{node.arch}" if node.get("arch") else str(node.name)


def run_name(cfg: DictConfig, stage: str) -> str:
    if stage == "teacher":
        return f"teacher-{model_label(cfg.teacher)}-s{cfg.seed}"
    if stage == "baseline":
        return f"baseline-{model_label(cfg.student)}-s{cfg.seed}"
    return (f"distill-{model_label(cfg.teacher)}-to-{model_label(cfg.student)}-explain_{cfg.explain.name}"
            f"-kd_{cfg.kd.name}-s{cfg.seed}")


def model_hparams(cfg: DictConfig, role: str, stage: str, datamodule: pl.LightningDataModule) -> dict:
    return {
        "model_name": cfg[role].name,
        "num_classes": int(cfg.data.num_classes),
        "data_name": cfg.data.name,
        "stage": stage,
        "identity": identity(cfg, role, datamodule),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


# ---------------------------------------------------------------------------- outputs
def metrics_to_floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in sorted(metrics.items())}


def publish(source: str | Path, target: Path) -> None:
    """Copy a finished checkpoint to ``target`` atomically (tmp file, fsync, rename)."""
    try:
        copy_file(source, target)
    except OSError as err:
        raise CheckpointError(f"could not publish {Path(source).name} as {target.name} in folder {target.parent}: "
                              f"{os_cause(err)}; the trained checkpoint stays in {Path(source).parent}") from None


# ---------------------------------------------------------------------------- stages
def fit_and_test(cfg: DictConfig, module: pl.LightningModule, datamodule: pl.LightningDataModule,
                 stage: str, run_dir: Path, extra_callbacks: list[pl.Callback] = ()) -> dict:
    """Fit (resuming from ``cfg.ckpt_path`` if set), test the final weights, return the metrics."""
    logger = build_logger(cfg, run_name(cfg, stage), run_dir)
    remember_wandb_run(logger, run_dir)
    best, last = checkpoint_callbacks(run_dir, monitor=f"val/{module.task.score_name}")
    within_epoch = mid_epoch.mid_epoch_checkpoints(run_dir, cfg.trainer.get("checkpoint_every_n_steps"),
                                                   cfg.trainer.get("checkpoint_every_minutes"))  # also last.ckpt
    extra_callbacks = [*within_epoch, *extra_callbacks, *localization_callbacks(datamodule)]  # VOC box localisation
    trainer = build_trainer(cfg, logger, [best, last, *extra_callbacks])
    if logger is not None:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = metrics_to_floats(trainer.callback_metrics)
    if cfg.get("test_after_fit", True):
        tested = trainer.test(module, datamodule=datamodule, verbose=False)
        metrics.update(metrics_to_floats(tested[0] if tested else {}))
    paths = {"checkpoint/best": best.best_model_path, "checkpoint/last": last.best_model_path}
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
        hparams=model_hparams(cfg, role, stage, datamodule), **nonfinite_options(cfg), **optimization(cfg),
    )
    return fit_and_test(cfg, module, datamodule, stage, run_dir)


def train_teacher(cfg: DictConfig, datamodule: pl.LightningDataModule, target: Path, run_dir: Path) -> dict:
    """Train the teacher in ``run_dir``; only a finished run is published to ``target``
    (best) and ``<target stem>-last.ckpt``, so a killed run never leaves a half-trained teacher."""
    result = train_classifier(cfg, datamodule, "teacher", "teacher", run_dir)
    if rank_zero_only.rank == 0:  # under DDP rank 0 publishes, the other ranks wait for it
        publish(result["checkpoint/best"] or result["checkpoint/last"], target)
        publish(result["checkpoint/last"], target.with_name(f"{target.stem}-last.ckpt"))
        write_json(target.with_suffix(".json"), {"identity": identity(cfg, "teacher", datamodule),
                                                 "metrics": result["metrics"]})
    ddp_barrier()
    log.info("teacher saved to %s", target)
    return {**result, "teacher_checkpoint": str(target)}


def announce_teacher(path: Path) -> None:
    """One line: which teacher file is reused, trained on what, and its test score."""
    record = path.with_suffix(".json")
    if not record.is_file():
        log.info("Teacher: %s", path)
        return
    saved = json.loads(record.read_text())
    data, metrics = saved["identity"]["data"], saved.get("metrics", {})
    scores = ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())
                       if k.startswith("test/") and not k.endswith(("loss", "num_images")))
    log.info("Reusing teacher %s (trained on %s%s; %s)", path, data.get("name"),
             f" {data['root']}" if data.get("root") else "", scores or "no test metrics")


def resolve_teacher(cfg: DictConfig, datamodule: pl.LightningDataModule) -> tuple[torch.nn.Module, Path | None]:
    """The teacher: as built (``teacher.as_is``: e.g. ImageNet weights for ImageNet data), from
    ``teacher.checkpoint``, or from the default checkpoint, trained first when it does not exist
    (a resumed run killed in that stage continues the teacher's own run)."""
    if cfg.teacher.get("as_is"):
        log.info("Teacher: %s as built (teacher.as_is=true: not trained here)", model_label(cfg.teacher))
        return network(cfg, "teacher"), None
    expected = identity(cfg, "teacher", datamodule)
    trusted = bool(cfg.get("trust_checkpoints", False))
    if cfg.teacher.checkpoint is not None:
        path = Path(cfg.teacher.checkpoint)
    else:
        path = default_teacher_checkpoint(cfg, datamodule)
        if not path.is_file():
            log.info("No teacher checkpoint at %s: training the %s teacher first (same data and "
                     "trainer settings), then distilling.", path, model_label(cfg.teacher))
            teacher_dir = output_dir(cfg) / "teacher"
            teacher_cfg = cfg.copy()
            with open_dict(teacher_cfg):
                teacher_cfg.ckpt_path = last_checkpoint(teacher_dir, trusted, bool(cfg.get("resume_fallback", False)),
                                                        "teacher's last.ckpt")
                teacher_cfg.trainer.enable_model_summary = False  # one model summary per run: the student's
            if teacher_cfg.ckpt_path:
                log.info("Resuming the teacher from its own last checkpoint %s", teacher_cfg.ckpt_path)
            train_teacher(teacher_cfg, datamodule, path, teacher_dir)
        else:
            announce_teacher(path)
    teacher = load_network(path, lambda: network(cfg, "teacher", weights_from_checkpoint=True),
                           cfg.teacher.name, int(cfg.data.num_classes), expected, trusted=trusted)
    return teacher, path


def check_contract(cfg: DictConfig, role: str, model: torch.nn.Module) -> torch.nn.Module:
    """``model`` follows the model contract and its head is measured; else one line, before any training."""
    require_network(model, role, model_label(cfg[role]), stages=cfg.loss.at > 0)
    inspect_network(model, example_images(cfg))
    return model


def distill(cfg: DictConfig, datamodule: pl.LightningDataModule) -> dict:
    student = check_contract(cfg, "student", network(cfg, "student"))
    if not cfg.teacher.get("as_is"):  # a teacher trained first must fit the contract before it is trained
        check_contract(cfg, "teacher", network(cfg, "teacher", weights_from_checkpoint=True))
    teacher, teacher_path = resolve_teacher(cfg, datamodule)
    check_contract(cfg, "teacher", teacher)
    for role, model in (("teacher", teacher), ("student", student)):  # the backbone only; the head
        if cfg[role].get("compile"):  # stays eager, so the maps' double backward never enters compiled code
            model.forward_features = torch.compile(model.forward_features)
    weights = LossWeights(**OmegaConf.to_container(cfg.loss, resolve=True))
    settings = ExplainSettings(method=cfg.explain.method, distance=cfg.explain.distance, target=cfg.explain.target,
                               eval_method=cfg.explain.eval_method, closed_form=cfg.explain.closed_form)
    hparams = model_hparams(cfg, "student", "distill", datamodule)
    hparams["teacher_checkpoint"] = str(teacher_path) if teacher_path else None
    module = DistillModule(
        student, teacher, weights=weights, explain=settings, hparams=hparams,
        task=task_of(datamodule, int(cfg.data.num_classes)),
        **nonfinite_options(cfg), **optimization(cfg),
    )
    run_dir = output_dir(cfg)
    panel = ExplanationPanel(**cfg.explanation_panel, out_dir=run_dir / "explanations")  # multi-label: per positive
    result = fit_and_test(cfg, module, datamodule, "distill", run_dir, [panel])
    return {**result, "teacher_checkpoint": str(teacher_path) if teacher_path else None}


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
    check_config(cfg, "train")
    if cfg.get("resume"):
        cfg, finished = resume_config(cfg, hydra_overrides())
        if finished is not None:
            return finished
    if cfg.stage not in STAGES:
        raise ConfigError(f"stage '{cfg.stage}' is unknown; choose one of {STAGES}")
    check_model_options(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data, "the data (data=...)")
    check_data(datamodule)
    if cfg.data.get("num_classes") is None:  # image folders count their class folders
        with open_dict(cfg):
            cfg.data.num_classes = int(datamodule.num_classes)
    console.quiet_choices(datamodule, cfg.trainer.get("accelerator"))
    run_dir = output_dir(cfg)
    if cfg.stage == "teacher":
        target = Path(cfg.teacher.checkpoint) if cfg.teacher.checkpoint else default_teacher_checkpoint(cfg, datamodule)
        result = train_teacher(cfg, datamodule, target, run_dir)
    elif cfg.stage == "baseline":
        result = train_classifier(cfg, datamodule, "student", "baseline", run_dir)
    else:
        result = distill(cfg, datamodule)
    result["config"] = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
                        for k in ("stage", "seed", "teacher", "student", "explain", "kd", "loss")}
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
    except OSError as err:  # a folder that cannot be created or written, a full disk
        print(f"error: {os_error_message(err)}", file=sys.stderr)
        sys.exit(2)
    return result["metrics"].get("test/acc")
