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
    from distill.config_schema import unknown_option_problem

    assert MISTAKES <= set(readme_commands())
    message = unknown_option_problem(["teacher=wrn99"])
    assert f"`error: {message}`" in (REPO / "README.md").read_text()


def test_every_readme_tar_extracts_into_a_folder_it_made():
    """``tar -C DIR`` fails when DIR does not exist: each README ``tar`` line makes its folder first."""
    lines = [line for line in (REPO / "README.md").read_text().splitlines() if "tar -x" in line]
    assert lines
    for line in lines:
        folder = re.search(r"-C (\S+)", line).group(1)
        assert f"mkdir -p {folder} " in line.split("tar -x")[0], line
