"""The teacher of a distillation run: used as built, loaded from its checkpoint, or trained first.

The teacher's data is the run's data option without the options that shape the student's
distillation set only (``data.per_class``, ``data.shortcut``: ``distill.identity.STUDENT_ONLY_KEYS``),
with the keys ``teacher_data`` sets (e.g. ``teacher_data.root``: another image folder with the same
classes): a teacher trained on the full, clean training set (Hinton's transfer set: the student
distils on other images than the teacher was trained on). Every few-shot or shortcut row of a table
so shares one teacher. An explicit ``teacher.checkpoint`` trained on other data is used with one
line naming the differences (``metrics.json``: ``teacher_data_differences``); another network or
class list is refused.

A teacher trained here is published only when its run finished: ``checkpoints/<network>_<data>-
<hash>.ckpt`` (its best weights), ``<stem>-last.ckpt`` and a ``.json`` record of what it is and
its test metrics (``distill.identity``). A run killed in this stage resumes the teacher's own run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from distill.build import identity, model_label, network
from distill.checkpoints import load_network
from distill.ddp import ddp_barrier
from distill.errors import CheckpointError, ConfigError, os_cause
from distill.files import copy_file, write_json
from distill.identity import STUDENT_ONLY_KEYS, checkpoint_stem, data_differences
from distill.models import BUILD_ATTRIBUTE, build_spec
from distill.resume import last_checkpoint

log = logging.getLogger("distill")

TrainStage = Callable[[DictConfig, pl.LightningDataModule, str, str], dict]  # (cfg, data, role, stage) -> result


def teacher_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` with ``data`` replaced by the teacher's data: ``STUDENT_ONLY_KEYS`` off (null), the
    non-null keys of ``teacher_data`` set. ``cfg`` itself when that changes nothing."""
    on = {"per_class": cfg.data.get("per_class"), "shortcut": OmegaConf.select(cfg.data, "shortcut.p")}
    changes = {key: None for key in STUDENT_ONLY_KEYS if on[key] is not None}
    teacher_data = cfg.get("teacher_data") or {}
    for key, value in teacher_data.items():
        if value is None:
            continue
        if key not in cfg.data:
            raise ConfigError(f"teacher_data.{key} is not a key of data={cfg.data.name}; the teacher's data takes "
                              f"the data option's keys: {', '.join(sorted(cfg.data))}")
        changes[key] = value
    if not changes:
        return cfg
    teacher_cfg = cfg.copy()
    with open_dict(teacher_cfg):
        for key, value in changes.items():
            teacher_cfg.data[key] = value
    return teacher_cfg


class ResolvedTeacher(NamedTuple):
    network: torch.nn.Module
    path: Path | None  # its checkpoint (None: used as built)
    data_differences: list[str]  # how the data it was trained on differs from the teacher's data option


def default_checkpoint(cfg: DictConfig, datamodule: pl.LightningDataModule) -> Path:
    """``checkpoints/<network>_<data>-<hash of both identities>.ckpt``."""
    ident = identity(cfg, "teacher", datamodule)
    return Path(cfg.paths.checkpoint_dir) / f"{checkpoint_stem(ident['network'], ident['data'])}.ckpt"


def target_checkpoint(cfg: DictConfig, datamodule: pl.LightningDataModule) -> Path:
    """Where ``stage=teacher`` publishes: ``teacher.checkpoint``, else the default file."""
    return Path(cfg.teacher.checkpoint) if cfg.teacher.checkpoint else default_checkpoint(cfg, datamodule)


def publish(source: str | Path, target: Path) -> None:
    """Copy a finished checkpoint to ``target`` atomically (tmp file, fsync, rename)."""
    try:
        copy_file(source, target)
    except OSError as err:
        raise CheckpointError(f"could not publish {Path(source).name} as {target.name} in folder {target.parent}: "
                              f"{os_cause(err)}; the trained checkpoint stays in {Path(source).parent}") from None


def train_teacher(cfg: DictConfig, datamodule: pl.LightningDataModule, target: Path, train: TrainStage) -> dict:
    """Train the teacher with ``train`` in ``cfg.paths.output_dir``; only a finished run is
    published to ``target`` (best), ``<target stem>-last.ckpt`` and ``<target stem>.json``, so a
    killed run never leaves a half-trained teacher."""
    result = train(cfg, datamodule, "teacher", "teacher")
    if rank_zero_only.rank == 0:  # under DDP rank 0 publishes, the other ranks wait for it
        publish(result["checkpoint/best"] or result["checkpoint/last"], target)
        publish(result["checkpoint/last"], target.with_name(f"{target.stem}-last.ckpt"))
        write_json(target.with_suffix(".json"), {"identity": identity(cfg, "teacher", datamodule),
                                                 "metrics": result["metrics"]})
    ddp_barrier()
    log.info("teacher saved to %s", target)
    return {**result, "teacher_checkpoint": str(target)}


def announce(path: Path) -> None:
    """One line: which teacher file is reused, trained on what, and its test score."""
    record = path.with_suffix(".json")
    if not record.is_file():
        log.info("Teacher: %s", path)
        return
    saved = json.loads(record.read_text())
    data, metrics = saved["identity"]["data"], saved.get("metrics", {})
    scores = ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())
                       if k.startswith("test/") and not k.endswith(("loss", "ce", "num_images")))
    log.info("Reusing teacher %s (trained on %s%s; %s)", path, data.get("name"),
             f" {data['root']}" if data.get("root") else "", scores or "no test metrics")


def teacher_run_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` for the teacher's own run in ``<output dir>/teacher`` (its checkpoints, panels and
    W&B id there; the logger keeps writing where the run's does), resumed from its last checkpoint."""
    run_dir = Path(cfg.paths.output_dir) / "teacher"
    teacher_cfg = cfg.copy()
    with open_dict(teacher_cfg):
        if teacher_cfg.get("logger") and "save_dir" in teacher_cfg.logger:
            teacher_cfg.logger.save_dir = str(OmegaConf.select(cfg, "logger.save_dir"))
        teacher_cfg.paths.output_dir = str(run_dir)
        teacher_cfg.ckpt_path = last_checkpoint(run_dir, bool(cfg.get("trust_checkpoints", False)),
                                                bool(cfg.get("resume_fallback", False)), "teacher's last.ckpt",
                                                ("teacher", OmegaConf.to_container(cfg.teacher, resolve=True)))
        teacher_cfg.trainer.enable_model_summary = False  # one model summary per run: the student's
    if teacher_cfg.ckpt_path:
        log.info("Resuming the teacher from its own last checkpoint %s", teacher_cfg.ckpt_path)
    return teacher_cfg


def resolve_teacher(cfg: DictConfig, datamodule: pl.LightningDataModule, train: TrainStage) -> ResolvedTeacher:
    """The teacher: as built (``teacher.as_is``: e.g. ImageNet weights for ImageNet data), from
    ``teacher.checkpoint``, or from the default checkpoint, trained first (with ``train``) when
    it does not exist. ``cfg`` and ``datamodule``: the teacher's data (:func:`teacher_config`)."""
    if cfg.teacher.get("as_is"):
        log.info("Teacher: %s as built (teacher.as_is=true: not trained here)", model_label(cfg.teacher))
        return ResolvedTeacher(network(cfg, "teacher"), None, [])
    expected = identity(cfg, "teacher", datamodule)
    explicit = cfg.teacher.checkpoint is not None
    if explicit:
        path = Path(cfg.teacher.checkpoint)
    else:
        path = default_checkpoint(cfg, datamodule)
        if path.is_file():
            announce(path)
        else:
            log.info("No teacher checkpoint at %s: training the %s teacher first (same trainer settings, on %s), "
                     "then distilling.", path, model_label(cfg.teacher), describe_data(expected["data"]))
            train_teacher(teacher_run_config(cfg), datamodule, path, train)
    # an explicit checkpoint may come from other data (checked below); the default one is the data's own
    checked = {"network": expected["network"]} if explicit else expected
    teacher, hparams = load_network(path, "teacher checkpoint", bool(cfg.get("trust_checkpoints", False)),
                                    build=lambda: network(cfg, "teacher", weights_from_checkpoint=True),
                                    expected={"name": cfg.teacher.name, "num_classes": int(cfg.data.num_classes),
                                              "identity": checked})
    differ = other_data(path, (hparams.get("identity") or {}).get("data") or {}, expected["data"]) if explicit else []
    object.__setattr__(teacher, BUILD_ATTRIBUTE, {**build_spec(teacher), "checkpoint": str(path)})  # rebuilt by
    return ResolvedTeacher(teacher, path, differ)  # DistillModule.load_from_checkpoint from its own file


def describe_data(data: dict) -> str:
    """``cifar10``, ``image_folder /data/cifar10-jpeg``: a data identity in a log line."""
    return f"{data.get('name')}{' ' + data['root'] if data.get('root') else ''}"


def other_data(path: Path, saved: dict, configured: dict) -> list[str]:
    """How the data the teacher checkpoint at ``path`` was trained on (``saved``) differs from the
    teacher's data option (``configured``), logged in one line; a different class list is refused."""
    if saved.get("classes") and configured.get("classes") and saved["classes"] != configured["classes"]:
        raise CheckpointError(f"teacher checkpoint '{path}' was trained on the classes {saved['classes']}, but the "
                              f"data has {configured['classes']}: distil with the same classes, or another teacher")
    differ = data_differences(saved, configured) if saved else ["its data is not recorded (not written by train.py)"]
    if differ:
        log.warning("Teacher %s was trained on other data than %s: %s (metrics.json: teacher_data_differences)",
                    path, describe_data(configured), "; ".join(differ))
    return differ
