"""Trust: no code runs from a checkpoint, every config value is checked before any work, and
nothing a run wrote is lost (safe loading, config schema, last.ckpt, disk faults, resume)."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from distill.checkpoints import AtomicCheckpointIO, read_checkpoint
from distill.config_schema import DATA, DISTANCES, EXPLAIN_METHODS, STAGES, Loss, check_config, config_errors
from distill.errors import CheckpointError, ConfigError, DataError
from distill.files import atomic_file, copy_file, write_json, write_text
from distill.models import build_model
from distill.module import ClassifierModule, NonFiniteLossError
from tests.support import CONFIG_DIR, REPO, compose_config, run_train

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}


# ------------------------------------------------------------------------------------ helpers
class Payload:
    """Unpickling this runs ``exec``: it creates ``marker`` (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "hyper_parameters": {"model_name": "wrn16_2", "num_classes": 10},
                "payload": Payload(marker)}, path)
    return path


def real_checkpoint(path: Path, name: str = "wrn16_1") -> Path:
    """A distill-format checkpoint of an untrained ``name`` (what train.py would write)."""
    state = {f"model.{k}": v for k, v in build_model(name, 10).state_dict().items()}
    torch.save({"state_dict": state, "epoch": 0, "global_step": 0,
                "hyper_parameters": {"model_name": name, "num_classes": 10, "stage": "baseline", "config": {}}}, path)
    return path


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def assert_one_line_exit_2(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = error_lines(proc)
    for needle in needles:
        assert needle in line, line
    return line


def run_script(name: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "scripts" / name), *args, f"output_dir={cwd}/out", f"hydra.run.dir={cwd}/out"]
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------------------------ 1. safe loading
def test_crafted_checkpoint_is_refused_by_the_loader_and_runs_only_when_trusted(tmp_path):
    marker = tmp_path / "pwned"
    path = crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path, "teacher checkpoint")
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "the Python object exec," in message
    assert "trust_checkpoints=true" in message
    assert not marker.exists()
    read_checkpoint(path, "teacher checkpoint", trusted=True)  # the explicit opt-in: full pickle
    assert marker.exists(), "the crafted file must really run code, or the refusal above proves nothing"


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["teacher.checkpoint", "default teacher", "resume", "evaluate", "evaluate teacher",
                                   "visualize"])
def test_crafted_checkpoint_never_runs_through_any_entry_point(entry, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    if entry == "teacher.checkpoint":
        crafted_checkpoint(evil, marker)
        proc = run_train(["experiment=smoke", "logger=none", f"teacher.checkpoint={evil}"], tmp_path)
    elif entry == "default teacher":  # checkpoints/<network>_<data>-<hash>.ckpt, loaded because it exists
        from hydra.utils import instantiate

        from distill.teacher import default_checkpoint as default_teacher_checkpoint

        probe = compose_config(tmp_path / "probe", ["experiment=smoke", "logger=none"])
        name = default_teacher_checkpoint(probe, instantiate(probe.data)).name
        evil = crafted_checkpoint(tmp_path / "ckpts" / name, marker)
        proc = run_train(["experiment=smoke", "logger=none", f"paths.checkpoint_dir={tmp_path / 'ckpts'}"], tmp_path)
    elif entry == "resume":
        run_dir = tmp_path / "run"
        cfg = compose_config(run_dir, ["experiment=smoke", "logger=none"])
        (run_dir / ".hydra").mkdir(parents=True)
        OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
        evil = crafted_checkpoint(run_dir / "checkpoints" / "last.ckpt", marker)
        proc = run_train([f"resume={run_dir}"], tmp_path)
    elif entry == "evaluate":
        proc = run_script("evaluate.py", [f"checkpoint={crafted_checkpoint(evil, marker)}"], tmp_path)
    elif entry == "evaluate teacher":
        student = real_checkpoint(tmp_path / "student.ckpt")
        proc = run_script("evaluate.py", [f"checkpoint={student}",
                                          f"teacher_checkpoint={crafted_checkpoint(evil, marker)}"], tmp_path)
    else:
        proc = run_script("visualize.py", [f"checkpoint={crafted_checkpoint(evil, marker)}"], tmp_path)
    assert_one_line_exit_2(proc, str(evil), "refused", "trust_checkpoints=true")
    assert not marker.exists(), f"unpickling through {entry} ran code"


@pytest.mark.slow
def test_checkpoints_written_by_train_py_load_with_the_safe_loader(tmp_path):
    from distill.run import run

    cfg = compose_config(tmp_path, ["experiment=smoke", "logger=none", "explain=gradcampp", "kd=hinton",
                                    "trainer.max_epochs=1", "test_after_fit=false"])
    run(cfg)  # trains the teacher first (teacher/), then distills: both kinds of checkpoint
    paths = sorted(tmp_path.rglob("*.ckpt"))
    assert len(paths) >= 4
    for path in paths:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # raises on any non-plain object
        assert checkpoint["hyper_parameters"]["model_name"] in ("wrn16_2", "wrn16_1")


# ------------------------------------------------------------------------------------ 3. file faults
def test_checkpoint_path_that_is_a_directory_unreadable_or_truncated(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="is a directory, not a checkpoint file"):
        read_checkpoint(tmp_path, "teacher checkpoint")
    whole = real_checkpoint(tmp_path / "whole.ckpt")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt or not a PyTorch checkpoint") as info:
        read_checkpoint(truncated, "teacher checkpoint")
    assert "\n" not in str(info.value) and str(truncated) in str(info.value)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x80\x02 not a checkpoint" * 50)
    with pytest.raises(CheckpointError, match="could not be read .*truncated, corrupt") as info:
        read_checkpoint(garbage, "teacher checkpoint")
    assert "refused" not in str(info.value)
    # root reads any file whatever its mode, so the permission check is simulated
    monkeypatch.setattr("distill.files.os.access", lambda path, mode: False)
    with pytest.raises(CheckpointError, match="cannot be read \\(permission denied\\)"):
        read_checkpoint(whole, "teacher checkpoint")


def test_symlink_loop_and_dangling_link_are_named_as_such(tmp_path):
    from distill.evaluation.runner import check_paths

    loop, other = tmp_path / "t.ckpt", tmp_path / "u.ckpt"
    loop.symlink_to(other)
    other.symlink_to(loop)
    with pytest.raises(CheckpointError, match=f"teacher checkpoint '{loop}' is a symlink loop"):
        read_checkpoint(loop, "teacher checkpoint")
    with pytest.raises(CheckpointError, match="is a symlink loop"):
        check_paths(OmegaConf.create({"checkpoint": str(loop)}))  # scripts/evaluate.py's early check
    dangling = tmp_path / "d.ckpt"
    dangling.symlink_to(tmp_path / "gone.ckpt")
    with pytest.raises(CheckpointError, match=f"is a symbolic link to '{tmp_path / 'gone.ckpt'}', which does not"):
        read_checkpoint(dangling, "teacher checkpoint")


def test_checkpoint_with_non_finite_weights_is_refused_naming_the_tensor(tmp_path):
    from distill.checkpoints import load_network

    path = real_checkpoint(tmp_path / "nan.ckpt")
    checkpoint = torch.load(path, weights_only=True)
    key = next(k for k, v in checkpoint["state_dict"].items() if v.is_floating_point())
    checkpoint["state_dict"][key][0] = float("nan")
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match=rf"'{path}' holds non-finite weights \(NaN or inf in "
                                              rf"{key.removeprefix('model.')}\)") as info:
        load_network(path)  # every consumer (teacher, evaluate.py, visualize.py) loads through it
    assert "\n" not in str(info.value)


def test_image_over_pils_decompression_bomb_limit_is_one_line_naming_it(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    from distill.data.image_folder import load_rgb

    path = tmp_path / "huge.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels > 2x the limit: PIL refuses it
    with pytest.raises(DataError, match=f"image {path} is too large to decode .*: resize it") as info:
        load_rgb(str(path))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_jpeg_gives_the_same_one_line_with_or_without_workers(workers, tmp_path):
    from distill.data import ImageFolderDataModule

    for split in ("train", "test"):
        for cls in ("a", "b"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (40 * i, 80, 120)).save(folder / f"{i}.jpg")
            (folder / "notes.txt").write_text("not an image: ignored")
    bad = tmp_path / "train" / "b" / "1.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    dm = ImageFolderDataModule(root=tmp_path, image_size=8, num_classes=2, batch_size=2, num_workers=workers,
                               seed=0, augment=False)
    dm.prepare_data()
    dm.setup("fit")
    with pytest.raises(DataError) as info:
        list(dm.train_dataloader())
    assert str(info.value).startswith(f"cannot read image {bad} (")
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)


# ------------------------------------------------------------------------------------ 6. disk faults
def test_disk_full_mid_write_leaves_no_tmp_and_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"\0" * 4096)  # part of the file made it to disk, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError) as info:
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    message = str(info.value)
    assert "\n" not in message and str(path.parent) in message and "ENOSPC" in message
    assert list(path.parent.iterdir()) == [path]  # no last.ckpt.tmp
    assert torch.equal(read_checkpoint(path)["state_dict"]["w"], torch.ones(3))


def test_file_size_limit_mid_write_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    # a real limit: torch's zip writer answers the OSError (EFBIG) with a RuntimeError ("unexpected pos")
    path = tmp_path / "checkpoints" / "last.ckpt"
    script = (
        "import resource, signal, sys, torch\n"
        "from distill.checkpoints import AtomicCheckpointIO\n"
        "from distill.errors import exit_on_user_error\n"
        "io = AtomicCheckpointIO()\n"
        "io.save_checkpoint({'state_dict': {'w': torch.ones(3)}}, sys.argv[1])\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write over the limit fails with EFBIG\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"
        "with exit_on_user_error():\n"
        "    io.save_checkpoint({'state_dict': {'w': torch.zeros(1_000_000)}}, sys.argv[1])\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(path)], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert_one_line_exit_2(proc, f"could not write checkpoint last.ckpt in folder {path.parent}", "EFBIG",
                           "the previous checkpoint there is kept")
    assert list(path.parent.iterdir()) == [path]  # no last.ckpt.tmp
    assert torch.equal(read_checkpoint(path)["state_dict"]["w"], torch.ones(3))


def test_atomic_writes_keep_the_previous_file_and_leave_no_tmp(tmp_path, monkeypatch):
    path = tmp_path / "out" / "metrics.json"
    write_json(path, {"b": 1, "a": [0.5]})
    first = path.read_text()
    assert json.loads(first) == {"a": [0.5], "b": 1} and first.index('"a"') < first.index('"b"')  # sorted keys

    def unchanged() -> bool:  # the previous file intact, nothing else in the folder (no metrics.json.tmp)
        return path.read_text() == first and [p.name for p in path.parent.iterdir()] == [path.name]

    with pytest.raises(RuntimeError, match="killed"), atomic_file(path) as f:
        f.write("{ torn")
        raise RuntimeError("killed mid-write")
    assert unchanged()

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError) as info:
        write_text(path, "new")
    assert info.value.errno == errno.ENOSPC
    assert unchanged()
    monkeypatch.undo()
    assert copy_file(path, tmp_path / "copy" / "m.json").read_bytes() == path.read_bytes()
    assert not list(tmp_path.rglob("*.tmp"))


def test_teacher_that_cannot_be_published_is_one_line_naming_the_folder(tmp_path):
    from distill.teacher import publish

    source = real_checkpoint(tmp_path / "best.ckpt")
    blocker = tmp_path / "checkpoints"
    blocker.write_text("a file where the checkpoints/ folder should be")
    with pytest.raises(CheckpointError) as info:
        publish(source, blocker / "wrn16_1_synthetic.ckpt")
    message = str(info.value)
    assert "\n" not in message and f"in folder {blocker}" in message and "(E" in message  # e.g. (ENOTDIR)
    assert source.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "checkpoints"]


def test_non_finite_weights_are_never_written(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)
    with pytest.raises(CheckpointError, match=r"non-finite by step 7 \(model.w\)"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"model.w": torch.tensor([1.0, float("nan")])},
                                              "global_step": 7}, path)
    assert torch.equal(read_checkpoint(path)["state_dict"]["w"], torch.ones(2))


def classifier(**options) -> ClassifierModule:
    return ClassifierModule(build_model("wrn16_1", 10), optimizer=torch.optim.SGD, **options)


def test_skip_mode_stops_after_the_configured_consecutive_skips():
    module = classifier(skip_nonfinite=True, max_skipped_steps=2)
    nan, one = torch.tensor(float("nan")), torch.tensor(1.0)
    assert module.finite_or_skip({"ce": nan}, nan) is False
    assert module.finite_or_skip({"ce": one}, one) is True  # a finite step resets the count
    assert module.finite_or_skip({"ce": nan}, nan) is False
    assert module.finite_or_skip({"ce": nan}, nan) is False
    with pytest.raises(NonFiniteLossError, match=r"3 steps in a row .*max_skipped_steps=2"):
        module.finite_or_skip({"ce": nan}, nan)
    assert int(module.skipped_steps) == 3


def test_non_finite_parameters_stop_the_run_naming_the_step():
    module = classifier(skip_nonfinite=True)
    module.on_train_batch_end(None, None, 0)  # finite: nothing happens
    with torch.no_grad():
        next(module.model.parameters())[0].fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"parameters or BatchNorm statistics became non-finite at step 0"):
        module.on_train_batch_end(None, None, 0)


@pytest.mark.slow
def test_skip_mode_with_a_huge_learning_rate_stops_and_writes_no_non_finite_weights(tmp_path):
    from distill.run import run

    cfg = compose_config(tmp_path, ["experiment=smoke", "logger=none", "stage=teacher", "optim.optimizer.lr=1e30",
                                    "trainer.skip_nonfinite=true", f"teacher.checkpoint={tmp_path / 'teacher.ckpt'}"])
    with pytest.raises(NonFiniteLossError, match=r"became non-finite at step \d+ \(epoch 0\)"):
        run(cfg)
    for path in tmp_path.rglob("*.ckpt"):
        state = read_checkpoint(path)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), path
    assert not (tmp_path / "teacher.ckpt").exists() and not (tmp_path / "metrics.json").exists()


@pytest.mark.slow
def test_output_folder_that_cannot_be_created_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = run_train(["experiment=smoke", f"hydra.run.dir={blocker / 'run'}"], tmp_path)
    assert_one_line_exit_2(proc, str(blocker / "run"), "cannot be created", "ENOTDIR")


@pytest.mark.slow
def test_disk_full_during_training_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from distill.run import run

    real_save, calls = torch.save, []

    def full_disk_on_third_save(obj, f, *args, **kwargs):
        calls.append(obj["epoch"])
        if len(calls) == 3:  # epoch 0 wrote best and last; epoch 1's last hits the full disk
            f.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_on_third_save)
    cfg = compose_config(tmp_path, ["experiment=smoke", "logger=none", "stage=teacher", "optim.optimizer.lr=0",
                                    f"teacher.checkpoint={tmp_path / 'teacher.ckpt'}", "trainer.max_epochs=3"])
    with pytest.raises(CheckpointError, match="ENOSPC") as info:
        run(cfg)
    monkeypatch.setattr(torch, "save", real_save)
    assert "\n" not in str(info.value) and str(tmp_path / "checkpoints") in str(info.value)
    assert not list(tmp_path.rglob("*.tmp"))
    assert read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["epoch"] == 0
    assert not (tmp_path / "teacher.ckpt").exists() and not (tmp_path / "metrics.json").exists()


# ------------------------------------------------------------------------------------ 4. last.ckpt
@pytest.mark.slow
def test_last_ckpt_holds_the_last_epoch_when_the_metric_plateaus(tmp_path):
    from distill.run import run

    epochs, num_train, batch = 3, 128, 32
    cfg = compose_config(tmp_path, ["experiment=smoke", "logger=none", "stage=teacher", "optim.optimizer.lr=0",
                                    f"teacher.checkpoint={tmp_path / 'teacher.ckpt'}", f"trainer.max_epochs={epochs}",
                                    f"data.num_train={num_train}", f"data.batch_size={batch}", "test_after_fit=false"])
    run(cfg)  # lr=0: the weights never change (only BN statistics), so val/acc does not improve after epoch 0
    last = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    best = read_checkpoint(tmp_path / "checkpoints" / "best.ckpt")
    assert last["epoch"] == epochs - 1 and last["global_step"] == epochs * (num_train // batch)
    assert best["epoch"] == 0 and best["global_step"] == num_train // batch
    assert last["optimizer_states"] and last["loops"]["fit_loop"]["epoch_progress"]["total"]["processed"] == epochs


# ------------------------------------------------------------------------------------ 2/7. the schema
def test_schema_names_match_the_code():
    from distill.explain import METHODS
    from distill.losses import DISTANCES as LOSS_DISTANCES
    from distill.module import TERMS, LossWeights
    from distill.run import STAGES as RUN_STAGES

    assert tuple(METHODS) == EXPLAIN_METHODS and tuple(LOSS_DISTANCES) == DISTANCES and tuple(RUN_STAGES) == STAGES
    assert set(Loss.model_fields) == set(LossWeights.__dataclass_fields__)  # the loss table, in both
    assert {name for name in TERMS if name != "dkd"} <= set(Loss.model_fields)  # a weight per term (DKD: warm-up)
    targets = {OmegaConf.load(p).get("_target_") for p in (CONFIG_DIR / "data").glob("*.yaml")}
    missing = targets - set(DATA)
    assert not missing, f"data options without a schema in distill/config_schema.py DATA: {missing}"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in ("data", "teacher", "student", "explain", "kd", "optim",
                                                               "trainer", "logger", "experiment") for o in options(g)])
def test_every_shipped_option_passes_the_schema(group, option, tmp_path):
    needs_root = {"image_folder", "imagenet", "imagenet_kd"}  # their data.root is required (???)
    overrides = [f"{group}={option}"] + ([f"data.root={tmp_path}"] if option in needs_root else [])
    assert config_errors(compose_config(tmp_path, overrides)) is None


@pytest.mark.parametrize(
    ("override", "key", "allowed"),
    [
        ("loss.explain=abc", "loss.explain='abc'", "a number >= 0"),
        ("loss.temperature=abc", "loss.temperature='abc'", "a number > 0"),
        ("loss.temperature=0", "loss.temperature=0", "a number > 0"),
        ("loss.dkd_warmup=-1", "loss.dkd_warmup=-1", "an integer >= 0"),
        ("trainer.max_epochs=abc", "trainer.max_epochs='abc'", "an integer >= 1"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0", "an integer >= 1"),
        ("trainer.devices=abc", "trainer.devices='abc'", "one of -1, 'auto' or device indices as a string, e.g. '0,1'"),
        ("seed=abc", "seed='abc'", "an integer >= 0"),
        ("optim.optimizer.lr=-0.1", "optim.optimizer.lr=-0.1", "a number >= 0"),
        ("data.batch_size=0", "data.batch_size=0", "an integer >= 1"),
        ("explain.distance=l1", "explain.distance='l1'", "one of 'squared_l2', 'normalized_squared_l2', 'cosine'"),
        ("explain=none loss.explain=0.01", "loss.explain=0.01 needs an explain.method",
         "one of cam, gradcam, gradcampp, hirescam"),
        ("+foo=1", "unknown config key foo=1", "takes only task_name"),
        ("+explain.wieght=1", "unknown config key explain.wieght=1", "takes only name, method, distance"),
        ("+loss.kd_weight=1", "unknown config key loss.kd_weight=1", "loss takes only ce, kd, temperature, at"),
        ("+trainer.max_epoch=3", "unknown config key trainer.max_epoch=3", "max_epochs"),
        ("data=image_folder", "data.root is required", "data.root=..."),
    ],
)
def test_each_kind_of_config_mistake_names_key_value_and_what_is_allowed(override, key, allowed, tmp_path):
    problem = config_errors(compose_config(tmp_path, ["experiment=smoke", *override.split()]))
    assert problem is not None and "\n" not in problem
    assert key in problem and allowed in problem, problem


@pytest.mark.parametrize(
    ("override", "line"),
    [("+explain.weight=0.02",
      "explain.weight is now loss.explain (one table for every loss weight): use loss.explain=0.02"),
     ("+kd.kd_weight=0.5", "kd.kd_weight is now loss.kd (one table for every loss weight): use loss.kd=0.5"),
     ("+kd.ce_weight=0.1", "kd.ce_weight is now loss.ce (one table for every loss weight): use loss.ce=0.1"),
     ("+kd.at_weight=1000", "kd.at_weight is now loss.at (one table for every loss weight, no hidden factor: "
                            "loss.at is the AT paper's beta/2): use loss.at=500.0"),
     ("+kd.temperature=2", "kd.temperature is now loss.temperature (one table for every loss weight): "
                           "use loss.temperature=2"),
     ("+explain.loss=paper", "explain.loss is now explain.distance (paper is now squared_l2, normalized "
                             "normalized_squared_l2): use explain.distance=squared_l2")],
)
def test_a_renamed_key_names_its_new_place(override, line, tmp_path):
    cfg = compose_config(tmp_path, ["experiment=smoke", override])
    assert config_errors(cfg) == line
    with pytest.raises(ConfigError, match="is now"):
        check_config(cfg)


@pytest.mark.parametrize(("override", "line"), [
    ("teacher.checkpoint=${paths.nope}/t.ckpt", "config key teacher.checkpoint='${paths.nope}/t.ckpt' cannot be "
                                                "resolved (Interpolation key 'paths.nope' not found)"),
    ("data.root=${oc.env:DISTILL_TEST_UNSET}", "config key data.root='${oc.env:DISTILL_TEST_UNSET}' cannot be "
                                               "resolved (Environment variable 'DISTILL_TEST_UNSET' not found): set"),
])
def test_an_unresolvable_interpolation_names_the_key_and_the_interpolation(override, line, tmp_path, monkeypatch):
    monkeypatch.delenv("DISTILL_TEST_UNSET", raising=False)
    extra = ["data=image_folder"] if override.startswith("data.") else []
    with pytest.raises(ConfigError) as info:
        check_config(compose_config(tmp_path, ["experiment=smoke", *extra, override]))
    assert str(info.value).startswith(line) and "\n" not in str(info.value)


def test_a_renamed_key_on_the_command_line_is_caught_before_hydra():
    from distill.config_schema import renamed_override_problem

    assert renamed_override_problem(["kd=hinton", "loss.kd=0.5", "explain=gradcampp"]) is None
    assert renamed_override_problem(["kd=hinton", "kd.dkd_warmup=20"]) == (
        "kd.dkd_warmup is now loss.dkd_warmup (one table for every loss weight): use loss.dkd_warmup=20")
    assert renamed_override_problem(["++kd.at_weight=1000"]).endswith("use loss.at=500.0")
    assert renamed_override_problem(["kd.kd_weight=0.5,1"]).endswith("use loss.kd=0.5,1")  # a sweep


def test_an_unknown_group_option_on_the_command_line_lists_the_options():
    from distill.config_schema import unknown_option_problem

    assert unknown_option_problem(["teacher=wrn40_2", "experiment=null", "teacher.checkpoint=x", "seed=1"]) is None
    group = Path(__file__).resolve().parents[1] / "configs" / "teacher"
    options = ", ".join(sorted(p.stem for p in group.glob("*.yaml")))
    assert unknown_option_problem(["teacher=wrn99"]) == (
        f"teacher=wrn99 is not an option of the config group teacher: choose one of {options} (configs/teacher/*.yaml)")
    assert unknown_option_problem(["-m", "explain=none,gradcamp"]).startswith("explain=gradcamp is not an option")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "needle"),
    [("loss.temperature=abc", "loss.temperature='abc'"), ("trainer.max_epochs=0", "trainer.max_epochs=0"),
     ("optim.optimizer.lr=-0.1", "optim.optimizer.lr=-0.1"), ("data=image_folder", "data.root"),
     ("+foo=1", "foo=1"), ("loss.explain=-1", "loss.explain=-1"),
     ("explain.weight=0.01",
      "explain.weight is now loss.explain (one table for every loss weight): use loss.explain=0.01")],
)
def test_config_mistakes_through_train_py_exit_2_before_anything_is_written(override, needle, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(["experiment=smoke", "logger=wandb", "kd=hinton", override, f"hydra.run.dir={run_dir}"], tmp_path)
    assert_one_line_exit_2(proc, needle)
    assert not run_dir.exists() and not (tmp_path / "logs").exists()  # no output dir, no logger run, no teacher


@pytest.mark.slow
def test_evaluation_scripts_check_their_config(tmp_path):
    proc = run_script("evaluate.py", ["checkpoint=x.ckpt", "similarity_target=nope"], tmp_path)
    assert_one_line_exit_2(proc, "similarity_target='nope'", "'label', 'student_pred', 'teacher_pred'")
    proc = run_script("visualize.py", ["checkpoint=x.ckpt", "num_images=0"], tmp_path)
    assert_one_line_exit_2(proc, "num_images=0", "an integer >= 1")
    assert not (tmp_path / "out").exists()


def test_unknown_model_option_is_refused_before_data_or_model(tmp_path):
    from distill.config_schema import check_model_options

    with pytest.raises(ConfigError, match=r"teacher=wrn16_2 does not take these options \['depth_x'\]"):
        check_model_options(compose_config(tmp_path, ["experiment=smoke", "+teacher.depth_x=3"]))
    with pytest.raises(ConfigError, match="student.name='nope' is not a registered model"):
        check_model_options(compose_config(tmp_path, ["experiment=smoke", "student.name=nope"]))


# ------------------------------------------------------------------------------------ 5. resume
def finished_run(tmp_path: Path, *overrides: str) -> Path:
    """A finished 1-epoch smoke baseline in ``tmp_path/run``, with the .hydra/config.yaml Hydra writes."""
    from distill.run import run

    run_dir = tmp_path / "run"
    cfg = compose_config(run_dir, ["experiment=smoke", "logger=csv", "stage=baseline", "trainer.max_epochs=1",
                                   *overrides])
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    run(cfg)
    return run_dir


def resume(tmp_path: Path, run_dir: Path, *overrides: str):
    from distill.run import run

    return run(compose_config(run_dir, [f"resume={run_dir}", *overrides]))  # same paths.* as the run


def killed_run(tmp_path: Path) -> Path:
    """What a smoke distill run killed in its first epoch leaves: .hydra/config.yaml, no metrics.json."""
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(compose_config(run_dir, ["experiment=smoke", "logger=none"]), run_dir / ".hydra" / "config.yaml")
    return run_dir


@pytest.mark.parametrize("kept", [0.5, 0.3, 0.77])
def test_resume_of_a_run_whose_saved_config_is_torn_names_the_file(kept, tmp_path):
    from distill.resume import resume_config

    run_dir = killed_run(tmp_path)
    saved = run_dir / ".hydra" / "config.yaml"
    text = saved.read_text()
    saved.write_text(text[: int(len(text) * kept)])  # half written: torn YAML, or valid YAML missing keys
    with pytest.raises(ConfigError, match=f"resume={run_dir}: the run's saved config {saved} cannot be used .*torn"):
        resume_config(compose_config(tmp_path / "new", [f"resume={run_dir}"]))


def test_resume_from_a_last_ckpt_of_another_network_is_refused_before_lightning_loads_it(tmp_path):
    from distill.resume import resume_config

    run_dir = killed_run(tmp_path)  # distills a wrn16_1 student
    last = run_dir / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    real_checkpoint(last, "wrn16_2")
    with pytest.raises(CheckpointError, match=f"'{last}' is not this run's: it holds another model .*name: 'wrn16_2' "
                                              r"\(checkpoint\) vs 'wrn16_1' \(config\)") as info:
        resume_config(compose_config(tmp_path / "new", [f"resume={run_dir}"]))
    assert "\n" not in str(info.value)
    real_checkpoint(last, "wrn16_1")  # the run's own network, but a baseline's checkpoint
    with pytest.raises(CheckpointError, match="stage: 'baseline' \\(checkpoint\\) vs 'distill' \\(config\\)"):
        resume_config(compose_config(tmp_path / "new", [f"resume={run_dir}"]))


@pytest.mark.slow
def test_resume_of_a_finished_run_changes_nothing_unless_extended(tmp_path, caplog):
    run_dir = finished_run(tmp_path)
    before = (run_dir / "metrics.json").read_bytes()
    assert "val/acc" in json.loads(before)["metrics"]
    result = resume(tmp_path, run_dir)
    assert "this run is finished" in caplog.text
    assert (run_dir / "metrics.json").read_bytes() == before and result == json.loads(before)

    with pytest.raises(ConfigError, match=r"the override loss.temperature=2 would change .*loss.temperature is 4.0"):
        resume(tmp_path, run_dir, "loss.temperature=2")
    assert (run_dir / "metrics.json").read_bytes() == before

    result = resume(tmp_path, run_dir, "trainer.max_epochs=2")  # extend by one epoch
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["epoch"] == 1
    assert "val/acc" in result["metrics"] and "train/acc" in result["metrics"]
    assert json.loads((run_dir / "metrics.json").read_text())["metrics"] == result["metrics"]


@pytest.mark.slow
def test_truncated_last_ckpt_stops_resume_unless_the_user_falls_back(tmp_path):
    run_dir = finished_run(tmp_path)
    (run_dir / "metrics.json").unlink()  # as if killed before the end
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated.*resume_fallback=true") as info:
        resume(tmp_path, run_dir)
    assert "\n" not in str(info.value)
    result = resume(tmp_path, run_dir, "resume_fallback=true")  # starts over from epoch 0
    assert read_checkpoint(last)["epoch"] == 0 and "test/acc" in result["metrics"]


@pytest.mark.slow
def test_distill_run_killed_in_its_teacher_stage_resumes_the_teacher(tmp_path, monkeypatch, caplog):
    from distill.run import run

    caplog.set_level(logging.INFO, logger="distill")
    run_dir = tmp_path / "run"
    # What a kill in the teacher stage leaves: run/teacher/checkpoints/last.ckpt after 1 of 2 epochs,
    # no published teacher (checkpoints/wrn16_2_synthetic-<hash>.ckpt), no metrics.json.
    teacher_cfg = compose_config(run_dir / "teacher", ["experiment=smoke", "logger=none", "stage=teacher",
                                                       "trainer.max_epochs=1", "test_after_fit=false",
                                                       f"teacher.checkpoint={tmp_path / 'elsewhere.ckpt'}"])
    run(teacher_cfg)
    cfg = compose_config(run_dir, ["experiment=smoke", "logger=none", "trainer.max_epochs=2"])
    steps = []
    original = ClassifierModule.training_step
    monkeypatch.setattr(ClassifierModule, "training_step",
                        lambda self, batch, i: steps.append(type(self).__name__) or original(self, batch, i))
    run(cfg)
    assert "Resuming the teacher from its own last checkpoint" in caplog.text
    per_epoch = 128 // 32
    assert steps.count("ClassifierModule") == per_epoch  # the teacher trained its 2nd epoch only
    assert read_checkpoint(run_dir / "teacher" / "checkpoints" / "last.ckpt")["epoch"] == 1
    assert list((run_dir / "checkpoints").glob("wrn16_2_synthetic-*.ckpt")) and (run_dir / "metrics.json").is_file()
