"""The distiller: frozen teacher, student-only optimizer, gradient flow of the explanation loss."""

from __future__ import annotations

import copy
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from distill.errors import ConfigError
from distill.models import build_model
from distill.module import DistillModule, ExplainSettings, LossWeights


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
        losses.append(float(terms.get("interpret", loss)))
    return losses


ALL_TERMS = LossWeights(ce=1.0, kd=1.0, at=1000.0, explain=0.01)


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
def test_interpret_term_alone_reaches_below_the_explained_layer(method, closed_form):
    module = make_module(LossWeights(ce=0.0, kd=0.0, explain=1.0), method=method, closed_form=closed_form)
    module.train()
    x, y = batch()
    terms, _ = module.loss_terms(x, y)
    assert set(terms) == {"ce", "interpret"}
    module.total_loss(terms).backward()
    stem = module.model.conv1.weight.grad
    first_block = module.model.groups[0][0].conv1.weight.grad
    head = module.model.fc.weight.grad
    for grad in (stem, first_block):
        assert grad is not None and grad.abs().sum() > 0
    # Through the closed form, the head gets a gradient via W; through autograd via the 2nd order.
    assert head is not None and head.abs().sum() > 0


@pytest.mark.parametrize("loss", ["paper", "normalized", "cosine"])
def test_interpret_loss_falls_on_a_fixed_batch(loss):
    module = make_module(LossWeights(ce=0.0, kd=0.0, explain=1.0 if loss != "paper" else 0.05), loss=loss)
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
    with pytest.raises(ConfigError, match="weights must be >= 0"):
        LossWeights(kd=-1.0)
    with pytest.raises(ConfigError, match="temperature"):
        LossWeights(temperature=0.0)
    with pytest.raises(ConfigError, match="explain.method"):
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
    for key in ("val/acc", "val/agreement", "val/map_cosine", "val/interpret", "val/teacher_acc",
                "train/ce", "train/kd", "train/at", "train/interpret"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert 0.0 <= float(metrics["val/map_cosine"]) <= 1.0


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
