"""The README is a short door to the docs: every ``python train.py ...`` command that the README and
the pages of ``docs/`` show composes and passes the config schema (every job of a sweep;
placeholders such as DIR replaced by a folder), so a renamed key or option never leaves the docs
behind; the README stays short and its links lead somewhere."""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import pytest

from distill.config_schema import check_config, check_model_options, check_overrides
from tests.support import REPO, compose_config

MISTAKES = {"python train.py teacher=wrn99"}  # shown as examples of a mistake and its message
PLACEHOLDER = re.compile(r"^(?P<key>[\w.]+)=(DIR|PATH|N|/datasets/\S+|/tmp/data/\S+)$")
README = REPO / "README.md"
PAGES = sorted((REPO / "docs").glob("*.md"))
MAX_README_LINES = 300
# pages that other branches add; the README links them already (a page that exists is checked)
PENDING: set[str] = set()  # pages linked before they exist (none now)


def commands_in(text: str) -> set[str]:
    """The train.py commands of a Markdown text: code spans and code blocks, backslash lines joined."""
    text = text.replace("\\\n", " ")
    spans = re.findall(r"`(python train\.py[^`]*)`", text)
    lines = [line.split("  #")[0].strip() for line in text.splitlines() if line.strip().startswith("python train.py")]
    return {c.strip() for c in spans + lines}


def readme_commands() -> list[str]:
    return sorted(commands_in(README.read_text()))


def docs_commands() -> list[str]:
    """The train.py commands of the README and of every page of docs/."""
    return sorted(set().union(*(commands_in(path.read_text()) for path in [README, *PAGES])))


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
    assert "python train.py experiment=quick data=image_folder data.root=/tmp/data/cifar10-jpeg" in commands
    assert len([c for c in commands if overrides(c, "/x") is not None]) >= 8
    assert len([c for c in docs_commands() if overrides(c, "/x") is not None]) >= 20


def test_commands_are_found_in_spans_blocks_and_continued_lines():
    text = ("run `python train.py a=1` here\n```bash\npython train.py b=2 \\\n    c=3   # comment\n```\n"
            "    python train.py -m d=4,5\n")
    assert commands_in(text) == {"python train.py a=1", "python train.py b=2      c=3", "python train.py -m d=4,5"}


@pytest.mark.parametrize("command", [c for c in docs_commands() if overrides(c, "/x") is not None])
def test_every_readme_and_docs_command_composes_and_passes_the_schema(tmp_path, command):
    for args in overrides(command, tmp_path):
        check_overrides(args)
        cfg = compose_config(tmp_path, args)
        check_config(cfg)
        check_model_options(cfg)


def test_the_readme_mistake_examples_are_mistakes(tmp_path):
    from distill.config_schema import unknown_option_problem

    assert MISTAKES <= set(docs_commands())
    message = unknown_option_problem(["teacher=wrn99"])
    assert f"`error: {message}`" in (REPO / "docs" / "robustness.md").read_text()


def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # a "# comment" in a code block is no heading
    return {anchor(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def broken_links(text: str, page: Path) -> list[str]:
    """What the Markdown ``text`` of ``page`` points to that is not there: relative links
    ``[..](target#anchor)`` whose file is missing or has no such heading, and ``docs/...`` paths
    it names that do not exist (the pages in PENDING excepted while they are missing)."""
    broken = []
    for target, fragment in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", text):
        if re.match(r"\w+:", target):
            continue  # http(s):, mailto:
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            if path.relative_to(REPO).as_posix() not in PENDING:
                broken.append(target)
        elif fragment and fragment not in anchors(text if path == page else path.read_text()):
            broken.append(f"{target}#{fragment}")
    for name in sorted(set(re.findall(r"(?<![\w/])docs/[\w./-]*\w", text))):
        if not (REPO / name).exists() and name not in PENDING and name not in broken:
            broken.append(name)
    return broken


def test_the_readme_is_a_short_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail to docs/"
    orphans = {page.name for page in PAGES} - reachable_pages()
    assert not orphans, f"no link from the README (or a page it links) leads to docs/{sorted(orphans)}"


def reachable_pages() -> set[str]:
    """The names of the docs/ pages that links lead to, from the README and page to page."""
    reached, todo = set(), [README]
    while todo:
        page = todo.pop()
        for target in re.findall(r"\]\(([^)#\s]+\.md)", page.read_text()):
            path = (page.parent / target).resolve()
            if path.parent == REPO / "docs" and path.exists() and path.name not in reached:
                reached.add(path.name)
                todo.append(path)
    return reached


def test_the_link_checker_finds_broken_links():
    text = ("# Top\n[a](docs/method.md) [b](docs/nope.md) [c](docs/method.md#1-explanation-maps) "
            "[d](docs/method.md#9-nope) [e](#top) [f](#bottom) [g](https://x.org/y) docs/gone.md docs/payoff.md")
    assert broken_links(text, README) == ["docs/nope.md", "docs/method.md#9-nope", "#bottom", "docs/gone.md"]
    assert anchor("Config groups in full (`configs/`)") == "config-groups-in-full-configs"


@pytest.mark.parametrize("path", [README, *PAGES], ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_of_the_readme_and_the_docs_leads_somewhere(path):
    assert not broken_links(path.read_text(), path)


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


def test_every_readme_tar_extracts_into_a_folder_it_made():
    """``tar -C DIR`` fails when DIR does not exist: each README ``tar`` line makes its folder first."""
    lines = [line for line in (REPO / "README.md").read_text().splitlines() if "tar -x" in line]
    assert lines
    for line in lines:
        folder = re.search(r"-C (\S+)", line).group(1)
        assert f"mkdir -p {folder} " in line.split("tar -x")[0], line
