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
