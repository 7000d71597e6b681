"""What makes a trained teacher the same teacher: its network and the data it was trained on.

The default teacher checkpoint is named after both (``checkpoints/<network>_<data>-<hash>.ckpt``),
the identity is stored in every checkpoint's hyperparameters, and a teacher checkpoint whose
identity differs from the configured one is refused with one line that says what differs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from distill.models import RUN_KEYS

# Data options that change what a network is trained on (not how fast it is read).
DATA_KEYS = ("name", "root", "num_classes", "image_size", "train_subset", "per_class", "val_split", "augment",
             "max_objects")
# Data options that shape the student's distillation set only: a teacher trains without them (distill.teacher)
STUDENT_ONLY_KEYS = ("per_class", "shortcut")


def network_identity(node: dict) -> dict[str, Any]:
    """A ``teacher`` / ``student`` node without the keys that do not change the network."""
    return {k: v for k, v in sorted(node.items()) if k == "name" or k not in RUN_KEYS}


def data_identity(node: dict, class_names: list[str] | None = None, seed: int | None = None) -> dict[str, Any]:
    """The data option, its root, class list and training subset (drawn from ``seed``)."""
    identity = {k: node[k] for k in DATA_KEYS if node.get(k) is not None}
    if "root" in identity:
        identity["root"] = str(Path(identity["root"]).expanduser().resolve())
    if class_names:
        identity["classes"] = list(class_names)
    if (node.get("shortcut") or {}).get("p") is not None:
        identity["shortcut"] = dict(node["shortcut"])
    if node.get("per_class") or "shortcut" in identity:
        identity["subset_seed"] = node.get("subset_seed", 0)  # the few-shot set and the cue are drawn from it
    if node.get("train_subset") or (node.get("val_split") and not node.get("per_class")):
        identity["seed"] = seed  # the subset / split is drawn from the seed
    return identity


def short_hash(payload: dict) -> str:
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:8]


def checkpoint_stem(network: dict, data: dict) -> str:
    """``wrn40_2_cifar10-1a2b3c4d``, ``timm-resnet18_image_folder-...``: readable, and unique per identity."""
    arch = f"-{network['arch']}" if network.get("arch") else ""
    return f"{network['name']}{arch}_{data['name']}-{short_hash({'network': network, 'data': data})}"


def data_differences(saved: dict, configured: dict) -> list[str]:
    """``key: saved (checkpoint) vs configured (config)`` for every data identity key that differs,
    also those only one side records (e.g. a teacher trained on ``per_class`` images)."""
    absent = object()
    out = []
    for key in sorted(set(saved) | set(configured)):
        old, new = saved.get(key, absent), configured.get(key, absent)
        if old != new:
            show = [("absent" if v is absent else repr(v)) for v in (old, new)]
            out.append(f"{key}: {show[0]} (checkpoint) vs {show[1]} (config)")
    return out


def differences(saved: dict, configured: dict, prefix: str = "") -> list[str]:
    """``key: saved -> configured`` for every key that both record and that differs."""
    out = []
    for key in sorted(set(saved) & set(configured)):
        if isinstance(saved[key], dict) and isinstance(configured[key], dict):
            out += differences(saved[key], configured[key], f"{prefix}{key}.")
        elif saved[key] != configured[key]:
            out.append(f"{prefix}{key}: {saved[key]!r} (checkpoint) vs {configured[key]!r} (config)")
    return out
