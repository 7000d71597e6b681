"""DDP launched from Hydra: one Hydra job = one DDP process group.

Lightning's DDP launcher starts the other ranks by re-running the command line; under a Hydra
multirun that would start the whole sweep again in each rank. Lightning offers no setting for that
command, so :func:`ddp_job` swaps in one that runs just this job (:func:`hydra_ddp_command`) for
the duration of the job only, puts Lightning's back afterwards, and cleans up the process group.
"""

from __future__ import annotations

import contextlib
import os
import sys
from unittest import mock

import torch
from lightning.pytorch.strategies.launchers import subprocess_script as ddp_launcher


def ddp_barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


HYDRA_FLAGS_WITH_VALUE = ("-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir")


def hydra_ddp_command(local_rank: int) -> tuple[list[str], str]:
    """The command Lightning's DDP launcher runs for rank ``local_rank`` under Hydra.

    Lightning's own version re-runs ``sys.argv`` with ``hydra.run.dir``: under ``-m`` every
    rank would start the whole sweep again, in the wrong folder. This one runs this job alone:
    its config flags, its own overrides (the swept values, no ``-m``) and its output dir.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd, to_absolute_path

    import __main__

    hydra_cfg = HydraConfig.get()
    if __main__.__spec__ is None:
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    args = sys.argv[1:]
    for i, arg in enumerate(args):
        if arg in HYDRA_FLAGS_WITH_VALUE and i + 1 < len(args):
            command += [arg, args[i + 1]]
        elif arg.split("=", 1)[0] in HYDRA_FLAGS_WITH_VALUE:
            command.append(arg)
    command += list(hydra_cfg.overrides.task)
    command += [f'hydra.run.dir="{hydra_cfg.runtime.output_dir}"', f"hydra.job.name=train_ddp_process_{local_rank}",
                "hydra.output_subdir=null"]
    return command, get_original_cwd()


DDP_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def ddp_job():
    """One Hydra job = one DDP group. Lightning launches the other ranks itself (unless a
    cluster did: SLURM, torchrun); when the job ends, the group and the variables Lightning set
    are dropped, so the next job of a multirun launches its own processes."""
    before = {key: os.environ.get(key) for key in DDP_ENV}
    try:
        with mock.patch.object(ddp_launcher, "_hydra_subprocess_cmd", hydra_ddp_command):
            yield
    finally:
        if before["LOCAL_RANK"] is None:  # this process launched the other ranks
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            for key, value in before.items():
                if value is None:
                    os.environ.pop(key, None)
