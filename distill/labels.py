"""The one label of a network in every table, run name and panel: ``wrn16_2``,
``timm-mobilenetv3_small_050``, ``torchvision-resnet18`` (``name``, then ``-arch`` when the
factory picks an architecture). Imports nothing heavy, so ``summarize.py`` stays fast."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def model_label(node: Mapping[str, Any] | None) -> str:
    """The label of a ``teacher`` / ``student`` config node (a DictConfig or a plain dict, e.g. a
    checkpoint's recorded build spec); ``"?"`` for a node that names no network."""
    if not node or not node.get("name"):
        return "?"
    return f"{node['name']}-{node['arch']}" if node.get("arch") else str(node["name"])


__all__ = ["model_label"]
