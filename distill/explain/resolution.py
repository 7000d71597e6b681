"""Whether a network's explained map is fine enough to mean anything: the one guard of every map metric.

A network explains a ``(h, w)`` grid: the spatial size of ``forward_features`` at the data's image
size (an ImageNet-style network of stride 32 explains 1 x 1 at 32 pixels). Below ``MIN_MAP_GRID``
cells per side the map says nothing about *where* the network looks, so the explanation loss,
the map cosine, the pointing game, box localisation, the faithfulness scores (Average Drop,
Increase in Confidence, Win) and the panels would all be numbers without meaning. A training run
with an explanation loss refuses such a network; everywhere else the metric is left out and
``map_metrics_missing`` says why (docs/map_grids.md).
"""

from __future__ import annotations

import re

from torch import Tensor, nn

# 2 x 2 is the coarsest grid that says where: a 1-cell side has no spatial information. At 1 x 1 a
# map is one non-negative number per image, so the cosine of any two non-zero maps is exactly 1,
# the normalised distances are 0 (the loss only matches magnitudes), min-max scaling makes the
# explanation image the whole image or black (Average Drop measures nothing), the upsampled map is
# uniform (the pointing game scores 1/n^2 whatever the network does) and a panel is one colour.
# At 2 x 2 a map already tells the quadrants apart: CAT-KD transfers class attention pooled to 2 x 2
# (Guo et al., CVPR 2023). A 1 x N map keeps only one axis: the smaller side counts.
MIN_MAP_GRID = 2
GRID_ATTRIBUTE = "distill_map_grid"  # (h, w) recorded by inspect_network at the data's image size

Grid = tuple[int, int]


def record_grid(model: nn.Module, features: Tensor) -> Grid:
    """Record (and return) the grid of ``features`` ``(B, K, h, w)`` on ``model``."""
    grid = (int(features.shape[-2]), int(features.shape[-1]))
    object.__setattr__(model, GRID_ATTRIBUTE, grid)
    return grid


def map_grid(model: nn.Module) -> Grid | None:
    """The grid recorded by ``inspect_network`` (``None``: never inspected)."""
    return getattr(model, GRID_ATTRIBUTE, None)


def grid_text(grid: Grid) -> str:
    return f"{grid[0]}x{grid[1]}"


def meaningful_grid(grid: Grid) -> bool:
    """True if both sides of ``grid`` have at least ``MIN_MAP_GRID`` cells."""
    return min(grid) >= MIN_MAP_GRID


def network_label(model: nn.Module) -> str:
    """``wrn40_2``, ``timm-resnet18``: the name a network was built by (its class name otherwise)."""
    from distill.models import build_spec

    spec = build_spec(model) or {}
    if "name" not in spec:
        return type(model).__name__
    return f"{spec['name']}-{spec['arch']}" if spec.get("arch") else str(spec["name"])


def grids_line(grids: dict[str, Grid]) -> str:
    """``teacher wrn40_2: 8x8, student timm-resnet18: 1x1`` from ``{name: grid}``."""
    return ", ".join(f"{name}: {grid_text(grid)}" for name, grid in grids.items())


def map_metrics_missing(grids: dict[str, Grid | None]) -> str | None:
    """Why no map metric may be reported on these networks' maps, or ``None`` when every known grid
    is meaningful: ``student timm-resnet18 explains a 1x1 map`` (several joined by ``; ``).
    ``grids``: ``{name: grid}``, e.g. ``{"student timm-resnet18": (1, 1)}``; ``None`` = unknown."""
    reasons = [f"{name} explains a {grid_text(grid)} map" for name, grid in grids.items()
               if grid is not None and not meaningful_grid(grid)]
    return "; ".join(reasons) or None


def networks_missing(networks: dict[str, nn.Module]) -> str | None:
    """``map_metrics_missing`` of networks by role (``{"teacher": model, ...}``), from their recorded grids."""
    return map_metrics_missing({f"{role} {network_label(m)}": map_grid(m) for role, m in networks.items()})


def missing_for(reason: str | None, roles: tuple[str, ...]) -> str | None:
    """The part of a ``map_metrics_missing`` reason about networks of ``roles`` (e.g. ``("teacher",)``)."""
    parts = [part for part in (reason or "").split("; ") if part.split(" ")[0] in roles]
    return "; ".join(parts) or None


def missing_cell(reason: str) -> str:
    """The report's cell for a metric left out: ``n/a (1x1 map)``."""
    grids = re.findall(r"(\d+x\d+) map", reason)
    return f"n/a ({grids[0]} map)" if grids else "n/a"


def degenerate_grid_fix(name: str, grid: Grid, image_size: int | None = None) -> str:
    """The one line that stops a run whose explanation loss would compare ``name``'s ``grid`` maps
    (``name`` = role and network, e.g. ``student timm-resnet18``)."""
    role = name.split(" ")[0]
    where = f"at {image_size}x{image_size} pixels" if image_size else "at this image size"
    return (f"{name} explains a {grid_text(grid)} map {where}, below the {MIN_MAP_GRID}x{MIN_MAP_GRID} minimum "
            f"for an explanation loss (no spatial information). Fix: {role}.output_stride=8 (timm), "
            f"{role}.replace_stride_with_dilation=[false,true,true] (torchvision ResNet-50 and up), a larger "
            f"data.image_size, an earlier {role}.layer=..., or a CIFAR network ({role}=wrn16_2); "
            "or explain=none for a run without an explanation loss")


__all__ = [
    "GRID_ATTRIBUTE",
    "MIN_MAP_GRID",
    "degenerate_grid_fix",
    "grid_text",
    "grids_line",
    "map_grid",
    "map_metrics_missing",
    "meaningful_grid",
    "missing_cell",
    "missing_for",
    "network_label",
    "networks_missing",
    "record_grid",
]
