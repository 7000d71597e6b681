"""``python train.py --help``: the main commands, every config group with its options, and how
to see the resolved config. Hydra prints ``hydra.help.template`` (configs/hydra/default.yaml),
which calls the ``distill_help`` resolver registered here with the script's name.

Only the standard library and OmegaConf are imported, so ``--help`` stays fast. Options are
read from the config folders, so a new option file shows up by itself.
"""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import OmegaConf

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

COMMANDS = [
    ("distill (default stage)", "python train.py teacher=wrn40_2 explain=gradcampp"),
    ("+ Hinton KD", "python train.py explain=gradcampp kd=hinton"),
    ("train a teacher", "python train.py stage=teacher teacher=wrn40_2"),
    ("the student alone", "python train.py stage=baseline student=wrn16_2"),
    ("smoke run (CPU, seconds)", "python train.py experiment=smoke"),
    ("quick real-data run (minutes)", "python train.py experiment=quick data=image_folder data.root=DIR"),
    ("the paper's CIFAR-10 table", "python train.py -m experiment=cifar10_paper explain=none,gradcam,gradcampp "
                                   "kd=none,hinton"),
    ("resume a killed run", "python train.py resume=logs/<task>/runs/<time>"),
    ("your own image folder", "python train.py data=image_folder data.root=DIR   (DIR/{train,test}/<class>/*.jpg)"),
]

GROUPS = {
    "data": "the data: root, batch_size, num_workers, train/val/test_subset, val_split",
    "task": "how labels are trained and scored (picked by the data): multiclass, multilabel",
    "teacher": "the frozen teacher network; checkpoint (null: trained first if missing)",
    "student": "the student network",
    "explain": "the explanation loss: method, distance, target (its weight: loss.explain)",
    "kd": "soft-target / attention distillation; its weights in the loss table: loss.kd, loss.temperature, loss.at",
    "optim": "optimizer and lr schedule",
    "trainer": "Lightning Trainer arguments (devices, precision, max_epochs, limit_*_batches)",
    "callbacks": "Lightning callbacks, one per file: checkpoints, explanation panel, localisation",
    "logger": "experiment tracking (metrics.json is always written)",
    "experiment": "whole-setup presets",
    "paths": "where logs, data and checkpoints go",
}

SCRIPTS = {
    "evaluate": ("scripts/evaluate.py: faithfulness and teacher-student agreement of a checkpoint",
                 ["python scripts/evaluate.py checkpoint=PATH [teacher_checkpoint=PATH] [data.root=DIR]",
                  "python scripts/evaluate.py checkpoint=PATH data.test_subset=1000   (a class-covering subset)"]),
    "visualize": ("scripts/visualize.py: a PNG grid of explanations of a checkpoint",
                  ["python scripts/visualize.py checkpoint=PATH num_images=8 [indices=[3,14,15]]"]),
}


def _defaults(config_name: str) -> dict[str, str]:
    """``group -> default option`` of a primary config's defaults list."""
    defaults = OmegaConf.load(CONFIG_DIR / f"{config_name}.yaml").get("defaults", [])
    chosen = {}
    for item in defaults:
        if OmegaConf.is_dict(item) or isinstance(item, dict):
            for group, option in dict(item).items():
                chosen[str(group)] = str(option)
    return chosen


def group_lines(config_name: str = "train") -> list[str]:
    """One line per config group: name, description, options (the default marked ``*``)."""
    chosen = _defaults(config_name)
    lines = []
    for group, description in GROUPS.items():
        folder = CONFIG_DIR / group
        if group not in chosen or not folder.is_dir():
            continue
        options = sorted(p.stem for p in folder.glob("*.yaml"))
        shown = ", ".join(f"{o}*" if o == chosen[group] else o for o in options)
        lines.append(f"  {group:<11} {description}")
        lines.append(f"  {'':<11}   {shown}")
    return lines


def key_lines(config_name: str) -> list[str]:
    """``key=default  comment`` for each top-level key of a config file that has a comment."""
    lines = []
    for line in (CONFIG_DIR / f"{config_name}.yaml").read_text().splitlines():
        match = re.match(r"^(\w+):\s*([^#]*?)\s*#\s*(.*)$", line)
        if match and match.group(2):
            key, value, comment = match.groups()
            lines.append(f"  {key + '=' + value:<28} {comment}")
    return lines


def help_text(app: str = "train") -> str:
    if app in SCRIPTS:
        title, usage = SCRIPTS[app]
        lines = [title, "", "Usage:", *[f"  {u}" for u in usage], "", f"Options (configs/{app}.yaml):",
                 *key_lines(app), "  data.KEY=VALUE               replaces the checkpoint's recorded data setting", "",
                 f"Resolved config: python scripts/{app}.py checkpoint=PATH --cfg job"]
        return "\n".join(lines) + "\n"
    width = max(len(what) for what, _ in COMMANDS)
    lines = ["train.py: explanation-guided knowledge distillation (PyTorch Lightning, Hydra, W&B)", "",
             "Main commands:"]
    lines += [f"  {what:<{width}}  {command}" for what, command in COMMANDS]
    lines += ["", "Config groups (group=option; * = default; configs/<group>/<option>.yaml):", *group_lines(), "",
              "The loss table (every weight of the student's loss, a plain weighted sum): loss.ce loss.kd",
              "  loss.temperature loss.at loss.explain loss.dkd_alpha loss.dkd_beta loss.dkd_warmup, e.g. loss.kd=0.5",
              "Any config key: key=value, e.g. data.batch_size=64 trainer.max_epochs=10 data.test_subset=1000",
              "  A whole sweep: -m explain=none,gradcampp. A key the config lacks is refused (a typo), except",
              "  where a group is open: +key=value adds a network's option (student=timm +student.drop_path_rate=0.1),",
              "  an optimizer argument (+optim.optimizer.dampening=0.1), a callback of yours",
              "  (+callbacks.NAME._target_=...) or a key of your own DataModule (data._target_=...)",
              "See the resolved config without running: python train.py [overrides] --cfg job",
              "  (add --resolve to fill in interpolations; Hydra's own flags: --hydra-help)",
              "Outputs: logs/<task_name>/runs/<time>/ (metrics.json, checkpoints/, explanations/); README.md has more."]
    return "\n".join(lines) + "\n"


def register() -> None:
    """Make ``${distill_help:<app>}`` available to the Hydra help template."""
    if not OmegaConf.has_resolver("distill_help"):
        OmegaConf.register_new_resolver("distill_help", lambda app="train": help_text(str(app)))


__all__ = ["COMMANDS", "GROUPS", "group_lines", "help_text", "register"]
