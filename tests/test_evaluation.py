"""Faithfulness metrics, agreement, the accumulator, the grid and the multirun summary, in process.

The model-level tests use a tiny "network" whose explained activations are the image itself
(``forward_features = identity``, 2 channels of 2x2 pixels) and whose head is global average
pooling + a hand-set linear layer, so every map, Y and O below is worked out by hand
(Z = 4 pixels, Grad-CAM weights ``W[c] / Z``, Grad-CAM++ ``alpha_k = 1 / (2 + S_k g_k)``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.evaluation import faithfulness as F
from distill.evaluation.grid import explanation_grid, figure_array, save_figure
from distill.evaluation.report import summarize_multirun
from distill.explain import inspect_network, use_general_path
from distill.losses import map_cosine
from tests.support import PooledLinear


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Two shared cores: OpenMP spinning over 2 threads makes small ops ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def image(a0, a1):
    return torch.tensor([a0, a1], dtype=torch.float32)


# Sample 1: A0 = [[4,2],[0,0]], A1 = 0.  Sample 2: A0 = [[4,0],[0,0]], A1 = [[0,0],[0,1]].
BATCH = torch.stack([image([[4, 2], [0, 0]], [[0, 0], [0, 0]]), image([[4, 0], [0, 0]], [[0, 0], [0, 1]])])
# Student: class 0 = mean(A0) + mean(A1), class 1 = constant 1.
STUDENT = ([[1.0, 1.0], [0.0, 0.0]], [0.0, 1.0])


# --------------------------------------------------------------------------- explanation images
def test_explanation_image_in_pixel_space():
    x = torch.tensor([[[[4.0, 2.0], [6.0, 8.0]]]])
    maps = torch.tensor([[[3.0, 1.0], [1.0, 2.0]]])  # min-max -> [[1, 0], [0, 0.5]]
    expected = torch.tensor([[[[4.0, 0.0], [0.0, 4.0]]]])
    assert torch.allclose(F.explanation_images(x, maps), expected)


def test_explanation_image_is_built_from_the_denormalised_image_and_normalised_again():
    pixels = torch.tensor([[0.8, 0.4], [0.2, 0.6]])
    x = torch.stack([(pixels - 0.5) / 0.25, (pixels - 0.2) / 0.5])[None]  # 2 channels, own stats
    maps = torch.tensor([[[3.0, 1.0], [1.0, 2.0]]])  # -> [[1, 0], [0, 0.5]]
    e = F.explanation_images(x, maps, mean=[0.5, 0.2], std=[0.25, 0.5])
    kept = torch.tensor([[0.8, 0.0], [0.0, 0.3]])  # pixels * map: switched-off pixels are black
    assert torch.allclose(e[0, 0], (kept - 0.5) / 0.25, atol=1e-6)
    assert torch.allclose(e[0, 1], (kept - 0.2) / 0.5, atol=1e-6)


def test_constant_map_gives_a_black_image_and_maps_per_target_broadcast():
    x = torch.rand(2, 3, 4, 4)
    maps = torch.zeros(2, 5, 2, 2)
    e = F.explanation_images(x, maps)
    assert e.shape == (2, 5, 3, 4, 4) and torch.count_nonzero(e) == 0
    with pytest.raises(ValueError, match="mean and std"):
        F.explanation_images(x, maps[:, 0], mean=[0.5, 0.5, 0.5])


# --------------------------------------------------------------------------- per-image formulas
def test_average_drop_and_increase_in_confidence_by_hand():
    y = torch.tensor([0.5, 0.8, 0.4, 0.2])
    o = torch.tensor([0.25, 0.9, 0.4, 0.1])
    # drops: 0.25/0.5, 0 (clipped), 0, 0.1/0.2 -> mean 0.25; increases: only the second (strict)
    assert torch.allclose(F.relative_drop(y, o), torch.tensor([0.5, 0.0, 0.0, 0.5]))
    assert F.confidence_increase(y, o).tolist() == [0.0, 1.0, 0.0, 0.0]


def test_wins_two_images_and_ties_count_half():
    a, b = torch.tensor([0.1, 0.3]), torch.tensor([0.2, 0.3])  # A wins image 1, image 2 is a tie
    assert F.wins(a, b).tolist() == [1.0, 0.5]
    assert F.wins(b, a).tolist() == [0.0, 0.5]
    assert F.wins(torch.tensor([0.0, 0.5]), torch.tensor([0.2, 0.1])).tolist() == [1.0, 0.0]


def test_agreement_and_map_cosine_by_hand():
    s = torch.tensor([[5.0, 1, 0], [0, 3, 1], [0, 0, 2], [1, 4, 0]])
    t = torch.tensor([[2.0, 1, 0], [0, 1, 9], [1, 0, 2], [7, 0, 0]])
    assert F.top1_agreement(s, t).tolist() == [1.0, 0.0, 1.0, 0.0]
    s_maps = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    t_maps = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]])
    # an all-zero map has no direction: NaN, never 0 or 1
    assert torch.allclose(map_cosine(s_maps, t_maps), torch.tensor([1 / math.sqrt(2), math.nan]), equal_nan=True)


# --------------------------------------------------------------------------- a tiny model
@pytest.mark.parametrize("path", ["linear", "general"])
def test_faithfulness_of_a_tiny_model_by_hand(path):
    model = PooledLinear(*STUDENT).eval()
    spec = inspect_network(model, BATCH) if path == "linear" else use_general_path(model, BATCH)
    assert spec.path == path  # the closed form and the autograd path give the same hand-worked scores
    scores = F.faithfulness_scores(model, BATCH)
    # Sample 1: logits [1.5, 1], c = 0, Y = sig(0.5). Both maps are proportional to A0:
    # min-max [[1, .5], [0, 0]] -> E0 = [[4, 1], [0, 0]], logits(E) = [1.25, 1], O = sig(0.25).
    # Sample 2: logits [1.25, 1], Y = sig(0.25). Grad-CAM weights [1/4, 1/4] -> map [[1,0],[0,1/4]]:
    # E1 = [[0,0],[0,1/4]], O = sig(1 + 1/16 - 1). Grad-CAM++: g = 1/4, alpha = 1/(2 + S g) = [1/3, 4/9],
    # weights Z alpha g = [1/3, 4/9] -> map [[4/3,0],[0,4/9]] -> [[1,0],[0,1/3]], O = sig(1/12).
    drop1 = 1 - sig(0.25) / sig(0.5)
    drop_gc = 1 - sig(1 / 16) / sig(0.25)
    drop_pp = 1 - sig(1 / 12) / sig(0.25)
    assert scores["gradcam/average_drop"].tolist() == pytest.approx([drop1, drop_gc], abs=1e-6)
    assert scores["gradcampp/average_drop"].tolist() == pytest.approx([drop1, drop_pp], abs=1e-6)
    assert scores["gradcam/increase_in_confidence"].tolist() == [0.0, 0.0]
    assert scores["gradcampp/increase_in_confidence"].tolist() == [0.0, 0.0]
    assert scores["win_gradcampp_vs_gradcam"].tolist() == [0.5, 1.0]  # same maps: a tie; then a win


def test_increase_in_confidence_of_a_tiny_model_by_hand():
    # class 0 = mean(A0) - mean(A1), class 1 = -1; A0 = [[4,0],[0,0]], A1 = [[0,0],[0,4]]:
    # logits [0, -1], Y = sig(1); map = ReLU(A0 - A1)/4 -> [[1,0],[0,0]] removes A1: O = sig(2).
    model = PooledLinear([[1.0, -1.0], [0.0, 0.0]], [0.0, -1.0]).eval()
    x = image([[4, 0], [0, 0]], [[0, 0], [0, 4]])[None]
    scores = F.faithfulness_scores(model, x)
    for method in ("gradcam", "gradcampp"):
        assert scores[f"{method}/increase_in_confidence"].tolist() == [1.0]
        assert scores[f"{method}/average_drop"].tolist() == [0.0]


def test_evaluate_batch_with_a_teacher_by_hand():
    student = PooledLinear(*STUDENT).eval()
    # Teacher: class 0 = mean(A0), class 1 = 1.1: predicts 0 on sample 1 (1.5) and 1 on sample 2 (1.0).
    teacher = PooledLinear([[1.0, 0.0], [0.0, 0.0]], [0.0, 1.1]).eval()
    labels = torch.tensor([0, 1])
    scores = F.evaluate_batch(student, BATCH, labels, teacher=teacher, explain_teacher=True)
    assert scores["accuracy"].tolist() == [1.0, 0.0]  # the student predicts 0 twice
    assert scores["teacher/accuracy"].tolist() == [1.0, 1.0]
    assert scores["agreement"].tolist() == [1.0, 0.0]
    # Label target: sample 1 both maps ~ A0 -> cos 1; sample 2 class 1 has zero weights -> all-zero maps -> NaN.
    assert scores["map_cosine"].tolist() == pytest.approx([1.0, math.nan], abs=1e-6, nan_ok=True)
    acc = F.ScoreAccumulator()
    acc.update({"map_cosine": scores["map_cosine"]})
    assert acc.compute()["map_cosine"] == pytest.approx(1.0)  # the undefined pair is left out of the mean
    assert "teacher/gradcampp/average_drop" in scores
    # Student's top-1 (class 0) on sample 2: student map [[4/3,0],[0,4/9]], teacher [[4/3,0],[0,0]]:
    # cos = (16/9) / (4/3 * sqrt(16/9 + 16/81)) = 3 / sqrt(10).
    scores = F.evaluate_batch(student, BATCH, labels, teacher=teacher, similarity_target="student_pred")
    assert scores["map_cosine"].tolist() == pytest.approx([1.0, 3 / math.sqrt(10)], abs=1e-6)


def test_accumulator_means_over_batches_of_different_sizes():
    acc = F.ScoreAccumulator()
    acc.update({"accuracy": torch.tensor([1.0, 0.0, 1.0]), "map_cosine": torch.tensor([0.5, 0.5, 0.5])})
    acc.update({"accuracy": torch.tensor([0.0]), "map_cosine": torch.tensor([0.9])})
    result = acc.compute()
    assert result == pytest.approx({"accuracy_pct": 50.0, "map_cosine": 0.6, "num_images": 4})


def test_per_batch_path_does_not_synchronise_with_the_host(monkeypatch):
    student, teacher = PooledLinear(*STUDENT).eval(), PooledLinear([[1.0, 0.0], [0.0, 0.0]], [0.0, 1.1]).eval()
    for model in (student, teacher):  # measuring the head (once, when a model is loaded) may synchronise
        inspect_network(model, BATCH)
    acc = F.ScoreAccumulator()

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation in the per-batch path")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    acc.update(F.evaluate_batch(student, BATCH, torch.tensor([0, 1]), teacher=teacher, explain_teacher=True))
    monkeypatch.undo()
    assert acc.compute()["num_images"] == 2


# --------------------------------------------------------------------------- the grid
def test_grid_has_the_expected_pixel_size_and_is_not_blank(tmp_path):
    torch.manual_seed(0)
    student = PooledLinear(torch.randn(4, 3).tolist(), [0.0] * 4).eval()
    teacher = PooledLinear(torch.randn(4, 3).tolist(), [0.0] * 4).eval()
    images, labels = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 2])
    fig = explanation_grid(student, images, labels, mean=[0.5] * 3, std=[0.25] * 3, teacher=teacher,
                           class_names=["a", "b", "c", "d"], cell_px=48, dpi=50)
    path = save_figure(fig, tmp_path / "grid.png")
    from PIL import Image

    png = np.asarray(Image.open(path).convert("RGB"))
    assert png.shape == (3 * 48, 5 * 48, 3)  # 3 images; image + 2 teacher maps + student map + guided
    assert png.std() > 0
    assert figure_array(fig).shape == png.shape
    fig = explanation_grid(student, images[:1], labels[:1], cell_px=48, dpi=50)  # no teacher: 4 columns
    assert figure_array(fig).shape == (48, 4 * 48, 3)


# --------------------------------------------------------------------------- multirun summary
def fake_job(root: Path, num: int, explain: str, seed: int, acc: float, agreement: float, cosine: float) -> None:
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(
        f"- experiment=smoke\n- seed={seed}\n- explain={explain}\n- teacher.checkpoint=/t.ckpt\n")
    metrics = {"test/acc": acc, "test/agreement": agreement, "test/map_cosine": cosine}
    (job / "metrics.json").write_text(json.dumps({"stage": "distill", "metrics": metrics,
                                                  "config": {"seed": seed, "explain": {"name": explain}}}))


def test_summary_mean_and_std_over_seeds_by_hand(tmp_path):
    fake_job(tmp_path, 0, "none", 0, 0.5, 0.8, 0.90)
    fake_job(tmp_path, 1, "gradcampp", 0, 0.6, 0.9, 0.95)
    fake_job(tmp_path, 2, "none", 1, 0.7, 0.6, 0.92)
    fake_job(tmp_path, 3, "gradcampp", 1, 0.6, 0.9, 0.97)
    (tmp_path / "4").mkdir()  # a failed job: left out
    result = summarize_multirun(tmp_path)
    table = Path(result["markdown"]).read_text().split("## Every test metric")[0]  # the headline table
    rows = [line for line in table.splitlines() if line.startswith("| explain=")]
    # none: acc 50, 70 -> 60 +- 14.14 (sample std = 20/sqrt(2)); error 40 +- 14.14; agreement 70 +- 14.14
    assert rows[0].startswith("| explain=none | 2 | 60.00 ± 14.14 | 40.00 ± 14.14 | 70.00 ± 14.14 | 0.9100 ± 0.0141")
    assert rows[1].startswith("| explain=gradcampp | 2 | 60.00 ± 0.00 | 40.00 ± 0.00 | 90.00 ± 0.00 | 0.9600 ± 0.0141")
    assert len(rows) == 2 and Path(result["plot"]).stat().st_size > 0
    summary = json.loads(Path(result["json"]).read_text())
    assert [v["seeds"] for v in summary["variants"]] == [["0", "1"], ["0", "1"]]


def test_summary_marks_jobs_tested_on_part_of_the_test_set(tmp_path):
    fake_job(tmp_path, 0, "none", 0, 0.5, 0.8, 0.9)
    fake_job(tmp_path, 1, "gradcam", 0, 0.25, 0.5, 0.8)
    result = json.loads((tmp_path / "1" / "metrics.json").read_text())
    result["test_images"] = {"used": 256, "of": 10000, "partial": True}
    (tmp_path / "1" / "metrics.json").write_text(json.dumps(result))
    (tmp_path / "0" / "evaluation.json").write_text(json.dumps(
        {"metrics": {"num_images": 512}, "split_size": 10000, "partial": True}))
    table = Path(summarize_multirun(tmp_path)["markdown"]).read_text()
    assert "**Partial test sets**" in table
    assert "- explain=gradcam: seed 0: test: 256 of 10,000 images" in table
    assert "- explain=none: seed 0: evaluate.py: 512 of 10,000 images" in table
    fake_job(tmp_path / "whole", 0, "none", 0, 0.5, 0.8, 0.9)
    fake_job(tmp_path / "whole", 1, "gradcam", 0, 0.25, 0.5, 0.8)
    assert "Partial" not in Path(summarize_multirun(tmp_path / "whole")["markdown"]).read_text()


def test_summary_lists_runs_flagged_at_chance_level(tmp_path):
    fake_job(tmp_path, 0, "none", 0, 0.5, 0.8, 0.9)
    fake_job(tmp_path, 1, "gradcam", 0, 0.09, 0.5, 0.8)
    result = json.loads((tmp_path / "1" / "metrics.json").read_text())
    result["flags"] = ["student at chance level: 9.00 % on 64 images"]
    (tmp_path / "1" / "metrics.json").write_text(json.dumps(result))
    table = Path(summarize_multirun(tmp_path)["markdown"]).read_text()
    assert "**Flagged runs**" in table and "- explain=gradcam: seed 0: student at chance level: 9.00 %" in table
    assert "explain=none: seed" not in table


def test_seed_tables_give_every_test_metric_of_both_checkpoints_in_markdown_csv_and_latex(tmp_path):
    import csv

    for num, (seed, acc, best_acc, conflict) in enumerate([(0, 0.5, 0.6, 0.1), (1, 0.7, 0.8, 0.3), (2, 0.6, 0.7, 0.2)]):
        fake_job(tmp_path, num, "gradcampp", seed, acc, 0.8, 0.9)
        result = json.loads((tmp_path / str(num) / "metrics.json").read_text())
        result["metrics"].update({"test_best/acc": best_acc, "test/conflict_acc": conflict, "test/num_images": 64})
        (tmp_path / str(num) / "metrics.json").write_text(json.dumps(result))
    result = summarize_multirun(tmp_path)
    # acc over seeds: 50, 70, 60 -> mean 60, sample std 10; best: 60, 80, 70 -> 70 +- 10; conflict 20 +- 10
    table = Path(result["markdown"]).read_text()
    last, best = table.split("## Every test metric, final weights")[1].split("## Every test metric, best checkpoint")
    assert "| all runs | 3 | 60.00 ± 10.00 |" in last and "conflict_acc %" in last and "20.00 ± 10.00" in last
    assert "| all runs | 3 | 70.00 ± 10.00 |" in best and "num_images" not in table
    rows = list(csv.DictReader(Path(result["csv"]).open()))
    best_acc = next(r for r in rows if r["checkpoint"] == "best" and r["metric"] == "acc %")
    assert float(best_acc["mean"]) == pytest.approx(70.0) and float(best_acc["std"]) == pytest.approx(10.0)
    assert best_acc["seeds"] == "3"
    latex = Path(result["latex"]).read_text()
    assert latex.count("\\begin{tabular}") == 2 and "60.00 $\\pm$ 10.00" in latex and "conflict\\_acc \\%" in latex


def test_summary_of_one_seed_shows_the_mean_only(tmp_path):
    fake_job(tmp_path, 0, "none", 0, 0.5, 0.8, 0.9)
    fake_job(tmp_path, 1, "gradcam", 0, 0.25, 0.5, 0.8)
    table = Path(summarize_multirun(tmp_path, tmp_path / "out" / "table")["markdown"]).read_text()
    assert "| explain=gradcam | 1 | 25.00 | 75.00 | 50.00 | 0.8000 |" in table


def separate_run(root: Path, name: str, overrides: list[str], config: dict, cosine: float | None) -> None:
    """A single run's folder as train.py leaves it (not a multirun job)."""
    (root / name / ".hydra").mkdir(parents=True)
    (root / name / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    metrics = {"test/acc": 0.5, "test/agreement": 0.8, **({"test/map_cosine": cosine} if cosine is not None else {})}
    (root / name / "metrics.json").write_text(json.dumps({"stage": "distill", "metrics": metrics,
                                                           "config": {"seed": 0, **config}}))


def test_summary_of_separate_runs_names_only_what_each_run_set(tmp_path):
    wrn = {"student": {"name": "wrn16_2"}, "teacher": {"name": "wrn40_2"}}
    timm = {"student": {"name": "timm", "arch": "mobilenetv3_small_050"}, "teacher": {"name": "wrn40_2"}}
    separate_run(tmp_path, "a", [], wrn, 0.92)
    separate_run(tmp_path, "b", ["student=timm", "student.arch=mobilenetv3_small_050"], timm, 0.95)
    separate_run(tmp_path, "c", ["explain=gradcampp"], wrn, None)
    result = summarize_multirun(tmp_path)
    variants = [s.variant for s in result["summaries"]]
    assert variants == ["default", "student=timm-mobilenetv3_small_050", "explain=gradcampp"]
    assert "None" not in Path(result["markdown"]).read_text()


def test_summary_plot_labels_do_not_overlap_and_the_cosine_axis_shows_the_difference(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from distill.evaluation.report import collect_runs, summarize_runs, summary_figure

    for i in range(6):
        separate_run(tmp_path, f"r{i}", [f"explain=gradcampp loss.explain={i} kd=hinton trainer.max_epochs=200"],
                     {"student": {"name": "wrn16_2"}}, None if i == 5 else 0.92 + 0.01 * (i % 4))
    fig = summary_figure(summarize_runs(collect_runs(tmp_path)))
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    cosine = next(ax for ax in fig.axes if ax.get_title() == "map cosine")
    low, high = cosine.get_xlim()
    assert 0.85 < low < 0.92 and 0.95 < high <= 1.0  # not from 0: 0.92 and 0.95 are visibly apart
    assert [t.get_text() for t in cosine.texts] == ["no value"]  # the run without a map cosine says so
    def drawn(ax, axis):  # matplotlib keeps labels of ticks outside the view: those are not drawn
        low, high = sorted(ax.get_xlim() if axis == "x" else ax.get_ylim())
        ticks = (ax.xaxis if axis == "x" else ax.yaxis).get_major_ticks()
        return [t.label1 for t in ticks
                if t.label1.get_visible() and t.label1.get_text() and low <= t.get_loc() <= high]

    boxes = [label.get_window_extent(renderer) for ax in fig.axes for axis in "xy" for label in drawn(ax, axis)]
    assert len(boxes) > 12
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (a, b)
