"""Speed-related guarantees of the training step (issue 6): no host synchronisation in the
explanation path, closed-form maps without a second backward, float32 map arithmetic under
bf16 autocast, float16 refused where an inner gradient would not be loss-scaled, and
``torch.compile`` of the teacher / the student's backbone. No timings are asserted here
(``scripts/bench_step.py`` measures them)."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from distill.errors import ConfigError
from distill.explain import explanation_maps, inspect_network, model_maps
from distill.models import build_model
from distill.module import DistillModule, ExplainSettings, LossWeights

KD_EXPLAIN = LossWeights(ce=1.0, kd=1.0, explain=0.01)
METHOD_PATHS = [("gradcam", True), ("gradcampp", True), ("gradcam", False), ("gradcampp", False)]


def make_module(method: str | None = "gradcampp", closed_form: bool = True, weights: LossWeights = KD_EXPLAIN,
                **explain) -> DistillModule:
    torch.manual_seed(0)
    teacher = build_model("wrn16_2", 10)
    student = build_model("wrn16_1", 10)
    for model in (teacher, student):  # as train.py does when it builds them: the head is measured once
        inspect_network(model, torch.randn(2, 3, 16, 16))
    settings = ExplainSettings(method=method, closed_form=closed_form, **explain)
    return DistillModule(student, teacher, optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9),
                         weights=weights, explain=settings)


def batch(n: int = 8, size: int = 16, seed: int = 1, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)
    return x.to(device), y.to(device)


# --------------------------------------------------------------------------- no host syncs
class HostSyncRecorder(TorchDispatchMode):
    """Records every operator that makes the host wait for the device: ``_local_scalar_dense``
    (``.item()``, ``bool(t)``, ``int(t)``, ``if t:``...) and copies from a device to the CPU."""

    SCALAR = torch.ops.aten._local_scalar_dense.default

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append(str(func))
        if func is self.SCALAR:
            self.syncs.append(str(func))
            if args[0].device.type == "meta":  # no value to return: fail right here
                raise AssertionError("host sync: aten._local_scalar_dense on a meta tensor")
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        target = kwargs.get("device")
        if func is torch.ops.aten.copy_.default:
            target = args[0].device
            tensors = tensors[1:]
        if target is not None and torch.device(target).type == "cpu" and any(t.device.type != "cpu" for t in tensors):
            self.syncs.append(f"{func} to the CPU")
            raise AssertionError(f"host sync: {func} copies to the CPU")
        return func(*args, **kwargs)


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize(("method", "closed_form"), METHOD_PATHS)
def test_explanation_step_has_no_host_sync(device, method, closed_form):
    """The explanation part of a training step (teacher + student forward, maps, losses and the
    backward) under a dispatch mode that records operators. On the ``meta`` device, where no
    tensor has a value, any ``.item()`` or copy to the CPU would also fail outright."""
    module = make_module(method, closed_form).to(device)
    module.train()
    x, y = batch(device=device)
    recorder = HostSyncRecorder()
    with recorder:
        terms, _ = module.loss_terms(x, y)
        module.total_loss(terms).backward()
    assert "explain" in terms
    assert len(recorder.ops) > 100, "the dispatch mode saw no operators"
    assert recorder.syncs == []
    assert all(p.grad is not None for p in module.model.parameters())


def test_multi_target_maps_have_no_host_sync():
    """The (B, T) autograd path (multi-label) builds its one-hot rows without F.one_hot's checks."""
    torch.manual_seed(0)
    acts = torch.randn(4, 8, 3, 3, device="meta", requires_grad=True)
    head = torch.nn.Linear(8, 5).to("meta")
    target = torch.tensor([[0, 2], [1, -1], [4, 3], [-1, -1]], device="meta")
    recorder = HostSyncRecorder()
    with recorder:
        maps = explanation_maps(head(acts.mean((2, 3))), acts, target, "gradcampp", create_graph=True)
        maps.sum().backward()
    assert maps.shape == (4, 2, 3, 3) and recorder.syncs == []


# --------------------------------------------------------------------------- fast path
@pytest.fixture
def grad_calls(monkeypatch):
    calls = []
    real = torch.autograd.grad

    def counting(*args, **kwargs):
        calls.append(kwargs.get("create_graph", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    return calls


@pytest.mark.parametrize("method", ["gradcam", "gradcampp"])
def test_wrn_training_step_uses_closed_form_without_second_backward(method, grad_calls):
    closed, forced = make_module(method, closed_form=True), make_module(method, closed_form=False)
    grad_calls.clear()  # building checks each head's fast path against autograd once
    x, y = batch()
    terms, _ = closed.loss_terms(x, y)
    assert grad_calls == []  # no inner gradient at all, for the teacher nor for the student
    forced_terms, _ = forced.loss_terms(x, y)
    assert grad_calls == [False, True]  # teacher first order, student with a graph (double backward)
    torch.testing.assert_close(terms["explain"], forced_terms["explain"], rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------- precision
def _head_inputs(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("wrn16_2", 10).eval()
    acts = model.forward_features(torch.randn(6, 3, 32, 32)).detach().requires_grad_(True)
    return model, acts, torch.randint(0, 10, (6,))


@pytest.mark.parametrize(("method", "closed_form"), METHOD_PATHS)
def test_map_arithmetic_runs_in_float32_under_bf16_autocast(method, closed_form):
    """Same float32 inputs: the maps under bf16 autocast equal the float32 maps (without the
    autocast-off region, einsum would run in bfloat16, about 3 significant digits)."""
    model, acts, y = _head_inputs()
    reference = model_maps(model, model.forward_head(acts), acts, y, method, closed_form=closed_form)
    logits = model.forward_head(acts)  # float32, outside autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps = model_maps(model, logits, acts, y, method, closed_form=closed_form)
    assert maps.dtype == torch.float32
    torch.testing.assert_close(maps, reference, rtol=1e-6, atol=1e-9)


# Tolerance of maps from a bf16-autocast forward against fp32 maps of the same weights and
# images (bf16 keeps 8 bits of mantissa; the error accumulates over the backbone's convolutions):
# per map, relative L2 error and cosine similarity. Grad-CAM's signed channel weights cancel,
# which amplifies relative errors; Grad-CAM++ weights only positive gradients. Measured here
# (random WRN-16-2): Grad-CAM 4.7 % / 0.9989, Grad-CAM++ 0.5 % / 0.99999.
BF16_TOLERANCE = {"gradcam": (0.10, 0.995), "gradcampp": (0.02, 0.9995)}  # (max rel. error, min cosine)


@pytest.mark.parametrize(("method", "closed_form"), METHOD_PATHS)
def test_bf16_maps_match_fp32_maps(method, closed_form):
    torch.manual_seed(0)
    model = build_model("wrn16_2", 10)
    model.train()
    with torch.no_grad():  # realistic BN statistics
        for _ in range(3):
            model(torch.randn(32, 3, 32, 32))
    model.eval()
    x, _ = batch(8, 32)
    y = torch.arange(8) % 10

    def maps(autocast: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            acts = model.forward_features(x)
            if not closed_form:
                acts = acts.detach().requires_grad_(True)
            out = model_maps(model, model.forward_head(acts), acts, y, method, closed_form=closed_form)
        return out

    fp32, bf16 = maps(False), maps(True)
    assert bf16.dtype == torch.float32
    rel = (bf16 - fp32).flatten(1).norm(dim=1) / fp32.flatten(1).norm(dim=1).clamp_min(1e-12)
    cos = F.cosine_similarity(bf16.flatten(1), fp32.flatten(1), dim=1)
    print(f"bf16 vs fp32 maps: max relative L2 error {rel.max():.4f}, min cosine {cos.min():.5f}")
    max_rel, min_cos = BF16_TOLERANCE[method]
    assert rel.max() <= max_rel, rel
    assert cos.min() >= min_cos, cos


def _synthetic_loader(n: int = 16, size: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(3)
    return DataLoader(TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.arange(n) % 10), batch_size=8)


def _fit(module: DistillModule, **trainer_kwargs) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         inference_mode=False, **trainer_kwargs)
    trainer.fit(module, _synthetic_loader(), _synthetic_loader(8))
    return trainer


@pytest.mark.parametrize("closed_form", [True, False])
def test_bf16_mixed_distillation_step_trains(closed_form):
    """trainer.precision=bf16-mixed: the whole step (double backward included) under autocast."""
    module = make_module("gradcampp", closed_form)
    before = [p.detach().clone() for p in module.model.parameters()]
    terms_seen = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            terms_seen.append(float(outputs["loss"]))

    trainer = _fit(module, precision="bf16-mixed", callbacks=[Spy()])
    assert trainer.precision == "bf16-mixed"
    assert len(terms_seen) == 2 and all(torch.isfinite(torch.tensor(terms_seen)))
    assert all(not torch.equal(b, p) for b, p in zip(before, module.model.parameters(), strict=True))
    assert all(torch.isfinite(p).all() for p in module.model.parameters())
    assert torch.isfinite(torch.tensor(float(trainer.callback_metrics["val/map_cosine"])))


@pytest.mark.parametrize("precision", ["16-mixed", "16-true"])
def test_float16_refused_for_autograd_maps(precision):
    module = make_module("gradcampp", closed_form=False)
    module._trainer = SimpleNamespace(precision=precision)
    with pytest.raises(ConfigError, match="bf16-mixed") as err:
        module.setup("fit")
    assert "not loss-scale" in str(err.value) and f"trainer.precision={precision}" in str(err.value)


def test_float16_allowed_with_closed_form_maps():
    """WRN heads: no inner gradient exists, so 16-mixed (GradScaler on the loss) is correct."""
    module = make_module("gradcampp", closed_form=True)
    module._trainer = SimpleNamespace(precision="16-mixed")
    module.setup("fit")
    forced_eval = make_module(None, closed_form=False, weights=LossWeights(kd=1.0))  # validation maps too
    forced_eval._trainer = SimpleNamespace(precision="16-mixed")
    with pytest.raises(ConfigError):
        forced_eval.setup("validate")


# --------------------------------------------------------------------------- compile
def _student_grads(module: DistillModule, x, y) -> dict[str, torch.Tensor]:
    module.train()
    module.model.zero_grad()
    terms, _ = module.loss_terms(x, y)
    module.total_loss(terms).backward()
    return {name: p.grad.clone() for name, p in module.model.named_parameters()}


@pytest.mark.parametrize("closed_form", [False, True])
def test_compiled_student_backbone_with_explanation_loss_matches_eager(closed_form):
    """student.compile=true compiles forward_features only; the maps' inner gradient goes through
    the eager head, so the double backward never enters compiled code. Same gradients as eager
    (backend aot_eager: AOTAutograd's forward/backward split without inductor's C++ build;
    inductor, measured by hand: max relative gradient difference 4e-6)."""
    torch._dynamo.reset()
    x, y = batch(8, 16)
    eager = _student_grads(make_module("gradcampp", closed_form), x, y)
    module = make_module("gradcampp", closed_form)
    module.model.forward_features = torch.compile(module.model.forward_features, backend="aot_eager")
    module.teacher.forward_features = torch.compile(module.teacher.forward_features, backend="aot_eager")
    compiled = _student_grads(module, x, y)
    for name, grad in eager.items():
        torch.testing.assert_close(compiled[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture
def compile_calls(monkeypatch):
    """``torch.compile`` with the aot_eager backend (no C++ toolchain needed); the names of what it compiled."""
    compiled = []
    real_compile = torch.compile

    def compile_aot_eager(fn, **kwargs):
        compiled.append(getattr(fn, "__qualname__", type(fn).__name__))
        return real_compile(fn, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    torch._dynamo.reset()
    return compiled


def _teacher_file(tmp_path):
    teacher = build_model("wrn16_2", 10)
    checkpoint = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in teacher.state_dict().items()},
                "hyper_parameters": {"model_name": "wrn16_2", "num_classes": 10}}, checkpoint)
    return checkpoint


SHORT = ("trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
         "trainer.num_sanity_val_steps=0", "test_after_fit=false", "trainer.enable_progress_bar=false",
         "~callbacks.explanation_panel")


@pytest.mark.slow
def test_teacher_and_student_compile_from_config(tmp_path, smoke_cfg, compile_calls):
    """teacher.compile=true / student.compile=true through distill.run: the backbones, not the heads."""
    from distill import run as run_module

    cfg = smoke_cfg("explain=gradcampp", "explain.closed_form=false", "kd=hinton",
                    f"teacher.checkpoint={_teacher_file(tmp_path)}", "teacher.compile=true", "student.compile=true",
                    *SHORT)
    result = run_module.run(cfg)
    assert sorted(compile_calls) == sorted(["WideResNet.forward_features", "WideResNet.forward_stages"] * 2)
    assert torch.isfinite(torch.tensor(result["metrics"]["train/loss"]))


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [("stage=teacher",), ("kd=at",)], ids=["teacher", "kd=at"])  # baseline ~ teacher
def test_compile_applies_in_every_stage_and_with_attention_transfer(tmp_path, smoke_cfg, compile_calls, overrides):
    from distill import run as run_module

    alone = overrides[0].startswith("stage=")  # one network trained; kd=at: teacher and student
    teacher = tmp_path / "published.ckpt" if alone else _teacher_file(tmp_path)
    cfg = smoke_cfg(*overrides, f"teacher.checkpoint={teacher}", "teacher.compile=true", "student.compile=true",
                    *SHORT)
    result = run_module.run(cfg)
    assert sorted(compile_calls) == sorted(["WideResNet.forward_features", "WideResNet.forward_stages"]
                                           * (1 if alone else 2))
    assert torch.isfinite(torch.tensor(result["metrics"]["train/loss"]))


def test_compile_config_defaults_off():
    from omegaconf import OmegaConf

    from tests.support import CONFIG_DIR

    for group in ("teacher", "student"):
        for path in sorted((CONFIG_DIR / group).glob("*.yaml")):
            assert OmegaConf.load(path).compile is False, path

