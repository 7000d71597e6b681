"""The entry point around the stages: callbacks from their config group, the returned
``optimized_metric``, one error line with exit status 2, and the DDP launcher patch kept to its job."""

from __future__ import annotations

import pytest
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, Timer
from lightning.pytorch.strategies.launchers import subprocess_script as ddp_launcher

from distill import build, run
from distill.callbacks import EpochTimer, ExplanationPanel
from distill.callbacks_localization import LocalizationCallback
from distill.config_schema import config_errors
from distill.ddp import ddp_job, hydra_ddp_command
from distill.errors import ConfigError, DataError, exit_on_user_error
from tests.support import compose_config


def test_callbacks_come_from_their_config_group(tmp_path):
    cfg = compose_config(tmp_path, ["+callbacks.timer._target_=lightning.pytorch.callbacks.Timer",
                                    "callbacks.explanation_panel.every_n_epochs=3", "eval_method=layercam"])
    built = build.callbacks(cfg, with_logger=True)
    assert list(built) == ["best_checkpoint", "last_checkpoint", "lr_monitor", "epoch_timer", "explanation_panel",
                           "localization", "timer"]
    kinds = [ModelCheckpoint, ModelCheckpoint, LearningRateMonitor, EpochTimer, ExplanationPanel, LocalizationCallback,
             Timer]
    assert all(isinstance(built[name], kind) for name, kind in zip(built, kinds, strict=True))
    assert built["best_checkpoint"].monitor == "val/acc" and built["last_checkpoint"].monitor is None
    assert str(built["best_checkpoint"].dirpath) == str(tmp_path / "checkpoints")
    assert built["explanation_panel"].every_n_epochs == 3
    assert built["explanation_panel"].method == built["localization"].method == "layercam"  # one eval_method
    assert "lr_monitor" not in build.callbacks(cfg, with_logger=False)  # Lightning refuses it without a logger


def test_dropping_a_callback_and_the_required_ones(tmp_path):
    assert "explanation_panel" not in build.callbacks(compose_config(tmp_path, ["~callbacks.explanation_panel"]), True)
    cfg = compose_config(tmp_path, ["~callbacks.last_checkpoint"])
    assert config_errors(cfg) == "config key callbacks.last_checkpoint is required but not set: add " \
                                 "callbacks.last_checkpoint=..."
    with pytest.raises(ConfigError, match="callbacks.last_checkpoint is required"):
        build.callbacks(cfg, with_logger=True)


def test_a_moved_key_names_its_new_place(tmp_path):
    cfg = compose_config(tmp_path, ["+explanation_panel.every_n_epochs=1"])
    assert config_errors(cfg) == ("explanation_panel.every_n_epochs is now callbacks.explanation_panel.every_n_epochs "
                                  "(callbacks are a config group): use callbacks.explanation_panel.every_n_epochs=1")
    assert config_errors(compose_config(tmp_path, ["+explain.eval_method=gradcam"])).startswith(
        "explain.eval_method is now eval_method")


def test_main_returns_the_optimized_metric(tmp_path, monkeypatch, caplog):
    result = {"metrics": {"test/acc": 0.25, "val/acc": 0.5}}
    monkeypatch.setattr(run, "run", lambda cfg: result)
    assert compose_config(tmp_path).optimized_metric == "test/acc"
    assert run.main(compose_config(tmp_path)) == 0.25
    assert run.main(compose_config(tmp_path, ["optimized_metric=val/acc"])) == 0.5
    assert compose_config(tmp_path, ["data=voc2007"]).optimized_metric == "test/map"
    assert run.main(compose_config(tmp_path, ["optimized_metric=test/map"])) is None
    assert "optimized_metric=test/map was not logged by this run" in caplog.text


@pytest.mark.parametrize("error, line", [
    (DataError("no images in DIR"), "error: no images in DIR"),
    (PermissionError(13, "Permission denied", "/out"),
     "error: could not write or read '/out': Permission denied (EACCES); check the folder's permissions"),
])
def test_a_user_error_is_one_line_and_exit_status_2(capsys, error, line):
    with pytest.raises(SystemExit) as exit_info, exit_on_user_error():
        raise error
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(line) and err.count("\n") == 1


def test_a_bug_keeps_its_traceback():
    with pytest.raises(KeyError), exit_on_user_error():
        raise KeyError("a bug, not a user error")


def test_the_ddp_launcher_patch_lives_only_inside_the_job():
    lightning_own = ddp_launcher._hydra_subprocess_cmd
    with ddp_job():
        assert ddp_launcher._hydra_subprocess_cmd is hydra_ddp_command
    assert ddp_launcher._hydra_subprocess_cmd is lightning_own
    with pytest.raises(RuntimeError), ddp_job():
        raise RuntimeError("a failed job")
    assert ddp_launcher._hydra_subprocess_cmd is lightning_own
