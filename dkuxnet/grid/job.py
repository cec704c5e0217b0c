"""What one job of a grid runs: take the cell's lock, skip it when done, else run it, record it, collect it.

:func:`run_grid_cell` is the function every launcher calls, inline or in a submitit job; it is idempotent:

1. apply the job's :class:`Slot` (CPU cores, threads) before the notebooks' kernel starts, so it inherits it;
2. take ``lock.json`` (:class:`~dkuxnet.grid.lock.CellLock`): a live job of another id makes the cell
   ``locked``, nothing is touched;
3. a done cell (:func:`~dkuxnet.grid.state.is_done`) is returned as it was recorded, with ``skipped``;
4. else ``cell.json`` is removed and :func:`dkuxnet.reproduce.run_cell` runs the notebooks (resuming
   ``last.pt`` when there is one); any exception becomes a ``failed`` record, its traceback kept in
   ``cell.json``, instead of stopping the grid;
5. a cell that ended ``ok`` is collected (:func:`~dkuxnet.grid.collect.collect_cell`); the record, with
   the config hash, is written to ``cell.json`` and returned.
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dkuxnet.grid.identity import host, job_id
from dkuxnet.grid.lock import CellLock, CellLockedError
from dkuxnet.grid.state import CELL_FILE, CellState, cell_state, config_hash, is_done, read_record
from dkuxnet.reproduce import PROFILES, Cell, PlannedRun, plan_cell, resolve_profile, run_cell
from dkuxnet.results import EVAL_MODES, write_json

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # read by torch when the kernel starts


@dataclass(frozen=True)
class GridSpec:
    """What every cell of one grid shares. Folders are made absolute, so that a job on another node or in
    another working directory writes to the same place."""

    profile: str
    runs_dir: Path
    results_dir: Path
    data_dir: Path | None = None
    max_iterations: int | None = None
    device: str | None = None
    eval_mode: str = "protocol"

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {PROFILES}, got {self.profile!r}")
        if self.eval_mode not in EVAL_MODES:
            raise ValueError(f"eval_mode must be one of {EVAL_MODES}, got {self.eval_mode!r}")
        object.__setattr__(self, "runs_dir", Path(self.runs_dir).resolve())
        object.__setattr__(self, "results_dir", Path(self.results_dir).resolve())
        if self.data_dir is not None:
            object.__setattr__(self, "data_dir", Path(self.data_dir).resolve())

    def plan(self, cell: Cell) -> PlannedRun:
        """The cell's run folder and notebook parameters (:func:`dkuxnet.reproduce.plan_cell`)."""
        return plan_cell(cell, self.profile, self.runs_dir, self.data_dir, self.max_iterations, self.device)

    def config_hash(self, cell: Cell) -> str:
        """The cell's :func:`~dkuxnet.grid.state.config_hash` in this grid."""
        return config_hash(self.plan(cell).parameters, self.eval_mode)

    def state(self, cell: Cell) -> CellState:
        """The cell's row of the status table."""
        return cell_state(cell.name, self.plan(cell).run_dir, self.config_hash(cell))


@dataclass(frozen=True)
class Slot:
    """The share of the machine one of several concurrent local jobs gets: its CPU cores (empty: all of them,
    threads as they are) and its GPU (None: none chosen; submitit's local executor sets
    ``CUDA_VISIBLE_DEVICES`` to it)."""

    cores: tuple[int, ...] = ()
    gpu: int | None = None

    def apply(self) -> None:
        """Pin this process to :attr:`cores` and set its thread counts to their number (inherited by the kernel)."""
        if not self.cores:
            return
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, self.cores)
        for name in THREAD_VARIABLES:
            os.environ[name] = str(len(self.cores))

    def describe(self) -> str:
        """``GPU 1, cores 0-3`` / ``cores 0-3`` / ``whole machine``."""
        parts = [f"GPU {self.gpu}"] if self.gpu is not None else []
        if self.cores:
            parts.append(f"cores {self.cores[0]}-{self.cores[-1]}" if len(self.cores) > 1 else f"core {self.cores[0]}")
        return ", ".join(parts) or "whole machine"


def run_grid_cell(cell: Cell, spec: GridSpec, slot: Slot | None = None, progress: bool = False) -> dict[str, Any]:
    """Run one cell of a grid idempotently (module docstring); return its record.

    The record is :func:`dkuxnet.reproduce.run_cell`'s with ``config_hash``, ``skipped`` (True for a cell
    that was already done), ``took_over`` (a stale lock replaced, else empty) and ``result`` (the result
    file written); or ``{"cell", "status": "locked", "error"}`` when a live job holds the folder.
    """
    if slot is not None:
        slot.apply()
    run = spec.plan(cell)
    expected = spec.config_hash(cell)
    try:
        with CellLock(run.run_dir) as lock:
            record = read_record(run.run_dir)
            if is_done(record, expected, run.run_dir):
                return {**record, "skipped": True}
            (run.run_dir / CELL_FILE).unlink(missing_ok=True)
            record = _run(cell, spec, run, progress)
            record.update(config_hash=expected, skipped=False, took_over=lock.took_over)
            write_json(run.run_dir / CELL_FILE, record)
            return record
    except CellLockedError as exc:
        return {"cell": cell.name, "run_dir": str(run.run_dir), "status": "locked", "error": str(exc)}


def _run(cell: Cell, spec: GridSpec, run: PlannedRun, progress: bool) -> dict[str, Any]:
    from dkuxnet.grid.collect import collect_cell, result_path

    start, clock = datetime.now(timezone.utc), time.perf_counter()
    try:
        record = run_cell(cell, spec.profile, spec.runs_dir, spec.data_dir, spec.max_iterations, spec.device,
                          progress, spec.eval_mode)
        if record["status"] == "ok":
            collect_cell(run.run_dir, spec.results_dir, spec.profile, resolve_profile(**run.parameters).result_note)
            record["result"] = str(result_path(spec.results_dir, spec.profile, cell.name))
        return record
    except Exception as exc:  # noqa: BLE001 - any error of one cell is its record, the grid goes on
        return {
            "cell": cell.name, **run.parameters, "status": "failed", "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(), "log": str(run.run_dir / CELL_FILE), "host": host(),
            "job_id": job_id(),
            "start": start.isoformat(timespec="seconds"),
            "end": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - clock, 1),
        }
