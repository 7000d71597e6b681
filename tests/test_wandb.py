"""The default W&B logger runs offline by itself and its run on disk holds what was logged."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import wandb
from wandb.proto import wandb_internal_pb2

from distill.loggers import wandb_credentials_present
from distill.run import run
from tests.support import compose_config

pytestmark = pytest.mark.slow

BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of (crc, length, type) chunks


def read_wandb_records(path: Path) -> list[wandb_internal_pb2.Record]:
    data, pos, pending, records = path.read_bytes(), 7, b"", []  # 7-byte ':W&B' file header
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # full, first
            pending = chunk
        elif kind in (3, 4):  # middle, last
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def logged(records) -> tuple[dict[str, list[float]], dict[str, object]]:
    """History values per key and config values, from the run's records."""
    history: dict[str, list[float]] = {}
    config: dict[str, object] = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                history.setdefault(key, []).append(json.loads(item.value_json))
        items = record.config.update if kind == "config" else record.run.config.update if kind == "run" else []
        for item in items:
            config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return history, config


def test_offline_wandb_run_holds_config_metrics_and_checkpoint_paths(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline must come from the missing credentials
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    assert not wandb_credentials_present()
    cfg = compose_config(tmp_path, ["experiment=smoke", "logger=wandb", "stage=baseline", "trainer.max_epochs=2"])
    assert cfg.logger.offline == "auto"
    result = run(cfg)
    wandb.teardown()  # wait for the W&B service to flush the run file

    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    assert (tmp_path / "wandb_run_id").read_text() in run_file.name
    history, config = logged(read_wandb_records(run_file))
    for key in ("train/loss", "train/ce", "train/acc", "val/acc", "val/loss", "val/ce", "time/epoch_s", "lr-SGD",
                "test/acc"):
        assert key in history, (key, sorted(history))
    assert len(history["val/acc"]) == 2 and len(history["time/epoch_s"]) == 2
    assert history["test/acc"][-1] == pytest.approx(result["metrics"]["test/acc"])
    assert config["stage"] == "baseline" and config["optim"]["optimizer"]["lr"] == 0.1
    assert config["checkpoint/best"].endswith("best.ckpt") and config["checkpoint/last"].endswith("last.ckpt")


def test_explanation_panels_land_in_the_offline_run_media(tmp_path):
    cfg = compose_config(tmp_path, ["experiment=smoke", "logger=wandb", "explain=gradcampp", "trainer.max_epochs=2",
                                    "callbacks.explanation_panel.every_n_epochs=1",
                                    "callbacks.explanation_panel.num_images=4"])
    run(cfg)
    wandb.teardown()
    distill_runs = [p for p in (tmp_path / "wandb").glob("offline-run-*")
                    if (tmp_path / "wandb_run_id").read_text() in p.name]
    (run_dir,) = distill_runs
    images = sorted((run_dir / "files" / "media" / "images").glob("val/explanations_*.png"))
    assert len(images) == 2  # one panel per epoch
    from PIL import Image

    panel = Image.open(images[-1])
    assert panel.size == (3 * 128, 4 * 128)  # image | teacher | student, 4 rows, 128 px per cell (cell_px)
    records = read_wandb_records(next(run_dir.glob("run-*.wandb")))
    history, _ = logged(records)
    assert any(key.startswith("val/explanations") for key in history)
