"""A picture grid of explanations: one row per image (matplotlib, no display needed).

Columns by default, with a teacher: the image | teacher Grad-CAM | teacher Grad-CAM++ | student
Grad-CAM++ | student Guided Grad-CAM++. Without a teacher (a teacher or baseline checkpoint):
the image | Grad-CAM | Grad-CAM++ | Guided Grad-CAM++ of the one model. ``columns`` picks
others (the training panel: image | teacher Grad-CAM++ | student Grad-CAM++). The image's title is
its label; each map's title is whose map it is, the method and that model's predicted class,
green when it is the label and red otherwise. By default every model explains its own top-1 class
(``target="pred"``); with ``target="label"`` all maps explain the label (the image's title says so).

Multi-label (VOC) images get :func:`multilabel_cells` instead: one column per positive class
(teacher's and student's Grad-CAM++), titled with the class name and the sigmoid score.

A network whose map is below the minimum grid (``distill.explain.resolution``, e.g. 1 x 1) gets
blank cells titled ``n/a (1x1 map)`` instead of its maps.

Maps are overlaid with :func:`distill.explain.overlay` (min-max normalised, jet colour map);
Guided Grad-CAM++ is shown with the usual contrast stretch (per image: subtract the mean,
divide by the std, scale by 0.1, shift to 0.5, clip to ``[0, 1]``).

The PNG is exactly ``rows * cell_px`` high and ``columns * cell_px`` wide (the figure is
``cell_px / dpi`` inches per cell and is saved without a tight bounding box); a grid of maps has a
colour bar (:func:`map_scale`) in that width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from distill.evaluation.faithfulness import forward_explainable
from distill.explain import EVAL_METHOD, head_maps, map_metrics_missing, missing_cell
from distill.explain.visual import denormalize, guided_gradcam, overlay

TARGETS = ("pred", "label")
GREEN, RED, BLACK = "#1a7f37", "#cf222e", "black"


@dataclass
class Cell:
    """One picture of the grid: an ``(H, W, 3)`` uint8 RGB image and its title."""

    image: np.ndarray
    title: str
    color: str = BLACK
    smooth: bool = False  # bilinear display interpolation (maps) instead of nearest (pixels)


def _rgb(images: Tensor) -> list[np.ndarray]:
    arrays = (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
    return list(arrays)


def stretch_guided(guided: Tensor) -> Tensor:
    """Contrast stretch of guided gradients ``(B, 3, H, W)`` for display, into ``[0, 1]``."""
    flat = guided.flatten(1)
    mean = flat.mean(dim=1)[:, None, None, None]
    std = flat.std(dim=1)[:, None, None, None]
    return ((guided - mean) / (std + 1e-5) * 0.1 + 0.5).clamp(0, 1)


def _too_small(who: str, features: Tensor) -> str | None:
    """``n/a (1x1 map)`` when ``features`` ``(B, K, h, w)`` give a map below the minimum grid
    (``distill.explain.resolution``): its cells are left blank, with that title, never a map."""
    missing = map_metrics_missing({who or "model": tuple(features.shape[-2:])})
    return missing_cell(missing) if missing else None


def _name(index: int, class_names: Sequence[str] | None) -> str:
    if class_names is not None and 0 <= index < len(class_names):
        return str(class_names[index])
    return str(index)


# Columns as (whose map, method): "teacher" / "student", or "" for the one model of a grid
# without a teacher; method "gradcam" | "gradcampp" | "guided" (Guided Grad-CAM++).
TEACHER_COLUMNS = (("teacher", "gradcam"), ("teacher", "gradcampp"), ("student", "gradcampp"), ("student", "guided"))
ALONE_COLUMNS = (("", "gradcam"), ("", "gradcampp"), ("", "guided"))
TITLES = {"gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++", "guided": "Guided Grad-CAM++"}


def explanation_cells(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    teacher: nn.Module | None = None,
    class_names: Sequence[str] | None = None,
    target: str = "pred",
    columns: Sequence[tuple[str, str]] | None = None,
    labels_of: dict[str, str] | None = None,
) -> list[list[Cell]]:
    """The grid's cells, one row per image: the image, then one cell per ``columns`` entry
    (default :data:`TEACHER_COLUMNS` with a teacher, :data:`ALONE_COLUMNS` without); ``labels_of``
    (``role -> model label``, ``distill.labels``) adds each network's label to its titles.

    ``images`` ``(B, 3, H, W)`` normalised with ``mean``/``std`` (``None``: already in
    ``[0, 1]``), ``labels`` ``(B,)``; models in eval mode, on the images' device.
    """
    if target not in TARGETS:
        raise ValueError(f"target '{target}' is unknown; choose one of {TARGETS}")
    columns = tuple(columns) if columns is not None else TEACHER_COLUMNS if teacher is not None else ALONE_COLUMNS
    nets = {"teacher": teacher, "student": model, "": model}
    labels = labels.long().to(images.device)
    pixels = images if mean is None else denormalize(images, mean, std)
    forwards: dict[str, tuple[Tensor, Tensor, Tensor]] = {}  # who -> (features, preds, explained class)
    pictures: list[tuple[str, str, Tensor, Tensor, bool]] = []  # (who, method, pictures, preds, is_map)
    for who, method in columns:
        net = nets.get(who)
        if net is None or method not in TITLES:
            raise ValueError(f"column {(who, method)!r}: no such model or method (methods: {sorted(TITLES)})")
        if who not in forwards:
            features, logits = forward_explainable(net, images)
            pred = logits.argmax(dim=1)
            forwards[who] = (features, pred, pred if target == "pred" else labels)
        features, pred, explained = forwards[who]
        if _too_small(who, features):
            pictures.append((who, method, torch.ones_like(images), pred, _too_small(who, features)))
        elif method == "guided":
            pictures.append((who, method, stretch_guided(guided_gradcam(net, images, explained, "gradcampp")),
                             pred, False))
        else:
            pictures.append((who, method, head_maps(net, features, explained, method), pred, True))

    rgb = _rgb(pixels)
    labels_cpu = labels.cpu().tolist()
    pictures_cpu = [(who, method, pics.detach().cpu(), preds.cpu().tolist(), is_map)
                    for who, method, pics, preds, is_map in pictures]
    rows = []
    for i, label in enumerate(labels_cpu):
        explains = "\n(the maps explain it)" if target == "label" else ""
        row = [Cell(rgb[i], f"image, label: {_name(label, class_names)}{explains}")]
        for who, method, pics, preds, is_map in pictures_cpu:
            pred = preds[i]
            network = f"\n{labels_of[who]}" if labels_of and labels_of.get(who) else ""
            title = f"{who} {TITLES[method]}".strip() + network + f"\npred: {_name(pred, class_names)}"
            if isinstance(is_map, str):  # a map too small to show anything: a blank cell saying so
                row.append(Cell(_rgb(pics[i : i + 1])[0], f"{title}\n{is_map}", GREEN if pred == label else RED))
                continue
            picture = overlay(pixels[i].cpu(), pics[i]) if is_map else _rgb(pics[i : i + 1])[0]
            row.append(Cell(picture, title, GREEN if pred == label else RED, smooth=is_map))
        rows.append(row)
    return rows


def multilabel_cells(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    teacher: nn.Module | None = None,
    class_names: Sequence[str] | None = None,
    method: str = EVAL_METHOD,
) -> list[list[Cell]]:
    """Cells of a multi-label grid: one row per image, one column per positive class (and per
    model: teacher then student), titled with the class name and the model's sigmoid score
    (green when > 0.5). ``labels`` ``(B, C)`` multi-hot (1 / 0 / -1). All maps of a model come
    from one batched call; rows with fewer positives than the widest row end in blank cells."""
    from distill.evaluation.multilabel import positive_targets

    labels = labels.long().to(images.device)
    width = max(int((labels == 1).sum(dim=1).max()), 1)
    target = positive_targets(labels, width)  # (B, T)
    pixels = images if mean is None else denormalize(images, mean, std)
    roles = [("teacher", teacher), ("student", model)] if teacher is not None else [("", model)]
    columns = []
    for who, net in roles:
        features, logits = forward_explainable(net, images)
        small = _too_small(who, features)
        maps = None if small else head_maps(net, features, target, method).cpu()  # (B, T, h, w)
        probs = torch.sigmoid(logits.float()).cpu()
        columns.append((who, maps, probs, small))
    title = {"gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++"}.get(method, method)
    rgb = _rgb(pixels)
    blank = np.full_like(rgb[0], 255)
    rows = []
    for b, classes in enumerate(target.cpu().tolist()):
        positives = [_name(c, class_names) for c in classes if c >= 0]
        row = [Cell(rgb[b], "image\n" + (", ".join(positives) or "no positive"))]
        for t, c in enumerate(classes):
            for who, maps, probs, small in columns:
                if c < 0:
                    row.append(Cell(blank, ""))
                    continue
                score = float(probs[b, c])
                heading = f"{who} {title}".strip() + f"\n{_name(c, class_names)} p={score:.2f}"
                color = GREEN if score > 0.5 else RED
                if small:  # a map too small to show anything
                    row.append(Cell(blank, f"{heading}\n{small}", color))
                    continue
                row.append(Cell(overlay(pixels[b].cpu(), maps[b, t]), heading, color, smooth=True))
        rows.append(row)
    return rows


def grid_figure(rows: list[list[Cell]], cell_px: int = 128, dpi: int = 100):
    """A matplotlib ``Figure`` of the cells: ``len(rows) * cell_px`` by ``columns * cell_px`` pixels."""
    from matplotlib.figure import Figure

    if not rows or not rows[0]:
        raise ValueError("the grid needs at least one row and one column")
    if cell_px < 16 or dpi < 10:
        raise ValueError(f"cell_px must be >= 16 and dpi >= 10, got {cell_px} and {dpi}")
    n_rows, n_cols = len(rows), len(rows[0])
    fig = Figure(figsize=(n_cols * cell_px / dpi, n_rows * cell_px / dpi), dpi=dpi, layout="constrained")
    fig.get_layout_engine().set(w_pad=1 / dpi, h_pad=1 / dpi, wspace=0.01, hspace=0.01)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    fontsize = max(3.0, cell_px / 22 * 100 / dpi)
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            ax = axes[r][c]
            ax.imshow(cell.image, interpolation="bilinear" if cell.smooth else "nearest")
            ax.set_title(cell.title, fontsize=fontsize, color=cell.color, pad=2, linespacing=1.1)
            ax.set_axis_off()
    if any(cell.smooth for row in rows for cell in row):
        map_scale(fig, axes, fontsize)
    return fig


def map_scale(fig, axes, fontsize: float) -> None:
    """The colour scale of the map overlays (:func:`distill.explain.overlay`: each map min-max
    normalised, jet colour map), beside the grid; the figure keeps its size."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    bar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), "jet"), ax=axes, fraction=0.04, pad=0.01, aspect=40)
    bar.set_label("(map - min) / (max - min), per map", fontsize=fontsize)
    bar.ax.tick_params(labelsize=fontsize)


def figure_array(fig) -> np.ndarray:
    """The rendered figure as an ``(H, W, 3)`` uint8 array (e.g. for ``WandbLogger.log_image``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_figure(fig, path: str | Path) -> Path:
    """Save as PNG at the figure's own size and dpi (no tight bounding box: exact pixels)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=fig.dpi, format="png")
    return path


@torch.no_grad()
def explanation_grid(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    teacher: nn.Module | None = None,
    class_names: Sequence[str] | None = None,
    target: str = "pred",
    cell_px: int = 128,
    dpi: int = 100,
    columns: Sequence[tuple[str, str]] | None = None,
):
    """:func:`explanation_cells` (``labels`` ``(B,)``) or :func:`multilabel_cells` (multi-hot
    ``labels`` ``(B, C)``) laid out by :func:`grid_figure`; returns the figure."""
    if labels.dim() == 2:
        rows = multilabel_cells(model, images, labels, mean, std, teacher, class_names)
    else:
        rows = explanation_cells(model, images, labels, mean, std, teacher, class_names, target, columns)
    return grid_figure(rows, cell_px, dpi)


__all__ = [
    "ALONE_COLUMNS",
    "Cell",
    "TEACHER_COLUMNS",
    "TARGETS",
    "explanation_cells",
    "explanation_grid",
    "figure_array",
    "grid_figure",
    "multilabel_cells",
    "save_figure",
    "stretch_guided",
]
