"""Maps too small to mean anything (distill.explain.resolution): the minimum grid, train.py's
statement and refusal before any training, and every map metric left out with its reason; timm's
``output_stride`` and torchvision's ``replace_stride_with_dilation`` that give ImageNet-style
networks a real map at CIFAR size."""

from __future__ import annotations

import logging
import math
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distill import build
from distill.errors import ConfigError
from distill.explain import MIN_MAP_GRID, inspect_network, map_grid, map_metrics_missing, meaningful_grid
from distill.explain.resolution import missing_cell, missing_for
from distill.losses import map_cosine
from distill.losses.explain import cosine_weights
from distill.models import build_model
from distill.models.adapters import OUTPUT_STRIDE_FAMILIES


class PooledTo1x1(nn.Module):
    """A contract network whose explained layer is already pooled to 1 x 1 (like a stride-32
    ResNet at 32 pixels): ``forward_features`` ``(B, 3, H, W) -> (B, 4, 1, 1)``."""

    num_classes = 10

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward_features(self, x):
        return torch.relu(self.conv(x)).mean(dim=(2, 3), keepdim=True)

    def forward_head(self, a):
        return self.fc(a.mean(dim=(2, 3)))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


# --------------------------------------------------------------------------- the guard
def test_the_minimum_grid_and_the_reasons():
    assert MIN_MAP_GRID == 2
    assert meaningful_grid((2, 2)) and meaningful_grid((8, 8))
    assert not meaningful_grid((1, 1)) and not meaningful_grid((1, 8))  # the smaller side counts
    grids = {"teacher wrn40_2": (8, 8), "student timm-resnet18": (1, 1)}
    reason = map_metrics_missing(grids)
    assert reason == "student timm-resnet18 explains a 1x1 map"
    assert map_metrics_missing({"teacher wrn40_2": (8, 8), "student x": (2, 2), "model y": None}) is None
    both = map_metrics_missing({"teacher t": (1, 1), "student s": (1, 2)})
    assert both == "teacher t explains a 1x1 map; student s explains a 1x2 map"
    assert missing_for(both, ("teacher",)) == "teacher t explains a 1x1 map"
    assert missing_for(reason, ("teacher",)) is None
    assert missing_cell(reason) == "n/a (1x1 map)"


def test_a_1x1_map_is_why_the_minimum_is_2():
    """At 1 x 1 any two non-zero maps have cosine exactly 1, whatever the networks look at; at 2 x 2
    two maps that point at different quadrants have cosine 0 (hand-worked)."""
    s, t = torch.rand(5, 1, 1) + 0.1, torch.rand(5, 1, 1) + 0.1
    assert torch.allclose(map_cosine(s, t), torch.ones(5))
    left, right = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]), torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])
    assert map_cosine(left, right).item() == 0.0


def test_an_all_zero_map_has_no_cosine_and_is_left_out_of_the_mean():
    s = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]], [[3.0, 4.0], [0.0, 0.0]]])
    t = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[5.0, 5.0], [5.0, 5.0]], [[0.0, 0.0], [0.0, 0.0]]])
    cosine = map_cosine(s, t)
    assert cosine[0].item() == pytest.approx(1 / math.sqrt(2)) and cosine[1:].isnan().all()
    values, weights = cosine_weights(cosine, torch.tensor([True, True, True]))
    assert weights.tolist() == [1.0, 0.0, 0.0] and not values.isnan().any()
    assert float((values * weights).sum() / weights.sum()) == pytest.approx(1 / math.sqrt(2))  # not 1, not 0


def test_inspect_network_records_the_grid_at_the_image_size():
    """A stride-32 ResNet-18 explains 32/32 = 1 cell per side at 32 pixels, 64/32 = 2 at 64, and with
    output_stride=8 32/8 = 4."""
    torch.manual_seed(0)
    model = build_model("timm", 10, arch="resnet18")
    inspect_network(model, torch.randn(2, 3, 32, 32))
    assert map_grid(model) == (1, 1)
    inspect_network(model, torch.randn(2, 3, 64, 64))
    assert map_grid(model) == (2, 2)
    dilated = build_model("timm", 10, arch="resnet18", output_stride=8)
    inspect_network(dilated, torch.randn(2, 3, 32, 32))
    assert map_grid(dilated) == (4, 4)


# --------------------------------------------------------------------------- output_stride / dilation
@pytest.mark.parametrize("arch", ["resnet18", "resnext26ts", "convnext_atto", "efficientnet_b0", "mobilenetv2_050",
                                  "regnetx_002", "cspresnet50", "repvgg_a0", "rexnet_100"])
def test_timm_families_that_take_output_stride(arch):
    assert any(family in arch or (family == "cspnet" and arch.startswith("csp")) for family in OUTPUT_STRIDE_FAMILIES)
    with torch.device("meta"):  # shapes only: the stem and stages of stride 8 leave 32 / 8 = 4 cells
        model = build_model("timm", 10, arch=arch, output_stride=8).eval()
        assert model.forward_features(torch.empty(1, 3, 32, 32)).shape[-2:] == (4, 4)


@pytest.mark.parametrize(("name", "options", "message"), [
    ("timm", {"arch": "mobilenetv3_small_050", "output_stride": 8}, "does not support output_stride=8"),
    ("timm", {"arch": "vgg11", "output_stride": 16}, "does not support output_stride=16"),
    ("timm", {"arch": "resnet18", "output_stride": 12}, "output_stride=12 for timm model resnet18: use one of"),
    ("torchvision", {"arch": "resnet18", "replace_stride_with_dilation": [False, True, True]},
     "resnet18 / resnet34 refuse dilation"),
    ("torchvision", {"arch": "mobilenet_v3_small", "replace_stride_with_dilation": [False, True, True]},
     "not of mobilenet_v3_small"),
    ("torchvision", {"arch": "resnet50", "replace_stride_with_dilation": [True]}, "give three booleans"),
])
def test_unsupported_stride_options_are_one_line(name, options, message):
    with pytest.raises(ConfigError, match=message) as info, torch.device("meta"):
        build_model(name, 10, **options)
    assert "\n" not in str(info.value)


def test_torchvision_resnet50_dilated_explains_4x4_at_32_pixels():
    with torch.device("meta"):
        model = build_model("torchvision", 10, arch="resnet50", replace_stride_with_dilation=[False, True, True]).eval()
        assert model.forward_features(torch.empty(1, 3, 32, 32)).shape[-2:] == (4, 4)
        plain = build_model("torchvision", 10, arch="resnet50").eval()
        assert plain.forward_features(torch.empty(1, 3, 32, 32)).shape[-2:] == (1, 1)


# --------------------------------------------------------------------------- before any training
def _networks(cfg):
    return (build.check_contract(cfg, "teacher", build.network(cfg, "teacher")),
            build.check_contract(cfg, "student", build.network(cfg, "student")))


def test_an_explanation_loss_on_a_1x1_map_stops_in_one_line(smoke_cfg):
    cfg = smoke_cfg("explain=gradcampp", "student=timm", "student.arch=resnet18", "data.image_size=32")
    with pytest.raises(ConfigError) as info:
        build.map_grids(cfg, *_networks(cfg))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("student timm-resnet18 explains a 1x1 map at 32x32 pixels, below the 2x2 minimum")
    for fix in ("student.output_stride=8", "student.replace_stride_with_dilation", "data.image_size",
                "student.layer=", "student=wrn16_2"):
        assert fix in message


def test_grids_are_stated_and_a_kd_only_run_goes_on_with_the_reason(smoke_cfg, caplog):
    cfg = smoke_cfg("kd=hinton", "explain=none", "student=timm", "student.arch=resnet18", "data.image_size=32")
    with caplog.at_level(logging.INFO, logger="distill"):
        missing = build.map_grids(cfg, *_networks(cfg))
    assert missing == "student timm-resnet18 explains a 1x1 map"
    assert "explained map grids at 32x32 pixels: teacher wrn16_2: 8x8, student timm-resnet18: 1x1" in caplog.text
    cfg = smoke_cfg("explain=gradcampp", "student=timm", "student.arch=resnet18", "student.output_stride=8",
                    "data.image_size=32")
    assert build.map_grids(cfg, *_networks(cfg)) is None  # 4x4: the explanation loss may run


# --------------------------------------------------------------------------- no number on such maps
def test_val_map_cosine_is_left_out_for_a_1x1_student(tmp_path):
    from distill.module import DistillModule, ExplainSettings, LossWeights

    torch.manual_seed(0)
    module = DistillModule(PooledTo1x1(), build_model("wrn16_1", 10), optimizer=partial(torch.optim.SGD, lr=0.1),
                           weights=LossWeights(kd=1.0), explain=ExplainSettings())
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, inference_mode=False)
    (got,) = trainer.validate(module, DataLoader(TensorDataset(x, y), batch_size=8), verbose=False)
    assert "val/map_cosine" not in got and "val/agreement" in got
    assert module.map_metrics_missing == "student PooledTo1x1 explains a 1x1 map"
    explaining = DistillModule(PooledTo1x1(), build_model("wrn16_1", 10), optimizer=partial(torch.optim.SGD, lr=0.1),
                               weights=LossWeights(explain=1.0), explain=ExplainSettings(method="gradcampp"))
    with pytest.raises(ConfigError, match="student PooledTo1x1 explains a 1x1 map"):  # the module on its own too
        explaining.loss_terms(x, y)


def test_reports_say_why_a_map_metric_is_missing():
    from distill.console import metrics_table
    from distill.evaluation.report import evaluation_markdown, summarize_runs, summary_markdown
    from distill.evaluation.runner import without_map_metrics

    reason = "student timm-resnet18 explains a 1x1 map"
    result = {"stage": "distill", "map_metrics_missing": reason,
              "config": {"teacher": {"name": "wrn40_2"}, "student": {"name": "timm", "arch": "resnet18"}},
              "metrics": {"test/acc": 0.5, "test/teacher_acc": 0.9, "test/agreement": 0.4}}
    table = "\n".join(metrics_table(result))
    assert "student timm-resnet18" in table and table.splitlines()[-1].endswith("n/a (1x1 map)")

    computed = {"accuracy_pct": 50.0, "agreement_pct": 40.0, "map_cosine": 1.0, "num_images": 4,
                "gradcampp/average_drop_pct": 3.0, "win_gradcampp_vs_gradcam_pct": 50.0,
                "pointing_game_2x2/gradcampp_pct": 25.0, "teacher/accuracy_pct": 90.0,
                "teacher/gradcampp/average_drop_pct": 7.0, "teacher/pointing_game_2x2/gradcampp_pct": 60.0}
    kept = without_map_metrics(computed, reason)
    assert kept == {"accuracy_pct": 50.0, "agreement_pct": 40.0, "num_images": 4, "teacher/accuracy_pct": 90.0,
                    "teacher/gradcampp/average_drop_pct": 7.0, "teacher/pointing_game_2x2/gradcampp_pct": 60.0}
    assert without_map_metrics(computed, None) == computed
    evaluation = {"checkpoint": "s.ckpt", "model": {"name": "timm", "stage": "distill"},
                  "teacher": {"name": "wrn40_2", "checkpoint": "t.ckpt"}, "data": "cifar10", "split": "test",
                  "similarity_target": "label", "map_metrics_missing": reason, "metrics": kept,
                  "pointing_game": {"grid": 2, "num_grids": 4, "methods": ["gradcampp"]}}
    markdown = evaluation_markdown(evaluation)
    student_row = next(line for line in markdown.splitlines() if line.startswith("| student timm"))
    assert student_row.count("n/a (1x1 map)") == 5  # Avg Drop / Incr. Conf. of both methods, Win
    teacher_row = next(line for line in markdown.splitlines() if line.startswith("| teacher wrn40_2"))
    assert "7.00" in teacher_row and "n/a" not in teacher_row
    assert "| map cosine (Grad-CAM++, class: label) | n/a (1x1 map) |" in markdown
    assert "| Grad-CAM++ | n/a (1x1 map) | 60.00 |" in markdown  # pointing game: student n/a, teacher scored
    assert f"Map metrics missing: {reason}" in markdown

    from distill.evaluation.report import Run

    runs = [Run(job_dir=None, seed=0, settings={"kd": "hinton"}, metrics={"test/acc": 0.5}, missing=reason)]
    summary = summary_markdown(summarize_runs(runs), "root")
    assert "| n/a (1x1 map) |" in summary and f"- all runs: {reason}" in summary


def test_panels_show_no_map_of_a_1x1_network():
    from distill.evaluation.grid import explanation_cells, multilabel_cells

    torch.manual_seed(0)
    student, teacher = PooledTo1x1().eval(), build_model("wrn16_1", 10).eval()
    inspect_network(teacher, torch.randn(2, 3, 32, 32))
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    rows = explanation_cells(student, x, y, teacher=teacher)
    titles = [cell.title for cell in rows[0]]
    assert [t.endswith("n/a (1x1 map)") for t in titles] == [False, False, False, True, True]
    assert (rows[0][3].image == 255).all()  # blank, not a one-colour map
    labels = torch.tensor([[1, 0, 1, 0, 0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0, 0, 0, 0]])
    cells = multilabel_cells(student, x, labels, teacher=teacher)[0]
    assert [c.title.endswith("n/a (1x1 map)") for c in cells[1:]] == [False, True, False, True]


def test_bench_output_stride_prints_the_cost(capsys):
    """ResNet-18 at 32 px: output_stride 8 runs layer3 on 4x and layer4 on 16x the positions, so it
    costs several times the FLOPs (the stem and layer1-2 are unchanged)."""
    import re
    import sys

    sys.path.insert(0, str(__import__("tests.support").support.REPO / "scripts"))
    from bench_output_stride import main

    assert main(["--steps", "1", "--batch-size", "2"]) > 0
    out = capsys.readouterr().out
    assert "output_stride 32: 1x1 map" in out and "output_stride  8: 4x4 map" in out
    flop_ratio = float(re.search(r"FLOP ratio: ([\d.]+)", out).group(1))
    assert 3.0 < flop_ratio < 16.0
