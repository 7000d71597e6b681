"""The benchmark presets end to end through train.py, on tiny data in the real on-disk formats
(CIFAR-100 pickles, an ImageNet-layout folder of JPEGs), and a 2-job multirun through Hydra's
submitit launcher (local processes, the plugin that also drives SLURM)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO, run_train
from tests.tiny_datasets import write_cifar100, write_image_tree

pytestmark = pytest.mark.slow

TINY = ["trainer=cpu", "logger=csv", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
        "trainer.num_sanity_val_steps=0", "trainer.enable_model_summary=false", "data.num_workers=0",
        "data.batch_size=8", "data.val_subset=8", "trainer.enable_progress_bar=false"]

# train.py in a process whose torchvision skips the CIFAR md5 checks (tiny files cannot match them),
# as tests/test_data.py does with monkeypatch in-process.
NO_MD5 = ("import runpy, sys, torchvision.datasets.cifar as c; c.CIFAR10._check_integrity = lambda self: True; "
          "c.check_integrity = lambda *a, **k: True; sys.argv = sys.argv[1:]; "
          "runpy.run_path(sys.argv[0], run_name='__main__')")


def one_metrics(root: Path) -> dict:
    found = sorted(root.rglob("metrics.json"))
    assert len(found) == 1, found
    return json.loads(found[0].read_text())


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_cifar100_kd_preset_runs_with_dkd_and_gradcampp(tmp_path):
    write_cifar100(tmp_path / "data" / "cifar100", n_train=40, n_test=16)
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}
    args = ["experiment=cifar100_kd", "kd=dkd", "explain=gradcampp", "data.download=false", *TINY,
            f"paths.log_dir={tmp_path}/logs", f"paths.data_dir={tmp_path}/data",
            f"paths.checkpoint_dir={tmp_path}/ckpt"]
    proc = subprocess.run([sys.executable, "-c", NO_MD5, str(REPO / "train.py"), *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert_ok(proc)
    assert list((tmp_path / "ckpt").glob("wrn40_2_cifar100-*.ckpt"))  # the WRN-40-2 teacher, trained first
    result = one_metrics(tmp_path / "logs" / "cifar100_kd" / "runs")  # the distillation run's
    assert result["stage"] == "distill" and result["config"]["loss"]["dkd_beta"] == 6.0
    m = result["metrics"]
    assert {"train/dkd", "train/explain", "val/explain", "val/dkd", "test/explain", "test/acc"} <= set(m)
    assert math.isfinite(m["train/dkd"])
    assert 0.0 <= m["test/acc"] <= 1.0


def test_imagenet_kd_preset_runs_on_an_imagenet_layout_folder(tmp_path):
    """The preset as written except the networks: small WRNs stand in for the torchvision
    ResNets (teacher=torchvision comes with the any-network work), at 32x32 crops."""
    write_image_tree(tmp_path / "imagenet", size=(40, 56), n_train=6, n_eval=3)
    proc = run_train(["experiment=imagenet_kd", "kd=dkd_imagenet", "teacher=wrn16_2", "student=wrn16_1",
                      "~teacher.arch", "~teacher.weights", "~teacher.as_is", "~student.arch",
                      f"data.root={tmp_path / 'imagenet'}",
                      "data.image_size=32", "data.resize=36", *TINY, f"paths.checkpoint_dir={tmp_path}/ckpt"],
                     tmp_path)
    assert_ok(proc)
    assert list((tmp_path / "ckpt").glob("wrn16_2_imagenet-*.ckpt"))
    result = one_metrics(tmp_path / "logs" / "imagenet_kd" / "runs")
    assert result["config"]["kd"]["name"] == "dkd_imagenet" and "test/acc" in result["metrics"]
    assert math.isfinite(result["metrics"]["train/dkd"])


def test_submitit_local_multirun_writes_each_jobs_metrics(tmp_path):
    """``-m hydra/launcher=submitit_local``: the submitit plugin (the one that submits to SLURM
    with ``submitit_slurm``) runs 2 jobs as local processes; each writes its own metrics.json."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e .[cluster]")
    sweep = tmp_path / "sweep"
    proc = run_train(["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5",
                      "hydra.launcher.cpus_per_task=1", f"hydra.sweep.dir={sweep}", "experiment=smoke",
                      "stage=baseline", "seed=0,1", "logger=csv", "trainer.max_epochs=1",
                      "trainer.limit_train_batches=2", "trainer.num_sanity_val_steps=0",
                      "trainer.enable_progress_bar=false"], tmp_path)
    assert_ok(proc)
    jobs = sorted(p for p in sweep.iterdir() if p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    assert list((sweep / ".submitit").glob("*/*_submitted.pkl"))  # went through submitit, not the basic launcher
    for job, seed in zip(jobs, (0, 1), strict=True):
        result = json.loads((job / "metrics.json").read_text())
        assert result["stage"] == "baseline" and result["config"]["seed"] == seed
        assert 0.0 <= result["metrics"]["test/acc"] <= 1.0


def test_cifar100_cross_family_preset_runs_with_at_and_gradcampp(tmp_path):
    """VGG13 -> MobileNetV2: AT across families and Grad-CAM++ maps of a 2 x 2 student grid."""
    write_cifar100(tmp_path / "data" / "cifar100", n_train=40, n_test=16)
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}
    args = ["experiment=cifar100_vgg13_mobilenetv2", "kd=at_cifar100", "explain=gradcampp", "data.download=false",
            *TINY, f"paths.log_dir={tmp_path}/logs", f"paths.data_dir={tmp_path}/data",
            f"paths.checkpoint_dir={tmp_path}/ckpt"]
    proc = subprocess.run([sys.executable, "-c", NO_MD5, str(REPO / "train.py"), *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert_ok(proc)
    assert list((tmp_path / "ckpt").glob("vgg13_cifar100-*.ckpt"))  # the VGG13 teacher, trained first
    result = one_metrics(tmp_path / "logs" / "cifar100_vgg13_mobilenetv2" / "runs")
    assert result["config"]["student"]["name"] == "mobilenetv2" and result["config"]["loss"]["at"] == 1000.0
    m = result["metrics"]
    assert {"train/at", "train/explain", "val/explain", "test/acc"} <= set(m)
    assert math.isfinite(m["train/at"]) and math.isfinite(m["train/explain"])
