"""DDP with the explanation loss: two CPU processes (gloo), and DDP launched from Hydra,
as a single run and as a multirun (issue 6). The slowest tests of the suite: each starts
two Python processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support import REPO, run_train

pytestmark = pytest.mark.slow

SCRIPT = '''
"""DDP distillation with the Grad-CAM++ loss through autograd (double backward) on 2 CPU ranks."""
import os
import sys
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch

from distill.data import ImageFolderDataModule
from distill.models import build_model
from distill.module import DistillModule, ExplainSettings, LossWeights


class Record(pl.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen += [(trainer.current_epoch, v) for v in batch[0].sum(dim=(1, 2, 3)).tolist()]

    def on_train_end(self, trainer, pl_module):
        torch.save({"params": {k: v.detach().clone() for k, v in pl_module.model.named_parameters()},
                    "initial": pl_module.initial, "seen": self.seen, "world_size": trainer.world_size,
                    "steps": trainer.global_step, "loader": type(trainer.train_dataloader).__name__},
                   Path(sys.argv[1]) / f"rank{trainer.global_rank}.pt")


def main():
    # A different seed per rank (Lightning sets LOCAL_RANK=1 when it re-runs this script for
    # rank 1): the ranks start from different weights, DDP must broadcast rank 0's.
    pl.seed_everything(int(sys.argv[3]) + int(os.environ.get("LOCAL_RANK", "0")))
    data = ImageFolderDataModule(sys.argv[2], image_size=16, num_classes=3, batch_size=4, num_workers=0,
                                 on_device=True, seed=0)
    teacher, student = build_model("wrn16_2", 3), build_model("wrn16_1", 3)
    module = DistillModule(student, teacher, optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9),
                           weights=LossWeights(kd=1.0, explain=0.01),
                           explain=ExplainSettings(method="gradcampp", closed_form=False))
    module.initial = {k: v.detach().clone() for k, v in student.named_parameters()}
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, inference_mode=False,
                         callbacks=[Record()])
    trainer.fit(module, datamodule=data)


if __name__ == "__main__":
    main()
'''


def write_tree(root: Path, n_train: int = 8, n_test: int = 2, size: int = 16) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for c in ("cat", "dog", "eel"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")


def test_two_cpu_ranks_end_with_identical_student_weights(tmp_path):
    write_tree(tmp_path / "data")
    script = tmp_path / "ddp_distill.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), str(tmp_path / "data"), "0"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["loader"] for r in ranks] == ["DeviceBatches", "DeviceBatches"]  # data.on_device, sharded
    assert ranks[0]["steps"] == ranks[1]["steps"] == 2 * (24 // 2 // 4)
    seen = [set(r["seen"]) for r in ranks]
    assert len(seen[0]) == len(seen[1]) == 2 * 12 and not seen[0] & seen[1]  # per epoch, one shard per rank
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
    assert any(not torch.equal(v, ranks[1]["initial"][k]) for k, v in ranks[0]["initial"].items())
    assert any(not torch.equal(v, ranks[0]["initial"][k]) for k, v in ranks[0]["params"].items())


def teacher_checkpoint(path: Path) -> Path:
    """A (random) wrn16_2 teacher in the distill checkpoint format: skips teacher training."""
    from distill.models import build_model

    teacher = build_model("wrn16_2", 10)
    torch.save({"state_dict": {f"model.{k}": v for k, v in teacher.state_dict().items()},
                "hyper_parameters": {"model_name": "wrn16_2", "num_classes": 10}}, path)
    return path


DDP_ARGS = ["experiment=smoke", "logger=csv", "kd=hinton", "trainer=ddp", "trainer.accelerator=cpu",
            "trainer.devices=2", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false"]


def assert_ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_ddp_single_run_from_hydra(tmp_path):
    ckpt = teacher_checkpoint(tmp_path / "teacher.ckpt")
    proc = run_train([*DDP_ARGS, "explain=gradcampp", f"teacher.checkpoint={ckpt}"], tmp_path)
    assert_ok(proc)
    (run_dir,) = (tmp_path / "logs" / "smoke" / "runs").iterdir()  # rank 1 wrote into rank 0's folder
    assert (run_dir / "metrics.json").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in (run_dir / "train_ddp_process_1.log").read_text()
    result = json.loads((run_dir / "metrics.json").read_text())
    assert result["config"]["explain"]["name"] == "gradcampp"


def test_ddp_multirun_from_hydra_launches_each_job_once(tmp_path):
    ckpt = teacher_checkpoint(tmp_path / "teacher.ckpt")
    proc = run_train(["-m", *DDP_ARGS, "explain=gradcam,gradcampp", f"teacher.checkpoint={ckpt}"], tmp_path)
    assert_ok(proc)
    logs = tmp_path / "logs" / "smoke"
    assert not (logs / "runs").exists()  # no rank re-ran as a single run elsewhere
    (sweep,) = (logs / "multiruns").iterdir()  # ... nor started the sweep again
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    for job, explain in (("0", "gradcam"), ("1", "gradcampp")):
        result = json.loads((sweep / job / "metrics.json").read_text())
        assert result["config"]["explain"]["name"] == explain
        rank1 = (sweep / job / "train_ddp_process_1.log").read_text()
        assert "GLOBAL_RANK: 1, MEMBER: 2/2" in rank1
    assert proc.stdout.count("Launching 2 jobs") + proc.stderr.count("Launching 2 jobs") == 1
