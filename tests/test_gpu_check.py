"""scripts/gpu_check.sh and scripts/payoff_figure.py on the CPU: the dry version runs every command
of the GPU check (both step benchmarks, the teacher, both students, the table) tiny, so the script a
device session runs once has already run here."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.tiny_datasets import write_image_tree

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_runs_dry_on_the_cpu_and_prints_its_table(tmp_path):
    root = tmp_path / "images"
    write_image_tree(root, classes=[f"c{i}" for i in range(4)], eval_split="test", n_train=8, n_eval=4,
                     size=(32, 32), suffix=".jpg")
    env = {**os.environ, "DRY": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(root), str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.count("explain/kd time ratio:") == 2 and "images/s" in out
    table = out.split("== table")[1]
    assert "student kd=hinton explain=gradcampp" in table and "student kd=hinton explain=none" in table
    assert "teacher" in table and (tmp_path / "out" / "teacher.ckpt").is_file()  # the file payoff.sh reuses
    figure = tmp_path / "payoff.png"
    students = sorted((tmp_path / "out").rglob("last.ckpt"))
    students = [p for p in students if "student_" in str(p)]
    proc = subprocess.run(["python", str(REPO / "scripts" / "payoff_figure.py"), "--root", str(root),
                           "--teacher", str(tmp_path / "out" / "teacher.ckpt"), "--student", f"KD={students[0]}",
                           "--student", f"KD+expl={students[1]}", "--conflicting-cue", "--num-images", "3",
                           "--cell-px", "32", "--out", str(figure)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from PIL import Image

    assert Image.open(figure).size == (4 * 32, 3 * 32)  # image | teacher | 2 students, 3 rows
