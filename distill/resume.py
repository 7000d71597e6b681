"""``resume=<run dir>``: continue a killed run, extend a finished one, and never lose what it wrote.

- A killed run continues from its ``checkpoints/last.ckpt`` (read with the safe loader first, so a
  truncated or crafted file is one line, not a traceback deep in Lightning).
- A finished run (its ``metrics.json`` exists) is left as it is, unless ``trainer.max_epochs`` is
  raised above the run's: then the extra epochs train from ``last.ckpt``.
- The command line's overrides are applied where that is safe (epochs, logging, where the data
  lives) and refused, by name, where they would change what the run trains.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from distill.checkpoints import read_checkpoint
from distill.config_schema import config_errors
from distill.errors import CheckpointError, ConfigError
from distill.identity import differences, network_identity

log = logging.getLogger("distill")

# Keys (or key prefixes, ending in ".") that an override may change when resuming.
SAFE_KEYS = (
    "resume", "trust_checkpoints", "resume_fallback", "trainer.max_epochs", "trainer.enable_progress_bar",
    "trainer.log_every_n_steps", "trainer.enable_model_summary", "trainer.checkpoint_every_n_steps",
    "trainer.checkpoint_every_minutes", "logger", "logger.", "paths.log_dir",
    "paths.data_dir", "data.num_workers",
)
IGNORED_KEYS = ("paths.output_dir",)  # the resumed run's own folder is used


def override_keys(overrides: list[str]) -> list[tuple[str, str]]:
    """``(key, override)`` of Hydra command-line overrides such as ``+a.b=1``, ``~a``, ``kd=hinton``."""
    keys = []
    for text in overrides:
        key = text.split("=", 1)[0].lstrip("+~")
        keys.append((key.split("@", 1)[0], text))
    return keys


def is_safe(key: str) -> bool:
    return any(key == safe or (safe.endswith(".") and key.startswith(safe)) for safe in SAFE_KEYS)


def _value(cfg: DictConfig, key: str):
    value = OmegaConf.select(cfg, key, default="<absent>")
    return OmegaConf.to_container(value, resolve=False) if OmegaConf.is_config(value) else value


def apply_overrides(saved: DictConfig, fresh: DictConfig, overrides: list[str], run_dir: Path) -> None:
    """Copy the safe overridden keys of ``fresh`` into ``saved``; refuse the others that differ."""
    for key, text in override_keys(overrides):
        if key in IGNORED_KEYS:
            continue
        new, old = _value(fresh, key), _value(saved, key)
        if is_safe(key):
            if new != old:
                log.info("resume: %s (was %s)", text, old)
                OmegaConf.update(saved, key, OmegaConf.select(fresh, key), merge=False, force_add=True)
            continue
        if new == "<absent>" or new != old:
            raise ConfigError(
                f"resume={run_dir}: the override {text} would change what the resumed run trains "
                f"({key} is {old!r} there), so it is refused; on resume only trainer.max_epochs, logging options "
                "and paths.data_dir / data.num_workers can change: drop it, or start a new run"
            )


def check_network(checkpoint: dict, path: Path, what: str, stage: str, node: dict) -> None:
    """Refuse (one line) a checkpoint whose recorded stage or network is not the run's ``stage`` and
    config node ``node`` (``teacher`` / ``student``): Lightning would fail deep in loading it."""
    hparams = checkpoint.get("hyper_parameters") or {}
    saved = {"stage": hparams.get("stage"), "network": {"name": hparams.get("model_name"),
                                                        **((hparams.get("identity") or {}).get("network") or {})}}
    configured = {"stage": stage, "network": network_identity(node)}
    differ = differences({k: v for k, v in saved.items() if v is not None}, configured)
    if differ:
        raise CheckpointError(f"{what} '{path}' is not this run's: it holds another model ({'; '.join(differ)}); "
                              "put the run's own last.ckpt back")


def last_checkpoint(run_dir: Path, trusted: bool, fallback: bool, what: str = "last.ckpt",
                    expected: tuple[str, dict] | None = None) -> str | None:
    """``run_dir/checkpoints/last.ckpt`` if it exists and loads; ``None`` if it does not exist.

    A truncated or corrupt one, or (given ``expected``: the run's stage and network node) one of
    another stage or network, stops the run with one line, unless ``fallback``: then the run
    starts over from epoch 0.
    """
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.exists():
        return None
    try:
        checkpoint = read_checkpoint(last, f"the {what} to resume from", trusted)
        if expected is not None:
            check_network(checkpoint, last, f"the {what} to resume from", *expected)
    except CheckpointError as err:
        if not fallback:
            raise CheckpointError(f"{err}. To start this run over from epoch 0 instead, add resume_fallback=true") \
                from None
        log.warning("%s; resume_fallback=true: starting %s over from epoch 0", err, run_dir)
        return None
    return str(last)


def finished_result(run_dir: Path) -> dict | None:
    path = run_dir / "metrics.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def saved_config(run_dir: Path) -> DictConfig:
    """The run's ``.hydra/config.yaml``; one line naming it when it is missing, or torn (half
    written) or edited so that it is no longer a whole ``train.py`` config."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise ConfigError(
            f"resume={run_dir}: no .hydra/config.yaml there. Pass the output directory of the run "
            "to resume, e.g. resume=logs/train/runs/2026-01-01_12-00-00"
        )
    try:
        saved = OmegaConf.load(path)
        problem = config_errors(saved, "train") if isinstance(saved, DictConfig) else "it holds no mapping"
    except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as err:
        problem = f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"
    if problem:
        raise ConfigError(f"resume={run_dir}: the run's saved config {path} cannot be used ({problem}); it is torn "
                          "(half written) or was edited: restore it from a copy, or start a new run")
    return saved


def resume_config(cfg: DictConfig, overrides: list[str] = ()) -> tuple[DictConfig, dict | None]:
    """The resumed run's config (its saved config, output dir and last checkpoint, with the safe
    ``overrides`` applied), and, for a finished run that is not extended, its saved result."""
    run_dir = Path(cfg.resume)
    resumed = saved_config(run_dir)
    epochs = int(resumed.trainer.max_epochs)
    with open_dict(resumed):
        apply_overrides(resumed, cfg, list(overrides), run_dir)
        resumed.paths.output_dir = str(run_dir.resolve())
        resumed.resume = None
    finished = finished_result(run_dir)
    if finished is not None and int(resumed.trainer.max_epochs) <= epochs:
        log.warning("resume=%s: this run is finished (%d epochs; metrics.json is written): nothing to do, nothing "
                    "changed. To train more epochs, add trainer.max_epochs=N with N > %d.", run_dir, epochs, epochs)
        return resumed, finished
    trusted, fallback = bool(resumed.get("trust_checkpoints", False)), bool(resumed.get("resume_fallback", False))
    role = "teacher" if resumed.stage == "teacher" else "student"
    with open_dict(resumed):
        resumed.ckpt_path = last_checkpoint(run_dir, trusted, fallback, expected=(
            resumed.stage, OmegaConf.to_container(resumed[role], resolve=True)))
    if finished is not None:
        log.info("Extending the finished run %s from %d to %d epochs", run_dir, epochs, resumed.trainer.max_epochs)
    log.info("Resuming %s from %s", run_dir, resumed.ckpt_path or "the start (no checkpoint yet)")
    return resumed, None


def hydra_overrides() -> list[str]:
    """The command line's overrides of the current Hydra run (none outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)
