"""The CIFAR zoo of the KD benchmarks and the CIFAR-100 pair presets.

The parameter counts are those of the reference implementation, RepDistiller
(github.com/HobbitLong/RepDistiller, ``models/``), counted by instantiating its code for 100
classes (``sum(p.numel() for p in model.parameters())``); the stage shapes are its ``is_feat``
features 1 to -2, the ones its attention transfer compares. Its code is not part of this repo.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from distill.config_schema import check_config, check_model_options
from distill.explain import inspect_network
from distill.losses.attention import match_stages
from distill.models import Network, build_model, model_options
from distill.module import DistillModule, LossWeights
from tests.support import compose_config

REFERENCE_PARAMS = {
    # RepDistiller models/resnet.py, resnetN(num_classes=100)
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,  # RepDistiller models/resnet.py resnet8x4(num_classes=100)
    "resnet32x4": 7_433_860,  # RepDistiller models/resnet.py resnet32x4(num_classes=100)
    # RepDistiller models/vgg.py, vggN_bn(num_classes=100) (models/__init__.py maps 'vggN' to vggN_bn)
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "vgg16_cifar": 14_774_436,  # RepDistiller's vgg16 (vgg16_bn); 'vgg16' here is the VOC teacher
    "vgg19": 20_086_692,
    "mobilenetv2": 812_836,  # RepDistiller models/mobilenetv2.py mobile_half(100)
    "shufflenetv1": 949_258,  # RepDistiller models/ShuffleNetv1.py ShuffleV1(num_classes=100)
    "shufflenetv2": 1_355_528,  # RepDistiller models/ShuffleNetv2.py ShuffleV2(num_classes=100)
}

# (channels, grid) of the explained layer at 32 px, and the (channels, grid) of each stage output.
NARROW = ((64, 8), [(16, 32), (32, 16), (64, 8)])
VGG = ((512, 4), [(128, 16), (256, 8), (512, 4), (512, 4)])
SHAPES = {
    **{f"resnet{d}": NARROW for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": ((256, 8), [(64, 32), (128, 16), (256, 8)]),
    "resnet32x4": ((256, 8), [(64, 32), (128, 16), (256, 8)]),
    **{name: VGG for name in ("vgg8", "vgg11", "vgg13", "vgg16_cifar", "vgg19")},
    "mobilenetv2": ((1280, 2), [(12, 16), (16, 8), (48, 4), (160, 2)]),
    "shufflenetv1": ((960, 4), [(240, 16), (480, 8), (960, 4)]),
    "shufflenetv2": ((1024, 4), [(116, 16), (232, 8), (464, 4)]),
}
ZOO = sorted(REFERENCE_PARAMS)


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ZOO)
def test_parameter_count_is_the_reference_one(name):
    assert _n_params(build_model(name, 100)) == REFERENCE_PARAMS[name]


@pytest.mark.parametrize("name", ZOO)
def test_contract_grid_stages_and_linear_map_path(name, images):
    torch.manual_seed(0)
    model = build_model(name, 100).eval()
    (channels, grid), stages = SHAPES[name]
    with torch.no_grad():
        features, outputs = model.forward_stages(images[:1])
    assert isinstance(model, Network) and model.num_classes == 100
    assert features.shape == (1, channels, grid, grid)
    assert (features >= 0).all() and (features > 0).any()  # after the final ReLU
    assert [(s.shape[1], s.shape[-1]) for s in outputs] == stages
    # The head is global average pooling + the last Linear: the closed-form map path.
    spec = inspect_network(model, images)
    assert spec.path == "linear" and spec.deterministic_head
    assert spec.linear(model) is [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    a = torch.rand(2, channels, 3, 5, generator=torch.Generator().manual_seed(1))
    lin = spec.linear(model)
    with torch.no_grad():
        expected = a.double().mean(dim=(2, 3)) @ lin.weight.double().T + lin.bias.double()
        torch.testing.assert_close(model.forward_head(a).double(), expected, rtol=1e-5, atol=1e-6)


# ============================================================================ the pair presets
PRESETS = {  # experiment -> (teacher, student, lr, number of stage resolutions AT compares)
    "cifar100_resnet32x4_resnet8x4": ("resnet32x4", "resnet8x4", 0.05, 3),
    "cifar100_resnet56_resnet20": ("resnet56", "resnet20", 0.05, 3),
    "cifar100_vgg13_vgg8": ("vgg13", "vgg8", 0.05, 3),
    "cifar100_resnet32x4_shufflenetv2": ("resnet32x4", "shufflenetv2", 0.01, 2),  # 16 and 8 px
    "cifar100_vgg13_mobilenetv2": ("vgg13", "mobilenetv2", 0.01, 3),  # 16, 8 and 4 px
    "cifar100_kd": ("wrn40_2", "wrn16_2", 0.05, 3),
}


@pytest.mark.parametrize("experiment", sorted(PRESETS))
def test_pair_preset_composes_with_kd_and_explain_and_builds(experiment, tmp_path):
    teacher, student, lr, _ = PRESETS[experiment]
    cfg = compose_config(tmp_path, [f"experiment={experiment}", "kd=hinton", "explain=gradcampp"])
    check_config(cfg)
    check_model_options(cfg)
    assert (cfg.task_name, cfg.teacher.name, cfg.student.name, cfg.data.name) == (
        experiment, teacher, student, "cifar100")
    # RepDistiller's protocol (train_student.py): 240 epochs, batch 64, SGD momentum 0.9, wd 5e-4,
    # x0.1 at 150/180/210; lr 0.05, 0.01 for the MobileNetV2 / ShuffleNet students.
    opt, sched = cfg.optim.optimizer, cfg.optim.scheduler
    assert (cfg.trainer.max_epochs, cfg.data.batch_size) == (240, 64)
    assert (opt.lr, opt.momentum, opt.nesterov, opt.weight_decay) == (lr, 0.9, False, 5e-4)
    assert (list(sched.milestones), sched.gamma) == ([150, 180, 210], 0.1)
    # The command line's kd= / explain= win over the preset's kd=hinton_cifar100.
    assert (cfg.kd.name, cfg.loss.ce, cfg.loss.kd) == ("hinton", 1.0, 1.0)
    assert cfg.explain.method == "gradcampp" and cfg.loss.explain > 0
    for role in ("teacher", "student"):
        node = OmegaConf.to_container(cfg[role], resolve=True)
        model = build_model(node["name"], int(cfg.data.num_classes), **model_options(node)).eval()
        with torch.no_grad():
            features = model.forward_features(torch.zeros(1, 3, 32, 32))
            assert model.forward_head(features).shape == (1, 100)
        assert features.shape[-1] == features.shape[-2] >= 2  # a real map at 32 px


def test_benchmark_at_weight(tmp_path):
    cfg = compose_config(tmp_path, ["experiment=cifar100_vgg13_vgg8", "kd=at_cifar100"])
    check_config(cfg)
    assert (cfg.kd.name, cfg.loss.ce, cfg.loss.kd, cfg.loss.at) == ("at_cifar100", 1.0, 0.0, 1000.0)


def at_reference(student_stages: list[torch.Tensor], teacher_stages: list[torch.Tensor]) -> float:
    """AT (Zagoruyko & Komodakis, 2017, eq. 2 with p = 2, squared, as in their code) in float64
    numpy: for each resolution both networks have, the last stage of that resolution of each;
    mean over batch and positions of (Q_S / ||Q_S|| - Q_T / ||Q_T||)^2 with Q = mean_k A_k^2."""
    def q(a: torch.Tensor) -> np.ndarray:
        v = (a.detach().double().numpy() ** 2).mean(axis=1).reshape(a.shape[0], -1)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    student = {s.shape[-1]: s for s in student_stages}
    teacher = {t.shape[-1]: t for t in teacher_stages}
    return sum(float(((q(student[r]) - q(teacher[r])) ** 2).mean()) for r in teacher if r in student)


@pytest.mark.parametrize("experiment", sorted(PRESETS))
def test_attention_transfer_between_the_pair(experiment):
    teacher_name, student_name, _, n_pairs = PRESETS[experiment]
    torch.manual_seed(0)
    teacher, student = build_model(teacher_name, 100).eval(), build_model(student_name, 100)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # the student in train mode, as in the module (BN on batch statistics)
        teacher_stages, student_stages = teacher.forward_stages(x)[1], student.forward_stages(x)[1]
    pairs = match_stages(student_stages, teacher_stages)
    assert len(pairs) == n_pairs
    # Through the module, as kd=at runs it: a finite AT term whose gradient reaches the student.
    module = DistillModule(student, teacher, optimizer=None, weights=LossWeights(ce=1.0, at=500.0))
    terms, _ = module.loss_terms(x, torch.tensor([3, 7]))
    assert set(terms) == {"ce", "at"}
    at = terms["at"]
    assert torch.isfinite(at) and at > 0
    expected = at_reference(student_stages, teacher_stages)
    assert at.item() == pytest.approx(expected, rel=1e-5)
    at.backward()
    first_conv = next(m for m in student.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0
