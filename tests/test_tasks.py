"""Tasks (distill.tasks): the multi-label task's map targets, agreement and the task registry."""

from __future__ import annotations

import pytest
import torch

from distill.errors import ConfigError
from distill.tasks import MultilabelTask, MultilabelVOC11Task, build_task


def test_map_targets_all_positives_first_then_padding():
    task = MultilabelTask(6)
    labels = torch.tensor([[0, 1, -1, 0, 1, 1], [0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    target = task.map_targets(labels, torch.zeros(3, 6), "label")
    assert target.tolist() == [[1, 4, 5, -1, -1, -1], [-1] * 6, [0, -1, -1, -1, -1, -1]]
    logits = torch.tensor([[-1.0, 2, -3, 0.5, -1, -2]]).repeat(3, 1)
    assert task.map_targets(labels, logits, "teacher_pred")[0].tolist() == [1, 3, -1, -1, -1, -1]
    capped = MultilabelTask(6, max_map_targets=2).map_targets(labels, logits, "label")
    assert capped.shape == (3, 2) and capped[0].tolist() == [1, 4]


def test_agreement_and_task_registry():
    task = build_task({"name": "multilabel"}, 4)
    s = torch.tensor([[1.0, -1, 2, -3], [1.0, 1, 1, 1]])
    t = torch.tensor([[2.0, -2, -1, -1], [-1.0, -1, -1, -1]])
    assert task.agreement(s, t).tolist() == [0.75, 0.0]
    voc11 = build_task({"name": "multilabel_voc11", "score": "map11"}, 4)
    assert task.score_name == "map" and voc11.score_name == "map11" and isinstance(voc11, MultilabelVOC11Task)


def test_a_task_that_does_not_fit_the_labels_is_one_line():
    with pytest.raises(ConfigError, match="task=multilabel does not fit this data's one label per image"):
        build_task({"name": "multilabel"}, 10, multilabel_data=False)
    with pytest.raises(ConfigError, match="use task=multilabel or multilabel_voc11"):
        build_task({"name": "multiclass"}, 20, multilabel_data=True)
    with pytest.raises(ConfigError, match="set task.score=map11"):
        build_task({"name": "multilabel_voc11", "score": "map"}, 20)
    with pytest.raises(ConfigError, match="task=unknown is unknown"):
        build_task({"name": "unknown"}, 20)


def test_every_task_splits_batches_with_and_without_boxes():
    images, labels = torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long)
    boxes = (torch.zeros(2, 1, 4), torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1, dtype=torch.bool))
    for task in (build_task({"name": name}, 4) for name in ("multiclass", "multilabel", "multilabel_voc11")):
        assert task.split_batch((images, labels))[2] is None
        x, y, extra = task.split_batch((images, labels, *boxes))
        assert x is images and y is labels and all(a is b for a, b in zip(extra, boxes, strict=True))
