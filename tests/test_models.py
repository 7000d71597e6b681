"""Wide ResNets and the model registry, checked against the WRN paper's architecture.

Expected parameter counts are worked out from the architecture (pre-activation basic
blocks, widths 16, 16k, 32k, 64k, 1x1 shortcut convs where a block changes shape, final
BN, linear head), not read off the code.
"""

from __future__ import annotations

import urllib.error

import numpy as np
import pytest
import torch
from torch import nn

from distill.errors import ConfigError, DistillError
from distill.explain import inspect_network
from distill.models import MODELS, Network, WideResNet, build_model, register_model
from distill.models.vgg import vgg11_student, vgg16

EXPECTED_PARAMS = {"wrn40_2": 2_243_546, "wrn16_2": 691_674}


def _arch_params(depth: int, k: int, num_classes: int) -> int:
    """Parameter count of WRN-depth-k from the paper's architecture (independent of the code)."""
    n = (depth - 4) // 6
    widths = [16, 16 * k, 32 * k, 64 * k]
    total = 3 * 16 * 9  # stem 3x3 conv, no bias
    for g in range(3):
        for i in range(n):
            cin = widths[g] if i == 0 else widths[g + 1]
            cout = widths[g + 1]
            total += 2 * cin + 9 * cin * cout + 2 * cout + 9 * cout * cout  # BN, conv, BN, conv
            if i == 0 and (cin != cout or g > 0):
                total += cin * cout  # 1x1 shortcut
    return total + 2 * widths[3] + widths[3] * num_classes + num_classes  # final BN + linear


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,depth,k", [("wrn40_2", 40, 2), ("wrn16_2", 16, 2)])
def test_parameter_counts(name, depth, k):
    expected = EXPECTED_PARAMS[name]
    assert _arch_params(depth, k, 10) == expected  # the constants agree with the architecture
    got = _n_params(build_model(name, 10))
    print(f"{name}: {got:,} parameters (expected {expected:,})")
    assert got == expected


def test_parameter_count_wrn16_1_and_classes():
    assert _n_params(build_model("wrn16_1", 10)) == _arch_params(16, 1, 10)
    # 100 classes adds 90 * (128 + 1) head parameters to WRN-16-2.
    assert _n_params(build_model("wrn16_2", 100)) == EXPECTED_PARAMS["wrn16_2"] + 90 * 129


@pytest.mark.parametrize(
    "name,n3x3,n1x1",
    [
        ("wrn40_2", 6 * 6 + 1, 3),  # 6 blocks x 3 groups x 2 convs + stem; all groups widen
        ("wrn16_2", 2 * 6 + 1, 3),
        ("wrn16_1", 2 * 6 + 1, 2),  # group 1 is 16 -> 16 at stride 1: identity shortcut
    ],
)
def test_conv_structure(name, n3x3, n1x1):
    model = build_model(name, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert sum(c.kernel_size == (3, 3) for c in convs) == n3x3
    assert sum(c.kernel_size == (1, 1) for c in convs) == n1x1
    assert len(convs) == n3x3 + n1x1
    assert all(c.bias is None for c in convs)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and linears[0].out_features == 10


@pytest.fixture(scope="module")
def wrn16_2():
    torch.manual_seed(0)
    return build_model("wrn16_2", 10)


def test_features_final_bn_relu(wrn16_2):
    model = wrn16_2.train()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats, groups = model.forward_stages(x)
    assert feats.shape == (2, 128, 8, 8)
    assert (feats >= 0).all()
    assert (feats == 0).any() and (feats > 0).any()
    # Train mode: features = ReLU(BN(last group output)) with batch statistics, weight 1, bias 0
    # at init; recomputed in float64 numpy.
    g = groups[-1].double().numpy()
    mean = g.mean(axis=(0, 2, 3), keepdims=True)
    var = g.var(axis=(0, 2, 3), keepdims=True)
    ref = np.maximum((g - mean) / np.sqrt(var + 1e-5), 0.0)
    np.testing.assert_allclose(feats.double().numpy(), ref, rtol=1e-4, atol=1e-4)
    model.eval()


def test_head_is_pool_then_linear(wrn16_2):
    model = wrn16_2.eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        feats = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(feats), model(x), rtol=1e-5, atol=1e-6)
    assert isinstance(model, Network)
    spec = inspect_network(model, x)
    assert spec.path == "linear" and spec.deterministic_head
    lin = spec.linear(model)
    assert isinstance(lin, nn.Linear) and (lin.in_features, lin.out_features) == (128, 10)
    # It is the final layer: the last Linear among the modules, and its output is the logits.
    assert lin is [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    # forward_head(a) == W mean_hw(a) + b for any activations (numpy float64, other sizes too).
    with torch.no_grad():
        lin.bias.copy_(torch.linspace(-1, 1, 10))  # a non-zero bias so that it is tested
        a = torch.rand(2, 128, 5, 3, generator=torch.Generator().manual_seed(3))
        got = model.forward_head(a)
        torch.testing.assert_close(got, lin(a.mean((2, 3))))
    w, b = lin.weight.detach().double().numpy(), lin.bias.detach().double().numpy()
    ref = a.double().numpy().mean(axis=(2, 3)) @ w.T + b
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=1e-5, atol=1e-5)


def test_forward_stages_shapes(wrn16_2):
    model = wrn16_2.eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        feats, groups = model.forward_stages(x)
        torch.testing.assert_close(feats, model.forward_features(x))
    assert feats.shape == (2, 128, 8, 8)
    assert [tuple(g.shape) for g in groups] == [(2, 32, 32, 32), (2, 64, 16, 16), (2, 128, 8, 8)]
    # Group outputs are the raw residual stream (before the final BN + ReLU): they go negative.
    assert (groups[-1] < 0).any()


def test_eval_features_independent_of_batch(wrn16_2):
    model = wrn16_2.eval()
    g = torch.Generator().manual_seed(5)
    x, other = torch.randn(2, 3, 32, 32, generator=g), 10 * torch.randn(1, 3, 32, 32, generator=g)
    with torch.no_grad():
        alone = model.forward_features(x[:1])
        with_a = model.forward_features(x)[:1]
        with_b = model.forward_features(torch.cat([x[:1], other]))[:1]
    torch.testing.assert_close(with_a, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(with_b, alone, rtol=1e-5, atol=1e-5)


def test_build_model_errors():
    with pytest.raises(ConfigError, match="unknown model") as info:
        build_model("resnet_nonexistent", 10)
    for name in ("wrn16_1", "wrn16_2", "wrn40_2", "timm", "torchvision"):
        assert name in str(info.value)
    for bad in (0, -3):
        with pytest.raises(ConfigError, match="num_classes"):
            build_model("wrn16_1", bad)
    for depth in (15, 17, 20, 41):
        with pytest.raises(ValueError, match="6n"):
            WideResNet(depth, 1, 10)
    assert _n_params(WideResNet(10, 1, 10)) == _arch_params(10, 1, 10)  # depth 10 = 6 * 1 + 4: one block a group


def test_register_model():
    name = "_test_tiny_wrn"
    assert name not in MODELS
    try:

        @register_model(name)
        def tiny(num_classes: int = 10, **kw):
            return WideResNet(10, 1, num_classes, **kw)

        assert callable(tiny) and MODELS[name] is tiny  # decorator returns the factory
        model = build_model(name, 3, drop_rate=0.1)
        assert isinstance(model, WideResNet) and model.num_classes == 3
        assert model.fc.out_features == 3
        with pytest.raises(ConfigError, match=name):
            build_model("_still_unknown", 3)  # the error lists the new name too

        @register_model("_test_bad_depth")
        def bad(num_classes: int = 10, **kw):
            return WideResNet(11, 1, num_classes, **kw)

        with pytest.raises(ValueError, match="6n"):
            build_model("_test_bad_depth", 10)
    finally:
        MODELS.pop(name, None)
        MODELS.pop("_test_bad_depth", None)
    assert name not in MODELS
    with pytest.raises(ConfigError):
        build_model(name, 3)


# =========================================================================== VGG (PASCAL VOC)
TINY = {"width": 0.0625, "hidden": 16}  # 4..32 channels: milliseconds per batch


def test_student_has_27m_parameters_and_vgg11_layers():
    model = vgg11_student(20)
    assert abs(sum(p.numel() for p in model.parameters()) - 27e6) <= 1e6
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(convs) == 8 and len(linears) == 3  # 11 weight layers
    assert [c.out_channels for c in convs] == [64, 128, 256, 256, 512, 512, 512, 512]
    a = model.forward_features(torch.randn(2, 3, 64, 64))
    assert a.shape == (2, 512, 4, 4)  # before the final max-pool: H/16
    assert model.forward_head(a).shape == (2, 20)


@pytest.fixture(scope="module")
def torchvision_vgg16():
    import torchvision

    return torchvision.models.vgg16(num_classes=20).eval()


def test_vgg16_is_torchvision_vgg16_and_explains_the_last_conv_block(torchvision_vgg16):
    reference = torchvision_vgg16
    model = vgg16(20).eval()
    model.load_state_dict(reference.state_dict(), strict=True)  # same names and shapes
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = model.forward_features(x)
        assert a.shape == (2, 512, 4, 4)
        assert torch.allclose(a, reference.features[:30](x))  # output of the last conv block's ReLU
        assert isinstance(reference.features[30], torch.nn.MaxPool2d)  # ... before the final max-pool
        assert torch.allclose(model.forward_head(a), reference(x), atol=1e-6)
    assert abs(sum(p.numel() for p in model.parameters()) - 134.3e6) < 0.1e6  # 138.4 M with 1000 classes


def test_pretrained_vgg16_loads_imagenet_weights_except_the_head(torchvision_vgg16, monkeypatch):
    state = dict(torchvision_vgg16.state_dict())  # ImageNet's file has a 1000-way head:
    state["classifier.6.weight"], state["classifier.6.bias"] = torch.randn(1000, 4096), torch.randn(1000)
    calls = []

    def from_cache(url, **kwargs):
        calls.append(url)
        return state

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", from_cache)
    model = vgg16(20, pretrained=True, finetune="head")
    assert calls and calls[0].endswith("vgg16-397923af.pth")
    own = model.state_dict()
    for key in ("features.0.weight", "features.28.bias", "classifier.0.weight", "classifier.3.weight"):
        assert torch.equal(own[key], state[key])
    assert own["classifier.6.weight"].shape == (20, 4096)
    assert not any(p.requires_grad for p in model.features.parameters())
    assert all(p.requires_grad for p in model.classifier.parameters())
    assert all(p.requires_grad for p in vgg16(20, finetune="all", **TINY).parameters())


def test_pretrained_vgg16_offline_is_a_clear_error(tmp_path, monkeypatch):
    def offline(url, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(DistillError) as info:
        vgg16(20, pretrained=True)
    msg = str(info.value)
    assert "teacher.pretrained=false" in msg and str(tmp_path) in msg and "URLError" in msg
    assert "IMAGENET1K_V1" in msg


def test_vgg_option_checks():
    with pytest.raises(ConfigError, match="finetune"):
        vgg16(20, finetune="last")
    with pytest.raises(ConfigError, match="width=1"):
        vgg16(20, pretrained=True, width=0.5)


def test_a_checkpoint_rebuilds_its_network_from_the_saved_build_spec(tmp_path):
    """The module records build_model's arguments (here a narrow VGG student): load_network rebuilds
    exactly that network, although the run's config node names none of its options."""
    from distill.checkpoints import load_network
    from distill.module import ClassifierModule

    spec = {"name": "vgg11_student", "num_classes": 20, "width": 0.0625, "hidden": 16}
    module = ClassifierModule(spec, model_name="vgg11_student", num_classes=20, stage="baseline",
                              config={"student": {"name": "vgg11_student"}})
    assert module.hparams["model"] == spec
    path = tmp_path / "student.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in module.model.state_dict().items()},
                "hyper_parameters": dict(module.hparams)}, path)
    model, hparams = load_network(path)
    assert hparams["stage"] == "baseline"
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model.eval()(x), module.model.eval()(x), rtol=0, atol=0)
