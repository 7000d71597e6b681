"""Any network behind the model contract: timm and torchvision classifiers with random weights.

Maps are checked against an independent float64 reference that explains one sample and one class
at a time with the plain Grad-CAM / Grad-CAM++ formulas (Grad-CAM eq. 1-2; Grad-CAM++ eq. 19
with the closed-form alpha of eq. 19's exponential-score derivation), through the full network.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import ConfigError
from distill.explain import explain_network, inspect_network, leaf_features, network_spec
from distill.models import Network, build_model

# (library, arch, expected path): the fast path each family must get (point 4 of the any-network work).
FAMILIES = [
    ("timm", "resnet18", "linear"),
    ("timm", "mobilenetv3_small_050", "pooled"),  # pool -> 1x1 conv -> act -> linear
    ("timm", "convnext_atto", "pooled"),  # pool -> LayerNorm -> linear
    ("timm", "efficientnet_b0", "linear"),
    ("torchvision", "resnet18", "linear"),
    ("torchvision", "mobilenet_v3_small", "pooled"),  # pool -> linear -> hardswish -> dropout -> linear
    ("torchvision", "vgg11_bn", "general"),  # flatten + hidden FC layers
]
SIZE = 64  # 2 x 2 maps at stride 32


def reference_maps(model: nn.Module, x: torch.Tensor, target: torch.Tensor, method: str) -> torch.Tensor:
    """One sample, one class at a time, in float64, from ``dS^c/dA`` through the whole head."""
    out = []
    for i in range(x.shape[0]):
        a = model.forward_features(x[i : i + 1]).detach().requires_grad_(True)
        with torch.enable_grad():
            score = model.forward_head(a)[0, target[i]]
            (g,) = torch.autograd.grad(score, a)
        a, g = a[0], g[0]  # (K, h, w)
        if method == "gradcam":
            w = g.mean(dim=(1, 2))
        else:
            s = a.sum(dim=(1, 2), keepdim=True)
            denom = 2 * g**2 + s * g**3
            alpha = torch.where(denom != 0, g**2 / torch.where(denom != 0, denom, torch.ones_like(denom)), 0.0)
            w = (alpha * F.relu(g)).sum(dim=(1, 2))
        out.append(F.relu((w[:, None, None] * a).sum(0)))
    return torch.stack(out)


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda p: f"{p[0]}-{p[1]}")
def family(request):
    library, arch, path = request.param
    torch.manual_seed(0)
    model = build_model(library, 5, arch=arch).eval()
    spec = inspect_network(model, torch.randn(2, 3, SIZE, SIZE))
    return model, spec, path


def test_fast_path_is_the_one_the_head_allows(family):
    model, spec, expected = family
    assert isinstance(model, Network)
    assert spec.path == expected


@pytest.mark.parametrize("method", ["gradcam", "gradcampp"])
def test_maps_equal_float64_per_sample_reference(family, method):
    model, _, _ = family
    model = model.double()
    try:
        x = torch.randn(3, 3, SIZE, SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        target = torch.tensor([0, 3, 4])
        with torch.no_grad():
            features = model.forward_features(x)
        maps = explain_network(model, features, target, method)  # the chosen fast path
        general = explain_network(model, leaf_features(model, x), target, method, closed_form=False)
        expected = reference_maps(model, x, target, method)
        assert expected.abs().sum() > 0
        torch.testing.assert_close(maps, expected, rtol=1e-7, atol=1e-9 * expected.abs().max().item())
        torch.testing.assert_close(general, expected, rtol=1e-7, atol=1e-9 * expected.abs().max().item())
    finally:
        model.float()


def test_student_maps_reach_the_body(family):
    model, _, _ = family
    model.train()
    try:
        x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
        features = model.forward_features(x)
        logits = model.forward_head(features)
        maps = explain_network(model, features, torch.tensor([1, 2]), "gradcampp", logits=logits, create_graph=True)
        first = next(p for p in model.parameters() if p.dim() == 4)  # the stem convolution
        (grad,) = torch.autograd.grad(maps.square().sum(), first)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    finally:
        model.eval()


def test_pooled_path_makes_no_full_size_gradient(monkeypatch):
    """A pool-first non-linear head: one autograd call, with respect to the pooled (B, K) vector."""
    model = build_model("timm", 5, arch="convnext_atto").eval()
    inspect_network(model, torch.randn(2, 3, 32, 32))
    shapes, real = [], torch.autograd.grad

    def recording(outputs, inputs, *args, **kwargs):
        shapes.append(tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else tuple(inputs[0].shape))
        return real(outputs, inputs, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", recording)
    with torch.no_grad():
        features = model.forward_features(torch.randn(4, 3, 32, 32))
    explain_network(model, features, torch.tensor([[0, 1], [2, 3], [4, 0], [1, -1]]), "gradcampp")
    assert shapes == [(4, features.shape[1])]


def test_timm_head_dropout_gives_maps_with_dropout_off():
    torch.manual_seed(0)
    model = build_model("timm", 5, arch="resnet18", drop_rate=0.5)
    spec = inspect_network(model, torch.randn(2, 3, 32, 32))
    assert not spec.deterministic_head
    model.train()
    x = torch.randn(2, 3, 32, 32)
    features = leaf_features(model, x)
    first = explain_network(model, features, torch.tensor([0, 1]), "gradcam", closed_form=False)
    again = explain_network(model, features, torch.tensor([0, 1]), "gradcam", closed_form=False)
    torch.testing.assert_close(first, again)  # train mode, yet not random
    model.eval()
    torch.testing.assert_close(explain_network(model, features, torch.tensor([0, 1]), "gradcam",
                                               closed_form=False), first)


def test_channels_last_features_are_permuted():
    """timm Swin returns (B, h, w, K): the adapter explains channels, not a spatial axis."""
    model = build_model("timm", 5, arch="swin_tiny_patch4_window7_224", img_size=64, depths=(1, 1, 1, 1),
                        embed_dim=24, num_heads=(1, 1, 1, 1), window_size=2).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        raw = model.model.forward_features(x)
        features = model.forward_features(x)
        assert raw.shape[-1] == features.shape[1] == 192 and features.shape[-2:] == raw.shape[1:3]
        torch.testing.assert_close(model.forward_head(features), model.model(x))
    assert inspect_network(model, x).path == "linear"  # its LayerNorm is in forward_features: pool -> linear


def test_vit_is_refused_with_what_to_use():
    model = build_model("timm", 5, arch="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
    with pytest.raises(ConfigError, match=r"token models .* stage=teacher\|baseline"):
        inspect_network(model, torch.randn(2, 3, 32, 32))


def test_torchvision_layer_by_name_and_skip_connection_refused():
    model = build_model("torchvision", 5, arch="resnet18", layer="layer3").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model.forward_features(x).shape[1] == 256
    assert inspect_network(model, x).path == "general"  # layer4 sits between layer3 and the pool
    with pytest.raises(ConfigError, match=r"layer='layer3.0.conv1'.*skip connection"):
        build_model("torchvision", 5, arch="resnet18", layer="layer3.0.conv1")
    with pytest.raises(ConfigError, match="is not a layer of this network"):
        build_model("torchvision", 5, arch="resnet18", layer="layer9")


def test_torchvision_split_equals_the_model():
    from torchvision.models import resnet18

    torch.manual_seed(0)
    reference = resnet18(num_classes=5).eval()
    torch.manual_seed(0)
    model = build_model("torchvision", 5, arch="resnet18").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())


def test_offline_weights_and_unknown_names_are_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: already imported
    from distill.errors import DistillError

    for library, options in (("torchvision", {"arch": "resnet18", "weights": "IMAGENET1K_V1"}),
                             ("timm", {"arch": "resnet18", "pretrained": True})):
        with pytest.raises(DistillError, match="neither cached nor downloadable") as info:
            build_model(library, 10, **options)
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="not a weight set of resnet18"):
        build_model("torchvision", 10, arch="resnet18", weights="IMAGENET9K")
    with pytest.raises(ConfigError, match="not a timm model"):
        build_model("timm", 10, arch="resnet_nonexistent")


def test_spec_is_measured_not_assumed():
    """A head that looks like pool + linear but is not (max pool) gets the general path."""

    class MaxPoolHead(nn.Module):
        num_classes = 3

        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 3)

        def forward_features(self, x):
            return F.relu(self.conv(x))

        def forward_head(self, a):
            return self.fc(a.amax(dim=(2, 3)))

    model = MaxPoolHead()
    assert inspect_network(model, torch.randn(2, 3, 8, 8)).path == "general"
    assert network_spec(model).path == "general"


# --------------------------------------------------------------------------- through train.py
# At 64 pixels every network below explains at least a 2x2 map (the minimum for an explanation loss).
PAIRS = {
    "timm": ["teacher=timm", "teacher.arch=resnet10t", "student=timm", "student.arch=mobilenetv3_small_050"],
    "torchvision": ["teacher=torchvision", "teacher.arch=resnet18", "student=torchvision",
                    "student.arch=mobilenet_v3_small"],
    "mixed": ["teacher=wrn16_2", "student=timm", "student.arch=convnext_atto"],
}


@pytest.mark.slow
@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_pairs_distill_through_train_py(pair, tmp_path):
    import json
    import math

    from tests.support import run_train

    proc = run_train(["experiment=smoke", "logger=none", "explain=gradcampp", "kd=hinton", "data.image_size=64",
                      "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.num_sanity_val_steps=0",
                      "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", *PAIRS[pair]], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = (tmp_path / "logs").rglob("metrics.json")
    metrics = json.loads(path.read_text())["metrics"]
    assert math.isfinite(metrics["test/map_cosine"]) and math.isfinite(metrics["train/explain"])


def test_attention_transfer_across_families_matches_stages_by_resolution():
    from functools import partial

    from distill.module import DistillModule, LossWeights

    torch.manual_seed(0)
    teacher, student = build_model("wrn16_2", 5), build_model("timm", 5, arch="resnet10t")
    module = DistillModule(student, teacher, optimizer=partial(torch.optim.SGD, lr=0.1),
                           weights=LossWeights(at=500.0))
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    _, t_stages = teacher.forward_stages(x)
    _, s_stages = student.forward_stages(x)
    shared = {tuple(t.shape[-2:]) for t in t_stages} & {tuple(s.shape[-2:]) for s in s_stages}
    assert shared == {(16, 16), (8, 8)}  # WRN groups at 32, 16, 8; ResNet stages at 16, 8, 4, 2, 1
    terms, _ = module.loss_terms(x, y)
    assert torch.isfinite(terms["at"]) and terms["at"] > 0
    with pytest.raises(ConfigError, match="lacks forward_stages"):
        DistillModule(build_model("torchvision", 5, arch="resnet18"), teacher,
                      optimizer=partial(torch.optim.SGD, lr=0.1), weights=LossWeights(at=500.0))


def test_docs_own_model_example_runs(capsys):
    from pathlib import Path

    from distill.models import MODELS

    page = (Path(__file__).resolve().parents[1] / "docs" / "your_own_model.md").read_text()
    code = page.split("<!-- own-model-example -->\n```python\n", 1)[1].split("```", 1)[0]
    try:
        exec(compile(code, "docs/your_own_model.md", "exec"), {})
        assert capsys.readouterr().out.strip() == "linear"
        assert MODELS["tinynet"](num_classes=3).num_classes == 3
    finally:
        MODELS.pop("tinynet", None)


def test_teacher_checkpoint_of_another_network_or_data_is_refused_in_one_line(tmp_path):
    from distill.checkpoints import load_network
    from distill.errors import CheckpointError
    from distill.identity import checkpoint_stem

    model = build_model("wrn16_1", 3)
    data = {"name": "image_folder", "root": "/data/a", "classes": ["x", "y", "z"]}
    saved = {"network": {"name": "wrn16_1"}, "data": data}
    path = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"model_name": "wrn16_1", "num_classes": 3, "identity": saved}}, path)
    other = {"network": {"name": "wrn16_1"}, "data": {**saved["data"], "root": "/data/b"}}
    with pytest.raises(CheckpointError, match=r"data\.root: '/data/a' \(checkpoint\) vs '/data/b' \(config\)") as info:
        load_network(path, build=lambda: build_model("wrn16_1", 3),
                     expected={"name": "wrn16_1", "num_classes": 3, "identity": other})
    assert "\n" not in str(info.value)
    loaded, _ = load_network(path, build=lambda: build_model("wrn16_1", 3),
                             expected={"name": "wrn16_1", "num_classes": 3, "identity": saved})
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())
    # The default file name tells networks and data apart.
    names = {checkpoint_stem(n, d) for n, d in ((saved["network"], saved["data"]), (other["network"], other["data"]),
                                                ({"name": "timm", "arch": "resnet18"}, saved["data"]),
                                                ({"name": "timm", "arch": "resnet50"}, saved["data"]))}
    assert len(names) == 4 and any(n.startswith("timm-resnet50_image_folder-") for n in names)


def test_timm_layer_by_name():
    import timm

    torch.manual_seed(0)
    reference = timm.create_model("resnet18", num_classes=5).eval()
    torch.manual_seed(0)
    model = build_model("timm", 5, arch="resnet18", layer="layer3").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape[1:] == (256, 4, 4)
        torch.testing.assert_close(model.forward_head(features), reference(x))
    assert inspect_network(model, x).path == "general"  # layer4 lies between layer3 and the pool


def test_a_model_without_the_contract_stops_before_training_also_without_explanations():
    from functools import partial

    from distill.module import DistillModule, LossWeights

    class Plain(nn.Module):  # a classifier with forward() only
        num_classes = 5

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 5)

        def forward(self, x):
            return self.fc(x.mean(dim=(2, 3)))

    for weights in (LossWeights(), LossWeights(kd=1.0)):  # explain=none, kd=none|hinton
        with pytest.raises(ConfigError, match=r"the student \(Plain\) lacks forward_features, forward_head") as info:
            DistillModule(Plain(), build_model("wrn16_1", 5), optimizer=partial(torch.optim.SGD, lr=0.1),
                          weights=weights)
        assert "\n" not in str(info.value)


@pytest.mark.slow
def test_vit_teacher_is_refused_before_it_is_trained(tmp_path):
    from tests.support import run_train

    proc = run_train(["experiment=smoke", "logger=none", "teacher=timm", "teacher.arch=vit_tiny_patch16_224",
                      "+teacher.img_size=16"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: TimmNetwork.forward_features gives shape")
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing was trained
