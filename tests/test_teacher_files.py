"""What a run writes to disk: each distinct set of weights once (hard links where two names must
exist), and one training of a teacher per sweep, also when the sweep's jobs run in parallel."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from omegaconf import OmegaConf

from distill.checkpoints import AtomicCheckpointIO, read_checkpoint
from distill.teacher import default_checkpoint, publish, resolve_teacher, teacher_folder
from tests.support import CONFIG_DIR, compose_config, run_train


def distinct_files(root: Path, pattern: str = "*.ckpt") -> dict[tuple[int, int], list[Path]]:
    """``(device, inode) -> names`` of the files under ``root``: one entry per copy on disk."""
    files: dict[tuple[int, int], list[Path]] = {}
    for path in sorted(root.rglob(pattern)):
        stat = path.stat()
        files.setdefault((stat.st_dev, stat.st_ino), []).append(path)
    return files


# ---------------------------------------------------------------------------- one copy of each set of weights
def test_best_and_last_of_one_step_are_one_file_and_part_when_last_moves_on(tmp_path):
    io = AtomicCheckpointIO()
    best, last = tmp_path / "best.ckpt", tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 0, "global_step": 4}, best)
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 0, "global_step": 4}, last)
    assert best.samefile(last) and len(distinct_files(tmp_path)) == 1
    io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 1, "global_step": 8}, last)
    assert not best.samefile(last)  # last.ckpt replaced (a new file), best.ckpt keeps epoch 0's weights
    assert torch.equal(read_checkpoint(best)["state_dict"]["w"], torch.ones(3))
    assert torch.equal(read_checkpoint(last)["state_dict"]["w"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt"]  # no *.tmp left


def test_a_published_teacher_is_a_link_to_its_run_checkpoint(tmp_path):
    source = tmp_path / "run" / "best.ckpt"
    source.parent.mkdir()
    torch.save({"state_dict": {"w": torch.ones(2)}}, source)
    target = tmp_path / "checkpoints" / "wrn16_2_synthetic-0123abcd.ckpt"
    publish(source, target)
    assert target.samefile(source) and not list(target.parent.glob("*.tmp"))


# ---------------------------------------------------------------------------- one teacher per sweep
def sweep_job(sweep: Path, num: int, mode: str = "MULTIRUN") -> Path:
    """A job folder as Hydra leaves it: ``.hydra/hydra.yaml`` records the mode."""
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"hydra": {"mode": mode}}), job / ".hydra" / "hydra.yaml")
    return job


@pytest.mark.parametrize("experiment", ["smoke", "quick"])
def test_jobs_of_a_sweep_share_a_teacher_kept_with_the_run(experiment, tmp_path):
    def checkpoint_dir(job: Path, preset: bool = True) -> Path:
        cfg = compose_config(tmp_path, [f"experiment={experiment}"])  # (its paths point into tmp_path)
        node = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "experiment" / f"{experiment}.yaml"))
        preset_dir = node["paths"]["checkpoint_dir"]  # ${paths.output_dir}/teacher
        cfg.paths.checkpoint_dir = preset_dir if preset else str(tmp_path / "checkpoints")
        cfg.paths.output_dir = str(job)
        return teacher_folder(cfg)

    sweep = tmp_path / "multiruns" / "t"
    for num in (0, 1):  # not <job>/teacher: each job would train its own
        assert checkpoint_dir(sweep_job(sweep, num)) == sweep / "teacher"
    assert checkpoint_dir(sweep_job(tmp_path / "runs", 0, mode="RUN")) == tmp_path / "runs" / "0" / "teacher"
    assert checkpoint_dir(sweep / "0", preset=False) == tmp_path / "checkpoints"  # checkpoints/: shared as it is


def teacher_checkpoint(cfg, datamodule, path: Path) -> None:
    """An untrained teacher checkpoint as train.py publishes it (its identity included)."""
    from distill.build import identity
    from distill.models import build_model

    state = {f"model.{k}": v for k, v in build_model("wrn16_2", 10).state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {
        "model_name": "wrn16_2", "num_classes": 10, "stage": "teacher",
        "identity": identity(cfg, "teacher", datamodule)}}, path)


def test_a_job_waits_for_the_teacher_another_job_is_training_then_reuses_it(tmp_path, caplog):
    from distill.run import prepare_data

    cfg = compose_config(tmp_path, ["experiment=smoke"])
    datamodule = prepare_data(cfg)
    path = default_checkpoint(cfg, datamodule)
    path.parent.mkdir(parents=True)
    held, published = threading.Event(), threading.Event()

    def other_job():  # holds the teacher's lock while it "trains", then publishes
        with FileLock(path.with_name(path.name + ".lock")):
            held.set()
            time.sleep(1.0)
            teacher_checkpoint(cfg, datamodule, path)
            published.set()

    def train(*args):
        raise AssertionError("the teacher was trained a second time")

    thread = threading.Thread(target=other_job)
    thread.start()
    held.wait(10)
    with caplog.at_level("INFO", logger="distill"):
        teacher, used, _ = resolve_teacher(cfg, datamodule, train)
    thread.join()
    assert published.is_set() and used == path
    assert "Another run is training the teacher" in caplog.text and f"Teacher: {path} (reused" in caplog.text


@pytest.mark.slow
def test_a_parallel_sweep_trains_its_teacher_once_and_writes_each_weights_once(tmp_path):
    """``-m explain=none,gradcampp`` under submitit's local launcher (jobs run at the same time):
    one teacher training for both jobs; each set of weights on disk once."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e .[cluster]")
    sweep = tmp_path / "sweep"
    proc = run_train(["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5",
                      "hydra.launcher.cpus_per_task=1", f"hydra.sweep.dir={sweep}", "experiment=smoke",
                      "explain=none,gradcampp", "logger=none", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                      "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false"], tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads((sweep / job / "metrics.json").read_text()) for job in ("0", "1")]
    (teacher,) = {r["teacher_checkpoint"] for r in results}
    assert Path(teacher).parent == sweep / "teacher"
    trained = [job for job in ("0", "1") if (sweep / job / "teacher" / "checkpoints").is_dir()]
    assert len(trained) == 1, trained  # the other job waited for it and reused it
    # 1 epoch: best = last. One file for the teacher (its best, last, the published file and its -last),
    # one per student (best, last).
    copies = distinct_files(sweep)
    assert len(copies) == 3, {k: [str(p.relative_to(sweep)) for p in v] for k, v in copies.items()}
    assert sorted(len(names) for names in copies.values()) == [2, 2, 4]


def test_a_given_teacher_checkpoint_is_announced_like_a_reused_one(tmp_path, caplog):
    from distill.files import write_json
    from distill.run import prepare_data

    path = tmp_path / "mine.ckpt"
    cfg = compose_config(tmp_path, ["experiment=smoke", f"teacher.checkpoint={path}"])
    datamodule = prepare_data(cfg)
    teacher_checkpoint(cfg, datamodule, path)
    write_json(path.with_suffix(".json"), {"identity": {"data": {"name": "synthetic"}}, "metrics": {"test/acc": 0.5}})
    with caplog.at_level("INFO", logger="distill"):
        resolve_teacher(cfg, datamodule, train=None)
    assert f"Teacher: {path} (given; trained on synthetic; test/acc 0.5000)" in caplog.text
