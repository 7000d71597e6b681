"""PASCAL VOC 2007 end to end through train.py on a tiny VOC-format tree: teacher fine-tuning,
distillation with multi-label maps, mAP and localisation, and the missing-data error."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.support import run_train


def _metrics(root: Path) -> dict:
    (path,) = sorted(root.rglob("metrics.json"))
    return json.loads(path.read_text())


@pytest.mark.slow
def test_voc_pipeline_through_train_py(voc_root, tmp_path):
    """Teacher fine-tuned first (none exists), then distilled with Grad-CAM++ maps of every
    positive class + multi-label KD; mAP, teacher mAP, localisation at val and test."""
    proc = run_train(["experiment=smoke_voc", "logger=none", f"data.root={voc_root}", "explain=gradcampp",
                      "kd=hinton"], tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "No teacher checkpoint" in proc.stdout + proc.stderr
    result = _metrics(tmp_path)
    metrics = result["metrics"]
    assert result["stage"] == "distill"
    for key in ("test/map", "test/teacher_map", "val/map", "test/agreement", "test/map_cosine", "train/ce",
                "train/kd", "train/explain", "test/explain", "test/loss", "test/loc00_student", "test/loc50_student",
                "test/loc00_teacher",
                "test/loc50_teacher", "val/loc50_student"):
        assert math.isfinite(metrics[key]), key
    assert 0 <= metrics["test/map"] <= 1 and 0 <= metrics["test/loc50_teacher"] <= 1
    assert "test/acc" not in metrics
    assert Path(result["checkpoint/best"]).is_file()  # monitored val/map


@pytest.mark.slow
def test_voc_teacher_stage_with_11point_map(voc_root, tmp_path):
    teacher = tmp_path / "vgg16_voc.ckpt"
    proc = run_train(["experiment=smoke_voc", "logger=none", "stage=teacher", f"data.root={voc_root}",
                      "task=multilabel_voc11", "callbacks.localization.on_val=false", f"teacher.checkpoint={teacher}"],
                     tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = _metrics(tmp_path)["metrics"]
    assert 0 <= metrics["test/map11"] <= 1 and math.isfinite(metrics["val/map11"])
    assert math.isfinite(metrics["test/loc50_teacher"]) and "val/loc50_teacher" not in metrics
    assert teacher.is_file()


@pytest.mark.slow
def test_missing_voc_through_train_py_is_one_line(tmp_path):
    proc = run_train(["experiment=smoke_voc", "logger=none", f"data.root={tmp_path / 'none'}"], tmp_path)
    assert proc.returncode == 2
    assert "PASCAL VOC 2007" in proc.stderr and "Traceback" not in proc.stderr
