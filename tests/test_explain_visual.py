"""Picture helpers: resizing, normalising, guided backprop, guided Grad-CAM, overlays."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill.explain import (
    GuidedReLUMode,
    denormalize,
    explanation_maps,
    guided_backprop,
    guided_gradcam,
    normalize_maps,
    overlay,
    resize_maps,
)
from distill.models import build_model
from tests.support import SHARED_CIFAR

DT = torch.float64
CIFAR_JPEG = SHARED_CIFAR
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


# --------------------------------------------------------------------------- resize / normalise
def test_resize_shapes_and_matches_interpolate():
    torch.manual_seed(0)
    maps = torch.rand(2, 3, 5, 7, dtype=DT)
    out = resize_maps(maps, (32, 30))
    assert out.shape == (2, 3, 32, 30)
    ref = torch.stack(
        [
            F.interpolate(maps[:, t : t + 1], size=(32, 30), mode="bilinear", align_corners=False)[
                :, 0
            ]
            for t in range(3)
        ],
        dim=1,
    )
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    assert resize_maps(maps[:, 0], 32).shape == (2, 32, 32)
    torch.testing.assert_close(resize_maps(maps[:, 1], (32, 30)), ref[:, 1], atol=1e-12, rtol=0)


def test_resize_is_bilinear_with_half_pixel_centres():
    # align_corners=False, 2 -> 4: source coordinates (-0.25, 0.25, 0.75, 1.25), clamped.
    m = torch.tensor([[[1.0, 3.0], [5.0, 11.0]]], dtype=DT)
    w = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]], dtype=DT)
    expected = w @ m[0] @ w.T
    torch.testing.assert_close(resize_maps(m, (4, 4))[0], expected, atol=1e-12, rtol=0)


def test_resize_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(B, h, w\) or \(B, T, h, w\)"):
        resize_maps(torch.zeros(4, 4), (8, 8))


def test_normalize_maps_range_constant_and_no_nan():
    torch.manual_seed(1)
    maps = torch.rand(2, 3, 4, 5) * 7 - 2
    maps[0, 1] = 3.5  # constant map
    maps[1, 2] = 0.0  # all-zero map
    out = normalize_maps(maps)
    assert out.shape == maps.shape and torch.isfinite(out).all()
    assert (out >= 0).all() and (out <= 1).all()
    assert (out[0, 1] == 0).all() and (out[1, 2] == 0).all()
    for b, t in [(0, 0), (0, 2), (1, 0), (1, 1)]:
        m = maps[b, t].numpy().astype(np.float64)
        ref = (m - m.min()) / (m.max() - m.min())
        np.testing.assert_allclose(out[b, t].numpy(), ref, atol=1e-6)
        assert out[b, t].min() == 0 and abs(float(out[b, t].max()) - 1) < 1e-6
    assert normalize_maps(torch.rand(3, 4, 4)).shape == (3, 4, 4)


def test_denormalize_inverts_normalisation():
    torch.manual_seed(2)
    x = torch.rand(2, 3, 4, 4, dtype=DT)
    mean, std = torch.tensor(CIFAR_MEAN, dtype=DT), torch.tensor(CIFAR_STD, dtype=DT)
    normed = (x - mean[:, None, None]) / std[:, None, None]
    torch.testing.assert_close(denormalize(normed, CIFAR_MEAN, CIFAR_STD), x)
    torch.testing.assert_close(denormalize(normed[0], mean, std), x[0])
    assert denormalize(torch.full((3, 2, 2), 100.0), CIFAR_MEAN, CIFAR_STD).max() == 1.0


# --------------------------------------------------------------------------- guided backprop
RELU_STYLES = {
    "F.relu": F.relu,
    "F.relu_inplace": lambda h: F.relu(h, inplace=True),
    "F.relu_": F.relu_,
    "torch.relu": torch.relu,
    "torch.relu_": torch.relu_,
    "Tensor.relu": lambda h: h.relu(),
    "Tensor.relu_": lambda h: h.relu_(),
    "nn.ReLU": nn.ReLU(),
    "nn.ReLU_inplace": nn.ReLU(inplace=True),
}


class Mlp(nn.Module):
    """x -> h1 -> relu -> h2 -> relu -> logits, with a selectable ReLU spelling."""

    def __init__(self, relu, d_in=3 * 2 * 2, hidden=(7, 6), classes=4):
        super().__init__()
        self.l1 = nn.Linear(d_in, hidden[0])
        self.l2 = nn.Linear(hidden[0], hidden[1])
        self.l3 = nn.Linear(hidden[1], classes)
        self.relu = relu

    def forward(self, x):
        r1 = self.relu(self.l1(x.flatten(1)))
        return self.l3(self.relu(self.l2(r1)))


def hand_guided(net, x, target):
    """Guided backprop derived by hand for ``Mlp`` (no autograd)."""
    W1, W2, W3 = net.l1.weight, net.l2.weight, net.l3.weight
    h1 = x.flatten(1) @ W1.T + net.l1.bias
    h2 = h1.clamp(min=0) @ W2.T + net.l2.bias
    g_r2 = W3[target]  # (B, hidden2)
    g_h2 = g_r2.clamp(min=0) * (h2 > 0)
    g_r1 = g_h2 @ W2
    g_h1 = g_r1.clamp(min=0) * (h1 > 0)
    return (g_h1 @ W1).reshape(x.shape)


@pytest.mark.parametrize("style", list(RELU_STYLES))
def test_guided_backprop_matches_hand_derivation(style):
    torch.manual_seed(3)
    net = Mlp(RELU_STYLES[style]).to(DT)
    x = torch.randn(5, 3, 2, 2, dtype=DT)
    target = torch.tensor([0, 1, 2, 3, 1])
    with torch.no_grad():
        expected = hand_guided(net, x, target)
    got = guided_backprop(net, x, target)
    assert got.shape == x.shape
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    # It is not the plain gradient (so the ReLUs really were replaced) ...
    xr = x.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(net(xr).gather(1, target[:, None]).sum(), xr)
    assert (plain - got).abs().max() > 1e-3
    # ... and the mode does not leak: afterwards the same call is the plain gradient again.
    xr = x.clone().requires_grad_(True)
    (again,) = torch.autograd.grad(net(xr).gather(1, target[:, None]).sum(), xr)
    torch.testing.assert_close(again, plain, atol=0, rtol=0)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_guided_backprop_matches_captum_on_relu_modules():
    from captum.attr import GuidedBackprop

    torch.manual_seed(4)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
    ).to(DT)
    x = torch.randn(3, 3, 6, 6, dtype=DT)
    target = torch.tensor([4, 0, 2])
    ref = GuidedBackprop(net).attribute(x, target=target)
    torch.testing.assert_close(guided_backprop(net, x, target), ref, atol=1e-12, rtol=0)


class _RefGuidedReLU(torch.autograd.Function):
    """Test-side guided ReLU, independent of distill.explain.visual."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return torch.where(x > 0, grad.clamp(min=0), torch.zeros_like(grad))


@pytest.fixture(scope="module")
def wrn():
    torch.manual_seed(5)
    model = build_model("wrn16_1", 10).to(DT)
    torch.manual_seed(6)
    return model, torch.randn(2, 3, 32, 32, dtype=DT)


def test_guided_backprop_on_wrn_functional_relu(wrn, monkeypatch):
    model, x = wrn
    target = torch.tensor([3, 8])
    model.train()
    model.groups[1].eval()  # a mixed state, to be restored exactly
    modes = [m.training for m in model.modules()]
    got = guided_backprop(model, x, target)
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())

    model.eval()
    xr = x.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(model(xr).gather(1, target[:, None]).sum(), xr)
    # Reference: the WRN's F.relu swapped for the test's own guided ReLU (eval mode).
    monkeypatch.setattr(F, "relu", lambda h, inplace=False: _RefGuidedReLU.apply(h))
    xr = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(model(xr).gather(1, target[:, None]).sum(), xr)
    monkeypatch.undo()
    model.train()
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    assert (got - plain).abs().max() > 1e-3 * plain.abs().max()
    assert torch.isfinite(got).all() and got.abs().sum() > 0


def test_guided_relu_mode_in_place_keeps_semantics():
    x = torch.tensor([-1.0, 2.0, 3.0], dtype=DT, requires_grad=True)
    with GuidedReLUMode():
        h = x * 1.0
        h.relu_()  # result discarded: h itself must now hold the ReLU
        out = (h * torch.tensor([-5.0, -7.0, 4.0], dtype=DT)).sum()
    assert h.tolist() == [0.0, 2.0, 3.0]
    (g,) = torch.autograd.grad(out, x)
    assert g.tolist() == [0.0, 0.0, 4.0]  # negative gradient blocked at the positive input


# --------------------------------------------------------------------------- guided Grad-CAM
@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "cam"])
def test_guided_gradcam_is_guided_backprop_times_map(wrn, method):
    model, x = wrn
    model.eval()
    target = torch.tensor([1, 6])
    got = guided_gradcam(model, x, target, method=method)
    assert got.shape == (2, 3, 32, 32)
    a = model.forward_features(x).detach().requires_grad_(True)
    lw = model.fc.weight if method == "cam" else None
    maps = explanation_maps(model.forward_head(a), a, target, method, linear_weight=lw)
    up = F.interpolate(maps.detach()[:, None], size=(32, 32), mode="bilinear", align_corners=False)
    expected = guided_backprop(model, x, target) * up
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-9)
    assert got.abs().sum() > 0


def test_guided_gradcam_autograd_head_with_frozen_parameters():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True))
            self.head = nn.Sequential(
                nn.Flatten(), nn.Linear(4 * 8 * 8, 6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 3)
            )

        def forward_features(self, x):
            return F.max_pool2d(self.body(x), 2)

        def forward_head(self, a):
            return self.head(a)

        def forward(self, x):
            return self.forward_head(self.forward_features(x))

    torch.manual_seed(7)
    net = Net().to(DT).train()
    net.requires_grad_(False)
    x = torch.randn(2, 3, 16, 16, dtype=DT)
    out1 = guided_gradcam(net, x, 1)
    out2 = guided_gradcam(net, x, torch.tensor([1, 1]))
    assert out1.shape == (2, 3, 16, 16) and torch.isfinite(out1).all()
    torch.testing.assert_close(out1, out2, atol=0, rtol=0)  # eval mode: dropout is off
    assert net.training


# --------------------------------------------------------------------------- overlay
def test_overlay_blends_colormap_where_map_is_high():
    from matplotlib import colormaps

    image = torch.full((3, 8, 10), 0.5)
    image[0] = torch.linspace(0, 1, 10)
    cam = torch.zeros(4, 5)
    cam[0, 0] = 1.0  # high in the top-left corner
    out = overlay(image, cam, alpha=0.4)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == (8, 10, 3)
    img = (image.permute(1, 2, 0).numpy() * 255).round()
    jet = colormaps["jet"]
    top = 0.6 * image[:, 0, 0].numpy() + 0.4 * np.asarray(jet(1.0)[:3])
    low = 0.6 * image[:, -1, -1].numpy() + 0.4 * np.asarray(jet(0.0)[:3])
    np.testing.assert_allclose(out[0, 0], top * 255, atol=1)
    np.testing.assert_allclose(out[-1, -1], low * 255, atol=1)
    assert np.abs(out[0, 0] - img[0, 0]).max() > 50
    # alpha = 0 gives the picture back; a uint8 HWC numpy image works too.
    np.testing.assert_allclose(overlay(image, cam, alpha=0.0), img, atol=1)
    hwc = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    np.testing.assert_allclose(overlay(hwc, cam.numpy(), alpha=0.4), out, atol=1)
    with pytest.raises(ValueError, match=r"\(h, w\)"):
        overlay(image, cam[None])


# --------------------------------------------------------------------------- real picture
def _first_test_jpeg(archive: Path) -> tuple[str, bytes]:
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if (
                member.isfile()
                and member.name.startswith("cifar10-jpeg/test/")
                and member.name.endswith(".jpg")
            ):
                return member.name, tar.extractfile(member).read()
    raise AssertionError("no test image in the archive")


@pytest.mark.skipif(not CIFAR_JPEG.exists(), reason=f"{CIFAR_JPEG} not present")
def test_overlay_png_on_real_cifar_image(tmp_path):
    from PIL import Image

    from distill.explain import model_maps

    name, data = _first_test_jpeg(CIFAR_JPEG)
    picture = Image.open(io.BytesIO(data)).convert("RGB")
    assert picture.size == (32, 32)
    image = torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1).float() / 255
    x = (image - torch.tensor(CIFAR_MEAN)[:, None, None]) / torch.tensor(CIFAR_STD)[:, None, None]

    torch.manual_seed(0)
    model = build_model("wrn16_1", 10).eval()
    with torch.no_grad():
        a = model.forward_features(x[None])
        logits = model.forward_head(a)
    maps = model_maps(model, logits, a, logits.argmax(1), "gradcampp")
    assert maps.shape == (1, 8, 8) and torch.isfinite(maps).all()

    blended = overlay(denormalize(x, CIFAR_MEAN, CIFAR_STD), maps[0])
    path = tmp_path / (Path(name).stem + "_gradcampp.png")
    Image.fromarray(blended).save(path)
    assert path.exists()
    saved = np.asarray(Image.open(path))
    assert saved.shape == (32, 32, 3) and saved.dtype == np.uint8
    assert saved.std() > 0
    assert np.abs(saved.astype(int) - np.asarray(picture).astype(int)).max() > 10
