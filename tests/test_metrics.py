"""The VOC mAP (distill.metrics): area and 11-point AP against scikit-learn, the VOC devkit's loop
and hand-worked cases, with difficult (-1) entries ignored."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from distill.metrics import MultilabelMeanAP, average_precision_11point


def _sklearn_ap(scores: np.ndarray, target: np.ndarray) -> list[float]:
    out = []
    for c in range(target.shape[1]):
        keep = target[:, c] >= 0
        out.append(average_precision_score(target[keep, c], scores[keep, c]))
    return out


def _area_ap(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The area AP of one class ``(N,)`` as the training metric computes it."""
    metric = MultilabelMeanAP(2)  # torchmetrics needs two labels: the class twice
    metric.update(torch.stack([scores, scores], 1), torch.stack([target, target], 1))
    return metric.per_class()[0]


def test_map_matches_sklearn_ignoring_difficult():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(60, 20, generator=g)
    target = torch.randint(0, 2, (60, 20), generator=g)
    target[torch.rand(60, 20, generator=g) < 0.15] = -1
    target[0] = 1  # every class has a positive
    metric = MultilabelMeanAP(20)
    for chunk in range(3):  # several batches, as in an epoch
        metric.update(logits[20 * chunk : 20 * chunk + 20], target[20 * chunk : 20 * chunk + 20])
    expected = _sklearn_ap(logits.numpy(), target.numpy())
    assert np.allclose(metric.per_class().numpy(), expected, atol=1e-6)
    assert metric.compute().item() == pytest.approx(np.mean(expected), abs=1e-6)
    # the ignored entries matter: counting them as negatives changes the result
    assert not np.isclose(np.mean(_sklearn_ap(logits.numpy(), target.clamp_min(0).numpy())), np.mean(expected))


def test_map_leaves_out_classes_without_positives():
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.3]])
    target = torch.tensor([[1, 0], [0, 0], [0, -1]])
    metric = MultilabelMeanAP(2)
    metric.update(scores, target)
    assert metric.compute().item() == pytest.approx(1.0)  # class 0 only: AP 1


def test_11point_ap_hand_worked():
    # ranked: tp(P1,R1/3) fp tp(P2/3,R2/3) ignored fp tp(P3/5,R1)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    target = torch.tensor([1, 0, 1, -1, 0, 1])
    # t = 0..0.3: max P = 1; t = 0.4..0.6: 2/3; t = 0.7..1.0: 3/5  ->  (4 + 3 * 2/3 + 4 * 0.6) / 11
    assert average_precision_11point(scores, target).item() == pytest.approx(8.4 / 11, abs=1e-12)
    # non-interpolated: (1 + 2/3 + 3/5) / 3, = sklearn's once the ignored image is dropped
    assert _area_ap(scores, target).item() == pytest.approx((1 + 2 / 3 + 0.6) / 3, abs=1e-6)  # torchmetrics: float32
    keep = target >= 0
    assert _area_ap(scores, target).item() == pytest.approx(
        average_precision_score(target[keep].numpy(), scores[keep].numpy()))
    metric = MultilabelMeanAP(2, interpolation="11point")  # class 1: no positive, left out
    metric.update(torch.stack([scores, scores], 1), torch.stack([target, torch.zeros_like(target)], 1))
    assert metric.compute().item() == pytest.approx(8.4 / 11, abs=1e-6)


def _voc07_reference(scores: np.ndarray, target: np.ndarray) -> float:
    """The VOC devkit's loop (VOCevalcls.m), with thresholds k/10."""
    order = np.argsort(-scores, kind="stable")
    gt = target[order]
    tp, fp = np.cumsum(gt == 1), np.cumsum(gt == 0)
    rec = tp / (target == 1).sum()
    prec = tp / np.maximum(tp + fp, np.finfo(float).tiny)
    ap = 0.0
    for k in range(11):
        reached = prec[rec >= k / 10]
        ap += (reached.max() if reached.size else 0.0) / 11
    return ap


def test_11point_ap_matches_the_devkit_loop_on_random_data():
    rng = np.random.default_rng(5)
    scores = rng.random((200, 20))
    target = rng.integers(0, 2, (200, 20)) * (rng.random((200, 20)) < 0.3)
    target[rng.random((200, 20)) < 0.1] = -1
    target[0] = 1
    got = average_precision_11point(torch.from_numpy(scores), torch.from_numpy(target)).numpy()
    expected = [_voc07_reference(scores[:, c], target[:, c]) for c in range(20)]
    assert np.allclose(got, expected, atol=1e-12)


def test_tied_scores_form_one_point():
    scores = torch.tensor([0.5, 0.5, 0.1])
    target = torch.tensor([0, 1, 1])
    expected = average_precision_score(target.numpy(), scores.numpy())  # sklearn groups ties too
    assert _area_ap(scores, target).item() == pytest.approx(expected)
    # 11-point: the tie is one point (P 1/2, R 1/2), then (P 2/3, R 1) -> all thresholds 2/3
    assert average_precision_11point(scores, target).item() == pytest.approx(2 / 3)


def test_above_chance_is_three_binomial_standard_errors_above_one_over_c():
    from distill.metrics import above_chance, chance_flags

    # p = 1/10, n = 100: standard error sqrt(0.1 * 0.9 / 100) = 0.03, threshold 0.1 + 3 * 0.03 = 0.19
    assert not above_chance(0.19, 100, 10) and above_chance(0.1901, 100, 10)
    # a 9.38 % student on 64 images of 10 classes (a smoke run) is at chance; 18.8 % on 1,000 is not
    assert not above_chance(0.0938, 64, 10) and above_chance(0.188, 1000, 10)
    flags = chance_flags({"test/acc": 0.0938, "test/teacher_acc": 0.9, "test/num_images": 64}, 10)
    assert len(flags) == 1 and flags[0].startswith("student at chance level: 9.38 % on 64 images")
    assert chance_flags({"test/acc": 0.0938, "test/num_images": 64}, None) == []  # multi-label: no 1/C chance
