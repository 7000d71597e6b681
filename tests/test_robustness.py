"""Resume after a kill, atomic checkpoints, clear errors, no silent NaN, determinism."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from torch import nn

from distill.checkpoints import AtomicCheckpointIO
from distill.errors import CheckpointError, ConfigError, DataError
from distill.models import MODELS
from distill.module import NonFiniteLossError
from distill.run import run
from tests.support import REPO, compose_config, run_train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("teacher")
    path = tmp / "teacher.ckpt"
    cfg = compose_config(tmp, ["experiment=smoke", "logger=none", "stage=teacher", f"teacher.checkpoint={path}",
                               "trainer.max_epochs=1", "test_after_fit=false"])
    run(cfg)
    return path


def final_metrics(run_dir: Path) -> dict[str, float]:
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    return {k: v for k, v in metrics.items() if not k.startswith("time/")}


def student_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


class Killed(NamedTuple):
    last: Path  # the run's checkpoints/last.ckpt
    returncode: int
    stderr: str


def kill_when(args: list[str], run_dir: Path, tmp_path: Path, ready, poll_s: float, then_s: float = 0.0,
              sig: signal.Signals = signal.SIGKILL, watched: str = "checkpoints/last.ckpt") -> Killed:
    """Start ``train.py args`` in ``run_dir``, send it ``sig`` once ``ready(run_dir / watched)`` holds
    (plus ``then_s`` seconds), and check it had not finished."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    cmd = [sys.executable, str(REPO / "train.py"), *args, f"hydra.run.dir={run_dir}", f"paths.log_dir={tmp_path}/logs"]
    with open(tmp_path / f"{run_dir.name}.stderr", "w+") as stderr:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.time() + 240
        while not ready(run_dir / watched) and proc.poll() is None and time.time() < deadline:
            time.sleep(poll_s)
        time.sleep(then_s)
        proc.send_signal(sig)
        proc.wait(timeout=120)
        stderr.seek(0)
        text = stderr.read()
    assert not (run_dir / "metrics.json").exists(), "the run finished before it could be killed"
    return Killed(run_dir / "checkpoints" / "last.ckpt", proc.returncode, text)


# ------------------------------------------------------------------------------------ resume
def test_killed_run_resumes_to_the_same_weights_metrics_and_wandb_run(teacher_ckpt, tmp_path):
    # 2 workers: their iterator draws the first batches before Lightning tells the sampler the epoch
    args = ["experiment=smoke", "logger=wandb", "explain=gradcampp", "kd=hinton", f"teacher.checkpoint={teacher_ckpt}",
            "data.num_train=512", "trainer.max_epochs=3", "data.num_workers=2"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_train([*args, f"hydra.run.dir={straight}"], tmp_path).returncode == 0

    kill_when(args, killed, tmp_path, lambda last: last.exists(), poll_s=0.05, then_s=0.5)  # 0.5 s: into the next epoch
    run_id = (killed / "wandb_run_id").read_text()

    resumed = run_train([f"resume={killed}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (killed / "wandb_run_id").read_text() == run_id
    run_dirs = {p.name.rsplit("-", 1)[-1] for p in (killed / "wandb").glob("offline-run-*")}
    assert run_dirs == {run_id}, run_dirs  # the resumed process logged into the same W&B run

    a, b = student_state(straight), student_state(killed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    assert final_metrics(killed) == pytest.approx(final_metrics(straight), abs=1e-6)


def saved_step(path: Path) -> int | None:
    """The ``global_step`` of the checkpoint at ``path`` (None while there is none)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["global_step"]
    except (OSError, RuntimeError, EOFError, KeyError):
        return None


@pytest.mark.parametrize("variant", [
    [],
    # a per-step scheduler makes Lightning build the loader before it restores the checkpoint
    # (Lightning-AI/pytorch-lightning#20550), and workers draw the first batches as the iterator is made
    ["optim=sgd_cosine", "~optim.scheduler.milestones", "data.num_workers=2"],
], ids=["default", "per_step_scheduler_and_workers"])
def test_run_killed_mid_epoch_resumes_from_the_mid_epoch_checkpoint_to_the_same_weights(variant, teacher_ckpt,
                                                                                        tmp_path):
    # 8 batches an epoch, last.ckpt also every 10 steps: the one mid-epoch save is epoch 1 after 2 of its batches.
    args = ["experiment=smoke", "logger=none", "explain=gradcampp", "kd=hinton", f"teacher.checkpoint={teacher_ckpt}",
            "data.num_train=256", "trainer.limit_train_batches=null", "trainer.max_epochs=2",
            "trainer.checkpoint_every_n_steps=10", *variant]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_train([*args, f"hydra.run.dir={straight}"], tmp_path).returncode == 0

    last = kill_when(args, killed, tmp_path, lambda last: saved_step(last) == 10, poll_s=0.02).last
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 10 and checkpoint["epoch"] == 1  # killed mid-epoch, after the mid-epoch save
    progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
    assert progress["processed"] == 2, progress

    resumed = run_train([f"resume={killed}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed mid-epoch: epoch 1 after batch 2" in resumed.stderr + resumed.stdout
    a, b = student_state(straight), student_state(killed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    assert final_metrics(killed) == pytest.approx(final_metrics(straight), abs=1e-6)


SIGNALLED_ARGS = ["experiment=smoke", "logger=none", "explain=gradcampp", "data.num_train=512",
                  "trainer.limit_train_batches=null", "trainer.max_epochs=2"]  # the teacher trained first, 16 batches


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("straight")
    assert run_train([*SIGNALLED_ARGS, f"hydra.run.dir={tmp / 'run'}"], tmp).returncode == 0
    return tmp / "run"


@pytest.mark.parametrize(("sig", "status", "stage_dir"), [
    (signal.SIGTERM, 143, "teacher/"),  # in the teacher stage of a distill run
    (signal.SIGINT, 130, ""),  # in the distill stage
], ids=["TERM_in_teacher_stage", "INT_in_distill_stage"])
def test_run_stopped_by_a_signal_says_how_to_resume_exits_128_plus_it_and_resumes_to_the_same_weights(
        sig, status, stage_dir, straight_run, tmp_path):
    stopped = tmp_path / "stopped"
    # 0.2 s after the stage's first end-of-epoch last.ckpt: inside its 2nd epoch
    result = kill_when(SIGNALLED_ARGS, stopped, tmp_path, lambda last: last.exists(), poll_s=0.02, then_s=0.2,
                       sig=sig, watched=f"{stage_dir}checkpoints/last.ckpt")
    assert result.returncode == status, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if "resume=" in line]
    assert line == (f"interrupted by {sig.name}: the run stopped, its last.ckpt saved; continue it with: "
                    f"python train.py resume={stopped}")

    resumed = run_train([f"resume={stopped}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for weights in ("teacher/checkpoints/last.ckpt", "checkpoints/last.ckpt"):
        a = torch.load(straight_run / weights, map_location="cpu", weights_only=True)["state_dict"]
        b = torch.load(stopped / weights, map_location="cpu", weights_only=True)["state_dict"]
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=f"{weights}: {key}")
    assert final_metrics(stopped) == pytest.approx(final_metrics(straight_run), abs=1e-6)


def test_resume_needs_a_run_directory(tmp_path):
    cfg = compose_config(tmp_path, ["experiment=smoke", "logger=none", f"resume={tmp_path / 'nowhere'}"])
    with pytest.raises(ConfigError, match="no .hydra/config.yaml"):
        run(cfg)


# ------------------------------------------------------------------------------------ atomic saves
def test_failed_save_leaves_previous_checkpoint_intact(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(1_000_000)}, "bad": Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no last.ckpt.tmp left behind


def test_kill_during_save_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    script = (
        "import sys, torch\n"
        "from distill.checkpoints import AtomicCheckpointIO\n"
        "io, i = AtomicCheckpointIO(), 0\n"
        "while True:\n"
        "    io.save_checkpoint({'state_dict': {'w': torch.full((4_000_000,), float(i))}, 'i': i}, sys.argv[1])\n"
        "    i += 1\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)], cwd=REPO)
    deadline = time.time() + 60
    while not path.exists() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.7)  # several saves in flight
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    checkpoint = torch.load(path, weights_only=False)
    assert torch.all(checkpoint["state_dict"]["w"] == checkpoint["i"])


# ------------------------------------------------------------------------------------ clear errors
def test_unknown_key_in_a_group_fails_with_its_name(tmp_path):
    proc = run_train(["experiment=smoke", "explain.wieght=1"], tmp_path)
    assert proc.returncode != 0
    assert "wieght" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("override", "message"),
    [("loss.explain=-1", "loss.explain=-1 is not allowed.*allowed: a number >= 0"),
     ("loss.kd=-0.5", "loss.kd=-0.5 is not allowed.*allowed: a number >= 0"),
     ("loss.temperature=0", "loss.temperature=0 is not allowed.*allowed: a number > 0"),
     ("loss.temperature=-2", "loss.temperature=-2 is not allowed.*allowed: a number > 0")],
)
def test_bad_loss_settings(override, message, teacher_ckpt, tmp_path):
    cfg = compose_config(tmp_path, ["experiment=smoke", "logger=none", "explain=gradcampp",
                                    f"teacher.checkpoint={teacher_ckpt}", override])
    with pytest.raises(ConfigError, match=message):
        run(cfg)


def test_bad_loss_setting_through_train_py_exits_2(teacher_ckpt, tmp_path):
    proc = run_train(["experiment=smoke", "logger=none", f"teacher.checkpoint={teacher_ckpt}", "kd=hinton",
                      "loss.temperature=0"], tmp_path)
    assert proc.returncode == 2
    assert "loss.temperature=0 is not allowed" in proc.stderr and "Traceback" not in proc.stderr


def test_explicit_teacher_checkpoint_missing(tmp_path):
    cfg = compose_config(tmp_path, ["experiment=smoke", "logger=none", f"teacher.checkpoint={tmp_path / 'no.ckpt'}"])
    with pytest.raises(CheckpointError, match="does not exist"):
        run(cfg)
    assert not (tmp_path / "no.ckpt").exists()  # an explicit path is never trained into


def test_explicit_teacher_checkpoint_corrupt(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x00not a checkpoint" * 100)
    cfg = compose_config(tmp_path, ["experiment=smoke", "logger=none", f"teacher.checkpoint={bad}"])
    with pytest.raises(CheckpointError, match="could not be read"):
        run(cfg)


def test_explicit_teacher_checkpoint_of_other_architecture(teacher_ckpt, tmp_path):
    cfg = compose_config(tmp_path, ["experiment=smoke", "logger=none", "teacher=wrn40_2",
                                    f"teacher.checkpoint={teacher_ckpt}"])
    with pytest.raises(CheckpointError, match="holds a wrn16_2 with 10 classes"):
        run(cfg)


@pytest.mark.parametrize("case", ["missing", "empty", "no_test_split"])
def test_image_folder_root_errors(case, tmp_path):
    root = tmp_path / "images"
    if case != "missing":
        root.mkdir()
    if case == "no_test_split":
        (root / "train" / "cat").mkdir(parents=True)
    cfg = compose_config(tmp_path, ["trainer=cpu", "logger=none", "stage=baseline", "data=image_folder",
                                    f"data.root={root}"])
    with pytest.raises(DataError, match=str(root)):
        run(cfg)


def test_cifar_root_missing_without_download(tmp_path):
    cfg = compose_config(tmp_path, ["logger=none", "stage=baseline", "data=cifar10", "data.download=false",
                                    f"data.root={tmp_path / 'cifar'}"])
    with pytest.raises(DataError, match="cifar"):
        run(cfg)


def test_explanations_need_forward_features(teacher_ckpt, tmp_path):
    class Plain(nn.Module):
        def __init__(self, num_classes: int):
            super().__init__()
            self.num_classes = num_classes
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, num_classes))

        def forward(self, x):
            return self.net(x)

    MODELS["plain"] = Plain
    try:
        cfg = compose_config(tmp_path, ["experiment=smoke", "logger=none", "explain=gradcampp", "student.name=plain",
                                        f"teacher.checkpoint={teacher_ckpt}"])
        with pytest.raises(ConfigError, match="the student .plain, Plain. lacks forward_features, forward_head"):
            run(cfg)
    finally:
        del MODELS["plain"]


# ------------------------------------------------------------------------------------ NaN
def test_non_finite_loss_stops_with_the_term_and_step(teacher_ckpt, tmp_path):
    cfg = compose_config(tmp_path, ["experiment=smoke", "logger=none", "explain=gradcampp", "kd=hinton",
                                    f"teacher.checkpoint={teacher_ckpt}", "optim.optimizer.lr=1e30"])
    with pytest.raises(NonFiniteLossError, match=r"became non-finite at step \d+ \(epoch 0\)") as info:
        run(cfg)
    assert "ce" in str(info.value) and "skip_nonfinite" in str(info.value)
    assert not (tmp_path / "metrics.json").exists()


def test_non_finite_steps_can_be_skipped_and_counted(teacher_ckpt, tmp_path, monkeypatch):
    from distill.module import DistillModule

    total_loss = DistillModule.total_loss  # every other step's loss is NaN; the weights stay finite
    monkeypatch.setattr(DistillModule, "total_loss",
                        lambda self, terms: total_loss(self, terms) * (float("nan") if self.global_step % 2 else 1.0))
    cfg = compose_config(tmp_path, ["experiment=smoke", "logger=csv", "explain=gradcampp",
                                    f"teacher.checkpoint={teacher_ckpt}", "trainer.skip_nonfinite=true",
                                    "trainer.max_epochs=1", "test_after_fit=false"])
    result = run(cfg)
    assert result["metrics"]["train/skipped_nonfinite"] >= 1


# ------------------------------------------------------------------------------------ determinism
def test_same_seed_same_metrics(teacher_ckpt, tmp_path):
    metrics = []
    for name in ("a", "b"):
        out = tmp_path / name
        out.mkdir()
        cfg = compose_config(out, ["experiment=smoke", "logger=none", "explain=gradcampp", "kd=hinton",
                                   f"teacher.checkpoint={teacher_ckpt}", "trainer.max_epochs=1"])
        run(cfg)
        metrics.append(final_metrics(out))
    assert metrics[0] == metrics[1]
