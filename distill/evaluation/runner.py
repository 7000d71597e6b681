"""What ``scripts/evaluate.py`` and ``scripts/visualize.py`` share: loading a checkpoint's
network, its teacher and its data back, and the two runs themselves (:func:`evaluate`,
:func:`visualize`), each driven by a Hydra config (``configs/evaluate.yaml``,
``configs/visualize.yaml``). User mistakes raise :class:`distill.errors.DistillError`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from distill.errors import CheckpointError, ConfigError
from distill.files import check_checkpoint_file
from distill.labels import model_label

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger("distill")


# --------------------------------------------------------------------------- loading
@dataclass
class LoadedModel:
    """A network rebuilt from a distill checkpoint, in eval mode with frozen parameters."""

    model: nn.Module
    path: Path
    hparams: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.hparams["model_name"])

    @property
    def num_classes(self) -> int:
        return int(self.hparams["num_classes"])

    @property
    def label(self) -> str:
        """The network's label, as train.py's tables and run names give it (``distill.labels``):
        from the build spec the checkpoint records, else from its run's config node."""
        spec = self.hparams.get("model") or self.hparams.get("student")
        if not (isinstance(spec, dict) and spec.get("name") == self.name):
            config = self.hparams.get("config") or {}
            spec = config.get("teacher" if self.hparams.get("stage") == "teacher" else "student")
        return model_label(spec if isinstance(spec, dict) and spec.get("name") == self.name else {"name": self.name})


def load_model(path: str | Path, what: str = "checkpoint", trusted: bool = False) -> LoadedModel:
    """Rebuild the ``model.*`` network of a distill checkpoint (any stage), in eval mode; the file
    is read with the safe loader unless ``trusted`` (``trust_checkpoints=true``)."""
    import torch

    from distill.checkpoints import load_network
    from distill.explain import inspect_network
    from distill.models import require_network

    model, hparams = load_network(path, what, trusted)
    require_network(model, what, hparams["model_name"])
    size = int(((hparams.get("config") or {}).get("data") or {}).get("image_size") or 32)
    inspect_network(model.eval(), torch.randn(2, 3, size, size))
    return LoadedModel(model.eval().requires_grad_(False), Path(path), hparams)


def teacher_path(explicit: str | None, hparams: dict) -> Path | None:
    """The teacher to compare with: ``explicit``, else the one recorded in a distilled student's
    checkpoint when that file still exists, else ``None`` (with a log line saying why)."""
    if explicit:
        return Path(explicit)
    recorded = hparams.get("teacher_checkpoint")
    if not recorded:
        log.info("No teacher: the checkpoint is a %s model; pass teacher_checkpoint=PATH for agreement and "
                 "map similarity.", hparams.get("stage", "non-distilled"))
        return None
    if not Path(recorded).is_file():
        log.warning("The recorded teacher checkpoint %s does not exist (any more): teacher metrics are left "
                    "out. Pass teacher_checkpoint=PATH to use another file.", recorded)
        return None
    return Path(recorded)


def resolve_device(name: str) -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; or any ``torch.device`` string."""
    import torch

    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(str(name))
    except RuntimeError:
        raise ConfigError(f"device '{name}' is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA GPU is available here: use device=auto or device=cpu")
    return device


def build_datamodule(hparams: dict, overrides: dict | None, batch_size: int | None, split: str = "test"):
    """The checkpoint's DataModule (its recorded ``config.data``, updated by the non-null
    ``overrides``), set up, with ``batch_size`` as its evaluation batch size."""
    from distill.build import instantiate

    if split not in ("test", "val"):
        raise ConfigError(f"split '{split}' is unknown; choose test or val")
    node = dict((hparams.get("config") or {}).get("data") or {})
    node.update({k: v for k, v in (overrides or {}).items() if v is not None})
    # The whole test split unless asked otherwise: the training run's quick test_subset is not reused.
    node["test_subset"] = (overrides or {}).get("test_subset")
    node.pop("shortcut", None)  # the clean test images; the conflicting-cue metrics are train.py's (test/conflict_*)
    if not node.get("_target_"):
        raise ConfigError("the checkpoint records no data config: give one with data._target_=... and its "
                          "arguments (+data.KEY=VALUE)")
    if batch_size is not None:
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        node["eval_batch_size"] = int(batch_size)
    datamodule = instantiate(OmegaConf.create(node), "the data (data=...)")
    datamodule.prepare_data()
    datamodule.setup("test" if split == "test" else "validate")
    return datamodule


def data_stats(datamodule) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    mean, std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
    if mean is None or std is None:
        return None, None
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


@dataclass
class Session:
    """Everything an evaluation or a picture needs, loaded from the config."""

    student: LoadedModel
    teacher: LoadedModel | None
    datamodule: Any
    device: torch.device


def check_paths(cfg: DictConfig) -> None:
    """Fail fast (before torch is imported) on a missing checkpoint argument or file."""
    if OmegaConf.is_missing(cfg, "checkpoint") or not cfg.checkpoint:
        raise ConfigError("no checkpoint given: add checkpoint=PATH (a .ckpt written by train.py)")
    for key, what in (("checkpoint", "checkpoint"), ("teacher_checkpoint", "teacher checkpoint")):
        if cfg.get(key):
            check_checkpoint_file(cfg.get(key), what)


def open_session(cfg: DictConfig) -> Session:
    check_paths(cfg)
    device = resolve_device(cfg.get("device", "auto"))
    trusted = bool(cfg.get("trust_checkpoints", False))
    student = load_model(cfg.checkpoint, "checkpoint", trusted)
    path = teacher_path(cfg.get("teacher_checkpoint"), student.hparams)
    teacher = load_model(path, "teacher checkpoint", trusted) if path is not None else None
    if teacher is not None and teacher.num_classes != student.num_classes:
        raise ConfigError(f"the teacher has {teacher.num_classes} classes but the checkpoint's model has "
                          f"{student.num_classes}: pass a teacher_checkpoint trained on the same data")
    overrides = OmegaConf.to_container(cfg.data, resolve=True) if cfg.get("data") else {}
    datamodule = build_datamodule(student.hparams, overrides, cfg.get("batch_size"), cfg.get("split", "test"))
    if int(datamodule.num_classes) != student.num_classes:
        raise ConfigError(f"the data has {datamodule.num_classes} classes but the checkpoint's model has "
                          f"{student.num_classes}: evaluate it on the data it was trained for")
    student.model.to(device)
    if teacher is not None:
        teacher.model.to(device)
    return Session(student, teacher, datamodule, device)


def _loader(session: Session, split: str, limit_batches: int | None):
    """``(batches, number of batches, dataset)`` of the split: the data's loader, which goes
    through the images in a fixed class-interleaved order (``BaseDataModule.test_images``), so
    that with ``limit_batches`` its first batches still cover every class; ``dataset[i]`` is the
    ``i``-th image the batches yield."""
    import itertools

    dm = session.datamodule
    loader = dm.test_dataloader() if split == "test" else dm.val_dataloader()
    if limit_batches is None or limit_batches >= len(loader):
        return loader, len(loader), loader.dataset
    return itertools.islice(loader, limit_batches), limit_batches, loader.dataset


def _dataset(session: Session, split: str):
    dm = session.datamodule
    return dm.test_set if split == "test" else dm.val_set


def _describe(loaded: LoadedModel | None) -> dict | None:
    if loaded is None:
        return None
    h = loaded.hparams
    return {"name": loaded.name, "label": loaded.label, "checkpoint": str(loaded.path), "stage": h.get("stage"),
            "data": h.get("data_name"), "num_classes": loaded.num_classes}


def _run_name(prefix: str, loaded: LoadedModel) -> str:
    return f"{prefix}-{loaded.label}-{loaded.path.parent.parent.name or loaded.path.stem}-{loaded.path.stem}"


# --------------------------------------------------------------------------- the two runs
def _pointing_settings(cfg: DictConfig) -> dict | None:
    """The checked ``pointing_game`` settings, or ``None`` when it is off (``grid: null``)."""
    from distill.explain import METHODS

    node = cfg.get("pointing_game") or {}
    if node.get("grid") in (None, 0, False):
        return None
    game = {"grid": node.get("grid"), "num_grids": node.get("num_grids", 500),
            "grids_per_batch": node.get("grids_per_batch", 16),
            "methods": list(node.get("methods") or ("gradcam", "gradcampp"))}
    for key in ("grid", "num_grids", "grids_per_batch"):
        if not isinstance(game[key], int) or isinstance(game[key], bool) or game[key] < 1:
            raise ConfigError(f"pointing_game.{key} must be an integer >= 1, got {game[key]!r}")
    if game["grid"] < 2:
        raise ConfigError(f"pointing_game.grid must be 2, 3, ... (an n x n grid) or null, got {game['grid']}")
    unknown = [m for m in game["methods"] if m not in METHODS or m == "cam"]
    if unknown:
        raise ConfigError(f"pointing_game.methods {unknown} are unknown; choose among "
                          f"{[m for m in METHODS if m != 'cam']}")
    return game


def map_metrics_missing(session: Session) -> str | None:
    """Why the map metrics of the checkpoint's network(s) are left out (``distill.explain.resolution``:
    a map grid below ``MIN_MAP_GRID`` at the data's image size), or ``None``."""
    from distill.explain import networks_missing

    networks = {"student" if session.teacher is not None else "model": session.student.model}
    if session.teacher is not None:
        networks["teacher"] = session.teacher.model
    missing = networks_missing(networks)
    if missing:
        log.warning("%s: its map metrics (faithfulness, map cosine, pointing game, localisation) are left out",
                    missing)
    return missing


def is_map_metric(key: str) -> bool:
    """True for a metric computed on explanation maps (``<method>/...``, Win, pointing game,
    localisation, map cosine), not on the logits (accuracy, mAP, agreement)."""
    name = key.removeprefix("teacher/")
    return name == "map_cosine" or "/" in name or name.startswith(("win_", "pointing_game_", "loc"))


def without_map_metrics(metrics: dict, missing: str | None) -> dict:
    """``metrics`` without the map metrics of the networks that ``missing`` names (map cosine
    with either)."""
    from distill.explain.resolution import missing_for

    student, teacher = missing_for(missing, ("student", "model")), missing_for(missing, ("teacher",))

    def dropped(key: str) -> bool:
        if not is_map_metric(key):
            return False
        if key == "map_cosine":
            return missing is not None
        return bool(teacher) if key.startswith("teacher/") else bool(student)

    return {k: v for k, v in metrics.items() if not dropped(k)}


def _pointing_game(session: Session, dataset, labels, correct, game: dict, seed: int,
                   missing: str | None = None) -> dict[str, float]:
    """The grid pointing game of the student (and its teacher) on grids of images that the
    teacher (else the model) classifies correctly: the same grids for both. A network whose map
    is too small (``missing``) is left out."""
    from distill.evaluation.pointing import pointing_game
    from distill.explain.resolution import missing_for

    models = {} if missing_for(missing, ("student", "model")) else {"": session.student.model}
    if session.teacher is not None and not missing_for(missing, ("teacher",)):
        models["teacher/"] = session.teacher.model
    if not models:
        return {}
    n = game["grid"]
    try:
        return pointing_game(models, dataset, labels, correct, n, game["num_grids"], game["methods"], seed,
                             game["grids_per_batch"], session.device)
    except ValueError as err:
        raise ConfigError(f"pointing game: {err}") from None


def recorded_max_map_targets(session: Session) -> int | None:
    """The training run's ``task.max_map_targets`` (``None``: pad to each batch's largest count)."""
    return ((session.student.hparams.get("config") or {}).get("task") or {}).get("max_map_targets")


def recorded_task(session: Session):
    """The task the checkpoint was trained for (its recorded ``config.task``)."""
    from distill.tasks import build_task

    node = (session.student.hparams.get("config") or {}).get("task")
    if not node:
        raise CheckpointError(f"checkpoint '{session.student.path}' records no task (config.task): it was written "
                              "by an older distill; retrain it, or evaluate it with that version")
    return build_task(node, session.student.num_classes, getattr(session.datamodule, "multilabel", None))


def _write_result(cfg: DictConfig, session: Session, metrics: dict, extra: dict) -> dict:
    """``evaluation.json`` / ``evaluation.md`` in ``output_dir``, and the logger."""
    from distill.evaluation.report import evaluation_markdown
    from distill.files import write_json, write_text
    from distill.loggers import log_results

    out = Path(cfg.output_dir)
    result = {
        "checkpoint": str(session.student.path),
        "model": _describe(session.student),
        "teacher": _describe(session.teacher),
        "data": session.datamodule.name,
        "device": str(session.device),
        "metrics": metrics,
        **extra,
    }
    json_path = write_json(out / "evaluation.json", result)
    markdown = evaluation_markdown(result)
    md_path = write_text(out / "evaluation.md", markdown)
    print("\n" + markdown.split("\nConventions:")[0].rstrip() + "\n", flush=True)
    log.info("evaluation of %s on %d images: %s and %s", session.student.path, metrics["num_images"],
             json_path, md_path)
    log_results(cfg, _run_name("eval", session.student),
                 {"checkpoint": result["checkpoint"], "teacher_checkpoint": (result["teacher"] or {}).get("checkpoint"),
                  "split": extra.get("split"), "similarity_target": extra.get("similarity_target")}, metrics)
    return result


def _evaluate_multilabel(cfg: DictConfig, session: Session, limit: int | None, split: str) -> dict:
    """Multi-label (VOC) checkpoints: mAP, per-positive-class Average Drop / Increase in
    Confidence on sigmoid scores, box localisation, and with a teacher agreement and map cosine
    (:mod:`distill.evaluation.multilabel`)."""
    from distill.evaluation.faithfulness import ScoreAccumulator
    from distill.evaluation.multilabel import ML_CONVENTIONS, evaluate_multilabel_batch
    dm = session.datamodule
    task = recorded_task(session)
    mean, std = data_stats(dm)
    teacher = session.teacher.model if session.teacher is not None else None
    deltas = tuple(float(d) for d in cfg.localization.deltas)
    scores = ScoreAccumulator().to(session.device)
    ap = {prefix: task.score_metric().to(session.device) for prefix in ("", "teacher/")[: 1 + (teacher is not None)]}
    non_blocking = session.device.type == "cuda"
    loader, _, _ = _loader(session, split, None if limit is None else int(limit))
    num_images = 0
    for batch in loader:
        batch = [t.to(session.device, non_blocking=non_blocking) for t in batch]
        num_images += batch[0].shape[0]
        batch_scores, logits = evaluate_multilabel_batch(
            session.student.model, batch, mean, std, teacher=teacher, deltas=deltas,
            explain_teacher=bool(cfg.get("explain_teacher", True)), max_targets=recorded_max_map_targets(session),
            similarity_method=cfg.eval_method)
        scores.update(batch_scores)
        for prefix, metric in ap.items():
            metric.update(logits[prefix], batch[1])
    if not num_images:
        raise ConfigError(f"the {split} split has no images to evaluate")
    missing = map_metrics_missing(session)
    metrics = without_map_metrics(scores.compute(), missing)
    metrics["num_images"] = num_images
    for prefix, metric in ap.items():
        metrics[f"{prefix}{task.score_name}"] = float(metric.compute())
    return _write_result(cfg, session, metrics, {**({"map_metrics_missing": missing} if missing else {}),
        "task": task.name, "score_name": task.score_name, "split": split, "limit_batches": limit,
        "split_size": len(_dataset(session, split)), "partial": num_images < len(_dataset(session, split)),
        "loc_deltas": list(deltas), "similarity_target": "label", "similarity_method": cfg.eval_method,
        "conventions": ML_CONVENTIONS})


def evaluate(cfg: DictConfig) -> dict:
    """Accuracy, Average Drop / Increase in Confidence (Grad-CAM, Grad-CAM++), Win %, with a
    teacher top-1 agreement and map similarity, over the test set, and with ``pointing_game.grid``
    the grid pointing game of every ``pointing_game.methods`` (teacher's grids); writes
    ``<output_dir>/evaluation.json`` and ``evaluation.md`` and returns the JSON payload."""
    import torch

    from distill.evaluation.faithfulness import CONVENTIONS, SIMILARITY_TARGETS, ScoreAccumulator, evaluate_batch

    similarity = cfg.get("similarity_target", "label")
    if similarity not in SIMILARITY_TARGETS:
        raise ConfigError(f"similarity_target '{similarity}' is unknown; choose one of {SIMILARITY_TARGETS}")
    limit = cfg.get("limit_batches")
    if limit is not None and int(limit) < 1:
        raise ConfigError(f"limit_batches must be >= 1 or null, got {limit}")
    split = cfg.get("split", "test")
    game = _pointing_settings(cfg)
    session = open_session(cfg)
    if recorded_task(session).multilabel:
        if game is not None:
            raise ConfigError("pointing_game.grid needs single-label data (a grid of distinct classes); a "
                              "multi-label checkpoint is judged against its boxes: leave pointing_game.grid=null")
        return _evaluate_multilabel(cfg, session, limit, split)
    if game is not None and game["grid"] ** 2 > session.student.num_classes:
        raise ConfigError(f"pointing_game.grid={game['grid']} needs {game['grid'] ** 2} distinct classes per grid, "
                          f"but the data has {session.student.num_classes}: use a smaller grid")
    mean, std = data_stats(session.datamodule)
    teacher = session.teacher.model if session.teacher is not None else None
    scores = ScoreAccumulator().to(session.device)
    non_blocking = session.device.type == "cuda"
    from tqdm.auto import tqdm

    loader, n_batches, dataset = _loader(session, split, None if limit is None else int(limit))
    all_labels, correct = [], []  # for the pointing game's grids: the judged images' labels
    for batch in tqdm(loader, total=n_batches, desc=f"evaluate ({split})", unit="batch", dynamic_ncols=True,
                      disable=not cfg.get("progress_bar", True)):
        images = batch[0].to(session.device, non_blocking=non_blocking)
        labels = batch[1].to(session.device, non_blocking=non_blocking)
        batch_scores = evaluate_batch(session.student.model, images, labels, mean, std, teacher=teacher,
                                      similarity_target=similarity, similarity_method=cfg.eval_method,
                                      explain_teacher=bool(cfg.get("explain_teacher", True)))
        scores.update(batch_scores)
        if game is not None:
            all_labels.append(labels)
            correct.append(batch_scores["teacher/accuracy" if teacher is not None else "accuracy"] > 0)
    missing = map_metrics_missing(session)
    metrics = without_map_metrics(scores.compute(), missing)
    if not metrics["num_images"]:
        raise ConfigError(f"the {split} split has no images to evaluate")
    if game is not None:
        metrics.update(_pointing_game(session, dataset, torch.cat(all_labels), torch.cat(correct), game,
                                      int(cfg.get("seed", 0)), missing))
    metrics["error_pct"] = 100.0 - metrics["accuracy_pct"]
    if "teacher/accuracy_pct" in metrics:
        metrics["teacher/error_pct"] = 100.0 - metrics["teacher/accuracy_pct"]
    return _write_result(cfg, session, metrics, {
        **({"map_metrics_missing": missing} if missing else {}),
        "pointing_game": game, "split": split, "split_size": len(_dataset(session, split)),
        "partial": metrics["num_images"] < len(_dataset(session, split)), "limit_batches": limit,
        "similarity_target": similarity, "similarity_method": cfg.eval_method, "conventions": CONVENTIONS})


def visualize(cfg: DictConfig) -> Path:
    """The explanation grid of ``num_images`` test images (or ``indices``) as a PNG."""
    import torch

    from distill.evaluation.grid import TARGETS, explanation_grid, figure_array, save_figure

    target = cfg.get("target", "pred")
    if target not in TARGETS:
        raise ConfigError(f"target '{target}' is unknown; choose one of {TARGETS}")
    split = cfg.get("split", "test")
    session = open_session(cfg)
    dataset = _dataset(session, split)
    if cfg.get("indices"):
        indices = [int(i) for i in cfg.indices]
    else:
        if int(cfg.num_images) < 1:
            raise ConfigError(f"num_images must be >= 1, got {cfg.num_images}")
        # Evenly spaced over the split: image folders are sorted by class.
        count = min(int(cfg.num_images), len(dataset))
        indices = [round(k * (len(dataset) - 1) / max(count - 1, 1)) for k in range(count)]
    bad = [i for i in indices if not 0 <= i < len(dataset)]
    if bad or not indices:
        raise ConfigError(f"indices {bad or indices} are not in the {split} split's 0..{len(dataset) - 1}")
    items = [dataset[i] for i in indices]
    images = torch.stack([torch.as_tensor(item[0]) for item in items]).to(session.device)
    multilabel = recorded_task(session).multilabel
    labels = (torch.stack([torch.as_tensor(item[1]) for item in items]) if multilabel  # (B, C) multi-hot
              else torch.as_tensor([int(item[1]) for item in items])).to(session.device)
    mean, std = data_stats(session.datamodule)
    teacher = session.teacher.model if session.teacher is not None else None
    fig = explanation_grid(session.student.model, images, labels, mean, std, teacher=teacher,
                           class_names=getattr(session.datamodule, "class_names", None), target=target,
                           cell_px=int(cfg.cell_px), dpi=int(cfg.dpi))
    path = save_figure(fig, Path(cfg.output_dir) / cfg.get("filename", "explanations.png"))
    log.info("explanation grid of %d %s images: %s", len(indices), split, path)
    if cfg.get("logger"):
        from distill.loggers import log_results

        caption = (f"{session.student.label}: image | "
                   + ("Grad-CAM++ of every positive class" if multilabel else
                      "teacher Grad-CAM | teacher Grad-CAM++ | student Grad-CAM++ | student Guided Grad-CAM++"
                      if teacher is not None else "Grad-CAM | Grad-CAM++ | Guided Grad-CAM++"))
        log_results(cfg, _run_name("visualize", session.student),
                    {"checkpoint": str(session.student.path), "indices": indices, "target": target},
                    image=figure_array(fig), caption=caption)
    return path


def run_script(function, cfg: DictConfig):
    """Run ``function(cfg)``; a mistake is one line on stderr and exit status 2."""
    from distill.config_schema import check_config
    from distill.errors import exit_on_user_error

    with exit_on_user_error():
        check_config(cfg, function.__name__)
        check_paths(cfg)
        return function(cfg)
