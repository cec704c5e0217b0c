"""One job per run folder: ``lock.json`` with the owner's job id, host and pid, kept fresh by a heartbeat.

A job takes the lock before it touches a cell's run folder and removes it when the cell ends. While the
cell runs, a thread touches the file every :data:`HEARTBEAT_S` seconds, so that the lock's age
(``now − mtime``) tells from any machine whether its owner is alive. A lock is **stale** when

* its owner ran on this host and its pid is no longer running, or
* its heartbeat is older than :data:`STALE_AFTER_S` (a job killed on another node, a preempted Slurm job);

a stale lock, or one left by the same job id (a Slurm job requeued after preemption keeps its id), is taken
over and the take-over is reported; any other lock refuses the folder with :class:`CellLockedError`.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from dkuxnet.errors import UserError
from dkuxnet.grid.identity import host, job_id

LOCK_FILE = "lock.json"
HEARTBEAT_S = 60.0  # seconds between two touches of a held lock
STALE_AFTER_S = 600.0  # a lock whose heartbeat is older is stale: ten missed heartbeats


class CellLockedError(UserError):
    """Another live job holds the run folder's lock."""


@dataclass(frozen=True)
class LockOwner:
    """Who holds a lock: job id (None outside a batch job), host, process id and start time (UTC, ISO)."""

    job_id: str | None
    host: str
    pid: int
    since: str

    def describe(self) -> str:
        """``job 123 on node7, pid 4242, since 2026-12-03T10:00:00+00:00``."""
        return f"job {self.job_id or '-'} on {self.host}, pid {self.pid}, since {self.since}"


def read_lock(run_dir: Path) -> tuple[LockOwner | None, float] | None:
    """The lock of ``run_dir``: its owner (None while the file is being written or is unreadable) and its
    heartbeat age in seconds; None when there is no lock."""
    path = Path(run_dir) / LOCK_FILE
    try:
        age = time.time() - path.stat().st_mtime
        d = json.loads(path.read_text(encoding="utf-8"))
        return LockOwner(d["job_id"], d["host"], int(d["pid"]), d["since"]), age
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return (None, age) if path.exists() else None


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_reason(owner: LockOwner | None, age_s: float, stale_after_s: float = STALE_AFTER_S) -> str:
    """Why a lock with this owner and heartbeat age is stale, or ``""`` while its owner may be alive."""
    if stale_after_s <= 0:
        raise ValueError(f"stale_after_s must be > 0, got {stale_after_s}")
    if owner is not None and owner.host == host() and not _pid_running(owner.pid):
        return f"pid {owner.pid} is no longer running on {owner.host}"
    if age_s > stale_after_s:
        return f"no heartbeat for {age_s / 60:.0f} min (stale after {stale_after_s / 60:.0f} min)"
    return ""


class CellLock:
    """Context manager: hold ``run_dir/lock.json`` for this process while a cell runs.

    ``took_over`` says whose stale lock was replaced, and why (empty when the folder was free).

    Raises:
        CellLockedError: a live job of another id holds the lock (the message names it).
    """

    def __init__(self, run_dir: Path, stale_after_s: float = STALE_AFTER_S, heartbeat_s: float = HEARTBEAT_S) -> None:
        if heartbeat_s <= 0 or heartbeat_s >= stale_after_s:
            raise ValueError(f"heartbeat_s must be in (0, stale_after_s={stale_after_s}), got {heartbeat_s}")
        self.path = Path(run_dir) / LOCK_FILE
        self.stale_after_s, self.heartbeat_s = stale_after_s, heartbeat_s
        self.owner = LockOwner(job_id(), host(), os.getpid(), datetime.now(timezone.utc).isoformat(timespec="seconds"))
        self.took_over = ""
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> CellLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_or_raise()
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(asdict(self.owner), f)
            self._beat = threading.Thread(target=self._heartbeat, name=f"heartbeat {self.path}", daemon=True)
            self._beat.start()
            return self
        raise CellLockedError(f"{self.path}: another job took the lock at the same moment; run again")

    def _take_over_or_raise(self) -> None:
        found = read_lock(self.path.parent)
        if found is None:
            return  # released in between: try again
        owner, age = found
        reason = stale_reason(owner, age, self.stale_after_s)
        if not reason and owner is not None and owner.job_id is not None and owner.job_id == self.owner.job_id:
            reason = "the same job, requeued"
        if not reason:
            held = owner.describe() if owner else "a job still writing it"
            raise CellLockedError(
                f"{self.path.parent} is locked by {held} (heartbeat {age:.0f} s ago): it is running; "
                f"a lock is stale after {self.stale_after_s / 60:.0f} min without heartbeat"
            )
        self.took_over = f"took over the lock of {owner.describe() if owner else 'an unreadable lock file'}: {reason}"
        self.path.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        found = read_lock(self.path.parent)
        if found is not None and found[0] == self.owner:
            self.path.unlink(missing_ok=True)
