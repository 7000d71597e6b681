"""Every option of every config group composes through Hydra and builds what it names."""

from __future__ import annotations

import hydra
import lightning.pytorch as pl
import pytest
import torch
from hydra.errors import MissingConfigException
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from omegaconf import OmegaConf

from distill.build import distill_trainer_keys
from distill.loggers import build_logger
from distill.models import build_model
from distill.module import ExplainSettings, LossWeights
from distill.optim import build_scheduler
from tests.support import CONFIG_DIR, compose_config
from tests.tiny_datasets import write_image_tree

GROUPS = ["data", "teacher", "student", "explain", "kd", "optim", "trainer", "logger", "experiment"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def test_required_groups_and_options_exist():
    assert {"default", "cpu", "gpu", "ddp"} <= set(options("trainer"))
    assert {"wandb", "csv", "none"} <= set(options("logger"))
    assert {"smoke", "cifar10_paper"} <= set(options("experiment"))
    assert {"none", "gradcam", "gradcampp"} <= set(options("explain"))
    assert {"none", "hinton", "at", "at_hinton"} <= set(options("kd"))


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_instantiates(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if (group, option) in (("data", "image_folder"), ("data", "imagenet"), ("experiment", "imagenet_kd")):
        write_image_tree(tmp_path / "tree", eval_split="test" if option == "image_folder" else "val", size=(8, 8))
        overrides.append(f"data.root={tmp_path / 'tree'}")
    cfg = compose_config(tmp_path, overrides)
    built = None
    if group == "data":
        built = hydra.utils.instantiate(cfg.data)
        assert isinstance(built, pl.LightningDataModule)
        assert built.num_classes == (cfg.data.num_classes or 3)  # null: counted, 3 class folders
    elif group in ("teacher", "student"):
        built = build_model(cfg[group].name, cfg.data.num_classes)
        assert built(torch.randn(2, 3, 32, 32)).shape == (2, cfg.data.num_classes)
    elif group == "explain":
        built = ExplainSettings(method=cfg.explain.method, distance=cfg.explain.distance, target=cfg.explain.target,
                                eval_method=cfg.eval_method, closed_form=cfg.explain.closed_form)
        assert (built.method is None) == (cfg.loss.explain == 0)
    elif group == "kd":
        built = LossWeights(**OmegaConf.to_container(cfg.loss))
    elif group == "optim":
        params = [torch.nn.Parameter(torch.zeros(2))]
        optimizer = hydra.utils.instantiate(cfg.optim.optimizer)(params=params)
        built = build_scheduler(hydra.utils.instantiate(cfg.optim.scheduler), optimizer, total_steps=10)
    elif group == "trainer":
        if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
            pytest.skip("trainer=gpu needs a GPU to instantiate; composed fine")
        trainer_cfg = {k: v for k, v in cfg.trainer.items() if k not in distill_trainer_keys()}  # read by distill
        built = hydra.utils.instantiate(trainer_cfg, logger=False, enable_checkpointing=False)
        assert isinstance(built, pl.Trainer)
        assert not built.predict_loop.inference_mode  # maps need autograd at evaluation
    elif group == "logger":
        built = build_logger(cfg, "test-run")
        expected = {"wandb": WandbLogger, "csv": CSVLogger, "none": type(None)}[option]
        assert isinstance(built, expected)
        if option == "wandb":  # no credentials in tests: offline by itself
            assert built._offline
    elif group == "experiment":
        built = hydra.utils.instantiate(cfg.data)
        assert cfg.task_name == option
    assert built is not None or group == "logger"


def test_cifar10_paper_experiment_is_the_spec_protocol(tmp_path):
    cfg = compose_config(tmp_path, ["experiment=cifar10_paper"])
    assert cfg.teacher.name == "wrn40_2" and cfg.student.name == "wrn16_2"
    assert cfg.trainer.max_epochs == 200 and cfg.data.batch_size == 128
    opt = cfg.optim.optimizer
    assert (opt.lr, opt.momentum, opt.nesterov, opt.weight_decay) == (0.1, 0.9, True, 5e-4)
    assert list(cfg.optim.scheduler.milestones) == [60, 120, 160] and cfg.optim.scheduler.gamma == 0.2


def test_paper_explanation_weight(tmp_path):
    cfg = compose_config(tmp_path, ["explain=gradcampp"])
    assert cfg.loss.explain == 0.01 and cfg.explain.distance == "squared_l2" and cfg.explain.target == "label"


def loss_table(tmp_path, *overrides: str) -> dict:
    return OmegaConf.to_container(compose_config(tmp_path, list(overrides)).loss)


def test_the_loss_table_takes_rows_from_kd_and_explain_and_the_command_line_wins(tmp_path):
    defaults = {"ce": 1.0, "kd": 0.0, "temperature": 4.0, "at": 0.0, "explain": 0.0, "dkd_alpha": 0.0,
                "dkd_beta": 0.0, "dkd_warmup": 0, "cat": 0.0, "cat_resolution": 2, "cat_normalize": False,
                "logit_standardize": False}
    assert loss_table(tmp_path) == defaults
    both = {**defaults, "kd": 1.0, "explain": 0.01}
    assert loss_table(tmp_path, "explain=gradcampp", "kd=hinton") == both  # both groups land, in either order
    assert loss_table(tmp_path, "kd=hinton", "explain=gradcampp") == both
    assert loss_table(tmp_path, "kd=hinton", "explain=gradcampp", "loss.kd=0.5")["kd"] == 0.5
    assert loss_table(tmp_path, "kd=at")["at"] == 500.0 and loss_table(tmp_path, "kd=at_hinton")["at"] == 500.0
    # an experiment's kd choice, then a command-line choice over it
    assert loss_table(tmp_path, "experiment=cifar100_kd") == {**defaults, "ce": 0.1, "kd": 0.9}
    dkd = loss_table(tmp_path, "experiment=cifar100_kd", "kd=dkd", "explain=gradcam", "loss.dkd_beta=8")
    assert dkd == {**defaults, "explain": 0.01, "dkd_alpha": 1.0, "dkd_beta": 8.0, "dkd_warmup": 20}
    cfg = compose_config(tmp_path, ["kd=dkd", "explain=gradcam"])
    assert (cfg.kd.name, cfg.explain.name, cfg.explain.method) == ("dkd", "gradcam", "gradcam")  # run names


@pytest.mark.parametrize("group", ["teacher", "explain", "kd", "trainer", "logger", "data"])
def test_wrong_option_lists_valid_choices(group, tmp_path):
    with pytest.raises(MissingConfigException) as info:
        compose_config(tmp_path, [f"{group}=no_such_option"])
    message = str(info.value)
    assert "Available options" in message
    for option in options(group):
        assert option in message


def test_configs_build_the_models(tmp_path):
    cfg = compose_config(tmp_path, ["experiment=smoke_voc"])
    for role in ("teacher", "student"):
        node = OmegaConf.to_container(cfg[role], resolve=True)
        options = {k: v for k, v in node.items() if k not in ("name", "checkpoint", "compile")}
        model = build_model(node["name"], int(cfg.data.num_classes), **options)
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 20)
    full = compose_config(tmp_path, ["experiment=voc2007_paper"])
    assert full.teacher.name == "vgg16" and full.teacher.pretrained and full.teacher.finetune == "head"
    assert full.student.name == "vgg11_student" and full.data.name == "voc2007" and full.data.image_size == 224
    assert (CONFIG_DIR / "optim" / "sgd_voc.yaml").is_file() and full.optim.optimizer.lr == 0.01
