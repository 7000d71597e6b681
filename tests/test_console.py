"""What a newcomer sees: the closing table, the explanation panel, a quiet smoke run, --help."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from distill.callbacks import ExplanationPanel
from distill.console import metrics_table, partial_note, report_run
from distill.data import SyntheticDataModule
from distill.explain import network_maps
from distill.explain.visual import denormalize, overlay
from distill.models import build_model
from distill.tasks import MulticlassTask
from tests.support import REPO

SMOKE_MAX_LINES = 50  # a smoke run (teacher first, then the student), W&B offline, map grids and chance flags


# ---------------------------------------------------------------------------- the closing table
def test_table_has_teacher_and_student_rows_and_marks_a_partial_test_set(tmp_path, capsys):
    result = {
        "stage": "distill",
        "metrics": {"test/acc": 0.5625, "test/teacher_acc": 0.75, "test/agreement": 0.625,
                    "test/map_cosine": 0.93125, "test/num_images": 16.0},
        "config": {"teacher": {"name": "wrn40_2"}, "student": {"name": "wrn16_2"}},
        "test_images": {"used": 16, "of": 64, "partial": True},
    }
    (tmp_path / "wandb" / "offline-run-1").mkdir(parents=True)
    (tmp_path / "wandb" / "offline-run-2").mkdir()
    text = report_run(result, tmp_path)
    assert capsys.readouterr().out.strip() == text.strip()
    lines = text.splitlines()
    teacher = next(line for line in lines if "teacher wrn40_2" in line).split()
    student = next(line for line in lines if "student wrn16_2" in line).split()
    assert teacher[2:] == ["75.00"]  # 100 * 0.75; no agreement with itself
    assert student[2:] == ["56.25", "62.50", "0.9313"]
    assert "Test metrics on a PARTIAL test set (16 of 64 images):" in text
    assert f"metrics.json: {tmp_path / 'metrics.json'}" in text
    sync = [line for line in lines if "wandb sync" in line]
    assert sync == [f"W&B ran offline; sync with: wandb sync {tmp_path / 'wandb'}/offline-run-*"]


def test_table_of_a_teacher_run_and_of_a_whole_test_set(tmp_path):
    result = {"stage": "teacher", "metrics": {"test/acc": 0.125}, "config": {"teacher": {"name": "wrn16_2"}}}
    table = metrics_table(result)
    assert len(table) == 2 and table[1].split() == ["teacher", "wrn16_2", "12.50"]
    assert "agreement" not in table[0]
    assert partial_note(64, 64) == "" and partial_note(None, 64) == ""
    assert partial_note(1000, 10000) == "partial test set: 1,000 of 10,000 images"
    voc = {"stage": "distill", "metrics": {"test/map11": 0.4213, "test/teacher_map11": 0.5, "test/agreement": 0.9},
           "config": {"teacher": {"name": "vgg16"}, "student": {"name": "vgg11_student"}}}
    header, teacher, student = metrics_table(voc)
    assert "mAP (11-point)" in header and "map cosine" not in header  # multi-label: mAP, not scaled to %
    assert teacher.split()[2:] == ["0.5000"] and student.split()[2:] == ["0.4213", "90.00"]
    text = report_run({"stage": "baseline", "metrics": {}, "config": {}}, tmp_path)
    assert "No test metrics" in text and "wandb sync" not in text


# ---------------------------------------------------------------------------- the panel
def test_panel_shows_fixed_images_of_distinct_classes_with_titled_columns():
    torch.manual_seed(0)
    dm = SyntheticDataModule(num_train=32, num_val=40, image_size=16, seed=3)  # val = test: 4 per class
    dm.setup("fit")
    teacher, student = build_model("wrn16_1", 10).eval(), build_model("wrn16_1", 10).eval()
    module = SimpleNamespace(networks=lambda: {"student": student, "teacher": teacher}, task=MulticlassTask(10),
                             device=torch.device("cpu"))
    panel = ExplanationPanel("gradcampp", num_images=8, cell_px=96)
    panel.pick_images(SimpleNamespace(datamodule=dm))
    assert len(set(panel.labels.tolist())) == 8  # one per class before a class repeats
    again = ExplanationPanel("gradcampp", num_images=8)
    again.pick_images(SimpleNamespace(datamodule=dm))
    assert torch.equal(again.images, panel.images)  # the same images at every epoch / run

    from distill.evaluation.grid import explanation_cells, figure_array

    rows = explanation_cells(student, panel.images, panel.labels, dm.mean, dm.std, teacher=teacher,
                             class_names=dm.class_names, target="label", columns=panel.columns(module))
    assert len(rows) == 8 and all(len(row) == 3 for row in rows)
    label = dm.class_names[int(panel.labels[0])]
    assert rows[0][0].title.startswith(f"image, label: {label}")
    assert rows[0][1].title.startswith("teacher Grad-CAM++\npred: ")
    assert rows[0][2].title.startswith("student Grad-CAM++\npred: ")
    # the teacher cell is the overlay of the teacher's Grad-CAM++ map for the label, computed apart
    expected = network_maps(teacher, panel.images, panel.labels, "gradcampp")[0]
    pixels = denormalize(panel.images, dm.mean, dm.std)[0]
    np.testing.assert_array_equal(rows[0][1].image, overlay(pixels, expected))

    figure = panel.render(module, dm)
    assert figure_array(figure).shape == (8 * 96, 3 * 96, 3)  # >= 96 px per cell
    assert not teacher.training and not student.training


def test_panel_shows_every_class_by_default_with_a_colour_scale():
    from distill.evaluation.grid import figure_array

    dm = SyntheticDataModule(num_train=32, num_val=40, image_size=16, seed=3)  # 10 classes, 4 each
    dm.setup("fit")
    teacher, student = build_model("wrn16_1", 10).eval(), build_model("wrn16_1", 10).eval()
    module = SimpleNamespace(networks=lambda: {"student": student, "teacher": teacher}, task=MulticlassTask(10),
                             device=torch.device("cpu"))
    from omegaconf import OmegaConf

    from distill.config_schema import Panel

    node = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "callbacks" / "explanation_panel.yaml"))
    node = {**node["explanation_panel"], "method": "gradcampp", "cell_px": 48, "out_dir": None}
    Panel(**node)  # the configured default passes the schema
    panel = ExplanationPanel(**{k: v for k, v in node.items() if k != "_target_"})
    panel.pick_images(SimpleNamespace(datamodule=dm))
    assert sorted(panel.labels.tolist()) == list(range(10))  # every class, once
    figure = panel.render(module, dm)
    assert figure_array(figure).shape == (10 * 48, 3 * 48, 3)
    module.hparams = {"teacher": {"name": "wrn16_1"}, "student": {"name": "timm", "arch": "mobilenetv3_small_050"}}
    titles = [ax.get_title() for ax in panel.render(module, dm).axes[:3]]
    assert titles[1].startswith("teacher Grad-CAM++\nwrn16_1\npred: ")  # the labels train.py's table uses
    assert titles[2].startswith("student Grad-CAM++\ntimm-mobilenetv3_small_050\npred: ")
    (scale,) = [ax for ax in figure.axes if ax.get_label() == "<colorbar>"]
    assert scale.get_ylabel() == "(map - min) / (max - min), per map" and scale.get_ylim() == (0.0, 1.0)


def test_panel_of_a_network_trained_alone_has_its_own_column():
    from distill.evaluation.grid import figure_array

    dm = SyntheticDataModule(num_train=32, num_val=40, image_size=16, seed=3)
    dm.setup("fit")
    teacher = build_model("wrn16_1", 10).train()
    module = SimpleNamespace(networks=lambda: {"teacher": teacher}, task=MulticlassTask(10), device=torch.device("cpu"))
    panel = ExplanationPanel("gradcam", num_images=4, cell_px=64)
    panel.pick_images(SimpleNamespace(datamodule=dm))
    assert panel.columns(module) == [("teacher", "gradcam")]
    assert figure_array(panel.render(module, dm)).shape == (4 * 64, 2 * 64, 3)
    assert teacher.training  # put back as it was


# ---------------------------------------------------------------------------- the terminal
@pytest.mark.slow
def test_smoke_run_is_quiet_and_ends_with_its_results(tmp_path):
    """The default logger (W&B, offline without credentials) and no WANDB_SILENT: what a user sees."""
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_SILENT", "WANDB_API_KEY")}
    env.update(WANDB_MODE="offline", HOME=str(tmp_path), PYTHONWARNINGS="default")
    command = [sys.executable, str(REPO / "train.py"), "experiment=smoke", f"paths.log_dir={tmp_path}/logs"]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, timeout=300)
    out = (proc.stdout + proc.stderr).decode()
    assert proc.returncode == 0, out[-3000:]
    lines = out.split("\n")  # as a terminal shows them: a progress bar redraws its line with "\r"
    assert not [line for line in lines if "warning" in line.lower()], out
    assert len(lines) < SMOKE_MAX_LINES, f"{len(lines)} lines:\n{out}"
    assert out.count("| Name ") <= 1  # at most one model summary
    assert sum("GPU available" in line for line in lines) == 1  # the device line once, not per Trainer
    assert "Run history" not in out and "Run summary" not in out  # no W&B footer blocks
    (metrics_path,) = (tmp_path / "logs").rglob("metrics.json")
    result = json.loads(metrics_path.read_text())
    student = next(line for line in lines if line.strip().startswith("student wrn16_1")).split()
    assert student[2] == f"{100 * result['metrics']['test/acc']:.2f}"
    assert f"metrics.json: {metrics_path}" in out
    assert sum("wandb sync" in line for line in lines) == 1
    assert result["test_images"]["used"] == 64 and result["test_images"]["partial"] is False


def test_train_help_lists_commands_groups_and_cfg_job():
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--help"], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "python train.py experiment=smoke" in text and "--cfg job" in text
    lines = text.splitlines()
    for group, option in (("data", "image_folder"), ("explain", "gradcampp"), ("kd", "hinton"),
                          ("experiment", "quick"), ("logger", "csv"), ("trainer", "ddp")):
        at = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{group} "))
        assert len(lines[at].split()) > 2, lines[at]  # a description
        assert option in lines[at + 1].replace(",", " ").split(), (group, lines[at + 1])
    assert "wandb*" in text and "cifar10*" in text  # the defaults are marked
    assert "ChoiceSetting" not in text and "Powered by Hydra" not in text
    assert len(text.splitlines()) < 80


def test_every_plus_key_example_of_help_is_accepted(tmp_path):
    """``--help`` says where ``+key=value`` works: each of its examples composes and passes the checks."""
    import re

    from distill.cli_help import help_text
    from distill.config_schema import check_config, check_model_options
    from tests.support import compose_config

    examples = [group.split() for group in re.findall(r"\(([^()]*\+[^()]*)\)", help_text())
                if "..." not in group]
    assert examples, help_text()
    for overrides in examples:
        cfg = compose_config(tmp_path, ["experiment=smoke", *overrides])
        check_config(cfg, "train")
        check_model_options(cfg)


# ---------------------------------------------------------------------------- presets compose
def _tiny_folder(root: Path, n_train: int = 12, n_test: int = 4) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for c in ("cat", "dog", "eel"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")


@pytest.mark.parametrize("experiment", ["smoke", "quick"])
def test_presets_compose_with_another_data_option(experiment, tmp_path):
    import hydra.utils

    from distill.data import ImageFolderDataModule
    from tests.support import compose_config

    cfg = compose_config(tmp_path, [f"experiment={experiment}", "data=image_folder", f"data.root={tmp_path}"])
    assert cfg.data._target_.endswith("ImageFolderDataModule") and "num_train" not in cfg.data
    assert isinstance(hydra.utils.instantiate(cfg.data), ImageFolderDataModule)
    if experiment == "quick":  # a quick teacher never lands in checkpoints/, where real runs look for theirs
        from omegaconf import OmegaConf

        preset = OmegaConf.load(REPO / "configs" / "experiment" / "quick.yaml")
        assert OmegaConf.to_container(preset.paths)["checkpoint_dir"] == "${paths.output_dir}/teacher"


def test_a_batch_larger_than_the_training_images_stops_before_the_teacher_is_trained(tmp_path, monkeypatch):
    from distill import build
    from distill.errors import ConfigError
    from distill.run import run
    from tests.support import compose_config

    _tiny_folder(tmp_path / "tree", n_train=5)  # 15 training images, batches of 32
    cfg = compose_config(tmp_path, ["experiment=smoke", "data=image_folder", f"data.root={tmp_path / 'tree'}",
                                    "logger=none"])

    def no_training(*args, **kwargs):
        raise AssertionError("a Trainer was built before the batch size was checked")

    monkeypatch.setattr(build, "trainer", no_training)
    with pytest.raises(ConfigError, match=r"^data.batch_size=32 exceeds the 15 training images"):
        run(cfg)
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.slow
def test_smoke_experiment_on_an_image_folder_end_to_end(tmp_path):
    from tests.support import run_train

    _tiny_folder(tmp_path / "tree")
    proc = run_train(["experiment=smoke", "data=image_folder", f"data.root={tmp_path / 'tree'}", "data.num_classes=3",
                      "data.test_subset=6", "logger=csv"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (metrics_path,) = (tmp_path / "logs").rglob("metrics.json")
    result = json.loads(metrics_path.read_text())
    assert result["test_images"] == {"used": 6, "of": 12, "partial": True,
                                     "per_metric": {k: 6 for k in result["metrics"] if k.startswith("test/")
                                                    and k != "test/num_images"}}
    assert "test/acc" in result["test_images"]["per_metric"]
    assert "Test metrics on a PARTIAL test set (6 of 12 images):" in proc.stdout


# ---------------------------------------------------------------------------- the filters themselves
def test_library_filters_are_narrow():
    import logging
    import warnings

    from distill.console import quiet_libraries

    leafspec = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_libraries()
        warnings.warn_explicit(leafspec, FutureWarning, "_pytree.py", 21, module="lightning.pytorch.utilities._pytree")
        warnings.warn_explicit(leafspec, FutureWarning, "mine.py", 1, module="distill.mine")  # elsewhere: kept
        warnings.warn_explicit("another deprecation", FutureWarning, "_pytree.py", 22,
                               module="lightning.pytorch.utilities._pytree")  # another message: kept
    kept = [(str(w.message), w.filename) for w in caught]
    assert kept == [(leafspec, "mine.py"), ("another deprecation", "_pytree.py")]

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addHandler(handler)
    old_level, logger.level = logger.level, logging.INFO
    try:
        gpu = "GPU available: True (a test device), used: True"  # a message no real Trainer logs
        for message in (gpu, gpu, "`Trainer.fit` stopped: `max_epochs=2` reached.",
                        "`Trainer.fit` stopped: `max_steps=5` reached.", "something else", "something else"):
            logger.info(message)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert seen == [gpu, "`Trainer.fit` stopped: `max_steps=5` reached.", "something else", "something else"]


@pytest.mark.parametrize("single_network", [False, True])
def test_panel_of_a_network_trained_alone_only_when_asked(tmp_path, single_network):
    dm = SyntheticDataModule(num_train=32, num_val=40, image_size=16, seed=3)
    dm.setup("fit")
    module = SimpleNamespace(networks=lambda: {"student": build_model("wrn16_1", 10)}, task=MulticlassTask(10),
                             device=torch.device("cpu"))
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, current_epoch=0, max_epochs=1,
                              datamodule=dm, loggers=[])
    panel = ExplanationPanel("gradcampp", num_images=2, cell_px=32, out_dir=tmp_path, single_network=single_network)
    panel.on_validation_epoch_end(trainer, module)
    assert [p.name for p in tmp_path.glob("*.png")] == (["explanations_epoch000.png"] if single_network else [])


def test_one_model_label_in_train_and_evaluate_tables_and_run_names(tmp_path):
    from pathlib import Path as _Path

    from distill.build import run_name
    from distill.console import metrics_table
    from distill.evaluation.report import evaluation_markdown
    from distill.evaluation.runner import LoadedModel, _describe, _run_name
    from tests.support import compose_config

    label = "timm-mobilenetv3_small_050"
    cfg = compose_config(tmp_path, ["experiment=smoke", "stage=baseline", "student=timm",
                                    "student.arch=mobilenetv3_small_050"])
    assert label in run_name(cfg, "baseline")
    trained = {"stage": "baseline", "metrics": {"test/acc": 0.5},
               "config": {"student": {"name": "timm", "arch": "mobilenetv3_small_050"}}}
    assert any(f"student {label}" in line for line in metrics_table(trained))
    loaded = LoadedModel(None, _Path("run/checkpoints/last.ckpt"), {
        "model_name": "timm", "num_classes": 10, "stage": "baseline",
        "model": {"name": "timm", "num_classes": 10, "arch": "mobilenetv3_small_050", "drop_rate": 0.0}})
    assert loaded.label == label and label in _run_name("eval", loaded)
    report = evaluation_markdown({"checkpoint": "c.ckpt", "model": _describe(loaded), "teacher": None,
                                  "data": "synthetic", "split": "test", "metrics": {"num_images": 4}})
    assert f"| model {label} |" in report


def test_the_smoke_experiment_exercises_the_gradcampp_loss(tmp_path):
    from distill.module import ExplainSettings, LossWeights
    from tests.support import compose_config

    cfg = compose_config(tmp_path, ["experiment=smoke"])
    assert cfg.explain.method == "gradcampp" and LossWeights(**cfg.loss).explain > 0
    assert ExplainSettings(method=cfg.explain.method, distance=cfg.explain.distance).method == "gradcampp"
