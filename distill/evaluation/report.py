"""Writing results: the evaluation JSON + markdown, and the ablation summary of a multirun.

``summarize_multirun(DIR)`` reads a Hydra multirun's output directory (one numbered job
folder per run, each with the ``metrics.json`` that ``train.py`` writes, and optionally an
``evaluation.json`` from ``scripts/evaluate.py`` in the job folder or its ``evaluation/``
subfolder), groups the runs into variants and writes a markdown table of mean +- std over
seeds and a bar plot (matplotlib, Agg; no display needed).

Variants: the command-line overrides of each job (``<job>/.hydra/overrides.yaml``) that differ
between jobs, ``seed`` left out (e.g. ``explain=gradcampp kd=hinton``). Without that file
the stage / student / explain / kd recorded in ``metrics.json`` are used the same way.
Standard deviations are sample standard deviations (``ddof=1``); with one seed only the
mean is shown.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.errors import DataError
from distill.files import write_json, write_text
from distill.labels import model_label

log = logging.getLogger("distill")

NETWORKS = ("teacher", "student")  # config groups named by their network's label (distill.labels)
METHOD_NAMES = {"cam": "CAM", "gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++", "hirescam": "HiResCAM",
                "xgradcam": "XGrad-CAM", "layercam": "LayerCAM"}


def _similarity_method(result: dict) -> str:
    """The name of the method whose maps the teacher-student cosine compares (``eval_method``)."""
    return METHOD_NAMES.get(result.get("similarity_method", "gradcampp"), result.get("similarity_method"))


ROLES = {"": ("student", "model"), "teacher/": ("teacher",), None: ("student", "model", "teacher")}


def _map_cell(result: dict, key: str, prefix: str | None, digits: int = 2) -> str:
    """A map metric's cell: its value, or ``n/a (1x1 map)`` when the network of ``prefix`` (``""``,
    ``teacher/``; ``None``: either, for the map cosine) explains a map too small to mean anything."""
    missing = result.get("map_metrics_missing")
    if missing:
        from distill.explain.resolution import missing_cell, missing_for

        part = missing_for(missing, ROLES[prefix])
        if part:
            return missing_cell(part)
    return _fmt(result["metrics"].get(key), digits)


def _faithfulness_cells(result: dict, prefix: str) -> list[str]:
    """Average Drop / Increase in Confidence of Grad-CAM and Grad-CAM++, then the Win %, of the
    model whose metric keys start with ``prefix`` (``""`` or ``teacher/``)."""
    cells = []
    for method in ("gradcam", "gradcampp"):
        cells += [_map_cell(result, f"{prefix}{method}/average_drop_pct", prefix),
                  _map_cell(result, f"{prefix}{method}/increase_in_confidence_pct", prefix)]
    return [*cells, _map_cell(result, f"{prefix}win_gradcampp_vs_gradcam_pct", prefix)]


def _missing_note(result: dict) -> list[str]:
    missing = result.get("map_metrics_missing")
    return [f"Map metrics missing: {missing} (below the minimum grid; docs/map_grids.md).", ""] if missing else []


def _label(described: dict) -> str:
    """A network's label (``distill.labels.model_label``) as evaluation.json records it."""
    return str(described.get("label") or described["name"])


# --------------------------------------------------------------------------- markdown
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; first column left-aligned, the others right-aligned."""
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    align = [":--"] + ["--:"] * (len(headers) - 1)
    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


# --------------------------------------------------------------------------- evaluation report
def multilabel_markdown(result: dict) -> str:
    """The markdown report of a multi-label (VOC) ``evaluate.py`` result."""
    m = result["metrics"]
    model, teacher = result["model"], result.get("teacher")
    score = result.get("score_name", "map")
    deltas = result.get("loc_deltas", [])
    lines = [
        f"# Evaluation of `{result['checkpoint']}`",
        "",
        f"{_label(model)} ({model.get('stage')}), data `{result['data']}` {result['split']} split, "
        f"{m['num_images']} images, multi-label: every ground-truth positive class of each image is explained "
        "(Y, O = its sigmoid score on the image and on the explanation image).",
        "",
    ]
    headers = ["model", score]
    for method in ("gradcam", "gradcampp"):
        headers += [f"Avg Drop % {METHOD_NAMES[method]} (lower)", f"Incr. Conf. % {METHOD_NAMES[method]} (higher)"]
    headers += ["Win % Grad-CAM++ vs Grad-CAM", *[f"Loc % Grad-CAM++ (delta {d:g})" for d in deltas]]

    def row(label: str, prefix: str) -> list[str]:
        return [label, _fmt(m.get(f"{prefix}{score}"), 4), *_faithfulness_cells(result, prefix),
                *(_map_cell(result, f"{prefix}loc{round(100 * d):02d}_pct", prefix) for d in deltas)]

    rows = [row(f"{'student' if teacher else 'model'} {_label(model)}", "")]
    if teacher:
        rows.append(row(f"teacher {_label(teacher)}", "teacher/"))
    lines.append(markdown_table(headers, rows))
    if teacher:
        lines += [f"Teacher: `{teacher['checkpoint']}`.", "",
                  markdown_table(["teacher vs student", "value"],
                                 [["agreement % (same logit > 0 decision, per class)", _fmt(m.get("agreement_pct"))],
                                  [f"map cosine ({_similarity_method(result)}, every positive class)",
                                   _map_cell(result, "map_cosine", None, 4)]])]
    lines += _missing_note(result)
    lines += ["Conventions:", ""]
    lines += [f"- `{k}`: {v}" for k, v in sorted(result.get("conventions", {}).items())]
    return "\n".join(lines) + "\n"


def evaluation_markdown(result: dict) -> str:
    """The markdown report of one ``evaluate.py`` result (see :func:`distill.evaluation.evaluate`)."""
    if str(result.get("task", "multiclass")).startswith("multilabel"):
        return multilabel_markdown(result)
    m = result["metrics"]
    model, teacher = result["model"], result.get("teacher")
    lines = [
        f"# Evaluation of `{result['checkpoint']}`",
        "",
        f"{_label(model)} ({model.get('stage')}), data `{result['data']}` {result['split']} split, "
        f"{m['num_images']} images, explained class: the model's top-1.",
        "",
    ]
    if result.get("partial"):
        lines += [f"**Partial {result['split']} set: {m['num_images']:,} of {result['split_size']:,} images** "
                  "(a fixed class-covering subset: `data.test_subset` / `limit_batches`); not comparable to "
                  "whole-set numbers.", ""]
    headers = ["model", "accuracy %"]
    for method in ("gradcam", "gradcampp"):
        headers += [f"Avg Drop % {METHOD_NAMES[method]} (lower)", f"Incr. Conf. % {METHOD_NAMES[method]} (higher)"]
    headers.append("Win % Grad-CAM++ vs Grad-CAM")

    def row(label: str, prefix: str) -> list[str]:
        return [label, _fmt(m.get(f"{prefix}accuracy_pct")), *_faithfulness_cells(result, prefix)]

    rows = [row(f"{'student' if teacher else 'model'} {_label(model)}", "")]
    if teacher:
        rows.append(row(f"teacher {_label(teacher)}", "teacher/"))
    lines.append(markdown_table(headers, rows))
    if teacher:
        lines += [
            f"Teacher: `{teacher['checkpoint']}`.",
            "",
            markdown_table(
                ["teacher vs student", "value"],
                [["top-1 agreement %", _fmt(m.get("agreement_pct"))],
                 [f"map cosine ({_similarity_method(result)}, class: {result['similarity_target']})",
                  _map_cell(result, "map_cosine", None, 4)]],
            ),
        ]
    else:
        lines += ["No teacher: pass `teacher_checkpoint=PATH` for agreement and map similarity.", ""]
    game = result.get("pointing_game")
    if game:
        n = game["grid"]
        who = [("student" if teacher else "model", "")] + ([("teacher", "teacher/")] if teacher else [])
        lines += [
            f"Grid pointing game, {n}x{n} grids ({game['num_grids']} grids of distinct classes, each image "
            f"classified correctly by the {'teacher' if teacher else 'model'}; share of the positive map mass "
            f"inside the explained class's cell, %, chance {100 / n ** 2:.1f}):",
            "",
            markdown_table(["method", *[w for w, _ in who]],
                           [[METHOD_NAMES.get(mth, mth),
                             *[_map_cell(result, f"{pre}pointing_game_{n}x{n}/{mth}_pct", pre) for _, pre in who]]
                            for mth in game["methods"]]),
        ]
    lines += _missing_note(result)
    lines += ["Conventions:", ""]
    lines += [f"- `{k}`: {v}" for k, v in sorted(result.get("conventions", {}).items())]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- multirun summary
@dataclass
class Run:
    """One finished job of a multirun."""

    job_dir: Path
    seed: Any
    settings: dict[str, str]  # what may tell variants apart
    metrics: dict[str, float]  # train.py's metrics.json plus `eval:<key>` from evaluation.json
    variant: str = ""
    partial: str = ""  # e.g. "test: 1,000 of 10,000 images" when a metric saw part of its split only
    flags: list[str] = field(default_factory=list)  # metrics.json's flags, e.g. a model at chance level
    missing: str = ""  # map_metrics_missing of metrics.json / evaluation.json: why map metrics are absent


@dataclass
class Column:
    key: str  # a metrics.json key, or eval:<key> from evaluation.json
    header: str
    scale: float = 1.0
    digits: int = 2
    derived_from: str | None = None  # error % = 100 - accuracy %
    on_maps: bool = False  # computed on explanation maps: absent (n/a) for a network whose map is too small


COLUMNS = [
    Column("test/acc", "accuracy %", 100.0),
    Column("error", "error %", 100.0, derived_from="test/acc"),
    Column("test/agreement", "agreement %", 100.0),
    Column("test/map_cosine", "map cosine", 1.0, digits=4, on_maps=True),
    Column("test/teacher_acc", "teacher accuracy %", 100.0),
    Column("eval:gradcampp/average_drop_pct", "Avg Drop % Grad-CAM++", on_maps=True),
    Column("eval:gradcampp/increase_in_confidence_pct", "Incr. Conf. % Grad-CAM++", on_maps=True),
    Column("eval:win_gradcampp_vs_gradcam_pct", "Win % Grad-CAM++", on_maps=True),
]
PLOTTED = ("test/acc", "test/agreement", "test/map_cosine")


@dataclass
class VariantSummary:
    variant: str
    seeds: list[Any]
    stats: dict[str, tuple[float, float | None]] = field(default_factory=dict)  # key -> (mean, std)
    partial: list[str] = field(default_factory=list)  # Run.partial of its runs that have one
    flags: list[str] = field(default_factory=list)  # Run.flags of its runs, "seed N: <flag>"
    missing: str = ""  # why its map metrics are absent (Run.missing of its first run that has one)


def _job_sort_key(path: Path) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(path)))


def _read_overrides(job_dir: Path) -> dict[str, str] | None:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    items = OmegaConf.to_container(OmegaConf.load(path)) or []
    settings = {}
    for item in items:
        key, _, value = str(item).partition("=")
        settings[key.lstrip("+~")] = value
    return settings


def _recorded_settings(result: dict) -> dict[str, str]:
    config = result.get("config", {})
    settings = {"stage": str(result.get("stage", config.get("stage")))}
    for group in ("teacher", "student", "explain", "kd"):
        node = config.get(group)
        if isinstance(node, dict) and "name" in node:
            settings[group] = model_label(node) if group in NETWORKS else str(node["name"])
    settings["seed"] = str(config.get("seed"))
    return settings


def _settings(overrides: dict[str, str] | None, result: dict) -> dict[str, str]:
    """What a run set on its command line (without that record: what its ``metrics.json`` records);
    a network's keys (``student=timm student.arch=...``) become its label (``student=timm-resnet18``)."""
    if overrides is None:
        return _recorded_settings(result)
    config, settings = result.get("config", {}), {}
    for key, value in overrides.items():
        group = key.split(".")[0]
        if group in NETWORKS and key != f"{group}.checkpoint" and isinstance(config.get(group), dict):
            settings[group] = model_label(config[group])
        else:
            settings[key] = value
    return settings


def _evaluation(job_dir: Path) -> dict:
    for path in (job_dir / "evaluation.json", job_dir / "evaluation" / "evaluation.json"):
        if path.is_file():
            return json.loads(path.read_text())
    return {}


def _eval_metrics(job_dir: Path) -> dict[str, float]:
    metrics = _evaluation(job_dir).get("metrics", {})
    return {f"eval:{k}": float(v) for k, v in metrics.items() if isinstance(v, int | float)}


def _partial(result: dict, evaluation: dict) -> str:
    """What part of its split a job's test metrics (metrics.json) and evaluation.json saw, when not all."""
    notes = []
    record = result.get("test_images") or {}
    if record.get("partial"):
        notes.append(f"test: {record['used']:,} of {record['of']:,} images")
    if evaluation.get("partial"):
        notes.append(f"evaluate.py: {evaluation['metrics']['num_images']:,} of {evaluation['split_size']:,} images")
    return "; ".join(notes)


def collect_runs(root: str | Path) -> list[Run]:
    """Every job under ``root`` that wrote a ``metrics.json``; jobs without one are reported."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"multirun directory '{root}' does not exist: pass the folder Hydra printed "
                        "(logs/<task_name>/multiruns/<timestamp>)")
    runs = []
    for path in sorted(root.rglob("metrics.json"), key=_job_sort_key):
        job_dir = path.parent
        try:
            result = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            log.warning("left out %s: not valid JSON (%s)", path, err)
            continue
        recorded = _recorded_settings(result)
        settings = _settings(_read_overrides(job_dir), result)
        metrics = {k: float(v) for k, v in result.get("metrics", {}).items() if isinstance(v, int | float)}
        metrics.update(_eval_metrics(job_dir))
        seed = settings.get("seed", recorded["seed"])
        evaluation = _evaluation(job_dir)
        missing = result.get("map_metrics_missing") or evaluation.get("map_metrics_missing") or ""
        runs.append(Run(job_dir, seed, settings, metrics, partial=_partial(result, evaluation), missing=missing,
                        flags=list(result.get("flags", []))))
    finished = {run.job_dir for run in runs}
    unfinished = [d for d in sorted(root.iterdir(), key=_job_sort_key)
                  if d.is_dir() and d.name.isdigit() and d not in finished]
    for job_dir in unfinished:
        log.warning("left out job %s: no metrics.json (the job failed or is still running)", job_dir)
    if not runs:
        raise DataError(f"no metrics.json under '{root}': is it the output directory of a finished "
                        "train.py multirun (python train.py -m ...)?")
    return runs


def assign_variants(runs: list[Run]) -> None:
    """Name each run's variant by the settings that differ between runs, seed left out: only those
    the run sets (``default`` when it sets none of them; ``all runs`` when none differ)."""
    keys = sorted({k for run in runs for k in run.settings} - {"seed"})
    varying = [k for k in keys if len({run.settings.get(k) for run in runs}) > 1]
    for run in runs:
        run.variant = (" ".join(f"{k}={run.settings[k]}" for k in varying if k in run.settings)
                       or ("default" if varying else "all runs"))


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize_runs(runs: list[Run], columns: Sequence[Column] = COLUMNS) -> list[VariantSummary]:
    """Mean and sample std over the seeds of each variant (in the order variants first appear)."""
    if not all(run.variant for run in runs):
        assign_variants(runs)
    summaries: dict[str, VariantSummary] = {}
    for run in runs:
        summaries.setdefault(run.variant, VariantSummary(run.variant, [])).seeds.append(run.seed)
    for summary in summaries.values():
        members = [run for run in runs if run.variant == summary.variant]
        summary.partial = [f"seed {run.seed}: {run.partial}" for run in members if run.partial]
        summary.flags = [f"seed {run.seed}: {flag}" for run in members for flag in run.flags]
        summary.missing = next((run.missing for run in members if run.missing), "")
        for column in columns:
            source = column.derived_from or column.key
            values = [run.metrics[source] for run in members if source in run.metrics]
            if not values:
                continue
            if column.derived_from:
                values = [1.0 - v for v in values]
            summary.stats[column.key] = _mean_std([column.scale * v for v in values])
    return list(summaries.values())


def _column_missing(column: Column, missing: str) -> str:
    """``n/a (1x1 map)`` for a map column of a variant whose (student's, or for the map cosine either)
    map is too small, else ``""``."""
    if not (column.on_maps and missing):
        return ""
    from distill.explain.resolution import missing_cell, missing_for

    part = missing if column.key.endswith("map_cosine") else missing_for(missing, ("student", "model"))
    return missing_cell(part) if part else ""


def summary_markdown(summaries: list[VariantSummary], root: str | Path, columns: Sequence[Column] = COLUMNS) -> str:
    shown = [c for c in columns if any(c.key in s.stats or _column_missing(c, s.missing) for s in summaries)]
    headers = ["variant", "seeds", *[c.header for c in shown]]
    rows = []
    for s in summaries:
        cells = [s.variant, str(len(s.seeds))]
        for c in shown:
            missing = _column_missing(c, s.missing)
            if missing:  # a map too small to mean anything: never a number
                cells.append(missing)
                continue
            if c.key not in s.stats:
                cells.append("–")
                continue
            mean, std = s.stats[c.key]
            cells.append(_fmt(mean, c.digits) if std is None else f"{_fmt(mean, c.digits)} ± {_fmt(std, c.digits)}")
        rows.append(cells)
    partial = [f"- {s.variant}: " + ", ".join(s.partial) for s in summaries if s.partial]
    flagged = [f"- {s.variant}: " + "; ".join(s.flags) for s in summaries if s.flags]
    missing = [f"- {s.variant}: {s.missing}" for s in summaries if s.missing]
    missing_note = ("\n**Map metrics missing** (a map below the minimum grid, docs/map_grids.md):\n\n"
                    + "\n".join(missing) + "\n") if missing else ""
    note = ("\n**Partial test sets** (`data.test_subset` / `limit_test_batches` / `limit_batches`): not comparable "
            "to whole-test-set numbers.\n\n" + "\n".join(partial) + "\n") if partial else ""
    if flagged:
        note += "\n**Flagged runs** (their agreement and map metrics measure nothing):\n\n" + "\n".join(flagged) + "\n"
    return (
        f"# Ablation summary of `{root}`\n\n"
        "Mean ± sample standard deviation over seeds (test split, final weights); one seed: mean only.\n\n"
        + markdown_table(headers, rows) + note + missing_note
    )


ZOOMED = ("test/map_cosine",)  # plotted as points on an axis fitted to the values: 0.92 vs 0.95 must show


def _fitted_range(lows: list[float], highs: list[float]) -> tuple[float, float]:
    """An axis range around ``[min(lows), max(highs)]`` with a margin (a cosine lies in [-1, 1])."""
    lo, hi = min(lows), max(highs)
    pad = max(0.15 * (hi - lo), 0.005)
    return max(lo - pad, -1.0), min(hi + pad, 1.0)


def summary_figure(summaries: list[VariantSummary], columns: Sequence[Column] = COLUMNS):
    """One panel per plotted metric, one horizontal row per variant (its name on the left, so long
    names never overlap), mean with the std as error bar. Percentages are bars from 0; the map
    cosine is a point on an axis fitted to the values. A variant without the metric says so."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    shown = [c for c in columns if c.key in PLOTTED and any(c.key in s.stats for s in summaries)]
    names = [s.variant for s in summaries]
    label_inches = min(0.065 * max(len(n) for n in names) + 0.3, 4.0)
    fig = Figure(figsize=(label_inches + 2.6 * max(1, len(shown)), 0.4 * len(summaries) + 1.1), dpi=120,
                 layout="constrained")
    fig.get_layout_engine().set(wspace=0.1)  # the edge tick labels of neighbouring panels apart
    axes = fig.subplots(1, max(1, len(shown)), squeeze=False, sharey=True)[0]
    rows = list(range(len(summaries)))
    colors = [f"C{i % 10}" for i in rows]
    for ax, column in zip(axes, shown, strict=False):
        stats = [s.stats.get(column.key) for s in summaries]
        have = [i for i in rows if stats[i] is not None]
        means = [stats[i][0] for i in have]
        errs = [stats[i][1] or 0.0 for i in have]
        if column.key in ZOOMED:
            ax.errorbar(means, have, xerr=errs, fmt="none", ecolor="black", capsize=4)
            ax.scatter(means, have, c=[colors[i] for i in have], zorder=3)
            ax.set_xlim(*_fitted_range([m - e for m, e in zip(means, errs, strict=True)],
                                       [m + e for m, e in zip(means, errs, strict=True)]))
        else:
            ax.barh(have, means, xerr=errs, color=[colors[i] for i in have], capsize=4)
        for i in rows:
            if stats[i] is None:  # never a silent gap
                ax.text(0.02, i, "no value", transform=ax.get_yaxis_transform(), va="center", fontsize=7,
                        color="0.4")
        ax.set_title(column.header, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="x", labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(4))  # a few ticks: a narrow panel's labels never touch
    axes[0].set_yticks(rows, names, fontsize=7)
    axes[0].set_ylim(len(summaries) - 0.5, -0.5)  # the first variant on top
    if not shown:
        axes[0].text(0.5, 0.5, "no metrics to plot", ha="center", va="center", transform=axes[0].transAxes)
    return fig


def summary_plot(summaries: list[VariantSummary], path: str | Path, columns: Sequence[Column] = COLUMNS) -> Path:
    """:func:`summary_figure` as a PNG at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    summary_figure(summaries, columns).savefig(path)
    return path


# The checkpoints whose test metrics metrics.json holds: test/* (final weights), test_best/* (test_best=true)
CHECKPOINTS = {"last": "test/", "best": "test_best/"}
PERCENT = ("acc", "agreement")  # test metrics that are fractions, shown as % (e.g. teacher_acc, conflict_acc)


def test_metric_columns(runs: list[Run], checkpoint: str) -> list[Column]:
    """One column per test metric any run logged for ``checkpoint`` (``last`` / ``best``), the
    headline ones first; fractions ending in ``acc`` / ``agreement`` are shown in %."""
    prefix = CHECKPOINTS[checkpoint]
    names = sorted({k.removeprefix(prefix) for run in runs for k in run.metrics
                    if k.startswith(prefix) and k != prefix + "num_images"})
    first = [n for n in ("acc", "agreement", "map_cosine", "teacher_acc") if n in names]
    columns = []
    for name in first + [n for n in names if n not in first]:
        percent = name.endswith(PERCENT)
        columns.append(Column(prefix + name, f"{name} %" if percent else name, 100.0 if percent else 1.0,
                              digits=2 if percent else 4))
    return columns


def seed_tables(runs: list[Run]) -> dict[str, tuple[list[Column], list[VariantSummary]]]:
    """``checkpoint -> (columns, per-variant mean / std over seeds)`` for every test metric."""
    tables = {}
    for checkpoint in CHECKPOINTS:
        columns = test_metric_columns(runs, checkpoint)
        if columns:
            tables[checkpoint] = (columns, summarize_runs(runs, columns))
    return tables


def _mean_pm_std(stats: tuple[float, float | None] | None, digits: int, pm: str = " ± ") -> str:
    if stats is None:
        return "–"
    mean, std = stats
    return _fmt(mean, digits) if std is None else f"{_fmt(mean, digits)}{pm}{_fmt(std, digits)}"


def seed_tables_markdown(tables: dict) -> str:
    parts = []
    for checkpoint, (columns, summaries) in tables.items():
        headers = ["variant", "seeds", *[c.header for c in columns]]
        rows = [[s.variant, str(len(s.seeds)), *[_mean_pm_std(s.stats.get(c.key), c.digits) for c in columns]]
                for s in summaries]
        what = "final weights (last.ckpt)" if checkpoint == "last" else "best checkpoint (best.ckpt, by validation)"
        parts.append(f"## Every test metric, {what}\n\n" + markdown_table(headers, rows))
    return "\n\n".join(parts) + "\n"


def seed_tables_csv(tables: dict) -> str:
    """Long format: one line per variant, checkpoint and metric (mean, sample std, number of seeds)."""
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["variant", "checkpoint", "metric", "mean", "std", "seeds"])
    for checkpoint, (columns, summaries) in tables.items():
        for s in summaries:
            for c in columns:
                if c.key in s.stats:
                    mean, std = s.stats[c.key]
                    writer.writerow([s.variant, checkpoint, c.header, repr(mean), "" if std is None else repr(std),
                                     len(s.seeds)])
    return out.getvalue()


def _latex_escape(text: str) -> str:
    return re.sub(r"([_%&#$])", r"\\\1", text)


def seed_tables_latex(tables: dict) -> str:
    """One ``tabular`` per checkpoint, cells ``mean $\\pm$ std`` (booktabs rules)."""
    parts = []
    for checkpoint, (columns, summaries) in tables.items():
        lines = [f"% {checkpoint} checkpoint: mean $\\pm$ sample std over seeds",
                 "\\begin{tabular}{l" + "r" * (len(columns) + 1) + "}", "\\toprule",
                 " & ".join(["variant", "seeds", *[_latex_escape(c.header) for c in columns]]) + " \\\\",
                 "\\midrule"]
        for s in summaries:
            cells = [_mean_pm_std(s.stats.get(c.key), c.digits, " $\\pm$ ") for c in columns]
            lines.append(" & ".join([_latex_escape(s.variant), str(len(s.seeds)), *cells]) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}"]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def summarize_multirun(root: str | Path, out: str | Path | None = None) -> dict:
    """Write ``<out>.md``, ``<out>.png``, ``<out>.json``, ``<out>.csv`` and ``<out>.tex`` (default
    ``<root>/summary``): the headline table and plot, then every test metric of the final weights and
    of the best checkpoint, mean +- std over seeds."""
    root = Path(root)
    runs = collect_runs(root)
    assign_variants(runs)
    summaries = summarize_runs(runs)
    tables = seed_tables(runs)
    prefix = Path(out) if out is not None else root / "summary"
    markdown = write_text(prefix.with_suffix(".md"),
                          summary_markdown(summaries, root) + "\n" + seed_tables_markdown(tables))
    csv_path = write_text(prefix.with_suffix(".csv"), seed_tables_csv(tables))
    latex = write_text(prefix.with_suffix(".tex"), seed_tables_latex(tables))
    plot = summary_plot(summaries, prefix.with_suffix(".png"))
    payload = {
        "root": str(root),
        "variants": [
            {"variant": s.variant, "seeds": s.seeds,
             "stats": {k: {"mean": m, "std": sd} for k, (m, sd) in s.stats.items()}}
            for s in summaries
        ],
        "runs": [{"job_dir": str(r.job_dir), "variant": r.variant, "seed": r.seed} for r in runs],
    }
    data = write_json(prefix.with_suffix(".json"), payload)
    return {"markdown": str(markdown), "plot": str(plot), "json": str(data), "csv": str(csv_path),
            "latex": str(latex), "summaries": summaries}


__all__ = [
    "COLUMNS",
    "Column",
    "Run",
    "VariantSummary",
    "assign_variants",
    "collect_runs",
    "evaluation_markdown",
    "markdown_table",
    "summarize_multirun",
    "summarize_runs",
    "summary_figure",
    "summary_markdown",
    "summary_plot",
]


def _hydra_callback_base() -> type:
    from hydra.experimental.callback import Callback

    return Callback


class SummarizeSweep(_hydra_callback_base()):
    """Hydra callback (configs/hydra/default.yaml): at the end of a multirun, summarize its jobs
    (:func:`summarize_multirun`) and print the headline table and where every file went."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        root = Path(config.hydra.sweep.dir)
        try:
            result = summarize_multirun(root)
        except DataError as err:
            log.warning("no sweep summary: %s", err)
            return
        print(Path(result["markdown"]).read_text().split("## Every test metric")[0].rstrip())
        print(f"sweep summary: {result['markdown']} (+ .csv, .tex, .json, .png)")
