"""Plain helpers shared by the tests (the fixtures built on them are in conftest.py): the
repository's paths, Hydra composition into a temporary folder, and running train.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from torch import nn

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
SHARED_CIFAR = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"  # real CIFAR-10 JPEGs, when present


def compose_config(tmp_path: Path, overrides: list[str] = ()) -> DictConfig:
    """The train.py config, composed as Hydra would, with every output under ``tmp_path``."""
    GlobalHydra.instance().clear()
    paths = [
        f"paths.output_dir={tmp_path}",
        f"paths.log_dir={tmp_path}/logs",
        f"paths.data_dir={tmp_path}/data",
        f"paths.checkpoint_dir={tmp_path}/checkpoints",
        f"hydra.run.dir={tmp_path}",
    ]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("train", overrides=[*overrides, *paths], return_hydra_config=True)
        HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        del cfg["hydra"]  # as in a real run: train.py's cfg has no hydra node
    return cfg


def run_train(args: list[str], tmp_path: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` in the repo, logging under ``tmp_path``."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}
    cmd = [sys.executable, str(REPO / "train.py"), *args, f"paths.log_dir={tmp_path}/logs",
           f"paths.data_dir={tmp_path}/data"]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


class PooledLinear(nn.Module):
    """A hand-built network whose maps are known: explained activations = the image, logits =
    ``W mean(A) + b`` (a pool + linear head, so closed-form maps). ``bias=None``: no bias."""

    def __init__(self, weight, bias=None):
        super().__init__()
        import torch

        self.fc = nn.Linear(len(weight[0]), len(weight), bias=bias is not None)
        with torch.no_grad():
            self.fc.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
            if bias is not None:
                self.fc.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
        self.num_classes = len(weight)

    def forward_features(self, x):
        return x * 1.0

    def forward_head(self, a):
        return self.fc(a.mean(dim=(2, 3)))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))
