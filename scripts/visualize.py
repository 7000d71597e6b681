"""A PNG grid of explanations (teacher / student Grad-CAM, Grad-CAM++, Guided Grad-CAM++).

    python scripts/visualize.py checkpoint=PATH [num_images=8] [indices=[0,1]] [logger=wandb]

Writes explanations.png into the output folder (configs/visualize.yaml).
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, uninstalled

from distill.cli_help import register  # noqa: E402

register()  # --help (configs/hydra/default.yaml)


@hydra.main(version_base="1.3", config_path="../configs", config_name="visualize")
def main(cfg: DictConfig) -> None:
    from distill.evaluation import run_script, visualize  # imported late: `--help` stays fast

    run_script(visualize, cfg)


if __name__ == "__main__":
    main()
