"""The experiment logger of ``train.py`` and the evaluation scripts: built, remembered and
finished in one place.

``logger=wandb`` goes offline by itself without credentials (``offline: auto``), and a run
resumed in its output folder continues its W&B run (id kept in ``<run dir>/wandb_run_id``).
"""

from __future__ import annotations

import logging
import os
from netrc import netrc
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from distill import console
from distill.build import instantiate

log = logging.getLogger("distill")

WANDB_ID_FILE = "wandb_run_id"


def wandb_credentials_present() -> bool:
    """True when W&B can log online: an API key in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc().authenticators("api.wandb.ai") is not None
    except Exception:  # no ~/.netrc, or one netrc cannot parse
        return False


def wandb_offline(setting: bool | str) -> bool:
    """``logger.offline``: ``auto`` is offline unless ``WANDB_MODE=online`` or credentials exist;
    ``WANDB_MODE=offline|dryrun`` forces offline."""
    if setting != "auto":
        return bool(setting)
    forced = os.environ.get("WANDB_MODE")
    return forced in ("offline", "dryrun") or (forced != "online" and not wandb_credentials_present())


def build_logger(cfg: DictConfig, run_name: str, run_dir: Path | None = None) -> Logger | None:
    """The configured logger (``logger=wandb|csv|none``), named ``run_name`` unless the config
    names it; with ``run_dir``, a W&B run recorded there is continued."""
    if not cfg.get("logger"):
        return None
    node = OmegaConf.to_container(cfg.logger, resolve=True)
    if not node["_target_"].endswith("WandbLogger"):
        return instantiate(OmegaConf.create(node), "the logger (logger=...)")
    node["offline"] = wandb_offline(node.get("offline", "auto"))
    node["name"] = node.get("name") or run_name
    id_file = run_dir / WANDB_ID_FILE if run_dir is not None else None
    if id_file is not None and id_file.is_file():
        node["id"], node["resume"] = id_file.read_text().strip(), "allow"
    Path(node["save_dir"]).mkdir(parents=True, exist_ok=True)
    logger = instantiate(OmegaConf.create(node), "the logger (logger=...)", **console.wandb_settings(node["offline"]))
    return console.without_anonymous(logger)


def remember_wandb_run(logger: Logger | None, run_dir: Path) -> None:
    """Start the W&B run and record its id in ``run_dir``, so ``resume=`` continues it."""
    if isinstance(logger, WandbLogger) and rank_zero_only.rank == 0:  # DDP ranks > 0 have no W&B run
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / WANDB_ID_FILE).write_text(str(logger.experiment.id))


def finish_logger(logger: Logger | None) -> None:
    """End the run: W&B's is finished (offline, :mod:`distill.console` prints the sync command),
    a file logger is flushed."""
    if logger is None or rank_zero_only.rank != 0:  # DDP ranks > 0 have no W&B run
        return
    if isinstance(logger, WandbLogger):
        logger.experiment.finish()
        return
    logger.save()
    logger.finalize("success")


def log_results(cfg: DictConfig, run_name: str, hparams: dict[str, Any], metrics: dict[str, float] | None = None,
                image=None, caption: str = "") -> Logger | None:
    """One evaluation record to the configured logger: ``hparams``, the metrics as ``eval/<name>``
    (and a W&B table), ``image`` as ``eval/explanations`` where the logger holds images."""
    logger = build_logger(cfg, run_name)
    if logger is None:
        return None
    logger.log_hyperparams(hparams)
    if metrics:
        logger.log_metrics({f"eval/{k}": float(v) for k, v in metrics.items()}, step=0)
    if isinstance(logger, WandbLogger):
        if metrics:
            logger.log_table("eval/table", columns=["metric", "value"],
                             data=[[k, float(v)] for k, v in sorted(metrics.items())])
        if image is not None:
            logger.log_image("eval/explanations", [image], caption=[caption])
        if logger.experiment.offline:
            log.info("W&B ran offline (no credentials). Sync it later with: wandb sync %s",
                     Path(logger.experiment.dir).parent)
    elif image is not None:
        log.info("The %s logger cannot hold images; the picture is in the output folder.", type(logger).__name__)
    finish_logger(logger)
    return logger


__all__ = ["WANDB_ID_FILE", "build_logger", "finish_logger", "log_results", "remember_wandb_run",
           "wandb_credentials_present", "wandb_offline"]
