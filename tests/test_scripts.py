"""scripts/evaluate.py, visualize.py and summarize.py end to end on smoke checkpoints (subprocesses).

One smoke teacher and one 4-job smoke multirun (seed=0,1 x explain=none,gradcampp, 1 epoch)
are trained once for the module; every script runs on them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support import REPO, run_train

pytestmark = pytest.mark.slow

# Two shared cores: OpenMP spinning over 2 threads makes small CPU runs several times slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def run_script(name: str, args: list[str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "scripts" / name), *args]
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def hydra_args(out: Path) -> list[str]:
    return [f"output_dir={out}", f"hydra.run.dir={out}"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A smoke teacher, then a smoke multirun distilled from it (4 jobs, 1 epoch each)."""
    tmp = tmp_path_factory.mktemp("runs")
    teacher = tmp / "teacher.ckpt"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        common = ["experiment=smoke", "logger=none", "trainer.max_epochs=1", "trainer.num_sanity_val_steps=0"]
        # 3 epochs: a teacher that classifies images of >= 4 classes correctly (2x2 pointing game).
        assert_ok(run_train([*common, "stage=teacher", "trainer.max_epochs=3", f"teacher.checkpoint={teacher}"], tmp))
        sweep = run_train(["-m", *common, "seed=0,1", "explain=none,gradcampp", f"teacher.checkpoint={teacher}"],
                          tmp, timeout=600)
        assert_ok(sweep)
    (multirun,) = (tmp / "logs" / "smoke" / "multiruns").iterdir()
    return {"tmp": tmp, "teacher": teacher, "multirun": multirun, "sweep_output": sweep.stdout + sweep.stderr}


def test_a_sweep_ends_by_printing_its_summary(trained):
    out, multirun = trained["sweep_output"], trained["multirun"]
    assert f"sweep summary: {multirun / 'summary.md'}" in out
    assert "| explain=gradcampp | 2 |" in out and "| explain=none | 2 |" in out  # both variants, two seeds each
    for suffix in (".md", ".csv", ".tex", ".json", ".png"):
        assert (multirun / "summary").with_suffix(suffix).stat().st_size > 0
    assert "## Every test metric, best checkpoint" in (multirun / "summary.md").read_text()


def job_with(multirun: Path, explain: str, seed: int) -> Path:
    for job in sorted(p for p in multirun.iterdir() if p.is_dir()):
        config = json.loads((job / "metrics.json").read_text())["config"]
        if config["explain"]["name"] == explain and config["seed"] == seed:
            return job
    raise AssertionError(f"no job with explain={explain} seed={seed}")


def test_evaluate_a_distilled_student_with_its_recorded_teacher(trained, tmp_path):
    job = job_with(trained["multirun"], "gradcampp", 0)
    proc = run_script("evaluate.py", [f"checkpoint={job / 'checkpoints' / 'last.ckpt'}", "batch_size=32",
                                      "logger=csv", "pointing_game.grid=2", "pointing_game.num_grids=6",
                                      "pointing_game.methods=[gradcampp,layercam]", *hydra_args(tmp_path)], tmp_path)
    assert_ok(proc)
    result = json.loads((tmp_path / "evaluation.json").read_text())
    m = result["metrics"]
    for key in (f"{p}pointing_game_2x2/{method}_pct" for p in ("", "teacher/") for method in ("gradcampp", "layercam")):
        assert 0.0 <= m[key] <= 100.0, key
    assert result["teacher"]["checkpoint"] == str(trained["teacher"]) and m["num_images"] == 64
    for key in ("accuracy_pct", "error_pct", "agreement_pct", "teacher/accuracy_pct", "win_gradcampp_vs_gradcam_pct",
                *(f"{p}{method}/{name}_pct" for p in ("", "teacher/") for method in ("gradcam", "gradcampp")
                  for name in ("average_drop", "increase_in_confidence"))):
        assert 0.0 <= m[key] <= 100.0, key
    assert 0.0 <= m["map_cosine"] <= 1.0 + 1e-6
    # last.ckpt holds the final weights that train.py tested: same accuracy, agreement and
    # label-class Grad-CAM++ map cosine as its metrics.json.
    trained_metrics = json.loads((job / "metrics.json").read_text())["metrics"]
    assert m["accuracy_pct"] == pytest.approx(100 * trained_metrics["test/acc"], abs=1e-3)
    assert m["agreement_pct"] == pytest.approx(100 * trained_metrics["test/agreement"], abs=1e-3)
    assert m["map_cosine"] == pytest.approx(trained_metrics["test/map_cosine"], abs=1e-4)
    table = (tmp_path / "evaluation.md").read_text()
    assert "| student wrn16_1 |" in table and "| teacher wrn16_2 |" in table and "top-1 agreement %" in table
    assert "map cosine (Grad-CAM++, class: label)" in table and result["similarity_method"] == "gradcampp"
    assert "Grid pointing game, 2x2 grids" in table and "| LayerCAM |" in table
    assert "| student wrn16_1 |" in proc.stdout and "Partial" not in table  # the table on screen; all 64 images
    assert "evaluate (test)" in proc.stderr and "2/2" in proc.stderr  # the progress bar (2 batches of 32)
    (csv_file,) = tmp_path.rglob("metrics.csv")
    header = csv_file.read_text().splitlines()[0]
    assert "eval/gradcampp/average_drop_pct" in header and "eval/teacher/pointing_game_2x2/layercam_pct" in header


def test_evaluate_a_teacher_checkpoint_without_teacher_in_process(trained, tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from distill.evaluation import evaluate

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "configs")):
        cfg = compose("evaluate", overrides=[f"checkpoint={trained['teacher']}", "limit_batches=1", "batch_size=16",
                                             f"output_dir={tmp_path}", "device=cpu"])
    result = evaluate(cfg)
    assert result["teacher"] is None and result["metrics"]["num_images"] == 16
    assert result["partial"] is True and result["split_size"] == 64
    assert "**Partial test set: 16 of 64 images**" in (tmp_path / "evaluation.md").read_text()
    assert "agreement_pct" not in result["metrics"] and 0 <= result["metrics"]["gradcampp/average_drop_pct"] <= 100
    assert "No teacher" in (tmp_path / "evaluation.md").read_text()


def test_visualize_writes_a_grid_of_the_expected_size(trained, tmp_path):
    from PIL import Image

    job = job_with(trained["multirun"], "none", 1)
    proc = run_script("visualize.py", [f"checkpoint={job / 'checkpoints' / 'best.ckpt'}", "num_images=3",
                                       "cell_px=64", "dpi=64", *hydra_args(tmp_path)], tmp_path)
    assert_ok(proc)
    png = np.asarray(Image.open(tmp_path / "explanations.png").convert("RGB"))
    assert png.shape == (3 * 64, 5 * 64, 3)  # image | T Grad-CAM | T Grad-CAM++ | S Grad-CAM++ | S Guided
    assert png.std() > 0


def test_summarize_the_multirun(trained):
    out = trained["tmp"] / "report" / "summary"
    proc = run_script("summarize.py", [str(trained["multirun"]), "--out", str(out)], trained["tmp"])
    assert_ok(proc)
    table = out.with_suffix(".md").read_text().split("## Every test metric")[0]  # the headline table
    rows = [line for line in table.splitlines() if line.startswith("| explain=")]
    assert [row.split(" | ")[0] for row in rows] == ["| explain=none", "| explain=gradcampp"]
    for row in rows:
        cells = row.strip("| ").split(" | ")
        assert cells[1] == "2"  # two seeds
        mean, std = (float(v) for v in cells[2].split(" ± "))  # accuracy %
        assert 0 <= mean <= 100 and std >= 0 and math.isfinite(std)
        assert " ± " in cells[4] and " ± " in cells[5]  # agreement, map cosine
    assert out.with_suffix(".png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("evaluate.py", [], "checkpoint is required"),
        ("evaluate.py", ["checkpoint=missing.ckpt"], "does not exist"),
        ("evaluate.py", ["checkpoint=x.ckpt", "pointing_game.grid=1"], "pointing_game.grid must be 2, 3"),
        ("evaluate.py", ["checkpoint=x.ckpt", "pointing_game.grid=2", "pointing_game.methods=[gradcam++]"],
         "pointing_game.methods ['gradcam++'] are unknown"),
        ("visualize.py", ["checkpoint=missing.ckpt"], "does not exist"),
        ("summarize.py", ["no_such_dir"], "does not exist"),
    ],
)
def test_user_mistakes_give_one_line_and_status_2(script, args, message, tmp_path):
    extra = hydra_args(tmp_path) if script != "summarize.py" else []
    (tmp_path / "x.ckpt").write_bytes(b"")  # exists: the settings are checked before it is read
    proc = run_script(script, [*args, *extra], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.startswith("error:")]) == 1


def test_checkpoints_rebuild_their_modules_with_load_from_checkpoint(trained):
    """A module saves its constructor arguments (config nodes) as hyper-parameters: Lightning's
    ``load_from_checkpoint`` rebuilds the distilled student with its teacher, read back from the
    teacher's own file, and the teacher's classifier module; both with the safe loader."""
    from distill.module import ClassifierModule, DistillModule

    job = job_with(trained["multirun"], "gradcampp", 0)
    path = job / "checkpoints" / "best.ckpt"
    module = DistillModule.load_from_checkpoint(path, map_location="cpu")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    teacher_file = torch.load(trained["teacher"], map_location="cpu", weights_only=True)
    for name, value in module.model.state_dict().items():
        torch.testing.assert_close(value, saved["state_dict"][f"model.{name}"], rtol=0, atol=0)
    for name, value in module.teacher.state_dict().items():
        torch.testing.assert_close(value, teacher_file["state_dict"][f"model.{name}"], rtol=0, atol=0)
    assert module.explain.method == "gradcampp" and module.weights.explain == 0.01
    assert module.hparams["teacher"]["checkpoint"] == str(trained["teacher"])
    assert module.hparams["stage"] == "distill" and not module.teacher.training
    assert module.optimizer_factory.func is torch.optim.SGD  # the recorded optim config, rebuilt
    teacher = ClassifierModule.load_from_checkpoint(trained["teacher"], map_location="cpu")
    assert teacher.role == "teacher" and teacher.hparams["model"] == {"name": "wrn16_2", "num_classes": 10}
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(teacher.eval()(x), module.teacher(x))
