"""Shared fixtures (the plain helpers they use are in tests/support.py)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
from omegaconf import DictConfig

from tests.support import compose_config
from tests.tiny_datasets import make_voc_tree

# Tiny test models: one intra-op thread per process beats two threads fighting over 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture
def compose(tmp_path: Path):
    """``compose(overrides)``: the train.py config composed into ``tmp_path`` (:func:`compose_config`)."""
    return functools.partial(compose_config, tmp_path)


@pytest.fixture
def smoke_cfg(tmp_path: Path):
    """Compose the smoke experiment (synthetic data, CPU, tiny) into ``tmp_path``."""

    def make(*overrides: str) -> DictConfig:
        return compose_config(tmp_path, ["experiment=smoke", "logger=csv", *overrides])

    return make


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    """A tiny PASCAL VOC 2007 tree (12 trainval, 8 test images), built once per test module."""
    root = tmp_path_factory.mktemp("voc")
    make_voc_tree(root)
    return root
