"""The state of each cell of a grid, read from its run folder: done, running, failed or pending.

A cell's **config hash** is the SHA-256 of its resolved configuration and evaluation mode,

    hash = sha256(json.dumps({"config": Config.to_dict(), "eval_mode": mode}, sort_keys=True))[:16],

the configuration being the one its notebooks build (``resolve_profile(**parameters).config()``: preset,
profile changes, ablation, label ratio, schedule, seed). A job writes ``cell.json`` into the run folder
when the cell ends: its record with ``status`` (``ok`` or ``failed``) and ``config_hash``. A cell is

* **done**: ``cell.json`` says ``ok``, its hash is the cell's and ``eval/summary.json`` exists;
* **running**: a live job holds its lock (:mod:`dkuxnet.grid.lock`);
* **failed**: ``cell.json`` says ``failed`` (with the error and the log to read);
* **pending**: anything else: never run, interrupted (a stale lock, taken over by the next run), or run
  with another configuration (its hash differs).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from dkuxnet.grid.lock import read_lock, stale_reason
from dkuxnet.reproduce import resolve_profile

CELL_FILE = "cell.json"
STATES = ("done", "running", "failed", "pending")


def config_hash(parameters: dict[str, Any], eval_mode: str) -> str:
    """16 hex digits of the SHA-256 of the cell's resolved config and evaluation mode (module docstring).

    ``parameters`` are the notebooks' (:attr:`dkuxnet.reproduce.PlannedRun.parameters`).
    """
    cfg = resolve_profile(**parameters).config()
    text = json.dumps({"config": cfg.to_dict(), "eval_mode": eval_mode}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """The ``cell.json`` record of a run folder, or None when the cell never ended there."""
    path = Path(run_dir) / CELL_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError:
        return {"status": "failed", "error": f"{path} is not valid JSON"}


def eval_dice(run_dir: Path) -> float | None:
    """Mean Dice (fraction) of the run folder's ``eval/summary.json``, or None."""
    try:
        return json.loads((Path(run_dir) / "eval" / "summary.json").read_text())["metrics"]["dice"]["mean"]
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class CellState:
    """One row of the status table."""

    cell: str
    state: str
    seconds: float | None
    dice: float | None
    detail: str


def cell_state(name: str, run_dir: Path, expected_hash: str) -> CellState:
    """The :data:`STATES` entry of one cell (module docstring), with its wall time, Dice and a detail."""
    run_dir = Path(run_dir)
    record = read_record(run_dir)
    lock = read_lock(run_dir)
    if lock is not None:
        owner, age = lock
        reason = stale_reason(owner, age)
        if not reason and owner is None:
            return CellState(name, "running", None, None, "a job is writing its lock")
        if not reason:
            return CellState(name, "running", time.time() - _timestamp(owner.since), None, owner.describe())
        held = owner.describe() if owner else "unreadable lock file"
        detail = f"interrupted: stale lock of {held} ({reason}); the next run resumes it"
        return CellState(name, "pending", None, None, detail)
    if record is None:
        return CellState(name, "pending", None, None, "")
    seconds = record.get("seconds")
    if record.get("status") == "failed":
        return CellState(name, "failed", seconds, None, f"{record.get('error', '')}; log: {record.get('log', '-')}")
    if record.get("config_hash") != expected_hash:
        return CellState(name, "pending", None, None,
                         f"configuration changed (hash {record.get('config_hash')} -> {expected_hash})")
    if not is_done(record, expected_hash, run_dir):
        return CellState(name, "pending", None, None, "eval/summary.json is missing")
    return CellState(name, "done", seconds, eval_dice(run_dir), _provenance(record))


def is_done(record: dict[str, Any] | None, expected_hash: str, run_dir: Path) -> bool:
    """True when ``record`` (``cell.json``) says ``ok`` with ``expected_hash`` and ``eval/summary.json`` exists."""
    return (record is not None and record.get("status") == "ok" and record.get("config_hash") == expected_hash
            and (Path(run_dir) / "eval" / "summary.json").is_file())


def _provenance(record: dict[str, Any]) -> str:
    job = record.get("job_id")
    return f"on {record.get('host', '?')}" + (f", job {job}" if job else "")


def _timestamp(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def status_table(states: list[CellState]) -> str:
    """Plain-text table: cell, state, seconds, Dice (%) and detail; a last line counts each state."""
    rows = [("cell", "state", "seconds", "Dice (%)", "detail")]
    for s in states:
        rows.append((s.cell, s.state, "-" if s.seconds is None else f"{s.seconds:.0f}",
                     "-" if s.dice is None else f"{100 * s.dice:.2f}", s.detail))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join([*(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))),
                        row[4]]).rstrip() for row in rows]
    counts = ", ".join(f"{sum(s.state == state for s in states)} {state}" for state in STATES)
    return "\n".join([*lines, f"{len(states)} cells: {counts}"])
