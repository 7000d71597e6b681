"""Grid pointing game: localisation of explanation maps without boxes, for any classifier.

Böhle et al., "Convolutional Dynamic Alignment Networks for Interpretable Classifications"
(CVPR 2021), also used by the B-cos papers: tile ``n x n`` images of *distinct* classes, each
classified correctly by the model, into one image (a grid). For each cell's class ``c``
explain ``c`` on the whole grid and score

    PG^c = (positive map mass inside c's cell) / (positive map mass over the whole grid).

The game averages ``PG`` over every cell of every grid. A map spread uniformly scores ``1/n^2``;
a map that lies entirely inside the right cell scores 1; an all-zero map scores 0.

Cells are laid out row-major: cell ``k`` is at row ``k // n``, column ``k % n``. The maps are
scored at their own resolution when it divides into ``n x n`` equal cells, else after a
bilinear upsampling to the grid's pixel size (:func:`grid_pointing_scores`).

:func:`sample_grids` draws the grids (seeded, no class repeated within a grid);
:func:`pointing_scores` is the score itself; both are pure tensor functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.explain import head_maps, leaf_features


# --------------------------------------------------------------------------- grids
def sample_grids(labels: Tensor, eligible: Tensor, n: int, num_grids: int, seed: int = 0) -> Tensor:
    """Positions of the images of ``num_grids`` grids: ``(G, n*n)`` indices into ``labels``.

    Each grid holds ``n*n`` distinct classes drawn uniformly among the classes that have at
    least one eligible image, and for each class one of its eligible images (``eligible``
    ``(N,)`` bool, e.g. "classified correctly"), uniformly; ``labels`` ``(N,)``. Seeded by
    ``seed`` alone (CPU generator), so the grids are the same on every machine.
    """
    labels, eligible = labels.long().cpu(), eligible.bool().cpu()
    if labels.dim() != 1 or eligible.shape != labels.shape:
        raise ValueError(f"labels and eligible must be (N,) of one length, got {tuple(labels.shape)} and "
                         f"{tuple(eligible.shape)}")
    if n < 1 or num_grids < 1:
        raise ValueError(f"the grid size n and num_grids must be >= 1, got {n} and {num_grids}")
    pool = eligible.nonzero()[:, 0]  # eligible positions
    pool = pool[labels[pool].argsort(stable=True)]  # grouped by class
    classes, counts = labels[pool].unique_consecutive(return_counts=True)
    if len(classes) < n * n:
        raise ValueError(f"a {n}x{n} grid needs {n * n} distinct classes with an eligible (correctly "
                         f"classified) image, but only {len(classes)} have one")
    starts = counts.cumsum(0) - counts
    generator = torch.Generator().manual_seed(int(seed))
    chosen = torch.rand(num_grids, len(classes), generator=generator).argsort(dim=1)[:, : n * n]  # (G, n*n)
    offset = (torch.rand(num_grids, n * n, generator=generator) * counts[chosen]).long()
    offset = torch.minimum(offset, counts[chosen] - 1)
    return pool[starts[chosen] + offset]


def tile_grids(images: Tensor, n: int) -> Tensor:
    """``(G, n*n, C, H, W)`` cell images -> ``(G, C, n*H, n*W)`` grids, cell ``k`` at row
    ``k // n``, column ``k % n``."""
    g, cells, c, h, w = images.shape
    if cells != n * n:
        raise ValueError(f"a {n}x{n} grid has {n * n} cells, got {cells} images per grid")
    return images.reshape(g, n, n, c, h, w).permute(0, 3, 1, 4, 2, 5).reshape(g, c, n * h, n * w)


# --------------------------------------------------------------------------- the score
def cell_mass(maps: Tensor, n: int) -> Tensor:
    """Positive mass of each map in each cell: ``(G, T, h, w)`` -> ``(G, T, n*n)``, row-major
    cells; ``h`` and ``w`` must be multiples of ``n``."""
    g, t, h, w = maps.shape
    if h % n or w % n:
        raise ValueError(f"maps of {h}x{w} do not split into {n}x{n} equal cells: upsample them first")
    positive = maps.clamp_min(0).reshape(g, t, n, h // n, n, w // n)
    return positive.sum(dim=(3, 5)).reshape(g, t, n * n)


def pointing_scores(maps: Tensor, n: int, cells: Tensor | None = None) -> Tensor:
    """``PG`` of every map: ``(G, T, h, w)`` -> ``(G, T)``, 0 for an all-zero map.

    Map ``[g, t]`` explains the class shown in cell ``cells[g, t]`` (``(G, T)`` long; default
    ``t``, i.e. ``T = n*n`` maps, one per cell in order). Float32 or wider.
    """
    mass = cell_mass(maps.to(torch.promote_types(maps.dtype, torch.float32)), n)
    if cells is None:
        cells = torch.arange(mass.shape[1], device=maps.device).expand(mass.shape[0], -1)
    inside = mass.gather(2, cells.long()[..., None])[..., 0]
    total = mass.sum(dim=2)
    return torch.where(total > 0, inside / torch.where(total > 0, total, torch.ones_like(total)), 0.0)


def grid_pointing_scores(
    model: nn.Module, grids: Tensor, classes: Tensor, n: int, methods: Sequence[str]
) -> dict[str, Tensor]:
    """``PG`` ``(G, n*n)`` per method for the grids ``(G, C, n*H, n*W)`` whose cell ``k``
    shows class ``classes[:, k]`` (``(G, n*n)``).

    One backbone pass for all grids; every method's ``n*n`` maps per grid come from one
    batched call through the head (``head_maps``, dropout off). Maps whose size does not split
    into ``n x n`` cells are upsampled bilinearly to the grids' pixel size first.
    """
    features = leaf_features(model, grids)
    scores = {}
    for method in methods:
        maps = head_maps(model, features, classes.long(), method)  # (G, n*n, h, w)
        h, w = maps.shape[-2:]
        if h % n or w % n:
            maps = F.interpolate(maps, size=grids.shape[-2:], mode="bilinear", align_corners=False)
        scores[method] = pointing_scores(maps, n)
    return scores


def pointing_game(
    models: dict[str, nn.Module],
    dataset,
    labels: Tensor,
    eligible: Tensor,
    n: int,
    num_grids: int,
    methods: Sequence[str],
    seed: int = 0,
    grids_per_batch: int = 32,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
) -> dict[str, float]:
    """Mean ``PG`` in % of every model and method on ``num_grids`` seeded ``n x n`` grids.

    ``dataset[i]`` is ``(image, label, ...)`` with ``labels[i]`` its label; the grids use the
    ``eligible`` images only (e.g. those the teacher classifies correctly), the same grids for
    every model in ``models`` (``{prefix: model}``, prefix ``""`` or ``"teacher/"``; eval mode, on
    ``device``). Returns ``{f"{prefix}pointing_game_{n}x{n}/{method}_pct": value}``.
    """
    from torch.utils.data import DataLoader, Subset

    from distill.evaluation.faithfulness import ScoreAccumulator

    positions = sample_grids(labels, eligible, n, num_grids, seed)  # (G, n*n)
    loader = DataLoader(Subset(dataset, positions.flatten().tolist()), batch_size=grids_per_batch * n * n,
                        shuffle=False, num_workers=num_workers)
    scores = ScoreAccumulator().to(device)
    for batch in loader:
        cells = batch[0].to(device)
        classes = batch[1].to(device).long().reshape(-1, n * n)
        grids = tile_grids(cells.reshape(-1, n * n, *cells.shape[1:]), n)
        for prefix, model in models.items():
            per_method = grid_pointing_scores(model, grids, classes, n, methods)
            scores.update({f"{prefix}pointing_game_{n}x{n}/{m}": v.flatten() for m, v in per_method.items()})
    result = scores.compute()
    result.pop("num_images", None)
    return result


__all__ = ["cell_mass", "grid_pointing_scores", "pointing_game", "pointing_scores", "sample_grids", "tile_grids"]
