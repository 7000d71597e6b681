"""PASCAL VOC 2007 data (issue 5): annotations, the DataModule's batches, splits and errors, on a
tiny tree in VOC's real on-disk layout (tests/tiny_datasets.py: JPEGImages, Annotations XML with
difficult flags, ImageSets/Main)."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch

import distill.data.voc as voc_module
from distill.data.resumable import ResumableLoader
from distill.data.seeding import EpochShuffleSampler
from distill.data.voc import IMAGENET_MEAN, IMAGENET_STD, VOC_CLASSES, VOC2007DataModule, parse_annotation
from distill.errors import ConfigError, DataError
from distill.tasks import MultilabelTask, MultilabelVOC11Task
from tests.support import compose_config
from tests.tiny_datasets import make_voc_tree, write_voc_image


def voc_dm(root: Path, **kw) -> VOC2007DataModule:
    args = {"root": root, "download": False, "image_size": 64, "batch_size": 4, "num_workers": 0}
    return VOC2007DataModule(**{**args, **kw})


def test_annotation_difficult_only_class_is_ignored(tmp_path):
    xml = tmp_path / "a.xml"
    xml.write_text(
        "<annotation>"
        "<object><name>dog</name><difficult>1</difficult><bndbox><xmin>1</xmin><ymin>2</ymin>"
        "<xmax>10</xmax><ymax>20</ymax></bndbox></object>"
        "<object><name>cat</name><difficult>1</difficult><bndbox><xmin>5</xmin><ymin>5</ymin>"
        "<xmax>9</xmax><ymax>9</ymax></bndbox></object>"
        "<object><name>cat</name><difficult>0</difficult><bndbox><xmin>3</xmin><ymin>4</ymin>"
        "<xmax>7</xmax><ymax>8</ymax></bndbox></object>"
        "</annotation>"
    )
    rec = parse_annotation(xml, "a.jpg")
    dog, cat = VOC_CLASSES.index("dog"), VOC_CLASSES.index("cat")
    expected = torch.zeros(20, dtype=torch.int64)
    expected[dog], expected[cat] = -1, 1  # difficult-only -> ignored; one easy object -> positive
    assert torch.equal(rec.labels, expected)
    assert rec.box_labels.tolist() == [dog, cat, cat] and rec.difficult.tolist() == [True, True, False]
    assert rec.boxes[0].tolist() == [0.0, 1.0, 10.0, 20.0]  # 1-based inclusive -> 0-based edges


def test_broken_annotation_names_the_file(tmp_path):
    bad = tmp_path / "bad.xml"
    bad.write_text("<annotation><object><name>unicorn</name></object></annotation>")
    with pytest.raises(DataError, match="bad.xml.*unicorn"):
        parse_annotation(bad, "x.jpg")


def test_datamodule_batches(voc_root):
    dm = voc_dm(voc_root)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.multilabel and len(dm.train_set) == 12 and len(dm.test_set) == 8
    assert dm.val_set is dm.test_set  # validate on the test split
    batch = next(iter(dm.train_dataloader()))
    assert len(batch) == 2  # training batches stay (images, targets)
    x, y = batch
    assert x.shape == (4, 3, 64, 64) and x.dtype == torch.float32
    assert y.shape == (4, 20) and y.dtype == torch.int64 and set(y.unique().tolist()) <= {-1, 0, 1}
    x, y, boxes, labels, difficult = next(iter(dm.val_dataloader()))
    assert x.shape == (4, 3, 64, 64) and y.shape == (4, 20)
    n = boxes.shape[1]
    assert boxes.shape == (4, n, 4) and labels.shape == (4, n) and difficult.shape == (4, n)
    assert difficult.dtype == torch.bool and ((labels == -1) | (labels < 20)).all()
    padded = labels == -1
    assert (boxes[padded] == 0).all() and not difficult[padded].any()
    # targets agree with the boxes: positive <=> an easy box of that class
    for b in range(4):
        easy = set(labels[b][(labels[b] >= 0) & ~difficult[b]].tolist())
        assert set(torch.nonzero(y[b] == 1).flatten().tolist()) == easy
    # ImageNet normalisation: the grey background (40/255) maps to (40/255 - mean) / std
    corner = x[:, :, 0, 0]
    bg = torch.tensor([(40 / 255 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)])
    assert ((corner - bg).abs() < 0.1).all(dim=1).any()


def test_train_order_is_seeded_epoch_dependent_and_resumes_mid_epoch(voc_root):
    def epoch(loader, e):
        _set_sampler_epoch(loader, e)  # what Lightning's fit loop calls every epoch
        return [x for x, _ in loader]  # augment=False: each image is fixed, so this is the order

    dm = voc_dm(voc_root, augment=False, seed=5)
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableLoader)
    for e in (0, 1):  # the order of every training loader with this seed: 12 images = 3 batches of 4
        order = EpochShuffleSampler(12, seed=5).order(e)[0].tolist()
        assert torch.equal(torch.cat(epoch(loader, e)), torch.stack([dm.train_set[i][0] for i in order]))
    assert EpochShuffleSampler(12, seed=5).order(0)[0].tolist() != EpochShuffleSampler(12, seed=5).order(1)[0].tolist()
    first = epoch(loader, 1)
    resumed = voc_dm(voc_root, augment=False, seed=5).train_dataloader()  # a fresh process
    resumed.load_state_dict({"epoch": 1, "batches": 1, "per_epoch": 3})
    rest = [x for x, _ in resumed]  # neither replayed nor skipped
    assert len(rest) == 2 and all(torch.equal(a, b) for a, b in zip(rest, first[1:], strict=True))


def test_difficult_only_target_is_minus_one(voc_root):
    dm = voc_dm(voc_root, augment=False)
    dm.setup("fit")
    _, y = dm.train_set[0]
    assert y[0] == 1 and y[2] == -1 and (y[3:] == 0).all() and y[1] == 0


def test_eval_boxes_follow_resize_and_center_crop(tmp_path):
    """The transformed box still frames the coloured rectangle in the transformed image."""
    voc = make_voc_tree(tmp_path, n_trainval=1, n_test=1)
    write_voc_image(voc, "000001", (120, 80), [(0, 31, 11, 100, 60, 0)])  # the test image
    dm = voc_dm(tmp_path, image_size=48)
    dm.setup("test")
    x, _, boxes, labels, _ = next(iter(dm.test_dataloader()))
    assert labels[0, 0] == 0
    x1, y1, x2, y2 = boxes[0, 0].tolist()
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    red = (x[0] * std + mean)[0] > 0.6  # (H, W) pixels of the red rectangle
    rows, cols = torch.nonzero(red, as_tuple=True)
    # the red pixels span the box (up to a pixel of resampling blur at the edges)
    assert abs(cols.min().item() - x1) <= 1.0 and abs(cols.max().item() + 1 - x2) <= 1.0
    assert abs(rows.min().item() - y1) <= 1.0 and abs(rows.max().item() + 1 - y2) <= 1.0
    # by hand: 120x80 -> shorter side 48 * 256/224 = 55 -> 82x55 (scale 82/120, 55/80); center crop 48
    # drops (82-48)/2 = 17 columns and round(3.5) = 4 rows; VOC box x 31..100, y 11..60 = edges 30..100, 10..60
    expected = [30 * 82 / 120 - 17, 10 * 55 / 80 - 4, 48.0, 60 * 55 / 80 - 4]  # x2 = 51.3 clipped to 48
    assert boxes[0, 0].tolist() == pytest.approx(expected, abs=1e-4)


def test_val_split_has_boxes_and_train_subset(voc_root):
    dm = voc_dm(voc_root, val_split=0.25, train_subset=6)
    dm.setup("fit")
    assert len(dm.val_set) == 3 and len(dm.train_set) == 6
    assert len(next(iter(dm.val_dataloader()))) == 5


def test_missing_dataset_is_a_clear_error(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("download attempted although download=False")

    monkeypatch.setattr(voc_module, "VOCDetection", no_download)
    dm = voc_dm(tmp_path / "nowhere")
    with pytest.raises(DataError) as info:
        dm.prepare_data()
    msg = str(info.value)
    assert "VOCdevkit/VOC2007" in msg and "data.root" in msg and "data.download=false" in msg
    assert "VOCtest_06-Nov-2007.tar" in msg
    with pytest.raises(DataError, match="does not exist"):
        dm.setup("fit")


def test_root_pointing_inside_vocdevkit_gets_a_hint(voc_root):
    dm = voc_dm(voc_root / "VOCdevkit" / "VOC2007")
    with pytest.raises(DataError, match="the folder that contains VOCdevkit"):
        dm.prepare_data()


def test_missing_test_split_listing(tmp_path):
    voc = make_voc_tree(tmp_path, n_trainval=2, n_test=1)
    (voc / "ImageSets" / "Main" / "test.txt").unlink()
    with pytest.raises(DataError, match="test.txt is missing"):
        voc_dm(tmp_path).prepare_data()


def test_missing_image_names_the_file(tmp_path):
    voc = make_voc_tree(tmp_path, n_trainval=2, n_test=1)
    (voc / "JPEGImages" / "000001.jpg").unlink()
    with pytest.raises(DataError, match="000001.jpg"):
        voc_dm(tmp_path).setup("fit")


def test_download_failure_is_one_clear_error(tmp_path, monkeypatch):
    def offline(*args, download=False, **kwargs):
        assert download
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(voc_module, "VOCDetection", offline)
    dm = voc_dm(tmp_path / "voc", download=True)
    with pytest.raises(DataError) as info:
        dm.prepare_data()
    assert "download failed" in str(info.value) and "URLError" in str(info.value)
    assert info.value.__cause__ is None


def test_argument_checks(tmp_path):
    with pytest.raises(ConfigError, match="20 classes"):
        voc_dm(tmp_path, num_classes=10)


def test_voc_data_picks_the_multilabel_task_and_its_options_reach_it(tmp_path):
    from distill import build

    cfg = compose_config(tmp_path, ["data=voc2007", "task.max_map_targets=3"])
    assert cfg.task.name == "multilabel" and cfg.callbacks.best_checkpoint.monitor == "val/map"
    task = build.task(cfg, voc_dm(tmp_path))
    assert isinstance(task, MultilabelTask) and task.max_map_targets == 3
    assert task.map_targets(torch.ones(2, 20, dtype=torch.int64), torch.zeros(2, 20), "label").shape == (2, 3)
    voc11 = compose_config(tmp_path, ["data=voc2007", "task=multilabel_voc11"])
    assert isinstance(build.task(voc11), MultilabelVOC11Task) and voc11.callbacks.best_checkpoint.monitor == "val/map11"
    assert build.task(compose_config(tmp_path, ["data=voc2007"])).max_map_targets == 20


def test_moved_voc_keys_say_where_they_are_now(tmp_path):
    from distill.config_schema import config_errors

    for old, line in (("data.ap=11point", "data.ap is now task (the task scores the labels; 11point is "
                                          "task=multilabel_voc11): use task=multilabel_voc11"),
                      ("data.loc_deltas=[0.5]", "data.loc_deltas is now callbacks.localization.deltas"),
                      ("data.max_map_targets=3", "data.max_map_targets is now task.max_map_targets"),
                      ("data.loc_method=gradcam", "data.loc_method is now eval_method")):
        problem = config_errors(compose_config(tmp_path, ["data=voc2007", f"+{old}"]))
        assert problem is not None and problem.startswith(line), problem
