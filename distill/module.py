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
from distill.explain import EVAL_METHOD, METHODS, box_mass_share, explain_network, network_spec
from distill.explain.maps import check_map_precision
from distill.explain.resolution import degenerate_grid_fix, map_metrics_missing, meaningful_grid, network_label
from distill.losses import (
    DISTANCES,
    attention_transfer,
    class_activation_maps,
    class_attention_transfer,
    decoupled_kd,
    dkd_warmup,
    explain_loss,
    map_cosine,
    standardize_logits,
)
from distill.losses.explain import cosine_weights
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


# The terms of the student's loss, in logging order (train/<name>, val/<name>, test/<name>). The loss
# is the plain sum of LossWeights.weight(name) * term; each term's formula is in DistillModule.terms.
TERMS = ("ce", "kd", "dkd", "at", "cat", "explain")


@dataclass(frozen=True)
class LossWeights:
    """The loss table (config node ``loss``): every weight of the student's loss (docs/method.md §3)."""

    ce: float = 1.0
    kd: float = 0.0
    temperature: float = 4.0  # of the KD and DKD terms
    at: float = 0.0  # the AT paper's beta/2 (beta = 1000: at = 500)
    explain: float = 0.0
    dkd_alpha: float = 0.0  # DKD's alpha and beta, inside its term T^2 (alpha TCKD + beta NCKD) (Eq. 7)
    dkd_beta: float = 0.0
    dkd_warmup: int = 0  # epochs of DKD's linear warm-up of its term (0: none)
    cat: float = 0.0  # CAT-KD's beta: class attention transfer, MSE of the pooled class activation maps
    cat_resolution: int = 2  # CAT-KD's CAM_RESOLUTION: the CAMs are average-pooled to r x r
    cat_normalize: bool = False  # CAT-KD's IF_NORMALIZE: L2-normalise each pooled CAM first
    logit_standardize: bool = False  # z-score each sample's logits before KD's and DKD's softmax (Sun et al.)

    def __post_init__(self) -> None:
        for name in ("ce", "kd", "at", "cat", "explain", "dkd_alpha", "dkd_beta", "dkd_warmup"):
            if getattr(self, name) < 0:
                raise ConfigError(f"loss.{name} is {getattr(self, name)}; loss weights must be >= 0")
        if self.temperature <= 0:
            raise ConfigError(f"loss.temperature must be > 0, got {self.temperature} (e.g. loss.temperature=4)")
        if self.cat_resolution < 1:
            raise ConfigError(f"loss.cat_resolution must be >= 1, got {self.cat_resolution} "
                              "(e.g. loss.cat_resolution=2)")

    def weight(self, name: str, epoch: int = 1) -> float:
        """The weight of term ``name`` in the sum at 1-based ``epoch``. DKD's is its linear warm-up
        factor (part of the DKD method, mdistiller), as its alpha and beta are inside the term."""
        if name == "dkd":
            return dkd_warmup(epoch, self.dkd_warmup) if self.dkd_alpha + self.dkd_beta > 0 else 0.0
        return getattr(self, name)

    def active(self) -> tuple[str, ...]:
        """The terms computed and logged: ``ce`` always (also at weight 0), the others when they weigh > 0."""
        return tuple(name for name in TERMS if name == "ce" or self.weight(name) > 0)


@dataclass(frozen=True)
class ExplainSettings:
    """How explanations enter training and evaluation."""

    method: str | None = None  # None: no explanation loss
    distance: str = "squared_l2"  # squared_l2 | normalized_squared_l2 | cosine
    target: str = "label"  # label | teacher_pred
    eval_method: str = EVAL_METHOD  # maps compared at evaluation (val/map_cosine), whatever the training loss
    closed_form: bool = True  # use the no-autograd closed form where the head allows it

    def __post_init__(self) -> None:
        if self.method is not None and self.method not in METHODS:
            raise ConfigError(f"explain.method '{self.method}' is unknown; choose one of {METHODS}")
        if self.eval_method not in METHODS:
            raise ConfigError(f"eval_method '{self.eval_method}' is unknown; choose one of {METHODS}")
        if self.distance not in DISTANCES:
            raise ConfigError(f"explain.distance '{self.distance}' is unknown; choose one of {DISTANCES}")
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
        # "conflict": the test images with a conflicting cue (data.shortcut), logged as test/conflict_<name>
        self.eval_metrics = nn.ModuleDict({stage: self._eval_metrics() for stage in ("val", "test", "conflict")})
        self.cue_metrics = MetricCollection({f"{who}{name}": MeanMetric() for who in ("", "teacher_")
                                             for name in ("cue_follow", "cue_map_mass")}, compute_groups=False)

    def _eval_metrics(self) -> MetricCollection:
        # no compute groups: loss and ce (equal when CE is the only term) must never be merged on a
        # first batch where they happen to agree
        return MetricCollection({self.task.score_name: self.task.score_metric(), "loss": MeanMetric(),
                                 "ce": MeanMetric()}, compute_groups=False)

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
        self.log("train/ce", loss)  # the whole loss here: the same keys as the distiller's
        self.log("train/loss", loss, prog_bar=True)
        self.log_train_score(logits, y)
        return loss

    def _eval_step(self, batch: tuple[Tensor, ...], stage: str) -> None:
        x, y = batch[0], batch[1]  # evaluation batches may carry more (e.g. VOC boxes)
        logits = self.model(x)
        metrics = self.eval_metrics[stage]
        metrics[self.task.score_name].update(logits, y)
        ce = self.task.loss(logits, y)
        metrics["loss"].update(ce)
        metrics["ce"].update(ce)
        self.log_eval(metrics, stage)

    def log_eval(self, metrics: MetricCollection, stage: str) -> None:
        """``<stage>/<name>``; the conflicting-cue test images' as ``test/conflict_<name>``."""
        prefix = "test/conflict_" if stage == "conflict" else f"{stage}/"
        missing = getattr(self, "map_metrics_missing", None)  # maps below MIN_MAP_GRID: no map metric
        self.log_dict({f"{prefix}{k}": m for k, m in metrics.items() if not (missing and "map_" in k)},
                      prog_bar=stage == "val", add_dataloader_idx=False)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, ...], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Test images (``dataloader_idx`` 0), and with ``data.shortcut`` the same images with a
        conflicting cue (1: items ``(image, label, cue class, cue box)``, ``distill.data.shortcut``)."""
        if dataloader_idx == 1:
            self._eval_step(batch, "conflict")
            self._cue_step(batch)
        else:
            self._eval_step(batch, "test")

    @property
    def cue_map_method(self) -> str:
        """The map method of ``test/cue_map_mass``: the evaluation's (``eval_method``)."""
        return getattr(getattr(self, "explain", None), "eval_method", EVAL_METHOD)

    def predict_and_explain(self, model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """``model``'s logits ``(B, C)`` on ``x`` and the ``cue_map_method`` maps ``(B, h, w)`` of its
        top-1 class (None for a network without ``forward_features``, e.g. a ViT trained alone)."""
        if not callable(getattr(model, "forward_features", None)):
            with torch.no_grad():
                return model(x), None
        if torch.is_inference_mode_enabled():
            raise ConfigError("explanation maps need autograd at evaluation: set trainer.inference_mode=false")
        with torch.no_grad():
            features = model.forward_features(x)
            logits = model.forward_head(features)
        with torch.enable_grad():
            maps = explain_network(model, features, logits.argmax(dim=1), self.cue_map_method)
        return logits, maps.detach()

    def _cue_step(self, batch: tuple[Tensor, ...]) -> None:
        """Per network (the teacher's prefixed ``teacher_``): ``test/cue_follow``, the share of
        predictions that are the cue's class, and ``test/cue_map_mass``, the cue's share of the positive
        mass of the map of the predicted class (:func:`~distill.explain.box_mass_share`)."""
        x, cue, boxes = batch[0], batch[2], batch[3]
        networks = self.networks()
        for role, model in networks.items():
            who = "teacher_" if role == "teacher" and len(networks) > 1 else ""
            logits, maps = self.predict_and_explain(model, x)
            self.cue_metrics[f"{who}cue_follow"].update((logits.argmax(dim=1) == cue).float())
            if maps is not None and map_metrics_missing({role: tuple(maps.shape[-2:])}) is None:  # no 1x1 map
                self.cue_metrics[f"{who}cue_map_mass"].update(box_mass_share(maps, boxes, tuple(x.shape[-2:])))
        self.log_dict({f"test/{k}": m for k, m in self.cue_metrics.items() if m.update_called},
                      add_dataloader_idx=False)

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
    """Student trained with the loss table's terms: CE, Hinton KD, DKD, attention transfer, class
    attention transfer (CAT-KD) and the explanation loss, their plain weighted sum (:class:`LossWeights`)."""

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
        if weights.dkd_alpha + weights.dkd_beta > 0 and self.task.multilabel:
            raise ConfigError(f"kd=dkd needs one label per image; the {self.task.name} task has none: use kd=hinton")
        if weights.logit_standardize and self.task.multilabel:
            raise ConfigError(f"loss.logit_standardize=true z-scores one softmax's logits; the {self.task.name} task's "
                              "outputs are independent sigmoids: set loss.logit_standardize=false")
        for role, model in (("teacher", teacher), ("student", student)):
            require_network(model, role, type(model).__name__, stages=weights.at > 0)
        self.teacher = teacher.eval().requires_grad_(False)
        self.weights = weights
        self.explain = explain
        if weights.explain > 0 and explain.method is None:
            raise ConfigError(f"loss.explain > 0 but explain.method is null: set explain.method to one of "
                              f"{', '.join(METHODS)} (e.g. explain=gradcampp), or loss.explain=0")
        for metrics in self.eval_metrics.values():  # <stage>/<term> of every active term (ce is there)
            metrics.add_metrics({name: MeanMetric() for name in weights.active() if name != "ce"})
        self.hparams.pop("role")
        self.hparams["student"] = self.hparams.pop("model")
        self.hparams.update(teacher=build_spec(teacher), weights=asdict(weights), explain=asdict(explain))
        self.map_metrics_missing: str | None = None  # why map_cosine is not logged (distill.explain.resolution)

    @property
    def loss_method(self) -> str | None:
        """The map method of the explanation term, ``None`` when the term is off."""
        return self.explain.method if self.weights.explain > 0 else None

    def _eval_metrics(self) -> MetricCollection:
        metrics = super()._eval_metrics()
        metrics.add_metrics(
            {
                f"teacher_{self.task.score_name}": self.task.score_metric(),
                "agreement": MeanMetric(),
                "map_cosine": MeanMetric(),
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
        methods = (self.explain.eval_method, self.loss_method)
        check_map_precision(self.trainer.precision, any(
            self._needs_head_grad(model, methods) for model in (self.teacher, self.model)))

    # ------------------------------------------------------------------ forward passes
    def _features(self, model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        if self.weights.at > 0:
            return model.forward_stages(x)
        return model.forward_features(x), []

    def _needs_head_grad(self, model: nn.Module, methods: tuple[str | None, ...],
                         features: Tensor | None = None) -> bool:
        """True if the maps of any of ``methods`` (``None``: no map) need ``dS/dA`` through the head
        (the general path); a model not inspected yet counts as needing it."""
        if all(method is None for method in methods):
            return False
        spec = network_spec(model, features) if features is not None else known_spec(model)
        return not self.explain.closed_form or spec is None or spec.path == "general"

    def teacher_forward(self, x: Tensor, *methods: str | None) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Teacher ``(features, logits, groups)``: backbone without a graph, head with one
        (first order only) when one of ``methods`` needs an autograd map."""
        with torch.no_grad():
            features, groups = self._features(self.teacher, x)
        if not self._needs_head_grad(self.teacher, methods, features):
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

    # ------------------------------------------------------------------ map grids
    def map_grids(self, t_features: Tensor, s_features: Tensor) -> dict[str, tuple[int, int]]:
        """``{"teacher wrn40_2": (h, w), "student ...": (h, w)}`` of features ``(B, K, h, w)`` (shapes only)."""
        return {f"{role} {network_label(model)}": tuple(features.shape[-2:])
                for role, model, features in (("teacher", self.teacher, t_features),
                                              ("student", self.model, s_features))}

    def require_meaningful_maps(self, t_features: Tensor, s_features: Tensor) -> None:
        """The explanation loss needs maps of at least ``MIN_MAP_GRID`` per side (train.py checks
        this before training; here for a module used on its own)."""
        for name, grid in self.map_grids(t_features, s_features).items():
            if not meaningful_grid(grid):
                raise ConfigError(degenerate_grid_fix(name, grid))

    # ------------------------------------------------------------------ the loss
    def class_maps(self, role: str, features: Tensor) -> Tensor:
        """Class activation maps of every class, ``(B, K, h, w) -> (B, C, h, w)``, for CAT-KD: the
        ``role`` network's linear head as a 1 x 1 convolution (a pool + linear head only)."""
        model = self.networks()[role]
        spec = network_spec(model, features)
        if spec.path != "linear":
            raise ConfigError(
                f"kd=cat (loss.cat > 0) needs a global-average-pool + linear head, and the {role} "
                f"{type(model).__name__}'s head is not one ({spec.path} path): use another kd= option or loss.cat=0")
        return class_activation_maps(features, spec.linear(model).weight)

    def terms(self, labels: Tensor, s_logits: Tensor, t_logits: Tensor, s_groups: list[Tensor],
              t_groups: list[Tensor], target: Tensor | None, maps: tuple[Tensor, Tensor] | None,
              features: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
        """The active terms (``LossWeights.active``), unweighted: logits ``(B, C)``, stage outputs
        for AT, map targets ``(B,)`` / ``(B, T)`` (-1: padding), ``(student, teacher)`` maps of
        ``loss_method`` for the explanation term and ``(student, teacher)`` features
        ``(B, K, h, w)`` for CAT-KD."""
        w, t_logits = self.weights, t_logits.detach()
        # KD and DKD on z-scored logits with loss.logit_standardize (CE always on the raw ones)
        s_soft, t_soft = (standardize_logits(s_logits), standardize_logits(t_logits)) if w.logit_standardize \
            else (s_logits, t_logits)
        formulas = {
            "ce": lambda: self.task.loss(s_logits, labels),
            "kd": lambda: self.task.kd(s_soft, t_soft, w.temperature),
            "dkd": lambda: decoupled_kd(s_soft, t_soft, labels, w.dkd_alpha, w.dkd_beta, w.temperature),
            "at": lambda: attention_transfer(s_groups, t_groups),
            "cat": lambda: class_attention_transfer(self.class_maps("student", features[0]),
                                                    self.class_maps("teacher", features[1]).detach(),
                                                    w.cat_resolution, w.cat_normalize),
            "explain": lambda: explain_loss(*maps, self.explain.distance, mask=target >= 0),
        }
        return {name: formulas[name]() for name in w.active()}

    def loss_terms(self, x: Tensor, y: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Unweighted loss terms and the student's logits for one training batch."""
        method = self.loss_method
        t_features, t_logits, t_groups = self.teacher_forward(x, method)
        s_features, s_groups = self._features(self.model, x)
        s_logits = self.model.forward_head(s_features)
        target, maps = None, None
        if method is not None:
            self.require_meaningful_maps(t_features, s_features)
            target = self.map_target(y, t_logits)
            t_maps = self.maps(self.teacher, t_logits, t_features, target, method, False).detach()
            maps = self.maps(self.model, s_logits, s_features, target, method, True), t_maps
        features = (s_features, t_features.detach())
        return self.terms(y, s_logits, t_logits, s_groups, t_groups, target, maps, features), s_logits

    def total_loss(self, terms: dict[str, Tensor]) -> Tensor:
        """``sum(weight(name) * term)`` at the current (1-based) epoch: the plain weighted sum."""
        return sum(self.weights.weight(name, self.current_epoch + 1) * value for name, value in terms.items())

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Logs ``train/<term>``: the student in train mode (BatchNorm with the batch's statistics),
        so a raw-map term is not comparable with ``val/<term>`` (docs/logged_terms.md)."""
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
        """The same terms and weighted total as in training (``<stage>/<term>``, ``<stage>/loss``),
        the scores, and the cosine of the ``eval_method`` maps (``<stage>/map_cosine``). The student
        is in eval mode here (BatchNorm's running statistics), in train mode for ``train/<term>``:
        early in training the squared-L2 explanation term differs by tens of times between the two
        for that reason alone (measured: docs/logged_terms.md, scripts/measure_explain_gap.py)."""
        x, y = batch[0], batch[1]
        if torch.is_inference_mode_enabled():
            raise ConfigError("explanation maps need autograd at evaluation: set trainer.inference_mode=false")
        methods = (self.explain.eval_method, self.loss_method)
        t_features, t_logits, t_groups = self.teacher_forward(x, *methods)
        s_features, s_groups = self._features(self.model, x)
        if self._needs_head_grad(self.model, methods, s_features):
            s_features = s_features.detach().requires_grad_(True)
        with torch.enable_grad():  # maps need a gradient; Trainer(inference_mode=False)
            s_logits = self.model.forward_head(s_features)
            target = self.map_target(y, t_logits)
            maps = {method: (self.maps(self.model, s_logits, s_features, target, method, False).detach(),
                             self.maps(self.teacher, t_logits, t_features, target, method, False).detach())
                    for method in dict.fromkeys(methods) if method is not None}
            terms = self.terms(y, s_logits, t_logits, s_groups, t_groups, target, maps.get(self.loss_method),
                               (s_features, t_features.detach()))
        terms = {name: value.detach() for name, value in terms.items()}
        t_logits, s_logits = t_logits.detach(), s_logits.detach()
        score = self.task.score_name
        metrics = self.eval_metrics[stage]
        metrics[score].update(s_logits, y)
        metrics["loss"].update(self.total_loss(terms))
        for name, value in terms.items():
            metrics[name].update(value)
        metrics[f"teacher_{score}"].update(t_logits, y)
        metrics["agreement"].update(self.task.agreement(s_logits, t_logits))
        self.map_metrics_missing = map_metrics_missing(self.map_grids(t_features, s_features))
        if self.map_metrics_missing is None:  # else map_cosine is left out, never a number
            metrics["map_cosine"].update(*cosine_weights(map_cosine(*maps[self.explain.eval_method]), target >= 0))
        self.log_eval(metrics, stage)
