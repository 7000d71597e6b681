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
its test metrics (``distill.identity``), as hard links to the run's files (no second copy). A run
killed in this stage resumes the teacher's own run. The jobs of a sweep that need the same teacher
train it once (:func:`teacher_folder`, :func:`teacher_lock`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import lightning.pytorch as pl
import torch
from filelock import FileLock, Timeout
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from distill.build import identity, model_label, network
from distill.checkpoints import load_network
from distill.ddp import ddp_barrier
from distill.errors import CheckpointError, ConfigError, os_cause
from distill.files import link_or_copy, write_json
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
    """``checkpoints/<network>_<data>-<hash of both identities>.ckpt`` (in :func:`teacher_folder`)."""
    ident = identity(cfg, "teacher", datamodule)
    return teacher_folder(cfg) / f"{checkpoint_stem(ident['network'], ident['data'])}.ckpt"


def is_sweep_job(run_dir: Path) -> bool:
    """``run_dir`` is the folder of one job of a Hydra multirun (``-m``), by what Hydra recorded
    there (``.hydra/hydra.yaml``: also true when that job is resumed, or is a DDP rank of it)."""
    record = run_dir / ".hydra" / "hydra.yaml"
    try:
        return record.is_file() and OmegaConf.select(OmegaConf.load(record), "hydra.mode") == "MULTIRUN"
    except Exception:  # noqa: BLE001 - an unreadable record: a run of its own
        return False


def teacher_folder(cfg: DictConfig) -> Path:
    """Where a teacher trained first is published: ``paths.checkpoint_dir``. When that lies in the
    run's own folder (``experiment=smoke`` / ``quick``: ``<output dir>/teacher``) and the run is a job
    of a multirun, the same place in the sweep's folder (``<sweep dir>/teacher``): the jobs that need
    the same teacher share one training of it."""
    folder, run_dir = Path(cfg.paths.checkpoint_dir), Path(cfg.paths.output_dir)
    inside = folder.absolute().is_relative_to(run_dir.absolute())
    if not inside or not is_sweep_job(run_dir):
        return folder
    return run_dir.parent / folder.absolute().relative_to(run_dir.absolute())


@contextlib.contextmanager
def teacher_lock(path: Path) -> Iterator[None]:
    """Held while a run looks for the teacher ``path`` and trains it when it is missing, so that
    jobs running in parallel (a multirun under a parallel launcher, two runs started at once)
    train it once: the others wait, then reuse the published file. The ranks of one DDP job that
    Lightning or a cluster started (``LOCAL_RANK`` set) do not take it: they train with the rank
    that holds it."""
    if os.environ.get("LOCAL_RANK") is not None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path.with_name(path.name + ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("Another run is training the teacher %s: waiting for it to finish (lock %s)", path, lock.lock_file)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def target_checkpoint(cfg: DictConfig, datamodule: pl.LightningDataModule) -> Path:
    """Where ``stage=teacher`` publishes: ``teacher.checkpoint``, else the default file."""
    return Path(cfg.teacher.checkpoint) if cfg.teacher.checkpoint else default_checkpoint(cfg, datamodule)


def publish(source: str | Path, target: Path) -> None:
    """Publish a finished checkpoint as ``target`` atomically: a hard link to ``source`` (no second
    copy on disk), or a copy where the two folders are on different file systems."""
    try:
        link_or_copy(source, target)
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


def announce(path: Path, how: str) -> None:
    """One line: which teacher file is used and ``how`` (``given``: ``teacher.checkpoint``;
    ``reused``: found at the default place), what it was trained on, and its test score."""
    record = path.with_suffix(".json")
    try:
        saved = json.loads(record.read_text()) if record.is_file() else None
    except (OSError, ValueError):
        saved = None
    if not saved or "identity" not in saved:
        log.info("Teacher: %s (%s)", path, how)
        return
    data, metrics = saved["identity"]["data"], saved.get("metrics", {})
    scores = ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())
                       if k.startswith("test/") and not k.endswith(("loss", "ce", "num_images")))
    log.info("Teacher: %s (%s; trained on %s%s; %s)", path, how, data.get("name"),
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
        announce(path, "given")
    else:
        path = default_checkpoint(cfg, datamodule)
        with teacher_lock(path):
            if path.is_file():
                announce(path, "reused")
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
