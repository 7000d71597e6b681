"""The distiller: frozen teacher, student-only optimizer, gradient flow of the explanation loss."""

from __future__ import annotations

import copy
import math
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from distill.errors import ConfigError
from distill.explain import explain_network
from distill.losses import map_cosine
from distill.models import build_model
from distill.models.vgg import vgg11_student, vgg16
from distill.module import DistillModule, ExplainSettings, LossWeights
from distill.tasks import MultilabelTask


def make_module(weights: LossWeights, method: str | None = "gradcampp", closed_form: bool = True, **explain):
    torch.manual_seed(0)
    teacher = build_model("wrn16_2", 10)
    # Non-trivial BN statistics, so "unchanged" is a real check.
    teacher.train()
    with torch.no_grad():
        for _ in range(2):
            teacher(torch.randn(8, 3, 32, 32))
    student = build_model("wrn16_1", 10)
    settings = ExplainSettings(method=method, closed_form=closed_form, **explain)
    return DistillModule(student, teacher, optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9),
                         weights=weights, explain=settings)


def batch(n: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def manual_steps(module: DistillModule, steps: int, data=None) -> list[float]:
    optimizer = module.configure_optimizers()
    module.train()
    losses = []
    x, y = data if data is not None else batch()
    for _ in range(steps):
        terms, _ = module.loss_terms(x, y)
        loss = module.total_loss(terms)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(terms.get("explain", loss)))
    return losses


ALL_TERMS = LossWeights(ce=1.0, kd=1.0, at=500.0, explain=0.01)


@pytest.mark.parametrize("closed_form", [True, False])
def test_teacher_weights_and_bn_statistics_unchanged(closed_form):
    module = make_module(ALL_TERMS, closed_form=closed_form)
    before = copy.deepcopy(module.teacher.state_dict())
    manual_steps(module, 3)
    assert not module.teacher.training
    assert all(not p.requires_grad for p in module.teacher.parameters())
    for key, value in module.teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in module.teacher.parameters())


def test_train_mode_keeps_teacher_in_eval():
    module = make_module(ALL_TERMS)
    module.train()
    assert module.model.training and not module.teacher.training
    assert all(not m.training for m in module.teacher.modules())


def test_optimizer_holds_student_parameters_only():
    module = make_module(ALL_TERMS)
    optimizer = module.configure_optimizers()
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.model.parameters()}
    assert not optimized & {id(p) for p in module.teacher.parameters()}


@pytest.mark.parametrize("closed_form", [True, False])
@pytest.mark.parametrize("method", ["gradcam", "gradcampp"])
def test_explain_term_alone_reaches_below_the_explained_layer(method, closed_form):
    module = make_module(LossWeights(ce=0.0, kd=0.0, explain=1.0), method=method, closed_form=closed_form)
    module.train()
    x, y = batch()
    terms, _ = module.loss_terms(x, y)
    assert set(terms) == {"ce", "explain"}
    module.total_loss(terms).backward()
    stem = module.model.conv1.weight.grad
    first_block = module.model.groups[0][0].conv1.weight.grad
    head = module.model.fc.weight.grad
    for grad in (stem, first_block):
        assert grad is not None and grad.abs().sum() > 0
    # Through the closed form, the head gets a gradient via W; through autograd via the 2nd order.
    assert head is not None and head.abs().sum() > 0


@pytest.mark.parametrize("distance", ["squared_l2", "normalized_squared_l2", "cosine"])
def test_explain_loss_falls_on_a_fixed_batch(distance):
    module = make_module(LossWeights(ce=0.0, kd=0.0, explain=1.0 if distance != "squared_l2" else 0.05),
                         distance=distance)
    losses = manual_steps(module, 8)
    assert losses[-1] < 0.7 * losses[0], losses


def test_autograd_and_closed_form_training_losses_agree():
    """The forced autograd path and the closed form give the same loss terms."""
    x, y = batch()
    a = make_module(ALL_TERMS, closed_form=True)
    b = make_module(ALL_TERMS, closed_form=False)
    b.load_state_dict(a.state_dict())
    terms_a, _ = a.loss_terms(x, y)
    terms_b, _ = b.loss_terms(x, y)
    for name in terms_a:
        torch.testing.assert_close(terms_a[name], terms_b[name], rtol=1e-4, atol=1e-6)


def test_teacher_prediction_target():
    module = make_module(LossWeights(ce=0.0, explain=1.0), target="teacher_pred")
    x, y = batch()
    logits = module.teacher(x)
    torch.testing.assert_close(module.map_target(y, logits), logits.argmax(1))


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="loss.kd is -1.0; loss weights must be >= 0"):
        LossWeights(kd=-1.0)
    with pytest.raises(ConfigError, match="temperature"):
        LossWeights(temperature=0.0)
    with pytest.raises(ConfigError, match="explain.method is null: set explain.method to one of cam, gradcam, "
                                          "gradcampp, hirescam, xgradcam, layercam"):
        make_module(LossWeights(explain=0.01), method=None)
    teacher, student = build_model("wrn16_1", 10), build_model("wrn16_1", 5)
    with pytest.raises(ConfigError, match="10 classes but the student has 5"):
        DistillModule(student, teacher, optimizer=partial(torch.optim.SGD, lr=0.1))


def fit(module: DistillModule, tmp_path, **trainer_kw) -> pl.Trainer:
    x, y = batch(16)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, inference_mode=False,
                         **trainer_kw)
    trainer.fit(module, loader, loader)
    return trainer


def test_validation_metrics_under_lightning_with_autograd_maps(tmp_path):
    module = make_module(ALL_TERMS, closed_form=False)
    trainer = fit(module, tmp_path)
    metrics = trainer.callback_metrics
    for key in ("val/acc", "val/agreement", "val/map_cosine", "val/teacher_acc", "val/loss",
                *[f"{stage}/{term}" for stage in ("train", "val") for term in ("ce", "kd", "at", "explain")]):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert 0.0 <= float(metrics["val/map_cosine"]) <= 1.0
    # val/loss is the same weighted total as train/loss (the mean of per-batch totals is linear)
    m = {k: float(v) for k, v in metrics.items()}
    assert m["val/loss"] == pytest.approx(m["val/ce"] + m["val/kd"] + 500.0 * m["val/at"] + 0.01 * m["val/explain"],
                                          rel=1e-5)


def test_without_the_explain_term_no_explain_key_is_logged(tmp_path):
    trainer = fit(make_module(LossWeights(kd=1.0)), tmp_path)
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert not [key for key in m if key.endswith("/explain")], sorted(m)
    assert "val/map_cosine" in m  # the eval_method maps are still compared
    assert m["val/loss"] == pytest.approx(m["val/ce"] + m["val/kd"], rel=1e-5)
    assert m["val/loss"] != pytest.approx(m["val/ce"], rel=1e-3)  # the total, not the cross-entropy alone


def test_val_explain_uses_the_training_method_and_map_cosine_the_eval_method(tmp_path):
    """With explain=gradcam (eval_method gradcampp), val/explain is the training term (Grad-CAM maps)
    computed in eval mode, and val/map_cosine compares Grad-CAM++ maps."""
    module = make_module(LossWeights(explain=1.0), method="gradcam", eval_method="gradcampp")
    x, y = batch(8)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, inference_mode=False)
    (got,) = trainer.validate(module, DataLoader(TensorDataset(x, y), batch_size=8), verbose=False)
    module.eval()
    terms, _ = module.loss_terms(x, y)
    assert got["val/explain"] == pytest.approx(float(terms["explain"]), rel=1e-5)
    assert got["val/ce"] == pytest.approx(float(terms["ce"]), rel=1e-5)
    assert got["val/loss"] == pytest.approx(float(terms["ce"] + terms["explain"]), rel=1e-5)
    with torch.no_grad():
        s_feat, t_feat = module.model.forward_features(x), module.teacher.forward_features(x)
    pp = [explain_network(net, f, y, "gradcampp") for net, f in ((module.model, s_feat), (module.teacher, t_feat))]
    cam = [explain_network(net, f, y, "gradcam") for net, f in ((module.model, s_feat), (module.teacher, t_feat))]
    assert got["val/map_cosine"] == pytest.approx(float(map_cosine(*pp).mean()), rel=1e-5)
    assert float(map_cosine(*cam).mean()) != pytest.approx(got["val/map_cosine"], rel=1e-3)  # the two differ here


def test_checkpoint_excludes_teacher_and_resumes(tmp_path):
    module = make_module(ALL_TERMS)
    trainer = fit(module, tmp_path)
    path = tmp_path / "distill.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, map_location="cpu", weights_only=False)
    assert saved["teacher_excluded"]
    assert not any(k.startswith("teacher.") for k in saved["state_dict"])
    assert any(k.startswith("model.") for k in saved["state_dict"])
    fresh = make_module(ALL_TERMS)
    trainer2 = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, default_root_dir=tmp_path, inference_mode=False)
    x, y = batch(16)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    trainer2.fit(fresh, loader, loader, ckpt_path=path)  # strict load: teacher keys re-inserted
    assert trainer2.current_epoch == 2


def test_inference_mode_evaluation_is_refused_with_the_fix(tmp_path):
    module = make_module(ALL_TERMS)
    x, y = batch(8)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, inference_mode=True)
    with pytest.raises(ConfigError, match="trainer.inference_mode=false"):
        trainer.validate(module, DataLoader(TensorDataset(x, y), batch_size=8))


# ------------------------------------------------------------------------------ the total, independently
def _gradcampp_float64(model: torch.nn.Module, features: torch.Tensor, label: int) -> torch.Tensor:
    """One image's Grad-CAM++ map ``(h, w)`` in float64, written out from the paper (Chattopadhyay et al.,
    WACV 2018): with ``g = dS^c/dA`` (one autograd call on this image's class score),
    ``alpha = g^2 / (2 g^2 + sum_ab A_kab g^3)`` (0 where the denominator is 0),
    ``w_k = sum_ij alpha_kij ReLU(g_kij)`` and ``L = ReLU(sum_k w_k A_k)``."""
    a = features.detach().double().clone().requires_grad_(True)  # (K, h, w)
    score = model.forward_head(a[None])[0, label]
    (g,) = torch.autograd.grad(score, a)
    denominator = 2 * g**2 + a.detach().sum(dim=(1, 2), keepdim=True) * g**3
    alpha = torch.where(denominator != 0, g**2 / torch.where(denominator != 0, denominator, 1.0), 0.0)
    weights = (alpha * g.clamp_min(0)).sum(dim=(1, 2))  # (K,)
    return (weights[:, None, None] * a.detach()).sum(0).clamp_min(0)


def test_total_loss_of_a_wrn_batch_equals_an_independent_float64_computation():
    """CE + KD (T = 4) + 0.01 * the squared L2 distance of the Grad-CAM++ maps (summed over pixels,
    averaged over the images), from float64 copies of both WRNs and a per-image map written above,
    against the module's float32 ``total_loss(loss_terms(...))``."""
    weights = LossWeights(ce=1.0, kd=1.0, temperature=4.0, explain=0.01)
    module = make_module(weights, method="gradcampp", distance="squared_l2")
    module.eval()  # BatchNorm on its running statistics: every image on its own, as the reference
    x, y = batch(4, seed=3)
    student, teacher = copy.deepcopy(module.model).double(), copy.deepcopy(module.teacher).double()
    terms, _ = module.loss_terms(x, y)
    total = module.total_loss(terms)

    with torch.no_grad():
        s_features, t_features = student.forward_features(x.double()), teacher.forward_features(x.double())
        s_logits, t_logits = student.forward_head(s_features), teacher.forward_head(t_features)
    log_p_s = s_logits.log_softmax(1)
    ce = -log_p_s[torch.arange(4), y].mean()
    log_ps_t, log_pt_t = (s_logits / 4).log_softmax(1), (t_logits / 4).log_softmax(1)
    kd = 16 * (log_pt_t.exp() * (log_pt_t - log_ps_t)).sum(1).mean()
    explain = torch.stack([
        (_gradcampp_float64(student, s_features[i], int(y[i])) - _gradcampp_float64(teacher, t_features[i], int(y[i])))
        .pow(2).sum() for i in range(4)]).mean()

    assert set(terms) == {"ce", "kd", "explain"}
    assert float(explain) > 1e-3 * float(ce)  # a term that matters at this scale, not a vanishing one
    assert float(terms["ce"]) == pytest.approx(float(ce), rel=1e-5)
    assert float(terms["kd"]) == pytest.approx(float(kd), rel=1e-4)
    assert float(terms["explain"]) == pytest.approx(float(explain), rel=1e-4)
    assert float(total) == pytest.approx(float(ce + kd + 0.01 * explain), rel=1e-5)


def test_loss_at_enters_the_total_unscaled():
    """loss.at is the weight itself (500 = the AT paper's beta/2): no hidden factor in the sum."""
    x, y = batch(4)
    with_at = make_module(LossWeights(ce=1.0, at=500.0), method=None).eval()
    without = make_module(LossWeights(ce=1.0), method=None).eval()  # same seed: same networks
    terms, _ = with_at.loss_terms(x, y)
    terms_without, _ = without.loss_terms(x, y)
    assert set(terms) == {"ce", "at"} and set(terms_without) == {"ce"}
    assert float(terms["at"]) > 0
    change = float(with_at.total_loss(terms)) - float(without.total_loss(terms_without))
    assert change == pytest.approx(500.0 * float(terms["at"]), rel=1e-5)


# =========================================================================== multi-label (VOC): dropout and maps
TINY = {"width": 0.0625, "hidden": 16}  # 4..32 channels: milliseconds per batch


def _student_and_features(seed: int = 0):
    torch.manual_seed(seed)
    model = vgg11_student(20, dropout=0.5, **TINY).train()
    x = torch.randn(3, 3, 64, 64)
    features = model.forward_features(x)
    return model, features


def _distiller(student, teacher=None):
    teacher = teacher or vgg16(20, **TINY)
    return DistillModule(student, teacher, optimizer=torch.optim.SGD, weights=LossWeights(explain=1.0),
                         explain=ExplainSettings(method="gradcampp"), task=MultilabelTask(20))


def test_student_maps_in_training_are_computed_with_dropout_off():
    model, features = _student_and_features()
    module = _distiller(model)
    target = torch.tensor([[0, 3, -1], [5, -1, -1], [1, 2, 7]])
    logits = model.forward_head(features)  # dropout on: what CE / KD see
    maps_a = module.maps(model, logits, features, target, "gradcampp", True)
    maps_b = module.maps(model, model.forward_head(features), features, target, "gradcampp", True)
    assert torch.equal(maps_a, maps_b)  # deterministic although the model is in train mode
    model.eval()
    reference = module.maps(model, model.forward_head(features), features, target, "gradcampp", False)
    assert torch.allclose(maps_a, reference, atol=1e-6)  # the maps of the evaluated network
    assert maps_a.requires_grad  # still differentiable for the explanation loss
    model.train()
    # control: maps taken from the dropped-out logits are random (the test can fail)
    from distill.explain import explanation_maps

    raw_a = explanation_maps(model.forward_head(features), features, target, "gradcampp", True)
    raw_b = explanation_maps(model.forward_head(features), features, target, "gradcampp", True)
    assert not torch.allclose(raw_a, raw_b)
    assert not torch.allclose(model.forward_head(features), model.forward_head(features, dropout=False))


def _gradcam_one(model, features, b, c):
    """Independent Grad-CAM for one (image, class): autograd on one logit, numpy-free formula."""
    a = features[b : b + 1].detach().requires_grad_(True)
    model.eval()
    (g,) = torch.autograd.grad(model.forward_head(a)[0, c], a)
    return F.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(1))[0]


def test_batched_multilabel_maps_match_one_pair_at_a_time():
    model, features = _student_and_features(1)
    model.eval()
    features = features.detach().requires_grad_(True)
    target = torch.tensor([[2, 7, -1, -1], [0, 1, 4, 19], [-1, -1, -1, -1]])
    module = _distiller(model)
    maps = module.maps(model, model.forward_head(features), features, target, "gradcam", False)
    assert maps.shape == (3, 4, 4, 4)
    for b in range(3):
        for t in range(4):
            c = int(target[b, t])
            expected = torch.zeros(4, 4) if c < 0 else _gradcam_one(model, features, b, c)
            assert torch.allclose(maps[b, t], expected, atol=1e-6, rtol=1e-4), (b, t)


def test_explain_loss_trains_the_student_through_the_vgg_head():
    torch.manual_seed(0)
    student = vgg11_student(20, **TINY)
    module = _distiller(student)
    module.train()
    x = torch.randn(4, 3, 64, 64)
    y = torch.zeros(4, 20, dtype=torch.int64)
    y[0, [1, 5]] = 1
    y[1, 2] = 1
    y[2, 3] = -1  # difficult only: not explained
    y[3, [0, 6, 9]] = 1
    terms, _ = module.loss_terms(x, y)
    assert math.isfinite(terms["explain"].item()) and terms["explain"] > 0
    grads = torch.autograd.grad(terms["explain"], [student.features[0].weight, student.classifier[0].weight])
    assert all(g.abs().sum() > 0 for g in grads)  # second order through the head, down to the convs
    assert all(p.grad is None for p in module.teacher.parameters())


# ====================================================================== the competing baselines (docs/baselines.md)
def test_cat_term_of_a_wrn_batch_equals_an_independent_float64_computation():
    """CAT-KD (Guo et al., CVPR 2023) from its equations on float64 copies of both WRNs:
    ``CAM = W A`` for all 10 classes (the linear weight as a 1 x 1 convolution, no bias), each
    8 x 8 map averaged over its four 4 x 4 quarters, then the mean squared difference; the
    total is CE + 12 * CAT (kd=cat's beta)."""
    module = make_module(LossWeights(ce=1.0, cat=12.0, cat_resolution=2), method=None).eval()
    with torch.no_grad():  # biases that a CAM would wrongly include
        for net in (module.model, module.teacher):
            net.fc.bias.normal_()
    x, y = batch(4, seed=5)
    terms, _ = module.loss_terms(x, y)
    student, teacher = copy.deepcopy(module.model).double(), copy.deepcopy(module.teacher).double()
    with torch.no_grad():
        cams = [torch.einsum("ck,bkhw->bchw", net.fc.weight, net.forward_features(x.double()))
                for net in (student, teacher)]
        logits = student.forward_head(student.forward_features(x.double()))
    quarters = [c.reshape(4, 10, 2, 4, 2, 4).mean(dim=(3, 5)) for c in cams]  # (B, C, 2, 2)
    cat = (quarters[0] - quarters[1]).pow(2).mean()
    ce = -logits.log_softmax(1)[torch.arange(4), y].mean()
    assert set(terms) == {"ce", "cat"}
    assert float(terms["cat"].detach()) == pytest.approx(float(cat), rel=1e-4)
    assert float(module.total_loss(terms).detach()) == pytest.approx(float(ce + 12.0 * cat), rel=1e-5)
    module.train()
    terms, _ = module.loss_terms(x, y)
    grads = torch.autograd.grad(terms["cat"], [module.model.conv1.weight, module.model.fc.weight])
    assert all(g.abs().sum() > 0 for g in grads)  # through the student's backbone and its head's weight
    assert all(p.grad is None for p in module.teacher.parameters())


class PooledMLP(torch.nn.Module):
    """Pool, then two layers: the head pools first but is no single linear layer (no CAM of all classes)."""

    def __init__(self, channels: int = 3, classes: int = 4):
        super().__init__()
        self.hidden, self.fc, self.num_classes = torch.nn.Linear(channels, 8), torch.nn.Linear(8, classes), classes

    def forward_features(self, x):
        return x * 1.0

    def forward_head(self, a):
        return self.fc(torch.relu(self.hidden(a.mean(dim=(2, 3)))))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def test_cat_refuses_a_head_that_is_not_pool_plus_linear_in_one_line():
    from tests.support import PooledLinear

    torch.manual_seed(0)
    teacher = PooledLinear(torch.randn(4, 3).tolist(), [0.0] * 4)
    module = DistillModule(PooledMLP(), teacher, optimizer=torch.optim.SGD, weights=LossWeights(cat=1.0))
    with pytest.raises(ConfigError, match=r"kd=cat \(loss.cat > 0\) needs a global-average-pool \+ linear head, "
                                          r"and the student PooledMLP's head is not one") as err:
        module.loss_terms(torch.randn(2, 3, 4, 4), torch.tensor([0, 1]))
    assert "\n" not in str(err.value)
    flipped = DistillModule(teacher, PooledMLP(), optimizer=torch.optim.SGD, weights=LossWeights(cat=1.0))
    with pytest.raises(ConfigError, match="the teacher PooledMLP's head is not one"):
        flipped.loss_terms(torch.randn(2, 3, 4, 4), torch.tensor([0, 1]))


def _zscore64(z: torch.Tensor) -> torch.Tensor:
    """Sun et al.'s z-score in float64: ``(z - mean) / (std + 1e-7)``, std over ``C - 1``."""
    z = z.double()
    centred = z - z.mean(1, keepdim=True)
    return centred / ((centred.pow(2).sum(1, keepdim=True) / (z.shape[1] - 1)).sqrt() + 1e-7)


def test_logit_standardized_kd_and_dkd_terms_equal_float64_formulas():
    """kd=hinton_ls's KD (T = 2) and kd=dkd_ls's DKD (alpha 12, beta 24, T = 2) on the module's
    batch, from the logits z-scored in float64; CE stays on the raw logits."""
    weights = LossWeights(ce=0.1, kd=9.0, temperature=2.0, dkd_alpha=12.0, dkd_beta=24.0, logit_standardize=True)
    module = make_module(weights, method=None).eval()
    x, y = batch(6, seed=7)
    terms, _ = module.loss_terms(x, y)
    with torch.no_grad():
        s_raw, t_raw = module.model(x).double(), module.teacher(x).double()
    ps, pt = (_zscore64(s_raw) / 2).softmax(1), (_zscore64(t_raw) / 2).softmax(1)
    kd = 4 * (pt * (pt / ps).log()).sum(1).mean()
    rows, target = torch.arange(6), F.one_hot(y, 10).bool()
    bs = torch.stack([ps[rows, y], 1 - ps[rows, y]], 1)
    bt = torch.stack([pt[rows, y], 1 - pt[rows, y]], 1)
    hs = ps.masked_fill(target, 0) / (1 - ps[rows, y])[:, None]
    ht = pt.masked_fill(target, 0) / (1 - pt[rows, y])[:, None]
    nckd = (ht * (ht / hs.masked_fill(target, 1)).log().masked_fill(target, 0)).sum(1)
    dkd = 4 * (12.0 * (bt * (bt / bs).log()).sum(1) + 24.0 * nckd).mean()
    ce = -s_raw.log_softmax(1)[rows, y].mean()
    assert float(terms["kd"]) == pytest.approx(float(kd), rel=1e-4)
    assert float(terms["dkd"]) == pytest.approx(float(dkd), rel=1e-4)
    assert float(terms["ce"]) == pytest.approx(float(ce), rel=1e-5)
    plain = make_module(LossWeights(ce=0.1, kd=9.0, temperature=2.0), method=None).eval()
    assert float(plain.loss_terms(x, y)[0]["kd"]) != pytest.approx(float(kd), rel=1e-2)  # the switch matters


def test_logit_standardize_is_refused_for_a_multilabel_task():
    from tests.support import PooledLinear

    net = PooledLinear(torch.randn(4, 3).tolist(), [0.0] * 4)
    with pytest.raises(ConfigError, match="loss.logit_standardize=false"):
        DistillModule(net, copy.deepcopy(net), weights=LossWeights(kd=1.0, logit_standardize=True),
                      task=MultilabelTask(4))


def test_e2kd_option_equals_kd_plus_one_minus_cosine_of_the_teachers_top1_gradcam(compose):
    """explain=e2kd as composed (Parchami-Araghi et al., ECCV 2024): T^2 KL at T = 1 plus
    lambda * (1 - cos(E_T, E_S)), lambda = 1, no CE, E the Grad-CAM map of the teacher's top-1
    class. On pool + linear networks whose features are the image, that map is written out:
    ``ReLU(sum_k W[c, k] / Z * A_k)``."""
    from tests.support import PooledLinear

    cfg = compose(["explain=e2kd"])
    weights = LossWeights(**cfg.loss)
    settings = ExplainSettings(method=cfg.explain.method, distance=cfg.explain.distance, target=cfg.explain.target)
    g = torch.Generator().manual_seed(11)
    w_s, w_t = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    b_s, b_t = torch.randn(5, generator=g), torch.randn(5, generator=g)
    student, teacher = PooledLinear(w_s.tolist(), b_s.tolist()), PooledLinear(w_t.tolist(), b_t.tolist())
    module = DistillModule(student, teacher, optimizer=torch.optim.SGD, weights=weights, explain=settings)
    x, y = torch.randn(6, 3, 4, 4, generator=g), torch.randint(0, 5, (6,), generator=g)
    terms, _ = module.loss_terms(x, y)

    x64, pooled = x.double(), x.double().mean(dim=(2, 3))
    zs, zt = pooled @ w_s.double().T + b_s.double(), pooled @ w_t.double().T + b_t.double()
    top1 = zt.argmax(1)
    assert not torch.equal(top1, y)  # the teacher's class, not the label, decides the maps here

    def gradcam(w):
        return F.relu(torch.einsum("bk,bkhw->bhw", w.double()[top1] / 16, x64)).flatten(1)

    e_s, e_t = gradcam(w_s), gradcam(w_t)
    explain = (1 - (e_s * e_t).sum(1) / (e_s.norm(dim=1) * e_t.norm(dim=1))).mean()
    pt, ps = zt.softmax(1), zs.softmax(1)
    kd = (pt * (pt / ps).log()).sum(1).mean()
    assert (weights.ce, weights.kd, weights.temperature, weights.explain) == (0.0, 1.0, 1.0, 1.0)
    assert float(terms["explain"]) == pytest.approx(float(explain), rel=1e-5)
    assert float(terms["kd"]) == pytest.approx(float(kd), rel=1e-5)
    assert float(module.total_loss(terms)) == pytest.approx(float(kd + explain), rel=1e-5)
    assert student.fc.weight in {p for p in module.parameters()} and torch.autograd.grad(
        terms["explain"], student.fc.weight)[0].abs().sum() > 0  # the student's map is in the graph


@pytest.mark.parametrize(("overrides", "rows"), [
    (["kd=cat", "explain=e2kd"], {"ce": 1.0, "cat": 12.0, "cat_resolution": 2, "kd": 1.0, "temperature": 1.0,
                                  "explain": 1.0}),
    (["kd=hinton", "explain=e2kd"], {"ce": 1.0, "kd": 1.0, "temperature": 4.0, "explain": 1.0}),
    (["kd=hinton_ls", "explain=gradcampp", "data=cifar100"], {"ce": 0.1, "kd": 9.0, "temperature": 2.0,
                                                              "logit_standardize": True, "explain": 0.01}),
    (["kd=dkd_ls", "explain=e2kd", "student=wrn16_2"], {"ce": 1.0, "dkd_alpha": 12.0, "dkd_beta": 24.0,
                                                        "temperature": 2.0, "logit_standardize": True, "kd": 1.0}),
    (["kd=cat", "loss.cat=3", "loss.kd=1", "loss.logit_standardize=true"], {"cat": 3.0, "kd": 1.0,
                                                                          "logit_standardize": True}),
])
def test_the_baseline_options_compose_with_each_other_and_with_other_options(compose, overrides, rows):
    """kd=... sets its rows after explain=... (the defaults list's order), so kd=hinton explain=e2kd
    is CE + KD at T = 4 + e2KD's map term; every composed table builds the module's settings."""
    cfg = compose(overrides)
    assert {key: cfg.loss[key] for key in rows} == rows
    weights = LossWeights(**cfg.loss)
    if "explain=e2kd" in overrides:
        assert (cfg.explain.method, cfg.explain.distance, cfg.explain.target) == ("gradcam", "cosine", "teacher_pred")
    assert "cat" in weights.active() or weights.cat == 0


@pytest.mark.slow
def test_cat_and_e2kd_train_through_train_py_and_log_their_terms(tmp_path):
    import json

    from tests.support import run_train

    proc = run_train(["experiment=smoke", "logger=none", "kd=cat", "explain=e2kd", "optim.optimizer.lr=0.05",
                      "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.num_sanity_val_steps=0",
                      "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = (tmp_path / "logs").rglob("metrics.json")
    metrics = json.loads(path.read_text())["metrics"]
    for key in [f"{stage}/{term}" for stage in ("train", "val", "test") for term in ("ce", "kd", "cat", "explain")]:
        assert math.isfinite(metrics[key]), key
    assert metrics["test/loss"] == pytest.approx(metrics["test/ce"] + metrics["test/kd"] + 12 * metrics["test/cat"]
                                                 + metrics["test/explain"], rel=1e-4)


@pytest.mark.slow
def test_cat_with_a_student_whose_head_is_not_pool_plus_linear_stops_with_one_line(tmp_path):
    from tests.support import run_train

    proc = run_train(["experiment=smoke", "logger=none", "kd=cat", "explain=none", "student=timm",
                      "student.arch=mobilenetv3_small_050",
                      "data.image_size=32", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
                      "trainer.num_sanity_val_steps=0"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [line for line in proc.stderr.splitlines() if "kd=cat" in line], proc.stderr[-2000:]
    assert len(errors) == 1 and "needs a global-average-pool + linear head" in errors[0]
    assert "Traceback" not in proc.stderr
