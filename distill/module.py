"""LightningModules: a plain classifier (teacher / student-alone) and the distiller.

The distiller keeps the teacher frozen in eval mode (``requires_grad=False``, re-applied on
every ``.train()``), runs its backbone under ``no_grad`` and gets its map from a first-order
gradient through its head only (or in closed form). The student's map is differentiable
(second order through the student's head). The optimizer holds the student's parameters only
and the teacher's weights are kept out of the student's checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection

from distill.checkpoints import load_network
from distill.errors import ConfigError, DistillError
from distill.explain import EVAL_METHOD, METHODS, explain_network, network_spec
from distill.explain.maps import check_map_precision
from distill.losses import INTERPRET_LOSSES, attention_transfer, decoupled_kd, dkd_warmup, interpret_loss, map_cosine
from distill.models import BUILD_ATTRIBUTE, build_model, build_spec
from distill.models.contract import known_spec, require_network
from distill.optim import SchedulerFactory, build_scheduler
from distill.tasks import MulticlassTask, build_task

log = logging.getLogger("distill")

OptimizerFactory = Callable[..., torch.optim.Optimizer]
# What train.py records beside the constructor arguments (read by the evaluation scripts and
# the teacher identity checks); passed back as keyword arguments by ``load_from_checkpoint``.
RECORD_KEYS = ("model_name", "num_classes", "data_name", "stage", "identity", "config", "teacher_checkpoint")


def network_from(spec: nn.Module | dict[str, Any]) -> nn.Module:
    """A network as given, or rebuilt from the spec a checkpoint records: ``build_model``'s
    arguments, plus ``checkpoint`` for a teacher whose weights live in its own file (read safely)."""
    if isinstance(spec, nn.Module):
        return spec
    options = dict(spec)
    path = options.pop("checkpoint", None)
    if path is None:
        return build_model(**options)
    model, _ = load_network(path, "teacher checkpoint", build=lambda: build_model(**options))
    object.__setattr__(model, BUILD_ATTRIBUTE, {**(build_spec(model) or options), "checkpoint": path})
    return model


def factory_from(node: Callable | dict[str, Any] | None) -> Callable | None:
    """An optimizer / scheduler factory as given, or from its Hydra config node (``_partial_: true``)."""
    if node is None or callable(node):
        return node
    import hydra

    return hydra.utils.instantiate(node)


def plain(value: Any) -> Any:
    """``value`` if a checkpoint can hold it for the safe loader (a config node), else None."""
    return value if isinstance(value, dict) else None


class NonFiniteLossError(DistillError):
    """A loss term became NaN or infinite."""


@dataclass(frozen=True)
class LossWeights:
    """Weights of the student's loss terms (docs/method.md §3)."""

    ce: float = 1.0
    kd: float = 0.0
    temperature: float = 4.0
    at: float = 0.0  # beta of attention transfer (AT paper: 1000); the loss is beta/2 * AT
    explain: float = 0.0
    dkd_alpha: float = 0.0  # DKD: T^2 (alpha TCKD + beta NCKD), on when alpha or beta > 0
    dkd_beta: float = 0.0
    dkd_warmup: int = 0  # epochs of linear warm-up of the DKD term (0: none)

    def __post_init__(self) -> None:
        for name in ("ce", "kd", "at", "explain", "dkd_alpha", "dkd_beta", "dkd_warmup"):
            if getattr(self, name) < 0:
                raise ConfigError(f"loss weight '{name}' is {getattr(self, name)}; weights must be >= 0")
        if self.temperature <= 0:
            raise ConfigError(f"KD temperature must be > 0, got {self.temperature} (kd.temperature=4)")


@dataclass(frozen=True)
class ExplainSettings:
    """How explanations enter training and evaluation."""

    method: str | None = None  # None: no interpretability loss
    loss: str = "paper"  # paper | normalized | cosine
    target: str = "label"  # label | teacher_pred
    eval_method: str = EVAL_METHOD  # maps compared at validation (val/map_cosine), whatever the training loss
    closed_form: bool = True  # use the no-autograd closed form where the head allows it

    def __post_init__(self) -> None:
        if self.method is not None and self.method not in METHODS:
            raise ConfigError(f"explain.method '{self.method}' is unknown; choose one of {METHODS}")
        if self.eval_method not in METHODS:
            raise ConfigError(f"explain.eval_method '{self.eval_method}' is unknown; choose one of {METHODS}")
        if self.loss not in INTERPRET_LOSSES:
            raise ConfigError(f"explain.loss '{self.loss}' is unknown; choose one of {INTERPRET_LOSSES}")
        if self.target not in ("label", "teacher_pred"):
            raise ConfigError(f"explain.target '{self.target}' is unknown; choose label or teacher_pred")


class ClassifierModule(pl.LightningModule):
    """Cross-entropy training of one network: the teacher, or the student alone."""

    def __init__(
        self,
        model: nn.Module | dict,
        optimizer: OptimizerFactory | dict | None = None,
        scheduler: SchedulerFactory | dict | None = None,
        task=None,
        skip_nonfinite: bool = False,
        scheduler_interval: str = "epoch",
        max_skipped_steps: int = 10,
        role: str = "student",
        **record: Any,
    ) -> None:
        """``model``, ``optimizer``, ``scheduler`` and ``task`` are objects or the config nodes that
        build them; the nodes are saved as hyper-parameters (Lightning's convention), so
        ``load_from_checkpoint(path)`` rebuilds the module. ``record``: what train.py records of
        the run (``RECORD_KEYS``)."""
        super().__init__()
        if role not in ("teacher", "student"):
            raise ConfigError(f"a classifier trains a teacher or a student, not {role!r}")
        if scheduler_interval not in ("epoch", "step"):
            raise ConfigError(f"optim.interval={scheduler_interval!r}: use epoch or step")
        unknown = sorted(set(record) - set(RECORD_KEYS))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword arguments {unknown}")
        self.role = role
        self.model = network_from(model)
        self.skip_nonfinite = skip_nonfinite
        self.max_skipped_steps = max_skipped_steps  # consecutive skipped steps before the run stops
        self._skipped_in_a_row = 0
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        if isinstance(task, dict):
            task = build_task(task, self.model.num_classes)
        self.task = task or MulticlassTask(self.model.num_classes)
        self.optimizer_factory = factory_from(optimizer)
        self.scheduler_factory = factory_from(scheduler)
        self.scheduler_interval = scheduler_interval
        self.save_hyperparameters({
            "model": build_spec(self.model), "optimizer": plain(optimizer), "scheduler": plain(scheduler),
            "task": self.task.spec, "skip_nonfinite": skip_nonfinite, "scheduler_interval": scheduler_interval,
            "max_skipped_steps": max_skipped_steps, "role": role, **record})
        self.train_score = self.task.score_metric()
        self.eval_metrics = nn.ModuleDict({stage: self._eval_metrics() for stage in ("val", "test")})

    def _eval_metrics(self) -> MetricCollection:
        return MetricCollection({self.task.score_name: self.task.score_metric(), "loss": MeanMetric()})

    def networks(self) -> dict[str, nn.Module]:
        """The networks this module evaluates, by role (``teacher`` / ``student``): callbacks
        (explanation panel, box localisation) explain each of them."""
        return {self.role: self.model}

    def finite_or_skip(self, terms: dict[str, Tensor], loss: Tensor) -> bool:
        """True if ``loss`` is finite. Otherwise stop with the term(s) and step at fault, or,
        with ``trainer.skip_nonfinite=true``, count the step as skipped and return False.

        One host sync per step, outside the explanation path, to never train on a NaN.
        """
        if torch.isfinite(loss):
            self._skipped_in_a_row = 0
            return True
        bad = [name for name, value in terms.items() if not torch.isfinite(value).all()] or ["loss"]
        where = f"at step {self.global_step} (epoch {self.current_epoch})"
        if not self.skip_nonfinite:
            raise NonFiniteLossError(
                f"loss term {', '.join(bad)} became non-finite {where}. Lower the learning rate "
                "(optim.optimizer.lr) or that term's weight, or set trainer.skip_nonfinite=true to skip such steps"
            )
        self._skipped_in_a_row += 1
        if self._skipped_in_a_row > self.max_skipped_steps:
            raise NonFiniteLossError(
                f"{self._skipped_in_a_row} steps in a row had a non-finite loss ({', '.join(bad)}), the last {where}: "
                f"stopping (trainer.max_skipped_steps={self.max_skipped_steps}). Lower the learning rate "
                "(optim.optimizer.lr) or the loss weights"
            )
        self.skipped_steps += 1
        log.warning("skipping step: loss term %s is non-finite %s", ", ".join(bad), where)
        self.log("train/skipped_nonfinite", self.skipped_steps.float(), on_step=True, on_epoch=False)
        return False

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """Stop as soon as a step made the network's parameters or statistics (BatchNorm running
        mean / var) non-finite, e.g. a huge learning rate: such weights would otherwise be
        validated, skipped over and checkpointed."""
        state = [p.detach() for p in self.trainable_parameters()]
        state += [b for b in self.model.buffers() if b.is_floating_point()]
        # max |x| per tensor in one fused kernel (NaN and inf propagate, no overflow), then one host sync
        if state and not torch.isfinite(torch.stack(torch._foreach_norm(state, float("inf")))).all():
            raise NonFiniteLossError(
                f"the network's parameters or BatchNorm statistics became non-finite at step {self.global_step} "
                f"(epoch {self.current_epoch}): lower the learning rate (optim.optimizer.lr) or the loss weights"
            )

    def log_train_score(self, logits: Tensor, target: Tensor) -> None:
        self.train_score(logits, target)
        self.log(f"train/{self.task.score_name}", self.train_score, on_step=False, on_epoch=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self.model(x)
        loss = self.task.loss(logits, y)
        if not self.finite_or_skip({"ce": loss}, loss):
            return None
        self.log("train/loss", loss, prog_bar=True)
        self.log_train_score(logits, y)
        return loss

    def _eval_step(self, batch: tuple[Tensor, ...], stage: str) -> None:
        x, y = batch[0], batch[1]  # evaluation batches may carry more (e.g. VOC boxes)
        logits = self.model(x)
        metrics = self.eval_metrics[stage]
        metrics[self.task.score_name].update(logits, y)
        metrics["loss"].update(self.task.loss(logits, y))
        self.log_dict({f"{stage}/{k}": m for k, m in metrics.items()}, prog_bar=stage == "val")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The network's parameters that train (a frozen backbone's are left out)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ConfigError(f"{type(self).__name__} was built without an optimizer: pass optimizer=... to train it")
        optimizer = self.optimizer_factory(params=self.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        by_step = self.scheduler_interval == "step"
        steps = self.trainer.estimated_stepping_batches if by_step else self.trainer.max_epochs
        scheduler = build_scheduler(self.scheduler_factory, optimizer, total_steps=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval}}


class DistillModule(ClassifierModule):
    """Student trained with CE + Hinton KD + attention transfer + interpretability loss."""

    def __init__(
        self,
        student: nn.Module | dict,
        teacher: nn.Module | dict,
        optimizer: OptimizerFactory | dict | None = None,
        scheduler: SchedulerFactory | dict | None = None,
        weights: LossWeights | dict = LossWeights(),
        explain: ExplainSettings | dict = ExplainSettings(),
        task=None,
        skip_nonfinite: bool = False,
        scheduler_interval: str = "epoch",
        max_skipped_steps: int = 10,
        **record: Any,
    ) -> None:
        """As :class:`ClassifierModule`; ``teacher`` is a network or its recorded spec (with the
        ``checkpoint`` its weights are read from), ``weights`` / ``explain`` the settings or their dicts."""
        super().__init__(student, optimizer, scheduler, task, skip_nonfinite, scheduler_interval, max_skipped_steps,
                         **record)
        teacher, student = network_from(teacher), self.model
        weights = LossWeights(**weights) if isinstance(weights, dict) else weights
        explain = ExplainSettings(**explain) if isinstance(explain, dict) else explain
        if teacher.num_classes != student.num_classes:
            raise ConfigError(
                f"teacher has {teacher.num_classes} classes but the student has "
                f"{student.num_classes}: train both for the same data"
            )
        if weights.dkd_alpha + weights.dkd_beta > 0 and self.task.name != "multiclass":
            raise ConfigError(f"kd=dkd needs one label per image; the {self.task.name} task has none: use kd=hinton")
        for role, model in (("teacher", teacher), ("student", student)):
            require_network(model, role, type(model).__name__, stages=weights.at > 0)
        self.teacher = teacher.eval().requires_grad_(False)
        self.weights = weights
        self.explain = explain
        if weights.explain > 0 and explain.method is None:
            raise ConfigError("explain.weight > 0 but explain.method is null: pick explain=gradcam|gradcampp")
        self.hparams.pop("role")
        self.hparams["student"] = self.hparams.pop("model")
        self.hparams.update(teacher=build_spec(teacher), weights=asdict(weights), explain=asdict(explain))

    def _eval_metrics(self) -> MetricCollection:
        metrics = super()._eval_metrics()
        metrics.add_metrics(
            {
                f"teacher_{self.task.score_name}": self.task.score_metric(),
                "agreement": MeanMetric(),
                "map_cosine": MeanMetric(),
                "interpret": MeanMetric(),
            }
        )
        return metrics

    def networks(self) -> dict[str, nn.Module]:
        return {"student": self.model, "teacher": self.teacher}

    # ------------------------------------------------------------------ frozen teacher
    def train(self, mode: bool = True) -> DistillModule:
        super().train(mode)
        self.teacher.eval()  # Lightning >= 2.2 no longer forces this; BN stats must not move
        return self

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("teacher.")]:
            del state[key]
        checkpoint["teacher_excluded"] = True

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # The teacher is frozen and loaded from its own checkpoint: put its weights back.
        if checkpoint.get("teacher_excluded"):
            teacher_state = {f"teacher.{k}": v for k, v in self.teacher.state_dict().items()}
            checkpoint["state_dict"].update(teacher_state)

    def setup(self, stage: str) -> None:  # float16 only where no map needs an inner gradient
        methods = {self.explain.eval_method, self.explain.method if self.weights.explain > 0 else None}
        check_map_precision(self.trainer.precision, any(
            self._needs_head_grad(model, method) for model in (self.teacher, self.model) for method in methods))

    # ------------------------------------------------------------------ forward passes
    def _features(self, model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        if self.weights.at > 0:
            return model.forward_stages(x)
        return model.forward_features(x), []

    def _needs_head_grad(self, model: nn.Module, method: str | None, features: Tensor | None = None) -> bool:
        """True if ``method``'s maps need ``dS/dA`` through the head (the general path); a model not
        inspected yet counts as needing it."""
        if method is None:
            return False
        spec = network_spec(model, features) if features is not None else known_spec(model)
        return not self.explain.closed_form or spec is None or spec.path == "general"

    def teacher_forward(self, x: Tensor, method: str | None) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Teacher ``(features, logits, groups)``: backbone without a graph, head with one
        (first order only) when ``method`` needs an autograd map."""
        with torch.no_grad():
            features, groups = self._features(self.teacher, x)
        if not self._needs_head_grad(self.teacher, method, features):
            with torch.no_grad():
                return features, self.teacher.forward_head(features), groups
        features = features.detach().requires_grad_(True)
        with torch.enable_grad():
            return features, self.teacher.forward_head(features), groups

    def map_target(self, labels: Tensor, teacher_logits: Tensor) -> Tensor:
        return self.task.map_targets(labels, teacher_logits, self.explain.target)

    def maps(self, model: nn.Module, logits: Tensor, features: Tensor, target: Tensor, method: str,
             create_graph: bool) -> Tensor:
        return explain_network(model, features, target, method, logits=logits, create_graph=create_graph,
                               closed_form=self.explain.closed_form)

    # ------------------------------------------------------------------ training
    def loss_terms(self, x: Tensor, y: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Unweighted loss terms and the student's logits for one batch."""
        method = self.explain.method if self.weights.explain > 0 else None
        t_features, t_logits, t_groups = self.teacher_forward(x, method)
        s_features, s_groups = self._features(self.model, x)
        s_logits = self.model.forward_head(s_features)
        terms = {"ce": self.task.loss(s_logits, y)}
        if self.weights.kd > 0:
            terms["kd"] = self.task.kd(s_logits, t_logits.detach(), self.weights.temperature)
        if self.weights.dkd_alpha + self.weights.dkd_beta > 0:
            terms["dkd"] = decoupled_kd(s_logits, t_logits.detach(), y, self.weights.dkd_alpha,
                                        self.weights.dkd_beta, self.weights.temperature)
        if self.weights.at > 0:
            terms["at"] = attention_transfer(s_groups, t_groups)
        if method is not None:
            target = self.map_target(y, t_logits)
            t_maps = self.maps(self.teacher, t_logits, t_features, target, method, False).detach()
            s_maps = self.maps(self.model, s_logits, s_features, target, method, True)
            terms["interpret"] = interpret_loss(s_maps, t_maps, self.explain.loss, mask=target >= 0)
        return terms, s_logits

    def total_loss(self, terms: dict[str, Tensor]) -> Tensor:
        w = self.weights
        scale = {"ce": w.ce, "kd": w.kd, "at": w.at / 2, "interpret": w.explain,
                 "dkd": dkd_warmup(self.current_epoch + 1, w.dkd_warmup)}
        return sum(scale[name] * value for name, value in terms.items())

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        terms, s_logits = self.loss_terms(x, y)
        loss = self.total_loss(terms)
        if not self.finite_or_skip(terms, loss):
            return None
        self.log_dict({f"train/{name}": value for name, value in terms.items()})
        self.log("train/loss", loss, prog_bar=True)
        self.log_train_score(s_logits, y)
        return loss

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: tuple[Tensor, ...], stage: str) -> None:
        x, y = batch[0], batch[1]
        if torch.is_inference_mode_enabled():
            raise ConfigError("explanation maps need autograd at evaluation: set trainer.inference_mode=false")
        method = self.explain.eval_method
        t_features, t_logits, _ = self.teacher_forward(x, method)
        s_features = self.model.forward_features(x)
        if self._needs_head_grad(self.model, method, s_features):
            s_features = s_features.detach().requires_grad_(True)
        with torch.enable_grad():  # maps need a gradient; Trainer(inference_mode=False)
            s_logits = self.model.forward_head(s_features)
            target = self.map_target(y, t_logits)
            t_maps = self.maps(self.teacher, t_logits, t_features, target, method, False)
            s_maps = self.maps(self.model, s_logits, s_features, target, method, False)
        t_logits, s_logits = t_logits.detach(), s_logits.detach()
        valid = target >= 0
        score = self.task.score_name
        metrics = self.eval_metrics[stage]
        metrics[score].update(s_logits, y)
        metrics["loss"].update(self.task.loss(s_logits, y))
        metrics[f"teacher_{score}"].update(t_logits, y)
        metrics["agreement"].update(self.task.agreement(s_logits, t_logits))
        metrics["map_cosine"].update(map_cosine(s_maps.detach(), t_maps.detach()), valid.float())
        metrics["interpret"].update(interpret_loss(s_maps.detach(), t_maps.detach(), self.explain.loss, mask=valid))
        self.log_dict({f"{stage}/{k}": m for k, m in metrics.items()}, prog_bar=stage == "val")
