"""What a run prints: library notices filtered where they come from, and the closing summary.

A run should print only what its user can act on. :func:`quiet_libraries` removes the
notices that are not (each filter names its upstream cause); :func:`report_run` ends the run
with a short table of its test metrics, where ``metrics.json`` is, and for an offline W&B run
the one command that syncs it.
"""

from __future__ import annotations

import logging
import shlex
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from distill.explain.resolution import missing_cell
from distill.labels import model_label

# Lightning's rank-zero messages repeated by every Trainer of a run (teacher, then student).
ONCE_PER_PROCESS = ("GPU available:", "TPU available:", "HPU available:", "LOCAL_RANK:")
# Lightning's normal end of fit: the run's summary follows, so it says nothing new.
DROPPED = ("`Trainer.fit` stopped: `max_epochs=",)


class _Quiet(logging.Filter):
    """Pass each of the :data:`ONCE_PER_PROCESS` messages once, drop the :data:`DROPPED` ones."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(DROPPED):
            return False
        if message.startswith(ONCE_PER_PROCESS):
            if message in self.seen:
                return False
            self.seen.add(message)
        return True


_FILTER = _Quiet()


def quiet_libraries() -> None:
    """Filter, narrowly, the library notices a run cannot act on."""
    # torch >= 2.10 deprecated constructing LeafSpec, which Lightning 2.6's own pytree helper still
    # does (Lightning-AI/pytorch-lightning#21326): a FutureWarning at every fit, not ours to fix.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")
    # Quick runs (limit_train_batches < log_every_n_steps) get a notice per Trainer; the
    # epoch-level metrics are logged either way.
    warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the "
                                              r"logging interval")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # "generated new fontManager" (first use)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def quiet_lightning() -> None:
    """One line per message: under Hydra, Lightning's own console handlers duplicate Hydra's."""
    if logging.getLogger().handlers:
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            logger.propagate = True
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(  # also the re-tests' reloads (test_best)
        lambda record: not any(noise in record.getMessage() for noise in (
            "litlogger", "Restoring states from the checkpoint path", "Loaded model weights from the checkpoint")))
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")  # the frozen teacher
    quiet_libraries()


def quiet_choices(datamodule: Any, accelerator: str | None) -> None:
    """Lightning's advice against a setting the config made on purpose is noise: more workers
    for an explicit ``data.num_workers=0`` (or in-memory data such as ``data=synthetic``; the
    default ``null`` takes Lightning's own suggestion, so it never advises), or the GPU for an
    explicit ``trainer.accelerator=cpu`` (e.g. ``trainer=cpu`` in ``experiment=smoke``)."""
    if getattr(datamodule, "num_workers", None) == 0:
        warnings.filterwarnings("ignore", message=r"The '\w+' does not have many workers")
    if accelerator == "cpu":
        warnings.filterwarnings("ignore", message=r"GPU available but not used")


def wandb_settings(offline: bool) -> dict:
    """Keyword arguments for ``WandbLogger``: no run-history block at the end and, offline, no
    header either (the run's summary prints the sync command once)."""
    import wandb

    return {"settings": wandb.Settings(quiet=True, silent=bool(offline))}


def without_anonymous(logger: Any) -> Any:
    """Lightning's ``WandbLogger`` always passes ``anonymous`` to ``wandb.init``, which W&B now
    warns about at every run (wandb/wandb#10909 removed anonymous mode); leave it out when unset."""
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and init.get("anonymous") is None:
        init.pop("anonymous", None)
    return logger


# ---------------------------------------------------------------------------- test coverage
class CountTestImages(pl.Callback):
    """Logs ``test/num_images``: the test images every test metric of this run was computed on
    (after ``data.test_subset`` and ``trainer.limit_test_batches``; summed over DDP ranks)."""

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.count = 0

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if dataloader_idx == 0:  # 1: the same images with a conflicting cue (data.shortcut)
            self.count += len(batch[0])

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = trainer.strategy.reduce(torch.tensor(float(self.count), device=pl_module.device), reduce_op="sum")
        pl_module.log("test/num_images", total, sync_dist=False)


def test_images_record(metrics: dict[str, float], datamodule: Any) -> dict | None:
    """``metrics.json``'s ``test_images``: how many test images each test metric used, of how many."""
    used = metrics.get("test/num_images")
    if used is None:
        return None
    test_set = getattr(datamodule, "test_set", None)
    total = len(test_set) if test_set is not None else None
    used = int(used)
    return {
        "used": used,
        "of": total,
        "partial": total is not None and used < total,
        "per_metric": {k: used for k in sorted(metrics) if k.startswith("test/") and k != "test/num_images"},
    }


def partial_note(used: int | None, total: int | None) -> str:
    """``""`` for a whole test set, else e.g. ``"partial test set: 1,000 of 10,000 images"``."""
    if used is None or total is None or used >= total:
        return ""
    return f"partial test set: {used:,} of {total:,} images"


# ---------------------------------------------------------------------------- the closing summary
SCORES = {"acc": ("accuracy %", 100.0), "map": ("mAP", 1.0), "map11": ("mAP (11-point)", 1.0)}


def metrics_table(result: dict) -> list[str]:
    """Lines of a small table of a run's test metrics: teacher and/or student rows."""
    metrics, config, stage = result.get("metrics", {}), result.get("config", {}), result.get("stage")
    score = next((s for s in SCORES if f"test/{s}" in metrics), None)
    if score is None:
        return []
    header, scale = SCORES[score]
    digits = 2 if scale == 100.0 else 4  # accuracy in %, mAP as a fraction

    def name(role: str) -> str:
        node = config.get(role)
        return f"{role} {model_label(node)}" if isinstance(node, dict) and node.get("name") else role

    def pct(key: str, factor: float, digits: int = 2) -> str:
        return f"{factor * metrics[key]:.{digits}f}" if key in metrics else ""

    rows = []
    if stage == "distill":
        missing = result.get("map_metrics_missing")  # a map too small to mean anything: no number
        cosine = missing_cell(missing) if missing else pct("test/map_cosine", 1.0, 4)
        rows.append([name("teacher"), pct(f"test/teacher_{score}", scale, digits), "", ""])
        rows.append([name("student"), pct(f"test/{score}", scale, digits), pct("test/agreement", 100.0), cosine])
    else:
        rows.append([name("teacher" if stage == "teacher" else "student"), pct(f"test/{score}", scale, digits), "", ""])
    headers = ["model", header, "agreement %", "map cosine"]
    keep = [i for i in range(len(headers)) if i < 2 or any(row[i] for row in rows)]
    table = [[headers[i] for i in keep]] + [[row[i] for i in keep] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(keep))]
    return [("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths, strict=True)))).rstrip()
            for r in table]


def cue_lines(metrics: dict[str, float]) -> list[str]:
    """With ``data.shortcut``: per network, its accuracy on the test images with a conflicting cue,
    the share of its predictions that are the cue's class and the cue's share of its map's mass."""
    if "test/conflict_acc" not in metrics:
        return []
    distilled = "test/teacher_cue_follow" in metrics
    rows = [("teacher", "conflict_teacher_acc", "teacher_")] if distilled else []
    rows.append(("student", "conflict_acc", ""))
    lines = ["  with a conflicting cue (data.shortcut):"]
    for who, acc, key in rows:
        mass = metrics.get(f"test/{key}cue_map_mass")
        lines.append(f"    {who}: accuracy {100 * metrics[f'test/{acc}']:.2f} %, follows the cue "
                     f"{100 * metrics[f'test/{key}cue_follow']:.2f} %"
                     + (f", map mass on the cue {100 * mass:.2f} %" if mass is not None else ""))
    return lines


def offline_wandb_runs(run_dir: Path) -> list[Path]:
    return sorted((Path(run_dir) / "wandb").glob("offline-run-*"))


def report_run(result: dict, run_dir: Path) -> str:
    """The closing summary of a run (also returned): its test metrics, ``metrics.json``'s path,
    and for an offline W&B run the one command that syncs every W&B run of it."""
    coverage = result.get("test_images") or {}
    note = partial_note(coverage.get("used"), coverage.get("of"))
    lines = [""]
    table = metrics_table(result)
    if table:
        used = coverage.get("used")
        if note:
            lines.append(f"Test metrics on a PARTIAL test set ({used:,} of {coverage['of']:,} images):")
        else:
            lines.append(f"Test metrics ({f'{used:,} test images' if used is not None else 'the test split'}):")
        lines += table + cue_lines(result.get("metrics", {}))
        if note:
            lines.append("  (data.test_subset / trainer.limit_test_batches: not comparable to whole-test-set numbers)")
        if result.get("map_metrics_missing"):
            lines.append(f"  map metrics missing: {result['map_metrics_missing']} (docs/map_grids.md)")
    else:
        lines.append("No test metrics (test_after_fit=false).")
    lines += [f"FLAG: {flag}" for flag in result.get("flags", [])]
    lines.append(f"metrics.json: {Path(run_dir) / 'metrics.json'}")
    runs = offline_wandb_runs(run_dir)
    if runs:  # one command for all (a distill run that trained its teacher has two W&B runs)
        where = shlex.quote(str(runs[0])) if len(runs) == 1 else shlex.quote(str(runs[0].parent)) + "/offline-run-*"
        lines.append(f"W&B ran offline; sync with: wandb sync {where}")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


__all__ = ["CountTestImages", "metrics_table", "partial_note", "quiet_choices", "quiet_libraries", "report_run",
           "test_images_record", "wandb_settings", "without_anonymous"]
