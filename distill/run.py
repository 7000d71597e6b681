"""What ``train.py`` does: train a teacher, a student alone, or distill a student from a teacher.

Every run writes into its output directory (``paths.output_dir``): ``checkpoints/best.ckpt``
and ``checkpoints/last.ckpt`` (saved atomically), ``metrics.json`` at the end, and, for W&B,
``wandb_run_id`` so that ``resume=<output dir>`` continues the same W&B run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from distill import build, console
from distill.config_schema import check_config, check_model_options
from distill.ddp import ddp_job
from distill.errors import ConfigError, exit_on_user_error
from distill.files import write_json
from distill.interrupt import stop_on_signals
from distill.loggers import build_logger, finish_logger, remember_wandb_run
from distill.metrics import chance_flags
from distill.module import ClassifierModule, DistillModule, ExplainSettings, LossWeights
from distill.resume import hydra_overrides, resume_config
from distill.teacher import resolve_teacher, target_checkpoint, teacher_config, train_teacher

log = logging.getLogger("distill")

STAGES = ("teacher", "baseline", "distill")


def fit_and_test(cfg: DictConfig, module: pl.LightningModule, datamodule: pl.LightningDataModule, stage: str) -> dict:
    """Fit (resuming from ``cfg.ckpt_path`` if set), test the final weights, return the metrics."""
    run_dir = Path(cfg.paths.output_dir)
    logger = build_logger(cfg, build.run_name(cfg, stage), run_dir)
    remember_wandb_run(logger, run_dir)
    callbacks = build.callbacks(cfg, with_logger=logger is not None)
    trainer = build.trainer(cfg, logger, callbacks)
    if logger is not None:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = floats(trainer.callback_metrics)
    paths = {"checkpoint/best": callbacks["best_checkpoint"].best_model_path,
             "checkpoint/last": callbacks["last_checkpoint"].best_model_path}
    if cfg.get("test_after_fit", True):
        best = paths["checkpoint/best"] if cfg.get("test_best", True) else ""
        metrics.update(test_checkpoints(trainer, module, datamodule, best, paths["checkpoint/last"]))
    if logger is not None:
        logger.log_hyperparams(paths)
    log.info("checkpoints: best %s, last %s", paths["checkpoint/best"], paths["checkpoint/last"])
    finish_logger(logger)
    return {"stage": stage, "metrics": metrics, **paths}


def test_checkpoints(trainer: pl.Trainer, module: pl.LightningModule, datamodule: pl.LightningDataModule,
                     best: str, last: str) -> dict[str, float]:
    """Test metrics of the final weights (``test/*``) and, given its path, of the ``best`` checkpoint
    (``test_best/*``). The best is tested first and the final weights reloaded from ``last``, so that
    ``test/*`` is what the logger holds last."""
    metrics = {}
    if best and last:
        tested = merged(trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False))
        metrics = {"test_best/" + k.removeprefix("test/"): v for k, v in tested.items()}
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics)
    tested = trainer.test(module, datamodule=datamodule, ckpt_path=last if metrics else None, verbose=False)
    return {**metrics, **merged(tested)}


def merged(tested: list[dict[str, Any]]) -> dict[str, float]:
    """``Trainer.test``'s one dict per test loader (e.g. clean and conflicting-cue images) as one."""
    return {k: v for one in tested for k, v in floats(one).items()}


def floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in sorted(metrics.items())}


def train_classifier(cfg: DictConfig, datamodule: pl.LightningDataModule, role: str, stage: str) -> dict:
    """Cross-entropy training of ``cfg[role]`` alone (a teacher, or the baseline student)."""
    module = ClassifierModule(build.network(cfg, role), task=build.task(cfg, datamodule), role=role,
                              **build.nonfinite_options(cfg), **build.optimization(cfg),
                              **build.run_record(cfg, role, stage, datamodule))
    build.compiled(cfg, role, module.model)
    return fit_and_test(cfg, module, datamodule, stage)


def distill(cfg: DictConfig, datamodule: pl.LightningDataModule) -> dict:
    student = build.check_contract(cfg, "student", build.network(cfg, "student"))
    probe = None  # a teacher trained first must fit the contract, and explain a real map, before it is trained
    if not cfg.teacher.get("as_is"):
        probe = build.check_contract(cfg, "teacher", build.network(cfg, "teacher", weights_from_checkpoint=True))
        missing = build.map_grids(cfg, probe, student)
    teacher_cfg, teacher_data = teacher_datamodule(cfg, datamodule)
    teacher, teacher_path, data_differences = resolve_teacher(teacher_cfg, teacher_data, train_classifier)
    build.check_contract(cfg, "teacher", teacher)
    if probe is None:
        missing = build.map_grids(cfg, teacher, student)
    weights = LossWeights(**OmegaConf.to_container(cfg.loss, resolve=True))
    settings = ExplainSettings(method=cfg.explain.method, distance=cfg.explain.distance, target=cfg.explain.target,
                               eval_method=cfg.eval_method, closed_form=cfg.explain.closed_form)
    record = build.run_record(cfg, "student", "distill", datamodule)
    module = DistillModule(
        student, teacher, weights=weights, explain=settings, task=build.task(cfg, datamodule),
        **build.nonfinite_options(cfg), **build.optimization(cfg), **record,
        teacher_checkpoint=str(teacher_path) if teacher_path else None,
    )
    build.compiled(cfg, "student", module.model)
    build.compiled(cfg, "teacher", module.teacher)
    result = fit_and_test(cfg, module, datamodule, "distill")
    missing = {"map_metrics_missing": missing} if missing else {}
    return {**result, "teacher_checkpoint": str(teacher_path) if teacher_path else None, **missing,
            "teacher_data": build.identity(teacher_cfg, "teacher", teacher_data)["data"],
            "teacher_data_differences": data_differences}


def teacher_datamodule(cfg: DictConfig,
                       datamodule: pl.LightningDataModule) -> tuple[DictConfig, pl.LightningDataModule]:
    """The teacher's config and data (``distill.teacher.teacher_config``: the full, clean training
    set, or ``teacher_data``'s), checked to have the student's classes; ``(cfg, datamodule)`` when
    they are the same."""
    teacher_cfg = teacher_config(cfg)
    if teacher_cfg is cfg:
        return cfg, datamodule
    teacher_data = prepare_data(teacher_cfg)

    def classes(c: DictConfig, dm: pl.LightningDataModule) -> tuple[str, list | int]:
        return c.data.get("root") or c.data.name, getattr(dm, "class_names", None) or int(c.data.num_classes)

    (t_where, t_classes), (s_where, s_classes) = classes(teacher_cfg, teacher_data), classes(cfg, datamodule)
    if t_classes != s_classes:
        raise ConfigError(f"the teacher's data ({t_where}) has the classes {t_classes}, the student's ({s_where}) "
                          f"{s_classes}: teacher_data must have the same classes")
    return teacher_cfg, teacher_data


def prepare_data(cfg: DictConfig) -> pl.LightningDataModule:
    """The DataModule, its files checked (and downloaded) and its batch size against its images,
    before any logger run, checkpoint or training work exists."""
    datamodule = build.instantiate(cfg.data, "the data (data=...)")
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        datamodule.prepare_data()
    if cfg.data.get("num_classes") is None:  # image folders count their class folders
        with open_dict(cfg):
            cfg.data.num_classes = int(datamodule.num_classes)
    # the other ranks of a DDP job wait for rank 0's download, then meet the same check in train_dataloader
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and callable(getattr(datamodule, "check_sizes", None)):
        datamodule.check_sizes()  # (a DataModule of the user's own may not have it)
    return datamodule


def run(cfg: DictConfig) -> dict:
    """Run the configured stage; write ``metrics.json`` in the output directory and return it."""
    console.quiet_lightning()
    check_config(cfg, "train")
    if cfg.get("resume"):
        cfg, finished = resume_config(cfg, hydra_overrides())
        if finished is not None:
            return finished
    if cfg.stage not in STAGES:
        raise ConfigError(f"stage '{cfg.stage}' is unknown; choose one of {STAGES}")
    check_model_options(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.stage == "teacher":  # a teacher trains on the full, clean training set (distill.teacher)
        cfg = teacher_config(cfg)
    datamodule = prepare_data(cfg)
    console.quiet_choices(datamodule, cfg.trainer.get("accelerator"))
    if cfg.stage == "teacher":
        result = train_teacher(cfg, datamodule, target_checkpoint(cfg, datamodule), train_classifier)
    elif cfg.stage == "baseline":
        result = train_classifier(cfg, datamodule, "student", "baseline")
    else:
        result = distill(cfg, datamodule)
    result["config"] = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
                        for k in ("stage", "seed", "teacher", "student", "explain", "kd", "loss")}
    result["test_images"] = console.test_images_record(result["metrics"], datamodule)
    result["num_classes"] = int(cfg.data.num_classes)
    result["flags"] = chance_flags(result["metrics"], None if build.task(cfg, datamodule).multilabel
                                   else result["num_classes"])
    if rank_zero_only.rank == 0:  # one writer under DDP
        write_json(Path(cfg.paths.output_dir) / "metrics.json", result)
        console.report_run(result, Path(cfg.paths.output_dir))
    return result


def main(cfg: DictConfig) -> float | None:
    """Hydra entry point: returns ``optimized_metric`` (e.g. a sweeper's objective); a mistake is
    one line on stderr and exit status 2; SIGTERM / SIGINT save ``last.ckpt``, say how to resume
    and exit 143 / 130 (``distill.interrupt``)."""
    with exit_on_user_error(), ddp_job(), stop_on_signals(cfg.get("resume") or cfg.paths.output_dir):
        result = run(cfg)
    metric = cfg.get("optimized_metric")
    if metric and metric not in result["metrics"]:
        log.warning("optimized_metric=%s was not logged by this run (it logged %s)", metric,
                    ", ".join(sorted(result["metrics"])))
    return result["metrics"].get(metric) if metric else None
