"""The schema of every config group: types, ranges, allowed values and required keys.

Checked once, right after Hydra composed the config and before anything heavy is imported, read
or built (:class:`CheckConfig`, a Hydra callback in ``configs/hydra/default.yaml``), and again by
``distill.run.run`` and the evaluation scripts (for runs composed without the callback, e.g. in
tests or multiruns). A mistake is one line naming the key, the bad value and what is allowed
(:class:`~distill.errors.ConfigError`, exit status 2).

One pydantic model per config group option family. To add a key, add a typed field with its
range to the model of its group (``Field(ge=0)``, ``Literal[...]``); to add an option family
with other keys (a new data module), subclass :class:`DataBase` and register it in ``DATA`` under
its ``_target_``. Models are :class:`Strict` (unknown keys refused) where the keys are ours, and
:class:`Open` (known keys typed, any other key passed through) where a library takes arbitrary
keyword arguments (models, optimizers, schedulers, loggers). This module imports no torch.
"""

from __future__ import annotations

import os
import re
import tempfile
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import annotated_types
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import GrammarParseError, InterpolationResolutionError, MissingMandatoryValue
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from distill.errors import ConfigError, exit_on_user_error, os_cause

# Names other modules define (kept in sync by tests/test_config_schema.py, so the schema never imports torch).
EXPLAIN_METHODS = ("cam", "gradcam", "gradcampp", "hirescam", "xgradcam", "layercam")  # distill.explain.maps.METHODS
DISTANCES = ("squared_l2", "normalized_squared_l2", "cosine")  # distill.losses.explain.DISTANCES
STAGES = ("teacher", "baseline", "distill")  # distill.run.STAGES
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
TASKS = ("multiclass", "multilabel", "multilabel_voc11")  # distill.tasks.TASKS

PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Method = Literal[EXPLAIN_METHODS]


class Strict(BaseModel):
    """A group whose keys are all ours: an unknown key is refused."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Open(BaseModel):
    """A group passed to a library as keyword arguments: known keys typed, others let through."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)


class Target(Open):
    target: str = Field(alias="_target_")
    partial: bool = Field(False, alias="_partial_")


# ------------------------------------------------------------------------------------------- data
class Shortcut(Strict):
    """``data.shortcut``: the class-coded cue of the shortcut benchmark (distill.data.shortcut)."""

    p: Fraction | None = None  # None: off
    size: PosInt = 4


class DataBase(Strict):
    """The keys every DataModule of distill.data takes (distill.data.base.BaseDataModule)."""

    target: str = Field(alias="_target_")
    name: str
    num_classes: PosInt | None = None  # None: counted from the class folders (image folders)
    batch_size: PosInt
    eval_batch_size: PosInt | None = None
    num_workers: NonNegInt | None = None  # None: the CPUs per device, minus one
    seed: int = 0
    val_split: Annotated[float, Field(ge=0, lt=1)] = 0.0
    train_subset: PosInt | None = None
    val_subset: PosInt | None = None
    test_subset: PosInt | None = None
    augment: bool = True
    per_class: PosInt | None = None  # few-shot: per_class training images of every class
    subset_seed: NonNegInt = 0
    shortcut: Shortcut | None = None


class CifarData(DataBase):
    root: str
    download: bool = True
    on_device: bool = False


class ImageFolderData(DataBase):
    root: str  # required: image_folder.yaml leaves it ??? (a required value)
    image_size: PosInt | list[PosInt] = 32
    mean: list[float] = Field(min_length=1, max_length=3)
    std: list[PosFloat] = Field(min_length=1, max_length=3)
    on_device: bool = False


class ImageNetData(ImageFolderData):
    resize: PosInt = 256


class SyntheticData(DataBase):
    num_train: PosInt
    num_val: PosInt
    image_size: PosInt
    noise: NonNegFloat


class VocData(DataBase):
    root: str
    download: bool = True
    image_size: PosInt


class OtherData(DataBase):
    """A DataModule of the user's own: the common keys typed, its own keys let through."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)


DATA: dict[str, type[DataBase]] = {
    "distill.data.CIFAR10DataModule": CifarData,
    "distill.data.CIFAR100DataModule": CifarData,
    "distill.data.ImageNetDataModule": ImageNetData,
    "distill.data.ImageFolderDataModule": ImageFolderData,
    "distill.data.SyntheticDataModule": SyntheticData,
    "distill.data.VOC2007DataModule": VocData,
}


# ------------------------------------------------------------------------------------------- models
class Model(Open):
    """teacher / student: ``name`` plus the factory's options (checked against its signature
    by :func:`check_model_options`), so timm / torchvision options pass through."""

    name: str
    checkpoint: str | None = None
    compile: bool = False
    pretrained: bool | None = None
    finetune: Literal["head", "all"] | None = None
    dropout: Annotated[float, Field(ge=0, lt=1)] | None = None
    width: PosFloat | None = None
    hidden: PosInt | None = None
    batch_norm: bool | None = None
    arch: str | None = None  # timm / torchvision architecture name
    layer: str | None = None  # the explained module (timm / torchvision)
    weights: str | None = None  # torchvision weight enum name
    drop_rate: Annotated[float, Field(ge=0, lt=1)] | None = None
    output_stride: Literal[8, 16, 32] | None = None  # timm: dilated last stages (a finer explained map)
    replace_stride_with_dilation: list[bool] | None = None  # torchvision bottleneck ResNets: the same
    as_is: bool = False  # teacher: use the network as built, untrained here


# ------------------------------------------------------------------------------------------- losses
class Explain(Strict):
    name: str
    method: Method | None = None
    distance: Literal[DISTANCES] = "squared_l2"
    target: Literal["label", "teacher_pred"] = "label"
    closed_form: bool = True


class KD(Strict):
    name: str


class Loss(Strict):
    """The loss table: every weight of the student's loss (distill.module.LossWeights)."""

    ce: NonNegFloat = 1.0
    kd: NonNegFloat = 0.0
    temperature: PosFloat = 4.0
    at: NonNegFloat = 0.0
    explain: NonNegFloat = 0.0
    dkd_alpha: NonNegFloat = 0.0  # DKD (Zhao et al., 2022): weight of TCKD inside its term
    dkd_beta: NonNegFloat = 0.0  # weight of NCKD inside its term
    dkd_warmup: NonNegInt = 0  # epochs of DKD's linear warm-up of its term
    cat: NonNegFloat = 0.0  # CAT-KD (Guo et al., 2023): its beta, MSE of the pooled class activation maps
    cat_resolution: PosInt = 2  # CAT-KD: the CAMs are average-pooled to cat_resolution x cat_resolution
    cat_normalize: bool = False  # CAT-KD: L2-normalise each pooled CAM first
    logit_standardize: bool = False  # z-score the logits before KD's / DKD's softmax (Sun et al., 2024)


# Keys that moved: old key -> (new key, why, the new value for an old one)
RENAMED: dict[str, tuple[str, str, Any]] = {
    **{f"kd.{old}": (f"loss.{new}", "one table for every loss weight", lambda v: v)
       for old, new in (("ce_weight", "ce"), ("kd_weight", "kd"), ("temperature", "temperature"),
                        ("dkd_alpha", "dkd_alpha"), ("dkd_beta", "dkd_beta"), ("dkd_warmup", "dkd_warmup"))},
    "kd.at_weight": ("loss.at", "one table for every loss weight, no hidden factor: loss.at is the AT paper's "
                     "beta/2", lambda v: v / 2 if isinstance(v, int | float) else v),
    "explain.weight": ("loss.explain", "one table for every loss weight", lambda v: v),
    "explain.loss": ("explain.distance", "paper is now squared_l2, normalized normalized_squared_l2",
                     lambda v: {"paper": "squared_l2", "normalized": "normalized_squared_l2"}.get(v, v)),
    "explain.eval_method": ("eval_method", "one map method for every evaluation", lambda v: v),
    "data.loc_method": ("eval_method", "one map method for every evaluation", lambda v: v),
    "data.ap": ("task", "the task scores the labels; 11point is task=multilabel_voc11",
                lambda v: {"11point": "multilabel_voc11", "area": "multilabel"}.get(v, v)),
    "data.max_map_targets": ("task.max_map_targets", "an option of the multi-label task", lambda v: v),
    "data.loc_deltas": ("callbacks.localization.deltas", "the localisation callback's setting", lambda v: v),
    "data.loc_on_val": ("callbacks.localization.on_val", "the localisation callback's setting", lambda v: v),
    **{f"explanation_panel.{key}": (f"callbacks.explanation_panel.{key}", "callbacks are a config group",
                                    lambda v: v)
       for key in ("every_n_epochs", "num_images", "method", "target", "cell_px")},
}


def renamed_key_problem(key: str, value: Any = None) -> str | None:
    """One line for a key that moved (``explain.weight`` -> ``loss.explain``), else ``None``.
    ``key`` may carry Hydra's ``+`` / ``++`` / ``~`` prefix."""
    key = key.lstrip("+~")
    if key not in RENAMED:
        return None
    new, why, convert = RENAMED[key]
    example = convert(value) if value is not None else "..."
    return f"{key} is now {new} ({why}): use {new}={example}"


def check_overrides(overrides: list[str]) -> None:
    """Raise ``ConfigError`` (one line) for a command-line override of a key that moved, or of a
    config group option that does not exist."""
    problem = renamed_override_problem(overrides) or unknown_option_problem(overrides)
    if problem:
        raise ConfigError(problem)


def unknown_option_problem(overrides: list[str], config_dir: Path = CONFIG_DIR) -> str | None:
    """One line naming the first ``group=option`` (or ``-m group=a,b`` sweep) whose option has no
    ``configs/<group>/<option>.yaml``, with the options there; else ``None``. Hydra's own answer is a
    multi-line message and exit status 1."""
    for item in overrides:
        key, sep, value = item.partition("=")
        group = key.lstrip("+~")
        folder = config_dir / group
        if not sep or not re.fullmatch(r"\w+", group) or not folder.is_dir() \
                or not re.fullmatch(r"[\w.-]+(,[\w.-]+)*", value):  # choice(...), globs: left to Hydra
            continue
        options = sorted(p.stem for p in folder.glob("*.yaml"))
        unknown = [option for option in value.split(",") if option != "null" and option not in options]
        if unknown:
            return (f"{group}={unknown[0]} is not an option of the config group {group}: choose one of "
                    f"{', '.join(options)} (configs/{group}/*.yaml)")
    return None


def renamed_override_problem(overrides: list[str]) -> str | None:
    """One line for the first command-line override of a key that moved, else ``None``; checked
    before Hydra composes (Hydra's own message would only say the key is not in the config)."""
    for item in overrides:
        key, _, value = item.partition("=")
        for number in (int, float):
            try:
                value = number(value) if value else None
                break
            except ValueError:
                pass
        problem = renamed_key_problem(key, value)
        if problem:
            return problem
    return None


def _renamed_in(raw: dict) -> str | None:
    for key in RENAMED:
        group, _, name = key.partition(".")
        if isinstance(raw.get(group), dict) and name in raw[group]:
            return renamed_key_problem(key, raw[group][name])
    return None


# ------------------------------------------------------------------------------------------- optim
class Optimizer(Target):
    lr: NonNegFloat
    momentum: Fraction | None = None
    weight_decay: NonNegFloat | None = None
    nesterov: bool | None = None


class Scheduler(Target):
    milestones: list[NonNegInt] | None = None
    gamma: PosFloat | None = None
    eta_min: NonNegFloat | None = None


class Optim(Strict):
    optimizer: Optimizer
    scheduler: Scheduler | None = None
    interval: Literal["epoch", "step"] = "epoch"


# ------------------------------------------------------------------------------------------- trainer
Batches = Annotated[int, Field(ge=0)] | Fraction | None
DeviceList = Annotated[str, Field(pattern=r"^\s*(-1|\d+(\s*,\s*\d+)*\s*,?)\s*$",  # Lightning's "2", "0,1", "1,"
                                  description="device indices as a string, e.g. '0,1'")]


class Trainer(Strict):
    """lightning.pytorch.Trainer's arguments (the frequent ones typed), plus the module's own."""

    target: str = Field(alias="_target_")
    accelerator: str = "auto"
    strategy: Any = None
    devices: PosInt | Literal[-1, "auto"] | DeviceList | list[NonNegInt] = 1
    num_nodes: PosInt = 1
    precision: str | int = "32-true"
    max_epochs: PosInt
    min_epochs: NonNegInt | None = None
    max_steps: Annotated[int, Field(ge=-1)] = -1
    min_steps: NonNegInt | None = None
    max_time: Any = None
    limit_train_batches: Batches = None
    limit_val_batches: Batches = None
    limit_test_batches: Batches = None
    limit_predict_batches: Batches = None
    overfit_batches: Annotated[int, Field(ge=0)] | Fraction = 0.0
    val_check_interval: PosInt | Fraction | None = None
    check_val_every_n_epoch: PosInt | None = 1
    num_sanity_val_steps: Annotated[int, Field(ge=-1)] | None = None
    log_every_n_steps: PosInt | None = None
    enable_checkpointing: bool | None = None
    enable_progress_bar: bool | None = None
    enable_model_summary: bool | None = None
    accumulate_grad_batches: PosInt = 1
    gradient_clip_val: NonNegFloat | None = None
    gradient_clip_algorithm: Literal["norm", "value"] | None = None
    deterministic: bool | Literal["warn"] | None = None
    benchmark: bool | None = None
    inference_mode: Literal[False] = False  # validation computes explanation maps, which need autograd
    use_distributed_sampler: bool = True
    profiler: Any = None
    detect_anomaly: bool = False
    barebones: bool = False
    sync_batchnorm: bool = False
    reload_dataloaders_every_n_epochs: NonNegInt = 0
    fast_dev_run: bool | NonNegInt = False
    default_root_dir: str | None = None
    enable_autolog_hparams: bool = True
    plugins: Any = None
    model_registry: str | None = None
    # read by the LightningModule (distill.build.MODULE_TRAINER_KEYS), not the Trainer
    skip_nonfinite: bool = False
    max_skipped_steps: PosInt = 10
    # read by distill (distill.mid_epoch.KEYS): last.ckpt also every N optimizer steps / M minutes
    checkpoint_every_n_steps: PosInt | None = None
    checkpoint_every_minutes: PosFloat | None = None


# ------------------------------------------------------------------------------------------- the rest
class Logger(Target):
    save_dir: str | None = None
    name: str | None = None
    project: str | None = None
    offline: bool | Literal["auto"] | None = None
    tags: list[str] | None = None
    log_model: bool | Literal["all"] | None = None


class Paths(Strict):
    data_dir: str
    checkpoint_dir: str
    log_dir: str
    output_dir: str


class Task(Strict):
    """``configs/task/``: how the labels are trained and scored (distill.tasks)."""

    name: Literal[TASKS]
    score: str
    max_map_targets: PosInt | None = None  # the multi-label tasks


class Panel(Target):
    every_n_epochs: PosInt
    num_images: PosInt | None = None
    method: Method
    target: Literal["label", "pred"] = "label"
    cell_px: PosInt = 128
    single_network: bool = False


class Localization(Target):
    deltas: list[Annotated[float, Field(ge=0, lt=1)]] = []
    method: Method
    on_val: bool = True


class Callbacks(Strict):
    """``configs/callbacks/``: the two checkpoint writers are required; the rest can be dropped
    (``~callbacks.<name>``), and a callback of the user's own added (``+callbacks.<name>._target_=...``)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    best_checkpoint: Target
    last_checkpoint: Target
    explanation_panel: Panel | None = None
    localization: Localization | None = None


class Common(Strict):
    task_name: str
    paths: Paths
    logger: Logger | None = None
    trust_checkpoints: bool = False
    hydra: Any = None  # Hydra's own node, present when the callback checks the config


class Train(Common):
    stage: Literal[STAGES]
    seed: Annotated[int, Field(ge=0, lt=2**32)]
    resume: str | None = None
    ckpt_path: str | None = None
    test_after_fit: bool = True
    test_best: bool = True
    resume_fallback: bool = False
    eval_method: Method
    optimized_metric: str | None = None
    task: Task
    callbacks: Callbacks
    data: dict[str, Any]  # checked by its own family's model (DATA)
    teacher_data: dict[str, Any] | None = None  # keys of data replaced for the teacher (distill.teacher)
    teacher: Model
    student: Model
    explain: Explain
    kd: KD
    loss: Loss
    optim: Optim
    trainer: Trainer

    @model_validator(mode="after")
    def _explain_weight_needs_method(self):
        if self.loss.explain > 0 and self.explain.method is None:
            raise ValueError(f"loss.explain={self.loss.explain} needs an explain.method: set explain.method to one of "
                             f"{', '.join(EXPLAIN_METHODS)} (e.g. explain=gradcampp), or loss.explain=0")
        return self


class EvalData(Open):
    """Replacements of the checkpoint's recorded ``config.data`` (null: keep the recorded value)."""

    target: str | None = Field(None, alias="_target_")
    root: str | None = None
    download: bool | None = None
    num_workers: NonNegInt | None = None


class Scripts(Common):
    checkpoint: str
    teacher_checkpoint: str | None = None
    data: EvalData | None = None
    split: Literal["test", "val"] = "test"
    device: str = "auto"
    output_dir: str


class PointingGame(Strict):
    """Checked in full by ``distill.evaluation.pointing`` (its messages list what is allowed)."""

    grid: int | None = None
    num_grids: PosInt = 500
    grids_per_batch: PosInt = 16
    methods: list[str] = []


class EvalLocalization(Strict):
    deltas: list[Annotated[float, Field(ge=0, lt=1)]] = [0.0, 0.25, 0.5]


class Evaluate(Scripts):
    batch_size: PosInt | None = 256
    limit_batches: PosInt | None = None
    seed: int = 0
    similarity_target: Literal["label", "student_pred", "teacher_pred"] = "label"
    explain_teacher: bool = True
    eval_method: Method = "gradcampp"
    localization: EvalLocalization = EvalLocalization()
    progress_bar: bool = True
    pointing_game: PointingGame = PointingGame()


class Visualize(Scripts):
    num_images: PosInt = 8
    indices: list[NonNegInt] | None = Field(None, min_length=1)
    target: Literal["pred", "label"] = "pred"
    cell_px: PosInt = 128
    dpi: PosInt = 100
    batch_size: PosInt | None = None
    filename: str = "explanations.png"


SCHEMAS: dict[str, type[BaseModel]] = {"train": Train, "evaluate": Evaluate, "visualize": Visualize}


# ------------------------------------------------------------------------------------------- messages
def _describe(annotation: Any, metadata: list = ()) -> str:
    """What a field allows, in words: ``a number > 0``, ``one of 'label', 'teacher_pred'``, ..."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        extra = [m for a in args[1:] for m in [a, *(getattr(a, "metadata", None) or [])]]
        return _describe(args[0], [*metadata, *extra])
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        text = " or ".join(_describe(a) for a in options)
        return f"{text} or null" if len(options) < len(args) else text
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args) if len(args) > 1 else repr(args[0])
    if origin is list:
        return f"a list of ({_describe(args[0])})" if args else "a list"
    if origin is dict:
        return "a mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"a mapping with the keys {', '.join(_keys(annotation))}"
    described = [m.description for m in metadata if getattr(m, "description", None)]
    if described:
        return described[0]
    name = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(annotation, "any value")
    bounds = {annotated_types.Gt: (">", "gt"), annotated_types.Ge: (">=", "ge"), annotated_types.Lt: ("<", "lt"),
              annotated_types.Le: ("<=", "le")}
    for m in metadata:
        for kind, (sign, attr) in bounds.items():
            if isinstance(m, kind):
                name += f" {sign} {getattr(m, attr)}"
    return name


def _keys(model: type[BaseModel]) -> list[str]:
    return [field.alias or name for name, field in model.model_fields.items() if name != "hydra"]


def _field(model: type[BaseModel], key: str):
    for name, field in model.model_fields.items():
        if key in (name, field.alias):
            return field
    return None


def _submodel(field) -> type[BaseModel] | None:
    candidates = [field.annotation, *typing.get_args(field.annotation)]
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)


def _message(err: ValidationError, model: type[BaseModel], raw: dict, prefix: str) -> str:
    """One line for the first error: the key, the bad value, and what is allowed."""
    first = err.errors()[0]
    parts, value, current, field = [], raw, model, None
    for loc in first["loc"]:  # walk the keys that exist; union members add tags that do not
        if isinstance(value, dict) and loc in value:
            parts.append(str(loc))
            value = value[loc]
            field = _field(current, loc) if current is not None else None
            current = _submodel(field) if field is not None else None
        elif isinstance(value, list) and isinstance(loc, int) and loc < len(value):
            parts[-1] += f"[{loc}]"
            value = value[loc]
        else:
            break
    key = ".".join([prefix, *parts] if prefix else parts) or prefix or "the config"
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    if first["type"] == "extra_forbidden":
        owner = model
        for part in parts[:-1]:
            owner = _submodel(_field(owner, part)) or owner
        group = ".".join(([prefix] if prefix else []) + parts[:-1]) or "the top level"
        return (f"unknown config key {key}={value!r}: {group} takes only {', '.join(_keys(owner))} "
                f"(check the spelling; '+key=' adds keys only to networks, optimizers, callbacks and your own "
                f"DataModule){more}")
    if first["type"] == "missing":
        key = ".".join(str(part) for part in ([prefix] if prefix else []) + list(first["loc"]))
        return f"config key {key} is required but not set: add {key}=...{more}"
    if first["type"] == "value_error":
        message = first["msg"].removeprefix("Value error, ")
        return f"{key}: {message}{more}" if parts else f"{message}{more}"
    allowed = f"; allowed: {_describe(field.annotation, field.metadata)}" if field is not None else ""
    return f"config key {key}={value!r} is not allowed ({first['msg']}){allowed}{more}"


# ------------------------------------------------------------------------------------------- checks
def _resolved(cfg: DictConfig, key: str, unresolved: Any) -> Any:
    """``cfg[key]`` resolved; a value that cannot be resolved yet (``${hydra:...}`` before Hydra
    set its run up) is kept unresolved, and its siblings are still resolved."""
    try:
        node = cfg[key]
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    except Exception:  # noqa: BLE001
        if isinstance(unresolved, dict) and OmegaConf.is_dict(cfg._get_node(key)):
            return {k: _resolved(cfg[key], k, v) for k, v in unresolved.items()}
        return unresolved


def _missing(value: Any, key: str) -> list[str]:
    """The keys under ``key`` left ``???`` (required values nobody set)."""
    if value == "???":
        return [key]
    if isinstance(value, dict):
        return [m for k, v in value.items() for m in _missing(v, f"{key}.{k}" if key else str(k))]
    return []


def _unresolvable(node: DictConfig | ListConfig, prefix: str = "") -> str | None:
    """The first value under ``node`` whose ``${...}`` cannot be resolved, as one line naming the key,
    the interpolation and why (a key it names does not exist, an unset environment variable, ...).
    ``${hydra:...}`` before Hydra has set its run up is not a mistake and is skipped."""
    keys = range(len(node)) if isinstance(node, ListConfig) else list(node.keys())
    for key in keys:
        if not prefix and key == "hydra":
            continue
        name = f"{prefix}.{key}" if prefix else str(key)
        child = node._get_node(key)
        if isinstance(child, (DictConfig, ListConfig)) and not child._is_interpolation():
            problem = _unresolvable(child, name)
            if problem:
                return problem
            continue
        try:
            node[key]
        except MissingMandatoryValue:  # ??? (reported by the caller, or by the schema inside a list)
            continue
        except (InterpolationResolutionError, GrammarParseError) as err:
            why = str(err).strip().splitlines()[0].removeprefix("KeyError raised while resolving interpolation: ")
            if "hydra" in why.lower():  # HydraConfig not set yet, or no `hydra` resolver outside a Hydra run
                continue
            raw = child._value()
            fix = ("set the environment variable, give a default (${oc.env:NAME,default}) or the value itself"
                   if "oc.env" in str(raw) else "correct the key it names, or give the value itself")
            return f"config key {name}={raw!r} cannot be resolved ({why.strip(chr(34))}): {fix}"
    return None


def config_errors(cfg: DictConfig, name: str = "train") -> str | None:
    """The first mistake in ``cfg`` (a composed config of ``name``: train / evaluate / visualize)
    as one line, or ``None``."""
    unresolved = {str(k): v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k != "hydra"}
    missing = _missing(unresolved, "")
    if missing:
        key = missing[0]
        return f"config key {key} is required but not set (it is ???): add {key}=... on the command line"
    unresolvable = _unresolvable(cfg)
    if unresolvable:
        return unresolvable
    raw = {k: _resolved(cfg, k, v) for k, v in unresolved.items()}
    if raw.get("logger") == {}:  # logger=none: an empty group
        raw["logger"] = None
    schema = SCHEMAS[name]
    renamed = _renamed_in(raw) if name == "train" else None
    if renamed:
        return renamed
    try:
        schema.model_validate(raw)
    except ValidationError as err:
        return _message(err, schema, raw, "")
    if name == "train":
        data = raw["data"]
        family = DATA.get(data.get("_target_"), OtherData)
        try:
            family.model_validate(data)
        except ValidationError as err:
            return _message(err, family, data, "data")
    return None


def check_config(cfg: DictConfig, name: str = "train") -> None:
    """Raise ``ConfigError`` (one line) on the first mistake in ``cfg``."""
    problem = config_errors(cfg, name)
    if problem:
        raise ConfigError(problem)


def output_dir_problem(path: str | Path) -> str | None:
    """Why the output folder ``path`` cannot be created or written, or ``None``. Creates the folder
    (as Hydra would next) and writes and removes one probe file in it."""
    path = Path(path).absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return (f"output folder {path} cannot be created or written ({os_cause(err)}): choose another one "
                "with hydra.run.dir=DIR or paths.log_dir=DIR")
    return None


def check_model_options(cfg: DictConfig) -> None:
    """The teacher's / student's names are registered and their factories take their options.

    Each network is built on the ``meta`` device (no memory, no weights, milliseconds), with
    ``pretrained`` / ``weights`` switched off so nothing is downloaded; its real build comes later.
    """
    import torch

    from distill.models import MODELS, build_model, model_options

    for role in ("teacher", "student"):
        node = OmegaConf.to_container(cfg[role], resolve=True)
        name = node["name"]
        if name not in MODELS:
            raise ConfigError(f"{role}.name={name!r} is not a registered model; allowed: {', '.join(sorted(MODELS))}")
        options = model_options(node, weights_from_checkpoint=True)  # nothing downloaded
        try:
            with torch.device("meta"):  # image folders count their classes later: any count builds the same network
                build_model(name, int(cfg.data.get("num_classes") or 2), **options)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{role}={name} does not take these options {sorted(options)}: "
                              f"{str(err).splitlines()[0]}") from None


try:  # the Hydra callback; Hydra is always there, but keep the schema importable without it
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object


class CheckConfig(Callback):
    """Hydra callback: check the composed config and the output folder before Hydra creates the
    folder and before the task imports torch; a mistake is one line on stderr and exit status 2."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        name = kwargs.get("config_name") or "train"
        try:
            problem = config_errors(config, name) if name in SCHEMAS else None
            problem = problem or output_dir_problem(OmegaConf.select(config, "hydra.run.dir"))
        except Exception:  # noqa: BLE001 - never let the early check break a run: the run checks again
            problem = None
        if problem:
            with exit_on_user_error():
                raise ConfigError(problem)
