"""Where a run ran: the host name and the id of the job it ran in (Slurm or submitit), for provenance."""

from __future__ import annotations

import os
import socket


def host() -> str:
    """This machine's host name (``socket.gethostname()``)."""
    return socket.gethostname()


def job_id() -> str | None:
    """The id of the batch job this process runs in, else None.

    * a submitit local job: ``SUBMITIT_LOCAL_JOB_ID`` (the job's controller process id);
    * a Slurm array task: ``<SLURM_ARRAY_JOB_ID>_<SLURM_ARRAY_TASK_ID>`` (as submitit and ``squeue`` name it);
    * any other Slurm job, submitit's or an ``sbatch`` script's: ``SLURM_JOB_ID``.

    Read from the environment only, so that a kernel started inside the job (papermill) sees the same id.
    """
    env = os.environ
    if env.get("SUBMITIT_EXECUTOR") == "local" and env.get("SUBMITIT_LOCAL_JOB_ID"):
        return env["SUBMITIT_LOCAL_JOB_ID"]
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None
