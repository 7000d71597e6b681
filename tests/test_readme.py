"""Every ``python train.py ...`` command the README shows composes and passes the config schema
(the first value of each sweep; placeholders such as DIR replaced by a folder), so a renamed key or
option never leaves the README behind."""

from __future__ import annotations

import itertools
import re
import shlex

import pytest

from distill.config_schema import check_config, check_model_options, check_overrides
from tests.support import REPO, compose_config

MISTAKES = {"python train.py teacher=wrn99"}  # shown as examples of a mistake and its message
PLACEHOLDER = re.compile(r"^(?P<key>[\w.]+)=(DIR|PATH|N|/datasets/\S+|/tmp/data/\S+)$")


def readme_commands() -> list[str]:
    """The train.py commands of the README: code spans and code blocks, backslash lines joined."""
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    spans = re.findall(r"`(python train\.py[^`]*)`", text)
    lines = [line.split("  #")[0].strip() for line in text.splitlines() if line.strip().startswith("python train.py")]
    return sorted({c.strip() for c in spans + lines})


def overrides(command: str, root) -> list[list[str]] | None:
    """The overrides of every job of one command (each combination of a ``-m`` sweep's values),
    or None for a command that is not a plain run (``--help``, ``--cfg``, ``resume=``, elisions,
    launchers that need their plugin)."""
    args = shlex.split(command)[2:]
    if command in MISTAKES or any(a.startswith(("--", "resume=", "hydra/launcher", "hydra.launcher", "["))
                                  or "..." in a for a in args):
        return None
    choices = []
    for arg in args:
        if arg == "-m":
            continue
        key, _, value = arg.partition("=")
        if PLACEHOLDER.match(arg):
            value = str(root) if key.endswith("root") else "3"
        choices.append([f"{key}={v}" for v in value.split(",")])
    return [list(job) for job in itertools.product(*choices)]


def test_the_readme_shows_the_main_commands():
    commands = readme_commands()
    assert "python train.py teacher=wrn40_2 explain=gradcampp" in commands
    assert len([c for c in commands if overrides(c, "/x") is not None]) >= 15


@pytest.mark.parametrize("command", [c for c in readme_commands() if overrides(c, "/x") is not None])
def test_every_readme_command_composes_and_passes_the_schema(tmp_path, command):
    for args in overrides(command, tmp_path):
        check_overrides(args)
        cfg = compose_config(tmp_path, args)
        check_config(cfg)
        check_model_options(cfg)


def test_the_readme_mistake_examples_are_mistakes(tmp_path):
    from hydra.errors import MissingConfigException

    assert MISTAKES <= set(readme_commands())
    with pytest.raises(MissingConfigException, match="Could not find 'teacher/wrn99'"):
        compose_config(tmp_path, ["teacher=wrn99"])


# --------------------------------------------------------------------------- map grids
def map_grid_at(cfg, role: str) -> tuple[int, int]:
    """The grid ``cfg[role]`` explains at the data's image size: the network built on the meta
    device (no weights, no memory), one image through ``forward_features`` (shapes only)."""
    import torch
    from omegaconf import OmegaConf

    from distill.build import example_images
    from distill.models import build_model, model_options

    node = OmegaConf.to_container(cfg[role], resolve=True)
    with torch.device("meta"):
        model = build_model(node["name"], int(cfg.data.get("num_classes") or 2),
                            **model_options(node, weights_from_checkpoint=True)).eval()
        size = example_images(cfg).shape[-1]
        features = model.forward_features(torch.empty(1, 3, size, size))
    return tuple(features.shape[-2:])


def test_map_grid_at_is_the_real_grid(tmp_path):
    """The meta-device grid equals the grid of real weights on a real image (hand-checked: a stride-32
    ResNet-18 at 32 pixels explains 1x1, with output_stride=8 4x4; WRN-40-2 stride 4: 8x8)."""
    cfg = compose_config(tmp_path, ["student=timm", "student.arch=resnet18", "teacher=wrn40_2"])
    assert map_grid_at(cfg, "student") == (1, 1) and map_grid_at(cfg, "teacher") == (8, 8)
    cfg = compose_config(tmp_path, ["student=timm", "student.arch=resnet18", "student.output_stride=8"])
    assert map_grid_at(cfg, "student") == (4, 4)


# The README's commands, and those of docs/ where this module collects them (docs_commands).
SHOWN_COMMANDS = globals().get("docs_commands", readme_commands)


@pytest.mark.parametrize("command", [c for c in SHOWN_COMMANDS() if overrides(c, "/x") is not None])
def test_every_readme_model_explains_a_real_map_at_its_data_size(tmp_path, command):
    """Each README command (the networks it names, or its preset's): with an explanation loss, both
    networks explain at least MIN_MAP_GRID x MIN_MAP_GRID at the data's image size (else train.py
    refuses the run)."""
    from distill.explain import MIN_MAP_GRID, meaningful_grid

    for args in overrides(command, tmp_path):
        cfg = compose_config(tmp_path, args)
        if float(cfg.loss.explain) > 0:
            grids = {role: map_grid_at(cfg, role) for role in ("teacher", "student")}
            assert all(meaningful_grid(g) for g in grids.values()), (
                f"{command}: {grids} below {MIN_MAP_GRID}x{MIN_MAP_GRID}")
