"""Run the cells of a grid inline, on submitit's local executor, or as Slurm jobs.

* ``inline`` — in this process, one cell after the other (no submitit needed);
* ``local`` — submitit's local executor: ``gpus`` cells at once, one GPU each (``CUDA_VISIBLE_DEVICES``), or
  without GPUs ``jobs`` cells at once, each pinned to its share of the CPU cores (:func:`local_slots`);
  waits for them all;
* ``slurm`` — one Slurm job per cell (an array job), with :class:`~dkuxnet.grid.slurm.SlurmOptions`;
  returns once they are submitted.

Every job runs :func:`~dkuxnet.grid.job.run_grid_cell`, so the grid is idempotent whatever the launcher:
done cells are skipped before anything is submitted, cells a live job holds are left to it, and a failed
cell is recorded without stopping the others. The records of this invocation are written to
``<runs_dir>/summary.json`` as they arrive; submitit's job logs go to ``<runs_dir>/logs/<job id>_0_log.{out,err}``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from dkuxnet.errors import UserError
from dkuxnet.grid.job import GridSpec, Slot, run_grid_cell
from dkuxnet.grid.slurm import SlurmOptions
from dkuxnet.grid.state import CellState, read_record
from dkuxnet.reproduce import Cell, notebooks_dir, prepare_data, resolve_profile
from dkuxnet.results import write_json

LAUNCHERS = ("inline", "local", "slurm")
LOGS_FOLDER = "logs"


def require_submitit() -> None:
    """Raise a :class:`~dkuxnet.errors.UserError` naming the install command when submitit is missing."""
    try:
        import submitit  # noqa: F401
    except ImportError as exc:
        raise UserError(
            "--launcher local|slurm needs submitit: pip install 'dkuxnet[cluster]' (or pip install submitit)"
        ) from exc


def local_slots(gpus: int = 0, jobs: int = 1, cores: Sequence[int] | None = None) -> list[Slot]:
    """The concurrent jobs of the local launcher: ``gpus`` slots of one GPU each, else ``jobs`` CPU slots.

    The ``cores`` (default: those this process may run on) are split into equal contiguous shares, one per
    slot, the remainder left unused: slot ``i`` of ``n`` gets ``cores[i*k:(i+1)*k]`` with ``k = len(cores) // n``.
    One CPU slot keeps the whole machine (no pinning), which the CPU runs' time budgets assume. GPU slot
    ``i`` is the ``i``-th entry of ``CUDA_VISIBLE_DEVICES`` when it is set, else GPU ``i``.

    Raises:
        ValueError: ``gpus`` or ``jobs`` below its minimum, both given, or more slots than cores.
    """
    if gpus < 0 or jobs < 1:
        raise ValueError(f"gpus must be >= 0 and jobs >= 1, got gpus={gpus}, jobs={jobs}")
    if gpus and jobs != 1:
        raise ValueError("give gpus (one cell per GPU) or jobs (CPU cells at once), not both")
    n = gpus or jobs
    if n == 1 and not gpus:
        return [Slot()]
    cores = sorted(cores if cores is not None else _usable_cores())
    if n > len(cores):
        raise ValueError(f"{n} concurrent cells need at least {n} CPU cores, this machine gives {len(cores)}")
    k = len(cores) // n
    shares = [tuple(cores[i * k:(i + 1) * k]) for i in range(n)]
    if not gpus:
        return [Slot(cores=share) for share in shares]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    ids = [int(v) for v in visible.split(",") if v.strip().isdigit()] if visible else list(range(gpus))
    if len(ids) < gpus:
        raise ValueError(f"gpus={gpus} but CUDA_VISIBLE_DEVICES={visible!r} names {len(ids)}")
    return [Slot(cores=share, gpu=gpu) for share, gpu in zip(shares, ids)]


def _usable_cores() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def grid_states(cells: Sequence[Cell], spec: GridSpec) -> list[CellState]:
    """The status-table row of every cell (:func:`dkuxnet.grid.state.status_table` prints them)."""
    return [spec.state(cell) for cell in cells]


def run_grid(
    cells: Sequence[Cell], spec: GridSpec, launcher: str = "inline", gpus: int = 0, jobs: int = 1,
    slurm: SlurmOptions | None = None, progress: bool = True, poll_s: float = 1.0,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run the cells that are not done (module docstring); return one record per cell, in grid order.

    Records: a done cell's stored ``cell.json`` with ``skipped``; a cell a live job holds,
    ``status: running``; a cell run here or by a local job, its :func:`~dkuxnet.grid.job.run_grid_cell`
    record (a local job that died without one: ``failed`` with its log); a cell submitted to Slurm,
    ``status: submitted`` with ``job_id`` and ``job_log``.

    Raises:
        ValueError: an unknown launcher, ``slurm`` without options, or bad ``gpus`` / ``jobs`` (or either of
            them with another launcher than ``local``).
        UserError: submitit is missing for ``local`` or ``slurm``.
    """
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")
    if launcher == "slurm" and slurm is None:
        raise ValueError("launcher 'slurm' needs SlurmOptions (at least the time limit)")
    if launcher != "local" and (gpus or jobs != 1):
        raise ValueError(f"gpus and jobs are for the local launcher, not {launcher!r}")
    slots = local_slots(gpus, jobs) if launcher == "local" else []
    if launcher != "inline":
        require_submitit()
    records: dict[str, dict[str, Any]] = {}
    to_run = []
    for cell in cells:
        state = spec.state(cell)
        if state.state == "done":
            records[cell.name] = {**_stored(spec, cell), "skipped": True}
        elif state.state == "running":
            records[cell.name] = {"cell": cell.name, "status": "running", "detail": state.detail}
        else:
            to_run.append(cell)
    log(f"grid of {len(cells)} cells: {len(cells) - len(to_run)} done or running elsewhere, {len(to_run)} to run")
    _prepare_phantom(spec, to_run)
    out = spec.runs_dir / "summary.json"
    spec.runs_dir.mkdir(parents=True, exist_ok=True)

    def record(name: str, r: dict[str, Any]) -> None:
        records[name] = r
        if r.get("took_over"):
            log(f"{name}: {r['took_over']}")
        write_json(out, [records[c.name] for c in cells if c.name in records])

    if launcher == "inline":
        for cell in to_run:
            record(cell.name, run_grid_cell(cell, spec, None, progress))
    elif launcher == "local":
        _run_local(to_run, spec, slots, record, poll_s, log)
    else:
        _submit_slurm(to_run, spec, slurm, record, log)
    write_json(out, [records[c.name] for c in cells])
    return [records[c.name] for c in cells]


def _stored(spec: GridSpec, cell: Cell) -> dict[str, Any]:
    return read_record(spec.plan(cell).run_dir) or {"cell": cell.name}


def _prepare_phantom(spec: GridSpec, cells: Sequence[Cell]) -> None:
    """Write the smoke phantom once, before concurrent jobs would each write it."""
    if spec.profile != "smoke" or not cells:
        return
    settings = resolve_profile(**spec.plan(cells[0]).parameters)
    root = settings.data_dir if settings.data_dir.is_absolute() else notebooks_dir() / settings.data_dir
    prepare_data(replace(settings, data_dir=root))


def _job_record(cell: Cell, spec: GridSpec, job: Any) -> dict[str, Any]:
    logs = {"job_id": job.job_id, "job_log": str(job.paths.stderr)}
    try:
        return {**job.result(), **logs}
    except Exception as exc:  # noqa: BLE001 - the job died (killed, out of memory): its record says so
        return {"cell": cell.name, "run_dir": str(spec.plan(cell).run_dir), "status": "failed",
                "error": f"job {job.job_id} ended without a record: {type(exc).__name__}: {str(exc)[-500:]}",
                "log": logs["job_log"], **logs}


def _run_local(cells: Sequence[Cell], spec: GridSpec, slots: list[Slot], record: Callable[[str, dict[str, Any]], None],
               poll_s: float, log: Callable[[str], None]) -> None:
    """At most one job per slot; a freed slot takes the next cell. Ctrl-C cancels the running jobs."""
    from dkuxnet.grid.executors import CellJob, local_executor

    folder = spec.runs_dir / LOGS_FOLDER
    queue, free = list(cells), list(range(len(slots)))
    running: dict[int, tuple[Cell, Any]] = {}
    try:
        while queue or running:
            while queue and free:
                i, cell = free.pop(0), queue.pop(0)
                job = local_executor(folder, slots[i]).submit(CellJob(), cell, spec, slots[i])
                running[i] = (cell, job)
                log(f"{cell.name}: started as local job {job.job_id} ({slots[i].describe()}), log {job.paths.stderr}")
            time.sleep(poll_s)
            for i, (cell, job) in list(running.items()):
                if job.done():
                    r = _job_record(cell, spec, job)
                    record(cell.name, r)
                    log(f"{cell.name}: {r['status']}")
                    del running[i]
                    free.append(i)
    except KeyboardInterrupt:
        for cell, job in running.values():
            job.cancel()
            log(f"{cell.name}: cancelled local job {job.job_id}; the next run resumes it")
        raise


def _submit_slurm(cells: Sequence[Cell], spec: GridSpec, options: SlurmOptions | None,
                  record: Callable[[str, dict[str, Any]], None], log: Callable[[str], None]) -> None:
    """One array job, one task per cell; the records say which job runs which cell."""
    from dkuxnet.grid.executors import CellJob, slurm_executor

    if not cells:
        return
    executor = slurm_executor(spec.runs_dir / LOGS_FOLDER, options)
    with executor.batch():
        jobs = [executor.submit(CellJob(), cell, spec, None) for cell in cells]
    for cell, job in zip(cells, jobs):
        record(cell.name, {"cell": cell.name, "run_dir": str(spec.plan(cell).run_dir), "status": "submitted",
                           "job_id": job.job_id, "job_log": str(job.paths.stderr)})
        log(f"{cell.name}: submitted as Slurm job {job.job_id}, log {job.paths.stderr}")
