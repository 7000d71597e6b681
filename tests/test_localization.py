"""Box localisation of explanation maps (distill.evaluation.localization) on VOC boxes: hand-worked
scores, VOC's pixel convention, upsampling, and the callback's metric names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distill.callbacks_localization import LocalizationCallback
from distill.data.voc import parse_annotation
from distill.errors import ConfigError
from distill.evaluation.localization import box_masks, localization_scores


def test_box_masks_use_voc_pixel_convention(tmp_path):
    xml = tmp_path / "a.xml"
    xml.write_text("<annotation><object><name>cat</name><difficult>0</difficult><bndbox><xmin>1</xmin>"
                   "<ymin>2</ymin><xmax>2</xmax><ymax>2</ymax></bndbox></object></annotation>")
    rec = parse_annotation(xml, "a.jpg")
    mask = box_masks(rec.boxes[None], (3, 4))[0, 0]  # VOC pixels x 1..2, y 2 -> row 1, cols 0-1
    expected = torch.zeros(3, 4, dtype=torch.bool)
    expected[1, 0:2] = True
    assert torch.equal(mask, expected)


def test_localization_hand_worked():
    maps = torch.zeros(1, 3, 4, 4)
    maps[0, 0, :2, :2] = 1.0  # fills the box exactly
    maps[0, 0, 3, 3] = 0.6  # outside, above delta=0.5
    maps[0, 0, 2, 2] = 0.3  # outside, below delta=0.5
    maps[0, 1, 3, 3] = 2.0  # class 1: entirely outside its box
    maps[0, 2] = 5.0  # class 2: only a difficult box -> not scored
    boxes = torch.tensor([[[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [2.0, 0.0, 4.0, 1.0], [0, 0, 4, 4],
                           [0, 0, 0, 0]]])
    box_labels = torch.tensor([[0, 1, 1, 2, -1]])
    difficult = torch.tensor([[False, False, False, True, False]])
    target = torch.tensor([[0, 1, 2]])
    scores, valid = localization_scores(maps, boxes, box_labels, difficult, target, (4, 4), deltas=(0.0, 0.5))
    assert valid.tolist() == [[True, True, False]]
    # delta 0: kept = 4 inside + 2 outside -> 4 / (4 + 2); delta 0.5: 4 / (4 + 1)
    assert scores[:, 0, 0].tolist() == pytest.approx([4 / 6, 4 / 5])
    # class 1: union of two boxes (1 + 2 pixels), kept pixel outside -> 0 / (3 + 1)
    assert scores[:, 0, 1].tolist() == [0.0, 0.0]
    # an all-zero map scores 0; padding targets are not valid
    zero, valid = localization_scores(torch.zeros(1, 2, 4, 4), boxes, box_labels, difficult,
                                      torch.tensor([[0, -1]]), (4, 4))
    assert zero[0, 0, 0] == 0 and valid.tolist() == [[True, False]]


def test_localization_upsamples_maps_to_the_image():
    maps = torch.zeros(1, 1, 2, 2)
    maps[0, 0, 0, 0] = 1.0  # top-left quadrant after upsampling
    boxes = torch.tensor([[[0.0, 0.0, 4.0, 4.0]]])
    scores, _ = localization_scores(maps, boxes, torch.tensor([[0]]), torch.tensor([[False]]), torch.tensor([[0]]),
                                    (8, 8), deltas=(0.5,))
    up = F.interpolate(maps, size=(8, 8), mode="bilinear", align_corners=False)[0, 0]
    kept = up >= 0.5 * up.max()
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[:4, :4] = True
    expected = (kept & inside).sum() / (inside.sum() + (kept & ~inside).sum())
    assert scores.item() == pytest.approx(expected.item())


def test_localization_callback_names_and_deltas():
    assert LocalizationCallback.metric_name("test", 0.5, "student") == "test/loc50_student"
    assert LocalizationCallback.metric_name("val", 0.0, "teacher") == "val/loc00_teacher"
    with pytest.raises(ConfigError, match=r"callbacks.localization.deltas must lie in \[0, 1\)"):
        LocalizationCallback("gradcampp", deltas=[1.5])
