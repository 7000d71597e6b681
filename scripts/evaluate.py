"""Faithfulness and teacher-student agreement of a checkpoint on its test set (Grad-CAM++ §4; docs/method.md §4).

    python scripts/evaluate.py checkpoint=PATH [teacher_checkpoint=PATH] [data.root=DIR] [logger=wandb]

Writes evaluation.json and evaluation.md into the output folder (configs/evaluate.yaml).
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, uninstalled

from distill.cli_help import register  # noqa: E402

register()  # --help (configs/hydra/default.yaml)


@hydra.main(version_base="1.3", config_path="../configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from distill.evaluation import evaluate, run_script  # imported late: `--help` stays fast

    run_script(evaluate, cfg)


if __name__ == "__main__":
    main()
