"""Train a teacher, a student alone, or distill a student with explanations.

    python train.py teacher=wrn40_2 explain=gradcampp
    python train.py stage=teacher teacher=wrn40_2
    python train.py experiment=smoke
"""

import sys

import hydra
from omegaconf import DictConfig

from distill.cli_help import register
from distill.config_schema import check_overrides
from distill.errors import exit_on_user_error

register()  # --help (configs/hydra/default.yaml)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from distill.run import main as run_main  # imported late: `--help` stays fast

    return run_main(cfg)


if __name__ == "__main__":
    with exit_on_user_error():  # explain.weight=... -> "use loss.explain=..." (Hydra would only say "not in struct")
        check_overrides(sys.argv[1:])
    main()
