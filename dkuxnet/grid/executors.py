"""submitit executors for a grid: a local one per :class:`~dkuxnet.grid.job.Slot`, and Slurm.

Imported only by :mod:`dkuxnet.grid.launch` once submitit is known to be installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import submitit

from dkuxnet.grid.job import GridSpec, Slot, run_grid_cell
from dkuxnet.grid.slurm import SlurmOptions
from dkuxnet.reproduce import Cell

LOCAL_TIMEOUT_MIN = 30 * 24 * 60  # submitit's local default is 2 min; a cell may take hours: 30 days


class CellJob(submitit.helpers.Checkpointable):
    """One grid cell as a submitit job (:func:`~dkuxnet.grid.job.run_grid_cell`).

    Checkpointable: when Slurm preempts the job or its time limit comes (submitit's signal), submitit
    requeues it with the same arguments, up to ``max_num_timeout`` times after a timeout; the requeued job
    keeps its id, takes over its own lock and resumes the cell's ``last.pt``.
    """

    def __call__(self, cell: Cell, spec: GridSpec, slot: Slot | None = None) -> dict[str, Any]:
        return run_grid_cell(cell, spec, slot)


def local_executor(folder: Path, slot: Slot) -> submitit.LocalExecutor:
    """A local executor whose job sees only the slot's GPU (``CUDA_VISIBLE_DEVICES``; none without one)."""
    executor = submitit.LocalExecutor(folder=folder)
    gpus = () if slot.gpu is None else (slot.gpu,)
    executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN, gpus_per_node=len(gpus), visible_gpus=gpus)
    return executor


def slurm_executor(folder: Path, options: SlurmOptions) -> submitit.SlurmExecutor:
    """A Slurm executor with :meth:`SlurmOptions.parameters` (needs ``srun`` on this machine)."""
    executor = submitit.SlurmExecutor(folder=folder)
    executor.update_parameters(**options.parameters())
    return executor
