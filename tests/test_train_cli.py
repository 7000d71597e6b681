"""End to end through train.py (subprocesses, synthetic data, CPU)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from tests.support import run_train

pytestmark = pytest.mark.slow


def metrics_files(root: Path) -> list[Path]:
    return sorted(root.rglob("metrics.json"))


def logged_columns(run_dir: Path) -> set[str]:
    columns: set[str] = set()
    for path in run_dir.rglob("metrics.csv"):
        with open(path) as f:
            columns |= set(next(csv.reader(f)))
    return columns


def assert_ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def smoke_teacher(tmp_path_factory) -> Path:
    """A wrn16_2 teacher trained once by `train.py stage=teacher`, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("teacher")
    path = tmp / "wrn16_2_synthetic.ckpt"
    proc = run_train(["experiment=smoke", "stage=teacher", "logger=csv", f"teacher.checkpoint={path}"], tmp)
    assert_ok(proc)
    assert path.is_file() and (tmp / "wrn16_2_synthetic-last.ckpt").is_file()
    return path


def test_smoke_trains_missing_teacher_then_distills(tmp_path):
    proc = run_train(["experiment=smoke", "logger=csv", "explain=gradcampp"], tmp_path)
    assert_ok(proc)
    assert "No teacher checkpoint" in proc.stdout + proc.stderr
    (metrics_path,) = metrics_files(tmp_path)
    run_dir = metrics_path.parent
    (teacher,) = (run_dir / "teacher").glob("wrn16_2_synthetic-????????.ckpt")  # named by network + data
    record = json.loads(teacher.with_suffix(".json").read_text())
    assert record["identity"]["network"]["name"] == "wrn16_2" and math.isfinite(record["metrics"]["test/acc"])
    assert (run_dir / "checkpoints" / "best.ckpt").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    result = json.loads(metrics_path.read_text())
    assert result["stage"] == "distill" and math.isfinite(result["metrics"]["test/acc"])
    assert list((run_dir / "explanations").glob("*.png"))


def test_every_explain_and_kd_combination_as_one_multirun(smoke_teacher, tmp_path):
    proc = run_train(
        ["-m", "experiment=smoke", "logger=csv", f"teacher.checkpoint={smoke_teacher}",
         "explain=none,gradcam,gradcampp", "kd=none,hinton,at,at_hinton", "trainer.max_epochs=1",
         "trainer.num_sanity_val_steps=0", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"],
        tmp_path, timeout=600,
    )
    assert_ok(proc)
    files = metrics_files(tmp_path)
    assert len(files) == 12
    seen = set()
    for path in files:
        result = json.loads(path.read_text())
        explain, kd = result["config"]["explain"]["name"], result["config"]["kd"]["name"]
        seen.add((explain, kd))
        metrics = result["metrics"]
        for key in ("test/acc", "test/agreement", "test/map_cosine", "test/loss", "test/ce", "train/ce"):
            assert math.isfinite(metrics[key]), (explain, kd, key)
        assert ("test/explain" in metrics) == (explain != "none"), (explain, kd)
        columns = logged_columns(path.parent)
        assert ("train/explain" in columns) == ("val/explain" in columns) == (explain != "none"), (explain, kd)
        assert ("train/kd" in columns) == (kd in ("hinton", "at_hinton")), (explain, kd)
        assert ("train/at" in columns) == (kd in ("at", "at_hinton")), (explain, kd)
    assert len(seen) == 12


def test_baseline_stage_trains_the_student_alone(tmp_path):
    proc = run_train(["experiment=smoke", "stage=baseline", "logger=none", "trainer.max_epochs=1"], tmp_path)
    assert_ok(proc)
    (metrics_path,) = metrics_files(tmp_path)
    result = json.loads(metrics_path.read_text())
    assert result["stage"] == "baseline" and "test/agreement" not in result["metrics"]
    assert Path(result["checkpoint/last"]).is_file()


def test_teacher_of_another_architecture_is_refused(smoke_teacher, tmp_path):
    proc = run_train(["experiment=smoke", "logger=none", "teacher=wrn40_2", f"teacher.checkpoint={smoke_teacher}"],
                     tmp_path)
    assert proc.returncode == 2
    assert "holds a wrn16_2 with 10 classes" in proc.stderr and "Traceback" not in proc.stderr


def test_teacher_with_other_number_of_classes_is_refused(smoke_teacher, tmp_path):
    proc = run_train(["experiment=smoke", "logger=none", "data.num_classes=5", f"teacher.checkpoint={smoke_teacher}"],
                     tmp_path)
    assert proc.returncode == 2
    assert "5 classes" in proc.stderr and "Traceback" not in proc.stderr


def test_wrong_option_name_lists_choices(tmp_path):
    proc = run_train(["teacher=wrn99"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "teacher=wrn99" in line and "wrn40_2" in line and "timm" in line
