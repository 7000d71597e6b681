"""Explanation maps (docs/method.md §1) against independent float64 references.

The reference below loops over samples, classes, channels and pixels in plain Python, with
one ``torch.autograd.grad`` of one logit of one sample at a time; it shares no code with
``distill.explain.maps``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill.explain import explanation_maps, gradcampp_alpha, model_maps
from distill.models import build_model

DT = torch.float64
TOL = 1e-10
METHODS_AUTOGRAD = ("gradcam", "gradcampp", "hirescam", "xgradcam", "layercam")


# --------------------------------------------------------------------------- test networks
class GapNet(nn.Module):
    """(a) conv body + global average pool + linear head (closed form possible)."""

    def __init__(self, channels: int = 4, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, channels, 3, padding=1, stride=2)
        self.fc = nn.Linear(channels, classes)

    def forward_features(self, x):
        return F.relu(self.conv2(F.relu(self.conv1(x))))

    def forward_head(self, a):
        return self.fc(a.mean(dim=(2, 3)))

    @property
    def cam_linear(self):
        return self.fc

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


class FcNet(nn.Module):
    """(b) conv body + hidden fully connected head: autograd path only."""

    def __init__(self, channels: int = 4, size: int = 4, hidden: int = 8, classes: int = 5):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(6, channels, 3, padding=1, stride=2),
            nn.ReLU(),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * size * size, hidden),
            nn.ReLU(),
            nn.Linear(hidden, classes),
        )

    def forward_features(self, x):
        return self.body(x)

    def forward_head(self, a):
        return self.head(a)

    def forward(self, x):
        return self.head(self.body(x))


def make(cls, seed=0, **kw):
    torch.manual_seed(seed)
    return cls(**kw).to(DT).eval()


def images(batch=3, size=8, seed=1):
    torch.manual_seed(seed)
    return torch.randn(batch, 3, size, size, dtype=DT)


# --------------------------------------------------------------------------- reference
def reference_maps(net, x, method, classes=None):
    """The papers' formulas (docs/method.md §1) by hand: ``(B, C, h, w)``, each sample and class separately."""
    out = []
    for b in range(x.shape[0]):
        a = net.forward_features(x[b : b + 1]).detach().requires_grad_(True)
        logits = net.forward_head(a)
        per_class = []
        for c in range(logits.shape[1]) if classes is None else classes[b]:
            if c < 0:
                per_class.append(torch.zeros(a.shape[2:], dtype=DT))
                continue
            (g,) = torch.autograd.grad(logits[0, c], a, retain_graph=True)
            per_class.append(reference_map(a[0].detach(), g[0], method, net, c))
        out.append(torch.stack(per_class))
    return torch.stack(out)


def reference_map(A, g, method, net=None, c=None):
    """One map from activations ``A`` (K, h, w) and gradients ``g`` (K, h, w)."""
    K, h, w = A.shape
    Z = h * w
    if method in ("hirescam", "layercam"):
        # HiResCAM (Draelos & Carin 2020, Eq. 4): ReLU(sum_k g_kij A_kij); LayerCAM (Jiang et al.
        # 2021, Eqs. 5-6): ReLU(sum_k ReLU(g_kij) A_kij).
        L = torch.zeros(h, w, dtype=DT)
        for i in range(h):
            for j in range(w):
                terms = [float(g[k, i, j]) for k in range(K)]
                if method == "layercam":
                    terms = [max(t, 0.0) for t in terms]
                L[i, j] = max(0.0, sum(terms[k] * float(A[k, i, j]) for k in range(K)))
        return L
    weights = []
    for k in range(K):
        if method == "cam":
            weights.append(float(net.cam_linear.weight[c, k].detach()))
        elif method == "gradcam":
            weights.append(sum(float(g[k, i, j]) for i in range(h) for j in range(w)) / Z)
        elif method == "xgradcam":
            # XGrad-CAM (Fu et al. 2020, Eq. 8): w_k = sum_ij A_kij / (sum_ab A_kab) * g_kij.
            s = sum(float(A[k, i, j]) for i in range(h) for j in range(w))
            weights.append(0.0 if s == 0 else sum(
                float(A[k, i, j]) / s * float(g[k, i, j]) for i in range(h) for j in range(w)))
        else:
            s = sum(float(A[k, i, j]) for i in range(h) for j in range(w))
            wk = 0.0
            for i in range(h):
                for j in range(w):
                    gij = float(g[k, i, j])
                    den = 2 * gij**2 + s * gij**3
                    alpha = 0.0 if den == 0 else gij**2 / den
                    wk += alpha * max(gij, 0.0)
            weights.append(wk)
    L = torch.zeros(h, w, dtype=DT)
    for i in range(h):
        for j in range(w):
            L[i, j] = max(0.0, sum(weights[k] * float(A[k, i, j]) for k in range(K)))
    return L


def batched(net, x, target, method, create_graph=False, closed=False):
    a = net.forward_features(x)
    logits = net.forward_head(a)
    lw = net.cam_linear.weight if closed else None
    return explanation_maps(logits, a, target, method, create_graph, linear_weight=lw)


# --------------------------------------------------------------------------- vs reference
@pytest.mark.parametrize("method", ["cam", *METHODS_AUTOGRAD])
def test_gap_net_matches_reference(method):
    net, x = make(GapNet), images()
    ref = reference_maps(net, x, method)
    B, C = ref.shape[:2]
    all_classes = torch.arange(C).expand(B, C)
    paths = [True] if method == "cam" else [False, True]
    for closed in paths:
        maps = batched(net, x, all_classes, method, closed=closed)
        assert maps.shape == ref.shape
        torch.testing.assert_close(maps, ref, atol=TOL, rtol=0)
        single = batched(net, x, torch.tensor([0, 3, 4]), method, closed=closed)
        torch.testing.assert_close(
            single, ref[torch.arange(B), torch.tensor([0, 3, 4])], atol=TOL, rtol=0
        )
    assert ref.sum() > 0  # the comparison is not between two all-zero tensors


@pytest.mark.parametrize("method", METHODS_AUTOGRAD)
def test_fc_net_matches_reference(method):
    net, x = make(FcNet), images()
    ref = reference_maps(net, x, method)
    B, C = ref.shape[:2]
    maps = batched(net, x, torch.arange(C).expand(B, C), method)
    torch.testing.assert_close(maps, ref, atol=TOL, rtol=0)
    maps = batched(net, x, torch.tensor([1, 2, 0]), method, create_graph=True)
    torch.testing.assert_close(
        maps, ref[torch.arange(B), torch.tensor([1, 2, 0])], atol=TOL, rtol=0
    )
    assert ref.sum() > 0
    # On the FC head the gradients vary over space: Grad-CAM++ is not Grad-CAM rescaled.
    if method == "gradcampp":
        gc = reference_maps(net, x, "gradcam")
        assert not torch.allclose(normalized(gc), normalized(ref), atol=1e-3)


def normalized(m):
    return m / m.flatten(-2).amax(-1).clamp_min(1e-30)[..., None, None]


def test_gradcam_matches_captum():
    from captum.attr import LayerGradCam

    net, x = make(FcNet), images(batch=4)
    target = torch.tensor([0, 4, 2, 1])
    ours = batched(net, x, target, "gradcam")
    theirs = LayerGradCam(net, net.body).attribute(x, target=target, relu_attributions=True)
    assert theirs.shape == (4, 1, 4, 4)
    torch.testing.assert_close(ours, theirs[:, 0].detach(), atol=TOL, rtol=0)
    assert ours.sum() > 0


# --------------------------------------------------------------------------- HiResCAM, XGrad-CAM, LayerCAM
def test_new_methods_coincide_with_gradcam_only_at_a_gap_head():
    """g_kij = W[c, k] / Z at a GAP + linear head: HiResCAM = XGrad-CAM = Grad-CAM there, and
    LayerCAM = ReLU(sum_k ReLU(W[c, k] / Z) A_k). Not so with a hidden-FC head."""
    gap, fc, x = make(GapNet), make(FcNet), images()
    target = torch.tensor([0, 3, 4])
    gap_maps = {m: batched(gap, x, target, m) for m in METHODS_AUTOGRAD}  # autograd path
    for m in ("hirescam", "xgradcam"):
        torch.testing.assert_close(gap_maps[m], gap_maps["gradcam"], atol=TOL, rtol=0)
    a = gap.forward_features(x).detach()
    W = gap.fc.weight.detach()
    Z = a.shape[-2] * a.shape[-1]
    layer = F.relu(torch.einsum("bk,bkhw->bhw", F.relu(W[target] / Z), a))
    torch.testing.assert_close(gap_maps["layercam"], layer, atol=TOL, rtol=0)
    assert (W[target] < 0).any() and not torch.allclose(gap_maps["layercam"], gap_maps["gradcam"], atol=1e-6)
    fc_maps = {m: batched(fc, x, target, m) for m in METHODS_AUTOGRAD}
    for m in ("hirescam", "xgradcam", "layercam"):
        assert not torch.allclose(normalized(fc_maps[m]), normalized(fc_maps["gradcam"]), atol=1e-3), m


def test_xgradcam_weight_is_zero_for_a_channel_summing_to_zero():
    # A channel of +-1 entries summing to 0 (a layer before a ReLU): no division by zero, weight 0.
    torch.manual_seed(9)
    a = torch.rand(1, 2, 2, 2, dtype=DT)
    a[0, 1] = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=DT)
    a.requires_grad_(True)
    W = torch.tensor([[1.0, 2.0]], dtype=DT)
    logits = F.linear(F.relu(a).flatten(2).sum(-1), W)  # a gradient that varies over space
    maps = explanation_maps(logits, a, torch.tensor([0]), "xgradcam", True)
    grads = (a.detach() > 0).to(DT) * W[0][:, None, None]
    w0 = float((a.detach()[0, 0] * grads[0, 0]).sum() / a.detach()[0, 0].sum())
    torch.testing.assert_close(maps[0], F.relu(w0 * a.detach()[0, 0]), atol=TOL, rtol=0)
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(maps.sum(), a))


def library_maps(method, net, x, target):
    """pytorch-grad-cam's maps before its min-max scaling: its hooks record A and dS/dA, its
    ``get_cam_image`` applies its formula, then ReLU as in its ``compute_cam_per_layer``."""
    import numpy as np
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = {"gradcam": GradCAM, "gradcampp": GradCAMPlusPlus, "hirescam": HiResCAM,
           "xgradcam": XGradCAM, "layercam": LayerCAM}[method]
    targets = [ClassifierOutputTarget(int(c)) for c in target]
    with cls(model=net, target_layers=[net.body]) as cam:
        cam(input_tensor=x, targets=targets)
        a = cam.activations_and_grads.activations[0].numpy()
        g = cam.activations_and_grads.gradients[0].numpy()
        image = cam.get_cam_image(x, net.body, targets, a, g, False)
    return torch.from_numpy(np.maximum(image, 0))


# pytorch-grad-cam 1.5.7 adds eps = 1e-7 to XGrad-CAM's sum_ab A_kab and eps = 1e-6 to
# Grad-CAM++'s denominator 2 g^2 + S g^3; Grad-CAM, HiResCAM and LayerCAM have no epsilon.
LIBRARY_RTOL = {"gradcam": 0.0, "hirescam": 0.0, "layercam": 0.0, "xgradcam": 1e-6, "gradcampp": 0.01}


@pytest.mark.parametrize("method", METHODS_AUTOGRAD)
def test_matches_pytorch_grad_cam(method):
    net, x = make(FcNet), images(batch=4)
    target = torch.tensor([0, 4, 2, 1])
    ours = batched(net, x, target, method).detach()
    theirs = library_maps(method, net, x, target)
    assert theirs.shape == ours.shape and ours.sum() > 0
    peak = ours.amax()
    torch.testing.assert_close(theirs, ours, atol=1e-12 + LIBRARY_RTOL[method] * peak, rtol=0)
    if method in ("xgradcam", "gradcampp"):  # the epsilon is visible, and only it
        assert (theirs - ours).abs().max() > 1e-13 * peak


# --------------------------------------------------------------------------- degenerate input
@pytest.mark.parametrize("method", METHODS_AUTOGRAD)
@pytest.mark.parametrize("case", ["zero_acts", "zero_grads", "both"])
def test_finite_for_zero_activations_and_gradients(method, case):
    net = make(FcNet)
    gap = make(GapNet)
    if case in ("zero_grads", "both"):
        with torch.no_grad():
            net.head[-1].weight.zero_()
            gap.fc.weight.zero_()
    torch.manual_seed(2)
    acts = torch.rand(2, 4, 4, 4, dtype=DT)
    if case in ("zero_acts", "both"):
        acts = torch.zeros_like(acts)
    for model, closed in ((net, False), (gap, False), (gap, True)):
        a = acts.clone().requires_grad_(True)
        logits = model.forward_head(a)
        lw = model.cam_linear.weight if closed else None
        maps = explanation_maps(logits, a, torch.tensor([1, 3]), method, True, linear_weight=lw)
        assert torch.isfinite(maps).all()
        params = [a] + [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(maps.sum(), params, allow_unused=True)
        assert all(g is None or torch.isfinite(g).all() for g in grads)
        if case != "zero_acts":
            assert (maps == 0).all()


# --------------------------------------------------------------------------- differentiability
def _head_params(seed=3, K=3, h=4, hidden=5, C=4):
    torch.manual_seed(seed)
    W1 = (torch.randn(hidden, K * h * h, dtype=DT) * 0.3).requires_grad_(True)
    b1 = torch.randn(hidden, dtype=DT) * 0.1
    W2 = torch.randn(C, hidden, dtype=DT).requires_grad_(True)
    return W1, b1, W2


def _smooth_head(a, W1, b1, W2):
    # Softplus (smooth, non-linear): the gradient dS/dA depends on A, so the second-order
    # term of create_graph=True is exercised (a ReLU head would make it vanish).
    return F.linear(F.softplus(F.linear(a.flatten(1), W1, b1)), W2)


def _positive_acts(seed=4, B=2, K=3, h=4):
    torch.manual_seed(seed)
    return (0.5 + torch.rand(B, K, h, h, dtype=DT)).requires_grad_(True)


TARGET2 = torch.tensor([1, 3])


@pytest.mark.parametrize("method", METHODS_AUTOGRAD)
def test_gradcheck_autograd_path(method):
    W1, b1, W2 = _head_params()
    acts = _positive_acts()

    def of_acts(a):
        return explanation_maps(_smooth_head(a, W1, b1, W2), a, TARGET2, method, True)

    def of_weights(w1, w2):
        a = acts.detach().requires_grad_(True)
        return explanation_maps(_smooth_head(a, w1, b1, w2), a, TARGET2, method, True)

    assert (of_acts(acts) > 0).any()
    assert torch.autograd.gradcheck(of_acts, (acts,))
    assert torch.autograd.gradcheck(of_weights, (W1, W2))
    # Without the second-order term the weight gradient would be missing entirely.
    assert torch.autograd.grad(of_weights(W1, W2).sum(), W1)[0].abs().sum() > 0


@pytest.mark.parametrize("method", METHODS_AUTOGRAD)
def test_gradcheck_closed_form(method):
    acts = _positive_acts()
    torch.manual_seed(5)
    W = torch.randn(4, 3, dtype=DT).requires_grad_(True)
    dummy_logits = torch.zeros(2, 4, dtype=DT)

    def closed(a, w):
        return explanation_maps(dummy_logits, a, TARGET2, method, linear_weight=w)

    def gap_autograd(a, w):
        return explanation_maps(F.linear(a.mean((2, 3)), w), a, TARGET2, method, True)

    assert (closed(acts, W) > 0).any()
    assert torch.autograd.gradcheck(closed, (acts, W))
    assert torch.autograd.gradcheck(gap_autograd, (acts, W))


class SmallConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 3, 3, padding=1, stride=2)
        self.fc1 = nn.Linear(3 * 4 * 4, 6)
        self.fc2 = nn.Linear(6, 4)

    def forward_features(self, x):
        return F.relu(self.conv2(F.relu(self.conv1(x))))

    def forward_head(self, a):
        return self.fc2(F.relu(self.fc1(a.flatten(1))))


@pytest.mark.parametrize("method", METHODS_AUTOGRAD)
def test_map_loss_reaches_body_and_head(method):
    net = make(SmallConvNet)
    x = images(batch=2)
    maps = batched(net, x, torch.tensor([0, 2]), method, create_graph=True)
    maps.square().sum().backward()
    for name in ("conv1", "conv2", "fc1", "fc2"):
        grad = getattr(net, name).weight.grad
        assert grad is not None and grad.abs().sum() > 0, name


# --------------------------------------------------------------------------- fast path
def _wrn():
    torch.manual_seed(0)
    model = build_model("wrn16_1", 10).to(DT).eval()
    torch.manual_seed(1)
    return model, torch.randn(2, 3, 32, 32, dtype=DT)


@pytest.fixture(scope="module")
def wrn():
    return _wrn()


def _check_closed_form(net, x, target, linear=None):
    a = net.forward_features(x).detach().requires_grad_(True)
    W = (linear or net.cam_linear).weight
    Z = a.shape[-2] * a.shape[-1]
    closed = {
        m: explanation_maps(net.forward_head(a), a, target, m, linear_weight=W)
        for m in ("cam", *METHODS_AUTOGRAD)
    }
    auto = {m: explanation_maps(net.forward_head(a), a, target, m) for m in METHODS_AUTOGRAD}
    for m in METHODS_AUTOGRAD:
        torch.testing.assert_close(closed[m], auto[m], atol=TOL, rtol=0)
        assert closed[m].sum() > 0
    # CAM = ReLU(sum_k W[c,k] A_k) = Z * Grad-CAM for a GAP + linear head.
    explicit = F.relu(torch.einsum("bk,bkhw->bhw", W[target], a))
    torch.testing.assert_close(closed["cam"], explicit, atol=TOL, rtol=0)
    torch.testing.assert_close(closed["cam"], Z * auto["gradcam"], atol=TOL, rtol=0)


def test_closed_form_equals_autograd_gap_net():
    _check_closed_form(make(GapNet), images(), torch.tensor([0, 3, 4]))


def test_closed_form_equals_autograd_wrn(wrn):
    model, x = wrn
    _check_closed_form(model, x, torch.tensor([3, 7]), linear=model.fc)


def grad_or_zero(p):
    return torch.zeros_like(p) if p.grad is None else p.grad.clone()


@pytest.mark.parametrize("method", METHODS_AUTOGRAD)
def test_closed_form_is_differentiable(method):
    net, x = make(GapNet), images(batch=2)
    target = torch.tensor([1, 2])
    grads = []
    for closed in (True, False):
        net.zero_grad()
        maps = batched(net, x, target, method, create_graph=True, closed=closed)
        maps.square().sum().backward()
        grads.append({n: grad_or_zero(p) for n, p in net.named_parameters()})
    for name in ("conv1.weight", "conv2.weight", "fc.weight"):
        assert grads[0][name].abs().sum() > 0, name
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-9, rtol=1e-7)


def test_closed_form_on_wrn_reaches_body(wrn):
    model, x = wrn
    model.zero_grad()
    a = model.forward_features(x)
    maps = model_maps(model, model.forward_head(a), a, torch.tensor([1, 2]), "gradcampp")
    maps.sum().backward()
    assert model.conv1.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_closed_form_makes_no_autograd_call(monkeypatch):
    net, x = make(GapNet), images()
    with torch.no_grad():
        a = net.forward_features(x)
        logits = net.forward_head(a)
    expected = {
        m: batched(net, x, torch.tensor([0, 1, 2]), m, closed=True)
        for m in ("cam", *METHODS_AUTOGRAD)
    }

    def forbidden(*args, **kwargs):
        raise AssertionError("autograd was called on the closed-form path")

    monkeypatch.setattr(torch.autograd, "grad", forbidden)
    monkeypatch.setattr(torch.autograd, "backward", forbidden)
    assert not a.requires_grad
    for m, exp in expected.items():
        maps = explanation_maps(
            logits, a, torch.tensor([0, 1, 2]), m, linear_weight=net.fc.weight.detach()
        )
        torch.testing.assert_close(maps, exp.detach(), atol=TOL, rtol=0)
    with pytest.raises(AssertionError, match="autograd was called"):  # the patch does bite
        explanation_maps(logits, a.requires_grad_(True), torch.tensor([0, 1, 2]), "gradcam")


# --------------------------------------------------------------------------- batches
@pytest.mark.parametrize("method", METHODS_AUTOGRAD)
def test_each_sample_alone_equals_batch(method, wrn):
    fc = (make(FcNet), images(batch=3), torch.tensor([4, 0, 2]))
    model, x = wrn
    for net, xs, target in (fc, (model, x, torch.tensor([5, 9]))):
        full = batched(net, xs, target, method)
        for b in range(xs.shape[0]):
            alone = batched(net, xs[b : b + 1], target[b : b + 1], method)
            torch.testing.assert_close(full[b : b + 1], alone, atol=TOL, rtol=0)
        assert full.sum() > 0


@pytest.mark.parametrize("method", ["cam", *METHODS_AUTOGRAD])
@pytest.mark.parametrize("create_graph", [False, True])
def test_multilabel_targets_equal_separate_calls(method, create_graph):
    nets = (
        [(make(GapNet), True)]
        if method == "cam"
        else [(make(FcNet), False), (make(GapNet), False), (make(GapNet), True)]
    )
    x = images(batch=3)
    target = torch.tensor([[0, 2, 4], [1, -1, 3], [4, 0, -1]])
    for net, closed in nets:
        net.zero_grad()
        multi = batched(net, x, target, method, create_graph, closed)
        assert multi.shape == (3, 3, 4, 4)
        assert (multi[1, 1] == 0).all() and (multi[2, 2] == 0).all()
        if create_graph or closed:
            multi.square().sum().backward()
            multi_grads = [grad_or_zero(p) for p in net.parameters()]
            net.zero_grad()
        for t in range(3):
            alone = batched(net, x, target[:, t], method, create_graph, closed)
            torch.testing.assert_close(multi[:, t], alone, atol=TOL, rtol=0)
            if create_graph or closed:
                alone.square().sum().backward()
        if create_graph or closed:
            for g_multi, p in zip(multi_grads, net.parameters(), strict=True):
                torch.testing.assert_close(g_multi, grad_or_zero(p), atol=1e-9, rtol=1e-7)
            assert any(g.abs().sum() > 0 for g in multi_grads)
        assert multi.sum() > 0


# --------------------------------------------------------------------------- epsilon trap
@pytest.mark.parametrize("closed", [False, True])
def test_gradcampp_alpha_has_no_epsilon(closed):
    # GAP + linear head with gradients g_k = W[c, k] / Z of order 1e-3 (CIFAR last layer).
    K, h, w, Z = 2, 4, 4, 16
    torch.manual_seed(6)
    A = (0.5 + torch.rand(1, K, h, w, dtype=DT)).requires_grad_(True)
    g = torch.tensor([1.0e-3, 2.0e-3], dtype=DT)
    W = torch.stack([g * Z, -g * Z])  # class 0 explained
    logits = F.linear(A.mean((2, 3)), W)
    maps = explanation_maps(
        logits, A, torch.tensor([0]), "gradcampp", linear_weight=W if closed else None
    )
    S = A.detach().sum((2, 3))[0]  # sum_ab A_kab
    exact = g**2 / (2 * g**2 + S * g**3)
    with_eps = g**2 / (2 * g**2 + S * g**3 + 1e-6)
    assert ((exact - with_eps) / exact).abs().min() > 0.1  # epsilon would matter a lot
    for alpha in (exact, with_eps):
        assert torch.isfinite(alpha).all()
    expected = F.relu(torch.einsum("k,khw->hw", Z * exact * g, A.detach()[0]))
    eps_maps = F.relu(torch.einsum("k,khw->hw", Z * with_eps * g, A.detach()[0]))
    torch.testing.assert_close(maps[0], expected, atol=0, rtol=1e-12)
    assert not torch.allclose(maps[0], eps_maps, rtol=0.05)
    # The exported alpha function as well.
    grads = g[None, None, :, None, None].expand(1, 1, K, h, w)
    alpha = gradcampp_alpha(grads, S[None, None, :, None, None])
    torch.testing.assert_close(alpha[0, 0, :, 0, 0], exact, atol=0, rtol=1e-12)
    assert math.isclose(float(exact[0]), 1 / (2 + float(S[0]) * 1e-3), rel_tol=1e-12)


@pytest.mark.parametrize("closed", [False, True])
def test_gradcampp_gradients_finite_for_tiny_float32_gradients(closed):
    # One channel with g = +-1e-21: g^2 is a float32 subnormal, 1 / denominator^2 overflows.
    torch.manual_seed(8)
    A = (0.5 + torch.rand(1, 2, 4, 4)).requires_grad_(True)
    for g in (1e-21, -1e-21):
        W = torch.tensor([[1e-2 * 16, g * 16], [1.0, 1.0]], requires_grad=True)
        logits = F.linear(A.mean((2, 3)), W)
        lw = W if closed else None
        maps = explanation_maps(logits, A, torch.tensor([0]), "gradcampp", True, linear_weight=lw)
        assert torch.isfinite(maps).all()
        grads = torch.autograd.grad(maps.sum(), (A, W))
        assert all(torch.isfinite(t).all() for t in grads)


# --------------------------------------------------------------------------- errors
def test_error_messages():
    net = make(GapNet)
    a = net.forward_features(images())
    logits = net.forward_head(a)
    t = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="Unknown explanation method 'gradcam\\+\\+'"):
        explanation_maps(logits, a, t, "gradcam++")
    with pytest.raises(ValueError, match="linear_weight"):
        explanation_maps(logits, a, t, "cam")
    with pytest.raises(ValueError, match=r"activations must be \(B, K, h, w\)"):
        explanation_maps(logits, a[0], t, "gradcam")
    with pytest.raises(ValueError, match=r"logits must be \(B, C\)"):
        explanation_maps(logits[:2], a, t, "gradcam")
    with pytest.raises(ValueError, match=r"logits must be \(B, C\)"):
        explanation_maps(logits[:, :, None], a, t, "gradcam")
    with pytest.raises(ValueError, match=r"target must be \(B,\) or \(B, T\)"):
        explanation_maps(logits, a, t[:2], "gradcam")
    with pytest.raises(ValueError, match=r"target must be \(B,\) or \(B, T\)"):
        explanation_maps(logits, a, t[:, None, None], "gradcam")
    with pytest.raises(ValueError, match="integer class indices"):
        explanation_maps(logits, a, t.to(DT), "gradcam")
