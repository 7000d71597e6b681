"""Judging multi-label (VOC) explanations: hand-worked per-pair scores, then evaluate.py,
visualize.py and the W&B explanation panel on a smoke VOC checkpoint.

Hand-worked network (as in tests/test_evaluation.py): explained activations = the image (2
channels of 2x2 pixels), logits = mean(A) per channel (identity linear layer), so the Grad-CAM
map of class ``c`` is ``A_c / 4`` and the Grad-CAM++ map is proportional to it.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from distill.evaluation.multilabel import evaluate_multilabel_batch, positive_targets
from tests.support import CONFIG_DIR, PooledLinear, run_train
from tests.tiny_datasets import make_voc_tree


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def identity2(channels: int = 2) -> PooledLinear:
    """Two classes, class c's logit = the mean of channel c (no bias)."""
    return PooledLinear(torch.eye(2, channels).tolist())


def test_positive_targets_pad_with_minus_one():
    labels = torch.tensor([[1, 0, -1, 1], [0, 0, 1, 0], [0, 0, 0, 0]])
    assert positive_targets(labels, 2).tolist() == [[0, 3], [2, -1], [-1, -1]]


def test_multilabel_scores_by_hand():
    # Image 1: A0 = [[4, 2], [0, 0]], A1 = [[0, 0], [0, 2]], both classes positive.
    # Image 2: A0 = 1, A1 = [[2, 0], [0, 0]], only class 1 positive (so one padded pair).
    x = torch.tensor([[[[4.0, 2.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 2.0]]],
                      [[[1.0, 1.0], [1.0, 1.0]], [[2.0, 0.0], [0.0, 0.0]]]])
    labels = torch.tensor([[1, 1], [0, 1]])
    # One box of class 0 in image 1 around pixel (0, 0); none of class 1 anywhere.
    boxes = torch.tensor([[[0.0, 0.0, 1.0, 1.0]], [[0.0, 0.0, 0.0, 0.0]]])
    box_labels, difficult = torch.tensor([[0], [-1]]), torch.zeros(2, 1, dtype=torch.bool)
    net = identity2().eval()
    scores, logits = evaluate_multilabel_batch(net, (x, labels, boxes, box_labels, difficult), teacher=net,
                                               deltas=(0.0, 0.5))
    # Pair (1, class 0): map = [[1, .5], [0, 0]] after min-max; E keeps A0 = [[4, 1], [0, 0]] and
    # zeroes A1, so Y = sig(6/4), O = sig(5/4). The other two pairs keep their class channel
    # exactly (O = Y): drop 0, and no strict increase.
    drop = (sig(1.5) - sig(1.25)) / sig(1.5)

    def mean(key):
        value, weight = scores[key]
        return float((value * weight).sum() / weight.sum())

    for method in ("gradcam", "gradcampp"):
        assert mean(f"{method}/average_drop") == pytest.approx(drop / 3, abs=1e-6)
        assert mean(f"{method}/increase_in_confidence") == 0.0
        assert mean(f"teacher/{method}/average_drop") == pytest.approx(drop / 3, abs=1e-6)
    assert mean("win_gradcampp_vs_gradcam") == 0.5  # ties count half
    assert scores["gradcam/average_drop"][1].tolist() == [1.0, 1.0, 1.0, 0.0]  # image 2: [class 1, padding]
    # Localisation of pair (1, class 0): kept pixels (0, 0) and (0, 1) at delta 0 and 0.5, box (0, 0):
    # 1 / (1 + 1). Class 1 has no box: left out.
    for key in ("loc00", "loc50", "teacher/loc50"):
        assert mean(key) == pytest.approx(0.5)
        assert scores[key][1].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert mean("map_cosine") == pytest.approx(1.0) and mean("agreement") == 1.0
    torch.testing.assert_close(logits[""], torch.tensor([[1.5, 0.5], [1.0, 0.5]]))


# =========================================================================== a smoke VOC checkpoint
@pytest.fixture(scope="module")
def voc_run(tmp_path_factory) -> dict:
    """A smoke VOC teacher, then a student distilled from it with Grad-CAM++ maps (1 epoch each)."""
    tmp = tmp_path_factory.mktemp("vocrun")
    root = tmp / "voc"
    make_voc_tree(root)
    teacher = tmp / "teacher.ckpt"
    common = ["experiment=smoke_voc", "logger=none", f"data.root={root}", f"teacher.checkpoint={teacher}"]
    proc = run_train([*common, "stage=teacher"], tmp, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_train([*common, "explain=gradcampp", "callbacks.explanation_panel.every_n_epochs=1"], tmp, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (metrics,) = [p for p in (tmp / "logs").rglob("metrics.json") if json.loads(p.read_text())["stage"] == "distill"]
    return {"tmp": tmp, "root": root, "teacher": teacher, "run": metrics.parent}


def _compose(name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return compose(name, overrides=overrides)


@pytest.mark.slow
def test_voc_checkpoint_through_evaluate_visualize_and_the_panel(voc_run, tmp_path):
    from PIL import Image

    from distill.evaluation import evaluate, visualize

    student = voc_run["run"] / "checkpoints" / "last.ckpt"
    cfg = _compose("evaluate", [f"checkpoint={student}", "batch_size=4", f"output_dir={tmp_path}", "device=cpu"])
    result = evaluate(cfg)
    m = result["metrics"]
    assert result["task"] == "multilabel" and m["num_images"] == 8
    assert result["teacher"]["checkpoint"] == str(voc_run["teacher"])
    for key in ("map", "teacher/map"):
        assert 0.0 <= m[key] <= 1.0, key
    for prefix in ("", "teacher/"):
        for key in ("gradcam/average_drop_pct", "gradcampp/increase_in_confidence_pct", "loc00_pct", "loc50_pct",
                    "win_gradcampp_vs_gradcam_pct"):
            assert 0.0 <= m[prefix + key] <= 100.0, prefix + key
    assert 0.0 <= m["agreement_pct"] <= 100.0 and -1e-6 <= m["map_cosine"] <= 1 + 1e-6
    # The same mAP and teacher mAP as the training run's test (separate code: the LightningModule).
    trained = json.loads((voc_run["run"] / "metrics.json").read_text())["metrics"]
    assert m["map"] == pytest.approx(trained["test/map"], abs=1e-5)
    assert m["teacher/map"] == pytest.approx(trained["test/teacher_map"], abs=1e-5)
    assert m["loc50_pct"] == pytest.approx(100 * trained["test/loc50_student"], abs=1e-3)
    assert "Loc % Grad-CAM++ (delta 0.5)" in (tmp_path / "evaluation.md").read_text()

    # visualize.py: one column per positive class and model, with the class names in the titles.
    cfg = _compose("visualize", [f"checkpoint={student}", "indices=[0,1,2]", "cell_px=64", "dpi=64",
                                 f"output_dir={tmp_path}", "device=cpu"])
    png = np.asarray(Image.open(visualize(cfg)).convert("RGB"))
    from distill.data.voc import VOC2007DataModule

    dm = VOC2007DataModule(root=voc_run["root"], download=False, image_size=64, num_workers=0)
    dm.setup("test")
    width = max(int((dm.test_set[i][1] == 1).sum()) for i in range(3))
    assert png.shape == (3 * 64, (1 + 2 * width) * 64, 3) and png.std() > 0

    # The training run's panels (every epoch): multi-label panels were written.
    panels = sorted((voc_run["run"] / "explanations").glob("*.png"))
    assert panels and np.asarray(Image.open(panels[-1])).std() > 0


def test_multilabel_grid_cells_name_the_positive_classes():
    from distill.evaluation.grid import multilabel_cells

    x = torch.rand(2, 3, 4, 4)  # RGB: channels 0 and 1 explain the two classes
    cells = multilabel_cells(identity2(3).eval(), x, torch.tensor([[1, 1], [0, 1]]), class_names=["cat", "dog"],
                             teacher=identity2(3).eval())
    assert [len(r) for r in cells] == [5, 5]  # image | (teacher, student) x 2 positives
    assert cells[0][0].title == "image\ncat, dog" and cells[1][0].title == "image\ndog"
    assert cells[0][1].title.startswith("teacher Grad-CAM++\ncat p=") and "dog" in cells[0][4].title
    assert cells[1][3].title == "" and cells[1][4].title == ""  # image 2 has one positive: blank cells


def test_accumulator_weights_pairs():
    # (1 * 1 + 0.5 * 1) / 3 over two batches; padding (weight 0) is left out. torchmetrics 1.9's
    # MeanMetric(nan_strategy="disable") would give 1.5 / 8 here.
    from distill.evaluation.faithfulness import ScoreAccumulator

    acc = ScoreAccumulator()
    acc.update({"loc": (torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, 0.0, 0.0]))})
    acc.update({"loc": (torch.tensor([0.5, 0.0, 9.0, 9.0]), torch.tensor([1.0, 1.0, 0.0, 0.0]))})
    result = acc.compute()
    assert result["loc_pct"] == pytest.approx(50.0) and result["num_images"] == 8
