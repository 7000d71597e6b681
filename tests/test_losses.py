"""Distillation losses (docs/method.md §3) against independent references.

Every expected value here comes from a hand-worked tiny case or a float64 numpy formula
written in this file; no test compares the library with itself. The only torch op used as
a reference is ``F.interpolate`` for bilinear upsampling (the resize convention of docs/method.md §3);
bilinear *downsampling* by exactly 2 is checked against a numpy 2x2 average instead.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.losses import (
    DISTANCES,
    MAP_NORM_EPS,
    attention_map,
    attention_transfer,
    class_activation_maps,
    class_attention_transfer,
    decoupled_kd,
    explain_loss,
    hinton_kd,
    map_cosine,
    masked_bce,
    multilabel_kd,
    standardize_logits,
)

KINDS = ("squared_l2", "normalized_squared_l2", "cosine")


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.float64).numpy()


def _rng(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# =========================================================================== Hinton KD
def _np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _np_kd(zs: np.ndarray, zt: np.ndarray, temp: float) -> float:
    """``T^2 * mean_b sum_c p_T (log p_T - log p_S)`` with ``p = softmax(z / T)``."""
    log_ps = _np_log_softmax(zs / temp)
    log_pt = _np_log_softmax(zt / temp)
    return float(temp**2 * (np.exp(log_pt) * (log_pt - log_ps)).sum(axis=1).mean())


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0, 7.5])
def test_hinton_kd_matches_numpy_float64(temp):
    g = _rng(1)
    zs = 3 * torch.randn(3, 5, generator=g)
    zt = 3 * torch.randn(3, 5, generator=g)
    got = hinton_kd(zs, zt, temp)
    assert got.shape == ()
    assert got.item() == pytest.approx(_np_kd(_np(zs), _np(zt), temp), rel=1e-5, abs=1e-7)


def test_hinton_kd_hand_worked():
    # T = 1: p_T = softmax([0, ln 3]) = [1/4, 3/4], p_S = softmax([0, 0]) = [1/2, 1/2].
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    zs = torch.zeros(1, 2)
    got = hinton_kd(zs, torch.tensor([[0.0, math.log(3.0)]]), 1.0)
    assert got.item() == pytest.approx(kl, rel=1e-6)
    # T = 2 with logits doubled: same distributions, so the loss is exactly T^2 = 4 times larger.
    got2 = hinton_kd(zs, torch.tensor([[0.0, 2 * math.log(3.0)]]), 2.0)
    assert got2.item() == pytest.approx(4 * kl, rel=1e-6)
    # Batch mean, not sum: a second, identical-distribution row (p_S = p_T) halves the loss.
    zs2 = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    two = hinton_kd(zs2, torch.tensor([[0.0, math.log(3.0)], [5.0, 6.0]]), 1.0)
    assert two.item() == pytest.approx(kl / 2, rel=1e-6)


def test_hinton_kd_zero_for_equal_logits():
    z = 4 * torch.randn(4, 10, generator=_rng(2))
    assert hinton_kd(z, z.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    # Softmax is shift-invariant: a per-row constant offset is still the same distribution.
    shifted = z + torch.arange(4.0)[:, None] * 3
    assert hinton_kd(shifted, z, 4.0).item() == pytest.approx(0.0, abs=1e-5)
    # ... but different logits do give a positive loss.
    assert hinton_kd(z.flip(1), z, 4.0).item() > 1e-3


def test_hinton_kd_decreases_toward_teacher():
    g = _rng(3)
    zs = 2 * torch.randn(2, 6, generator=g)
    zt = 2 * torch.randn(2, 6, generator=g)
    s = zs.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(hinton_kd(s, zt, 4.0), s)
    # Directional derivative toward the teacher is negative ...
    assert (grad * (zt - zs)).sum().item() < 0
    # ... and matches a float64 central finite difference of the numpy reference.
    d, h = _np(zt - zs), 1e-4
    fd = (_np_kd(_np(zs) + h * d, _np(zt), 4.0) - _np_kd(_np(zs) - h * d, _np(zt), 4.0)) / (2 * h)
    assert (grad.double().numpy() * d).sum() == pytest.approx(fd, rel=1e-3)
    # Along the straight line to the teacher the loss is convex with minimum 0 at lambda = 1,
    # hence strictly decreasing on [0, 1].
    values = [hinton_kd(zs + lam * (zt - zs), zt, 4.0).item() for lam in np.linspace(0, 1, 6)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))
    assert values[-1] == pytest.approx(0.0, abs=1e-6)
    # One gradient step lowers the loss.
    assert hinton_kd(zs - 0.5 * grad, zt, 4.0).item() < hinton_kd(zs, zt, 4.0).item()


def test_hinton_kd_temperature_scaling():
    g = _rng(4)
    zs = torch.randn(3, 5, generator=g)
    zt = torch.randn(3, 5, generator=g)
    # The T^2 factor keeps the loss O(1) at high temperature: with p = (1 + z/T - mean)/C to
    # first order, T^2 * KL -> mean_b sum_c (centred (z_S - z_T))_c^2 / (2C)  (Hinton 2015).
    d = _np(zs - zt)
    d = d - d.mean(axis=1, keepdims=True)
    limit = float((d**2).sum(axis=1).mean() / (2 * d.shape[1]))
    assert hinton_kd(zs, zt, 200.0).item() == pytest.approx(limit, rel=1e-2)
    # Without the T^2 factor the loss would shrink like 1/T^2; check the ratio between T's.
    ratio = hinton_kd(zs, zt, 100.0).item() / hinton_kd(zs, zt, 200.0).item()
    assert ratio == pytest.approx(1.0, rel=2e-2)
    # Gradients also stay O(1) (not O(1/T)).
    s = zs.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(hinton_kd(s, zt, 200.0), s)
    np.testing.assert_allclose(grad.double().numpy(), d / (d.shape[1] * d.shape[0]), rtol=2e-2,
                               atol=1e-4)


# =========================================================================== attention transfer
def _np_attention(feat: np.ndarray) -> np.ndarray:
    """``normalize(mean_k A_k^2)`` flattened, in float64."""
    a = (feat**2).mean(axis=1).reshape(feat.shape[0], -1)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def _np_at(student: list[np.ndarray], teacher: list[np.ndarray]) -> float:
    return float(sum(((_np_attention(s) - _np_attention(t)) ** 2).mean()
                     for s, t in zip(student, teacher, strict=True)))


def _np_avg2(x: np.ndarray) -> np.ndarray:
    """2x2 mean pooling, which equals bilinear downsampling by exactly 2 (align_corners=False)."""
    *lead, h, w = x.shape
    return x.reshape(*lead, h // 2, 2, w // 2, 2).mean(axis=(-3, -1))


def test_attention_map_hand_worked():
    # Channels [[1, 2]] and [[3, 0]]: mean of squares = [(1 + 9)/2, (4 + 0)/2] = [5, 2].
    feat = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])
    expected = np.array([[5.0, 2.0]]) / math.sqrt(29.0)
    np.testing.assert_allclose(_np(attention_map(feat)), expected, rtol=1e-6)


def test_attention_map_matches_numpy():
    feat = torch.randn(2, 5, 3, 4, generator=_rng(5))
    got = attention_map(feat)
    assert got.shape == (2, 12)
    np.testing.assert_allclose(_np(got), _np_attention(_np(feat)), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(_np(got), axis=1), 1.0, rtol=1e-6)
    # Channel count does not matter, and neither does the features' scale.
    np.testing.assert_allclose(_np(attention_map(7 * feat)), _np(got), rtol=1e-5, atol=1e-7)


def test_attention_transfer_matches_numpy():
    g = _rng(6)
    # Different channel counts between student and teacher; same spatial sizes.
    student = [torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 5, 2, 2, generator=g)]
    teacher = [torch.randn(2, 6, 4, 4, generator=g), torch.randn(2, 7, 2, 2, generator=g)]
    got = attention_transfer(student, teacher)
    assert got.shape == ()
    expected = _np_at([_np(s) for s in student], [_np(t) for t in teacher])
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # Single group, hand-worked: a_S = [1, 0], a_T = [0, 1] -> mean((1, 1)) = 1.
    s = torch.tensor([[[[1.0, 0.0]]]])
    t = torch.tensor([[[[0.0, 2.0]]]])
    assert attention_transfer([s], [t]).item() == pytest.approx(1.0, rel=1e-6)
    assert attention_transfer(teacher, [x.clone() for x in teacher]).item() == pytest.approx(
        0.0, abs=1e-7
    )


def test_attention_transfer_pairs_stages_by_resolution():
    g = _rng(7)
    # Student: 8x8, 4x4, 4x4 (the last 4x4 counts), 2x2; teacher: 4x4 and 8x8, no 2x2.
    student = [torch.randn(2, c, n, n, generator=g) for c, n in ((3, 8), (4, 4), (5, 4), (2, 2))]
    teacher = [torch.randn(2, 6, 4, 4, generator=g), torch.randn(2, 7, 8, 8, generator=g)]
    got = attention_transfer(student, teacher)
    expected = _np_at([_np(student[2]), _np(student[0])], [_np(t) for t in teacher])
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # The gradient reaches the matched student stage only.
    s = student[2].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(attention_transfer([student[0], s], teacher), s)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_attention_transfer_without_a_shared_resolution():
    x, y = torch.randn(2, 3, 4, 4, generator=_rng(8)), torch.randn(2, 3, 2, 2, generator=_rng(9))
    with pytest.raises(ValueError, match="no stage resolution shared"):
        attention_transfer([x], [y])


# =========================================================================== explanation loss
def _np_explain(s: np.ndarray, t: np.ndarray, kind: str, mask: np.ndarray | None = None) -> float:
    s = s.reshape(*s.shape[:-2], -1)
    t = t.reshape(*t.shape[:-2], -1)
    if kind == "squared_l2":
        per = ((s - t) ** 2).sum(-1)
    else:
        ns = np.linalg.norm(s, axis=-1, keepdims=True)
        nt = np.linalg.norm(t, axis=-1, keepdims=True)
        su, tu = s / np.maximum(ns, 1e-12), t / np.maximum(nt, 1e-12)
        per = ((su - tu) ** 2).sum(-1) if kind == "normalized_squared_l2" else 1 - (su * tu).sum(-1)
    if mask is None:
        return float(per.mean())
    return float((per * mask).sum() / mask.sum())


# Two 2x2 map pairs, worked by hand:
#   map 0: S = [[3, 0], [0, 4]] (unit [.6, 0, 0, .8]), T = [[0, 0], [0, 2]] (unit [0, 0, 0, 1]);
#          squared_l2 = 9 + 0 + 0 + 4 = 13, normalized_squared_l2 = .36 + .04 = .4, cos = .8;
#   map 1: S = [[1, 1], [1, 1]] (unit [.5]*4), T = [[2, 0], [0, 0]] (unit [1, 0, 0, 0]);
#          squared_l2 = 1 + 1 + 1 + 1 = 4, normalized_squared_l2 = .25 * 4 = 1, cos = .5.
S2 = torch.tensor([[[3.0, 0.0], [0.0, 4.0]], [[1.0, 1.0], [1.0, 1.0]]])
T2 = torch.tensor([[[0.0, 0.0], [0.0, 2.0]], [[2.0, 0.0], [0.0, 0.0]]])
HAND = {"squared_l2": (13.0 + 4.0) / 2, "normalized_squared_l2": (0.4 + 1.0) / 2, "cosine": (0.2 + 0.5) / 2}


@pytest.mark.parametrize("kind", KINDS)
def test_explain_loss_hand_worked(kind):
    got = explain_loss(S2, T2, kind)
    assert got.shape == () and got.dtype == torch.float32
    assert got.item() == pytest.approx(HAND[kind], rel=1e-6)
    # Single map: mean over one map is that map's value.
    single = {"squared_l2": 13.0, "normalized_squared_l2": 0.4, "cosine": 0.2}[kind]
    assert explain_loss(S2[:1], T2[:1], kind).item() == pytest.approx(single, rel=1e-6)


def test_explain_loss_hand_worked_more():
    s = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    t = torch.tensor([[[0.0, 2.0], [1.0, 5.0]]])
    assert explain_loss(s, t, "squared_l2").item() == pytest.approx(1 + 0 + 4 + 1)  # raw, no norm
    assert explain_loss(2 * s, 2 * t, "squared_l2").item() == pytest.approx(4 * 6)
    # Scale-free variants ignore a positive rescaling of either map.
    for kind in ("normalized_squared_l2", "cosine"):
        assert explain_loss(5 * S2, 0.1 * T2, kind).item() == pytest.approx(HAND[kind], rel=1e-5)
    # Orthogonal maps: cosine 1, normalized_squared_l2 2; opposite maps: cosine 2, normalized_squared_l2 4.
    a = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    b = torch.tensor([[[0.0, 0.0], [3.0, 0.0]]])
    assert explain_loss(a, b, "cosine").item() == pytest.approx(1.0)
    assert explain_loss(a, b, "normalized_squared_l2").item() == pytest.approx(2.0)
    assert explain_loss(a, -a, "cosine").item() == pytest.approx(2.0)
    assert explain_loss(a, -a, "normalized_squared_l2").item() == pytest.approx(4.0)
    for kind in KINDS:
        assert explain_loss(S2, S2.clone(), kind).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_explain_loss_random_matches_numpy(kind):
    g = _rng(9)
    s, t = torch.randn(3, 5, 6, generator=g), torch.randn(3, 5, 6, generator=g)
    expected = _np_explain(_np(s), _np(t), kind)
    assert explain_loss(s, t, kind).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_explain_loss_multi_map_mask(kind):
    g = _rng(10)
    s, t = torch.rand(2, 3, 4, 4, generator=g), torch.rand(2, 3, 4, 4, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    # Garbage in the padded entries must not matter.
    s_pad, t_pad = s.clone(), t.clone()
    s_pad[~mask] = 1e3 * torch.randn(3, 4, 4, generator=g)
    t_pad[~mask] = -1e3
    expected = _np_explain(_np(s), _np(t), kind, mask.double().numpy())
    got = explain_loss(s_pad.requires_grad_(True), t_pad, kind, mask)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # Hand check of the averaging: the mean of the three counted maps' own losses.
    per = [explain_loss(s[b, i][None], t[b, i][None], kind).item()
           for b, i in ((0, 0), (0, 1), (1, 0))]
    assert got.item() == pytest.approx(sum(per) / 3, rel=1e-5)
    # No gradient into padded maps.
    (grad,) = torch.autograd.grad(got, s_pad)
    assert grad[~mask].abs().max().item() == 0.0
    assert grad[mask].abs().sum().item() > 0
    # Without a mask, every one of the 6 maps counts.
    assert explain_loss(s, t, kind).item() == pytest.approx(
        _np_explain(_np(s), _np(t), kind), rel=1e-5
    )
    # A float mask of ones equals no mask; (B,) mask for (B, h, w) maps works too.
    assert explain_loss(s, t, kind, torch.ones(2, 3)).item() == pytest.approx(
        explain_loss(s, t, kind).item(), rel=1e-6
    )
    s3, t3 = s[:, 0], t[:, 0]
    assert explain_loss(s3, t3, kind, torch.tensor([0.0, 1.0])).item() == pytest.approx(
        _np_explain(_np(s3[1:]), _np(t3[1:]), kind), rel=1e-5
    )


@pytest.mark.parametrize("kind", KINDS)
def test_explain_loss_resizes_student(kind):
    g = _rng(11)
    # Upsampling 4x4 -> 8x8: reference is torch's bilinear interpolate (align_corners=False).
    s, t = torch.rand(2, 4, 4, generator=g), torch.rand(2, 8, 8, generator=g)
    ref = F.interpolate(s[:, None].double(), size=(8, 8), mode="bilinear", align_corners=False)
    expected = _np_explain(ref[:, 0].numpy(), _np(t), kind)
    assert explain_loss(s, t, kind).item() == pytest.approx(expected, rel=1e-5)
    # (B, T, h, w): every map is resized on its own.
    s4, t4 = torch.rand(2, 3, 4, 4, generator=g), torch.rand(2, 3, 8, 8, generator=g)
    ref4 = F.interpolate(s4.double(), size=(8, 8), mode="bilinear", align_corners=False)
    expected4 = _np_explain(ref4.numpy(), _np(t4), kind)
    assert explain_loss(s4, t4, kind).item() == pytest.approx(expected4, rel=1e-5)
    # Downsampling by exactly 2 is a 2x2 average (numpy), and a block-constant student resizes
    # back to the teacher exactly.
    big = torch.rand(2, 3, 8, 8, generator=g)
    small = torch.rand(2, 3, 4, 4, generator=g)
    expected_down = _np_explain(_np_avg2(_np(big)), _np(small), kind)
    assert explain_loss(big, small, kind).item() == pytest.approx(expected_down, rel=1e-5)
    blocky = small.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    assert explain_loss(blocky, small, kind).item() == pytest.approx(0.0, abs=1e-5)
    # map_cosine resizes the same way.
    ref_cos = 1 - _np_explain(ref[:, 0].numpy()[:1], _np(t)[:1], "cosine")
    assert map_cosine(s, t)[0].item() == pytest.approx(ref_cos, rel=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("which", ["both", "student", "teacher"])
def test_explain_loss_zero_maps_finite(kind, which):
    g = _rng(12)
    s = torch.zeros(2, 4, 4) if which in ("both", "student") else torch.rand(2, 4, 4, generator=g)
    t = torch.zeros(2, 4, 4) if which in ("both", "teacher") else torch.rand(2, 4, 4, generator=g)
    s.requires_grad_(True)
    loss = explain_loss(s, t, kind)
    (grad,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(loss)
    assert torch.isfinite(grad).all()
    if which == "both":
        assert grad.abs().max().item() == 0.0
        # Zero vs zero: the squared L2 distances 0; cosine treats a zero map as cos = 0.
        assert loss.item() == pytest.approx({"squared_l2": 0.0, "normalized_squared_l2": 0.0, "cosine": 1.0}[kind])
    # Also through a (B, T, h, w) mask with a fully-masked sample.
    s4 = torch.zeros(2, 2, 4, 4, requires_grad=True)
    loss4 = explain_loss(s4, torch.zeros(2, 2, 4, 4), kind, torch.tensor([[1, 1], [0, 0]]))
    (grad4,) = torch.autograd.grad(loss4, s4)
    assert torch.isfinite(loss4) and torch.isfinite(grad4).all()
    # An all-zero mask gives 0, not 0/0.
    zero_mask = explain_loss(S2, T2, kind, torch.zeros(2))
    assert torch.isfinite(zero_mask) and zero_mask.item() == 0.0


def test_explain_loss_unknown_distance():
    with pytest.raises(ValueError, match="gradcam_l1") as info:
        explain_loss(S2, T2, "gradcam_l1")
    for kind in KINDS:
        assert kind in str(info.value)
    assert tuple(DISTANCES) == KINDS


def test_map_cosine():
    got = map_cosine(S2, T2)
    assert got.shape == (2,)
    np.testing.assert_allclose(_np(got), [0.8, 0.5], rtol=1e-6)
    # (B, T, h, w) -> (B, T); an all-zero map has no direction -> NaN (left out of means); opposite -> -1.
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    stack_s = torch.stack([torch.stack([S2[0], torch.zeros(2, 2)]), torch.stack([a, a])])
    stack_t = torch.stack([torch.stack([T2[0], T2[1]]), torch.stack([-a, torch.zeros(2, 2)])])
    got2 = map_cosine(stack_s, stack_t)
    assert got2.shape == (2, 2)
    np.testing.assert_allclose(_np(got2), [[0.8, np.nan], [-1.0, np.nan]], rtol=1e-6, atol=1e-7)
    # Resized student: 2x2 block-constant map downsampled to the teacher is identical.
    assert map_cosine(a.repeat_interleave(2, 0).repeat_interleave(2, 1)[None], a[None]).item() == (
        pytest.approx(1.0, rel=1e-6)
    )


# =========================================================================== multi-label (VOC)
def _np_bce(z, y):
    p = 1 / (1 + np.exp(-z))
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def test_masked_bce_ignores_difficult_entries():
    g = torch.Generator().manual_seed(0)
    z = 2 * torch.randn(5, 20, generator=g, dtype=torch.float64)
    y = torch.randint(-1, 2, (5, 20), generator=g)
    keep = (y >= 0).numpy()
    expected = _np_bce(z.numpy(), y.clamp_min(0).numpy())[keep].mean()
    assert masked_bce(z, y).item() == pytest.approx(expected, rel=1e-5)
    z.requires_grad_(True)
    (grad,) = torch.autograd.grad(masked_bce(z, y), z)
    assert (grad[y == -1] == 0).all() and (grad[y >= 0] != 0).all()
    assert masked_bce(z, torch.full_like(y, -1)).item() == 0.0


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_multilabel_kd_is_scaled_bernoulli_kl(temp):
    g = torch.Generator().manual_seed(1)
    zs, zt = 3 * torch.randn(4, 20, generator=g), 3 * torch.randn(4, 20, generator=g)
    ps, pt = 1 / (1 + np.exp(-zs.double().numpy() / temp)), 1 / (1 + np.exp(-zt.double().numpy() / temp))
    kl = pt * np.log(pt / ps) + (1 - pt) * np.log((1 - pt) / (1 - ps))
    assert multilabel_kd(zs, zt, temp).item() == pytest.approx(temp**2 * kl.mean(), rel=1e-4)
    assert multilabel_kd(zt, zt, temp).item() == pytest.approx(0.0, abs=1e-6)
    zs.requires_grad_(True)
    (grad,) = torch.autograd.grad(multilabel_kd(zs, zt, temp), zs)
    assert np.allclose(grad.double().numpy(), temp * (ps - pt) / zs.numel(), atol=1e-6)


def test_one_map_norm_epsilon_in_the_distances_and_the_map_cosine():
    """Every map norm is clamped at the same MAP_NORM_EPS = 1e-6, worked by hand: for a student map
    ``s = a * u`` along the teacher's unit direction ``u``, ``cos = a / max(a, eps)``, so a map of norm
    1e-9 (below eps) has cosine 1e-3 in both the cosine distance and map_cosine; one of norm 1e-3 has 1."""
    assert MAP_NORM_EPS == 1e-6
    t = torch.tensor([[[3.0, 0.0], [0.0, 4.0]]])  # ||t|| = 5, u = t / 5
    for norm, cos in ((1e-9, 1e-3), (1e-3, 1.0)):
        s = norm * t / 5
        assert map_cosine(s, t).item() == pytest.approx(cos, rel=1e-5)
        assert explain_loss(s, t, "cosine").item() == pytest.approx(1 - cos, rel=1e-5, abs=1e-6)
        # s / max(||s||, eps) = cos * u, t / ||t|| = u: the normalised distance is (1 - cos)^2
        assert explain_loss(s, t, "normalized_squared_l2").item() == pytest.approx((1 - cos) ** 2, rel=1e-5, abs=1e-6)
    # The gradient at a near-zero student map is bounded: below eps, 1 - cos = 1 - s.u / eps, whose
    # gradient is -u / eps (entries -6e5, -8e5; with eps = 1e-12 they would be -6e11, -8e11).
    s = torch.tensor([[[0.0, 1e-9], [0.0, 0.0]]], requires_grad=True)
    (grad,) = torch.autograd.grad(explain_loss(s, t, "cosine"), s)
    torch.testing.assert_close(grad, -t / 5 / 1e-6, rtol=1e-5, atol=0)


# --------------------------------------------------------------------------- CAT-KD (Guo et al., CVPR 2023)
def _adaptive_pool_np(maps: np.ndarray, r: int) -> np.ndarray:
    """Adaptive average pooling ``(..., h, w) -> (..., r, r)`` written out: cell ``i`` averages rows
    ``floor(i h / r) .. ceil((i + 1) h / r) - 1`` (overlapping when ``r`` does not divide ``h``)."""
    h, w = maps.shape[-2:]
    out = np.empty((*maps.shape[:-2], r, r))
    for i in range(r):
        for j in range(r):
            rows = slice(i * h // r, -(-(i + 1) * h // r))
            cols = slice(j * w // r, -(-(j + 1) * w // r))
            out[..., i, j] = maps[..., rows, cols].mean(axis=(-2, -1))
    return out


def _cat_np(s_feat, s_weight, t_feat, t_weight, r: int, normalize: bool) -> float:
    """CAT-KD from its equations in float64: ``CAM = W A`` for every class, pooled to ``r x r``,
    optionally divided by each map's L2 norm, then the mean squared difference."""
    cams = [np.einsum("ck,bkhw->bchw", _np(w), _np(a)) for a, w in ((s_feat, s_weight), (t_feat, t_weight))]
    pooled = [_adaptive_pool_np(c, r) for c in cams]
    if normalize:
        pooled = [p / np.sqrt((p**2).sum(axis=(-2, -1), keepdims=True)) for p in pooled]
    return float(((pooled[0] - pooled[1]) ** 2).mean())


def test_cat_hand_worked():
    """One image, one class, one channel, r = 1: the pooled CAMs are the weighted means,
    1 * mean(1, 2, 3, 4) = 2.5 and 2 * mean(0, 0, 0, 2) = 1, so the loss is 1.5^2."""
    student = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    teacher = torch.tensor([[[[0.0, 0.0], [0.0, 2.0]]]])
    s_cams = class_activation_maps(student, torch.tensor([[1.0]]))
    t_cams = class_activation_maps(teacher, torch.tensor([[2.0]]))
    assert torch.equal(t_cams, 2 * teacher)
    assert float(class_attention_transfer(s_cams, t_cams, resolution=1)) == pytest.approx(2.25)
    # normalised, each 1 x 1 map is its sign: both +1, no difference
    assert float(class_attention_transfer(s_cams, t_cams, resolution=1, normalize=True)) == pytest.approx(0.0)


@pytest.mark.parametrize(("size", "r", "normalize"), [(8, 2, False), (8, 2, True), (5, 2, False), (3, 4, True)])
def test_cat_matches_numpy_float64(size, r, normalize):
    """Student and teacher with other widths and (for 5 -> 3) other map sizes, 7 classes."""
    g = _rng(3)
    s_feat, t_feat = torch.randn(4, 6, size, size, generator=g), torch.randn(4, 10, size - 2, size - 2, generator=g)
    s_weight, t_weight = torch.randn(7, 6, generator=g), torch.randn(7, 10, generator=g)
    got = class_attention_transfer(class_activation_maps(s_feat, s_weight), class_activation_maps(t_feat, t_weight),
                                   resolution=r, normalize=normalize)
    assert float(got) == pytest.approx(_cat_np(s_feat, s_weight, t_feat, t_weight, r, normalize), rel=1e-5)


def test_cat_gradcheck_through_the_student_features_and_weight():
    g = _rng(4)
    t_cams = class_activation_maps(torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g),
                                   torch.randn(3, 3, dtype=torch.float64, generator=g))
    feat = torch.randn(2, 2, 4, 4, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(3, 2, dtype=torch.float64, generator=g, requires_grad=True)
    for normalize in (False, True):
        def loss(f, w, normalize=normalize):
            return class_attention_transfer(class_activation_maps(f, w), t_cams, resolution=2, normalize=normalize)

        assert torch.autograd.gradcheck(loss, (feat, weight), fast_mode=True)


def test_cat_refuses_other_class_counts():
    with pytest.raises(ValueError, match="differ in batch or class count"):
        class_attention_transfer(torch.zeros(2, 5, 4, 4), torch.zeros(2, 6, 4, 4))


# --------------------------------------------------------------------------- logit standardisation (Sun et al.)
def _zscore_np(z: np.ndarray) -> np.ndarray:
    """``(z - mean) / (std + 1e-7)`` per row, ``std`` with ``C - 1`` in the denominator (the reference code)."""
    return (z - z.mean(1, keepdims=True)) / (z.std(1, ddof=1, keepdims=True) + 1e-7)


def _kd_np(zs: np.ndarray, zt: np.ndarray, temperature: float) -> float:
    """``T^2 mean_b KL(softmax(z_T / T) || softmax(z_S / T))`` in float64."""
    def log_softmax(z):
        z = z / temperature
        return z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))

    lt, ls = log_softmax(zt), log_softmax(zs)
    return float(temperature**2 * (np.exp(lt) * (lt - ls)).sum(1).mean())


def test_standardize_logits_hand_worked():
    """(1, 2, 3): mean 2, sample standard deviation 1, so (-1, 0, 1) / (1 + 1e-7)."""
    got = standardize_logits(torch.tensor([[1.0, 2.0, 3.0], [10.0, 10.0, 16.0]], dtype=torch.float64))
    expected = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, -2.0, 4.0]], dtype=torch.float64) / torch.tensor(
        [[1 + 1e-7], [math.sqrt(12) + 1e-7]], dtype=torch.float64)  # (-2, -2, 4): variance 24 / 2 = 12
    assert torch.allclose(got, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0])
def test_kd_on_standardized_logits_matches_numpy_float64(temp):
    g = _rng(5)
    zs, zt = torch.randn(6, 10, generator=g) * 3, torch.randn(6, 10, generator=g) * 8 + 2
    got = hinton_kd(standardize_logits(zs), standardize_logits(zt), temp)
    assert float(got) == pytest.approx(_kd_np(_zscore_np(_np(zs)), _zscore_np(_np(zt)), temp), rel=1e-5)


def test_kd_on_standardized_logits_ignores_the_student_logits_shift_and_scale():
    """The point of the method: a student whose logits are an affine image ``a z + b`` (a > 0) of
    the teacher's has zero standardised KD, while plain KD still penalises the range mismatch."""
    g = _rng(6)
    zt = torch.randn(5, 10, generator=g, dtype=torch.float64)
    zs = 0.25 * zt + torch.randn(5, 1, generator=g, dtype=torch.float64)  # other range and offset per sample
    assert float(hinton_kd(standardize_logits(zs), standardize_logits(zt), 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(hinton_kd(zs, zt, 2.0)) > 1e-2


def _dkd_np(zs: np.ndarray, zt: np.ndarray, labels: np.ndarray, alpha: float, beta: float, temperature: float):
    """DKD (Zhao et al., CVPR 2022, Eq. 1-7) in float64 from probabilities: ``b = (p_t, 1 - p_t)``,
    ``p_hat`` the softmax renormalised over the non-target classes,
    ``T^2 mean_b (alpha KL(b^T || b^S) + beta KL(p_hat^T || p_hat^S))``."""
    def softmax(z):
        e = np.exp(z / temperature - (z / temperature).max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    ps, pt = softmax(zs), softmax(zt)
    rows = np.arange(len(labels))
    bs = np.stack([ps[rows, labels], 1 - ps[rows, labels]], 1)
    bt = np.stack([pt[rows, labels], 1 - pt[rows, labels]], 1)
    tckd = (bt * np.log(bt / bs)).sum(1)
    keep = np.ones_like(ps, dtype=bool)
    keep[rows, labels] = False
    hs = ps[keep].reshape(len(labels), -1)
    ht = pt[keep].reshape(len(labels), -1)
    hs, ht = hs / hs.sum(1, keepdims=True), ht / ht.sum(1, keepdims=True)
    nckd = (ht * np.log(ht / hs)).sum(1)
    return float(temperature**2 * (alpha * tckd + beta * nckd).mean())


def test_dkd_on_standardized_logits_matches_numpy_float64():
    """kd=dkd_ls's values: alpha 12, beta 24, T = 2."""
    g = _rng(7)
    zs, zt = torch.randn(6, 10, generator=g) * 2, torch.randn(6, 10, generator=g) * 6
    labels = torch.randint(0, 10, (6,), generator=g)
    got = decoupled_kd(standardize_logits(zs), standardize_logits(zt), labels, 12.0, 24.0, 2.0)
    expected = _dkd_np(_zscore_np(_np(zs)), _zscore_np(_np(zt)), labels.numpy(), 12.0, 24.0, 2.0)
    assert float(got) == pytest.approx(expected, rel=1e-4)


def test_standardize_logits_gradcheck():
    z = torch.randn(3, 5, dtype=torch.float64, generator=_rng(8), requires_grad=True)
    assert torch.autograd.gradcheck(standardize_logits, (z,))
