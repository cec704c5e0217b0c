"""Tests of dkuxnet.grid: the run-folder lock, cell states, local slots, Slurm options and submission (mocked)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from dkuxnet.grid.identity import host, job_id
from dkuxnet.grid.job import GridSpec, Slot
from dkuxnet.grid.launch import grid_states, local_slots
from dkuxnet.grid.lock import LOCK_FILE, CellLock, CellLockedError, read_lock, stale_reason
from dkuxnet.grid.slurm import SlurmOptions, parse_options, slurm_minutes
from dkuxnet.grid.state import CELL_FILE, status_table
from dkuxnet.reproduce import Cell


def _write_lock(run_dir: Path, pid: int, job: str | None = "77", on: str | None = None, age_s: float = 0.0) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    path.write_text(json.dumps({"job_id": job, "host": on or host(), "pid": pid, "since": "2026-12-03T10:00:00+00:00"}))
    if age_s:
        stamp = time.time() - age_s
        os.utime(path, (stamp, stamp))


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_job_id_from_the_environment(monkeypatch):
    names = ("SUBMITIT_EXECUTOR", "SUBMITIT_LOCAL_JOB_ID", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")
    for name in names:
        monkeypatch.delenv(name, raising=False)
    assert job_id() is None
    monkeypatch.setenv("SLURM_JOB_ID", "900")
    assert job_id() == "900"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "12")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert job_id() == "12_3"  # an array task, as squeue and submitit name it
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "4321")
    assert job_id() == "4321"


def test_lock_refuses_a_live_job_and_is_released(tmp_path):
    with CellLock(tmp_path) as lock:
        owner, age = read_lock(tmp_path)
        assert owner == lock.owner and owner.pid == os.getpid() and age < 60 and lock.took_over == ""
    assert read_lock(tmp_path) is None  # released
    _write_lock(tmp_path, os.getppid(), job="77")  # a live process of another job on this host
    with pytest.raises(CellLockedError, match=f"job 77 on {host()}, pid {os.getppid()}"):
        CellLock(tmp_path).__enter__()
    assert read_lock(tmp_path)[0].job_id == "77"  # untouched


def test_stale_locks_are_taken_over_and_say_why(tmp_path, monkeypatch):
    dead = _dead_pid()
    _write_lock(tmp_path / "a", dead)
    with CellLock(tmp_path / "a") as lock:
        assert f"pid {dead} is no longer running" in lock.took_over and "job 77" in lock.took_over
    _write_lock(tmp_path / "b", 1, on="node-that-died", age_s=3600)  # no heartbeat for an hour
    with CellLock(tmp_path / "b") as lock:
        assert "no heartbeat for 60 min" in lock.took_over
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # the same job, requeued after preemption
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    _write_lock(tmp_path / "c", 1, on="other-node")
    with CellLock(tmp_path / "c") as lock:
        assert "the same job, requeued" in lock.took_over
    assert stale_reason(None, 5.0) == "" and "no heartbeat" in stale_reason(None, 700.0)
    with pytest.raises(ValueError, match="heartbeat_s"):
        CellLock(tmp_path, stale_after_s=10, heartbeat_s=10)


def test_heartbeat_keeps_the_lock_fresh(tmp_path):
    with CellLock(tmp_path, stale_after_s=5.0, heartbeat_s=0.05):
        stamp = time.time() - 100
        os.utime(tmp_path / LOCK_FILE, (stamp, stamp))
        time.sleep(0.3)
        assert read_lock(tmp_path)[1] < 5.0


def _spec(tmp_path: Path) -> GridSpec:
    return GridSpec("smoke", tmp_path / "runs", tmp_path / "results", tmp_path / "data", 2, "cpu", "fast")


def test_cell_states_and_the_status_table(tmp_path):
    spec = _spec(tmp_path)
    cells = [Cell("tiny", "seg", 0.1, seed) for seed in range(1, 7)]
    done, failed, running, stale, changed, _ = (spec.plan(c).run_dir for c in cells)
    for folder in (done, changed):
        (folder / "eval").mkdir(parents=True)
        (folder / "eval" / "summary.json").write_text(json.dumps({"metrics": {"dice": {"mean": 0.8125}}}))
    (done / CELL_FILE).write_text(json.dumps({"status": "ok", "config_hash": spec.config_hash(cells[0]),
                                            "seconds": 12.4, "host": "ws1", "job_id": "5"}))
    (changed / CELL_FILE).write_text(json.dumps({"status": "ok", "config_hash": "0" * 16, "seconds": 3}))
    failed.mkdir(parents=True)
    (failed / CELL_FILE).write_text(json.dumps({"status": "failed", "error": "NonFiniteLossError: nan", "seconds": 7,
                                              "log": "/x/03_train.ipynb"}))
    _write_lock(running, os.getpid(), job="88")
    _write_lock(stale, _dead_pid(), job="89")
    states = grid_states(cells, spec)
    assert [s.state for s in states] == ["done", "failed", "running", "pending", "pending", "pending"]
    assert states[0].dice == 0.8125 and states[0].detail == "on ws1, job 5"
    assert "configuration changed" in states[4].detail and "stale lock of job 89" in states[3].detail
    lines = status_table(states).splitlines()
    assert lines[0].split() == ["cell", "state", "seconds", "Dice", "(%)", "detail"]
    assert lines[1].split()[:5] == ["tiny-seg-r0.1-s1", "done", "12", "81.25", "on"]
    assert lines[2].split()[:4] == ["tiny-seg-r0.1-s2", "failed", "7", "-"]
    assert lines[2].endswith("NonFiniteLossError: nan; log: /x/03_train.ipynb")
    assert "job 88" in lines[3] and lines[6].split() == ["tiny-seg-r0.1-s6", "pending", "-", "-"]
    assert lines[-1] == "6 cells: 1 done, 1 running, 1 failed, 3 pending"


def test_config_hash_follows_the_resolved_config(tmp_path):
    spec, cell = _spec(tmp_path), Cell("tiny", "seg", 0.1, 1)
    h = spec.config_hash(cell)
    elsewhere = GridSpec("smoke", tmp_path / "elsewhere", tmp_path, None, 2, "cpu", "fast")  # folders are no config
    assert len(h) == 16 and h == elsewhere.config_hash(cell)
    assert h != GridSpec("smoke", tmp_path, tmp_path, None, 3, "cpu", "fast").config_hash(cell)  # schedule
    assert h != GridSpec("smoke", tmp_path, tmp_path, None, 2, "cpu", "protocol").config_hash(cell)  # evaluation
    assert h != spec.config_hash(Cell("tiny", "seg", 0.1, 2))  # seed
    with pytest.raises(ValueError, match="eval_mode"):
        GridSpec("smoke", tmp_path, tmp_path, eval_mode="slow")


def test_local_slots_split_the_cores(monkeypatch):
    assert local_slots() == [Slot()]  # one cell has the whole machine
    assert local_slots(jobs=3, cores=range(8)) == [Slot((0, 1)), Slot((2, 3)), Slot((4, 5))]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert local_slots(gpus=2, cores=[4, 5, 6, 7]) == [Slot((4, 5), 3), Slot((6, 7), 5)]
    assert Slot((4, 5), 3).describe() == "GPU 3, cores 4-5" and Slot().describe() == "whole machine"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert [s.gpu for s in local_slots(gpus=1, cores=[0, 1])] == [0]
    bad = (({"jobs": 0}, "jobs"), ({"gpus": 2, "jobs": 2}, "not both"), ({"jobs": 3, "cores": [0, 1]}, "cores"))
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            local_slots(**kwargs)


def test_slurm_time_and_options():
    assert [slurm_minutes(t) for t in ("90", "4:00:00", "1-00:00:00", "1-2", "30:30", "1-2:30")] == [
        90, 240, 1440, 1560, 31, 1590]
    for bad in ("", "4h", "0", "1:2:3:4"):
        with pytest.raises(ValueError, match="time"):
            slurm_minutes(bad)
    assert parse_options(["account=lab", "--qos=high", "exclusive", "cpus_per_task=8"]) == {
        "account": "lab", "qos": "high", "exclusive": True, "cpus-per-task": "8"}
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_options(["=x"])
    with pytest.raises(ValueError, match="time_min"):
        SlurmOptions(0)


@pytest.mark.filterwarnings("ignore:pkg_resources is deprecated")
def test_slurm_submission_script_and_job(tmp_path, monkeypatch, capsys):
    """The array job's sbatch script (partition, time, GPUs, options), and its task run in-process (submitit's own
    Slurm mock: no cluster); a done cell is not submitted."""
    papermill = pytest.importorskip("papermill")
    pytest.importorskip("submitit")
    from submitit.core import submission
    from submitit.slurm.test_slurm import mocked_slurm

    import dkuxnet.grid.collect
    from dkuxnet.cli import main

    def fake_execute(source, output, parameters, **kwargs):
        (Path(parameters["run_dir"]) / "eval").mkdir(parents=True, exist_ok=True)
        (Path(parameters["run_dir"]) / "eval" / "summary.json").write_text('{"metrics": {"dice": {"mean": 0.5}}}')

    monkeypatch.setattr(papermill, "execute_notebook", fake_execute)
    monkeypatch.setattr(dkuxnet.grid.collect, "collect_cell", lambda *args: {})
    runs = tmp_path / "runs"
    args = ["reproduce", "--profile", "paper", "--ratios", "0.1", "--seeds", "1", "2", "3", "--runs-dir", str(runs),
            "--data-dir", str(tmp_path / "LA"), "--max-iterations", "5"]
    spec = GridSpec("paper", runs, runs / "results", tmp_path / "LA", 5)
    done = Cell("paper", "all", 0.1, 1)
    (spec.plan(done).run_dir / "eval").mkdir(parents=True)
    (spec.plan(done).run_dir / "eval" / "summary.json").write_text('{"metrics": {"dice": {"mean": 0.9}}}')
    (spec.plan(done).run_dir / CELL_FILE).write_text(json.dumps({"cell": done.name, "status": "ok",
                                                                 "config_hash": spec.config_hash(done)}))
    assert main([*args, "--launcher", "slurm"]) == 2  # no --time
    assert "needs --time" in capsys.readouterr().err
    assert main([*args, "--time", "1:00:00"]) == 2 and "are for --launcher slurm" in capsys.readouterr().err
    assert main([*args, "--gpus", "2"]) == 2 and "for the local launcher" in capsys.readouterr().err
    with mocked_slurm() as mock:
        assert main([*args, "--launcher", "slurm", "--partition", "gpu-h100", "--time", "8:00:00",
                     "--gpus-per-node", "1", "--slurm-opt", "account=lab", "--slurm-opt", "exclusive"]) == 0
        records = json.loads((runs / "summary.json").read_text())
        assert [r["status"] for r in records] == ["ok", "submitted", "submitted"] and records[0]["skipped"]
        assert [r["job_id"] for r in records[1:]] == ["12_0", "12_1"]
        script = next((runs / "logs").glob("*submission.sh")).read_text()
        for line in ("#SBATCH --partition=gpu-h100", "#SBATCH --time=480", "#SBATCH --gpus-per-node=1",
                     "#SBATCH --account=lab", "#SBATCH --exclusive", "#SBATCH --array=0-1%2",
                     "#SBATCH --ntasks-per-node=1"):
            assert line in script.splitlines()
        monkeypatch.setenv("SUBMITIT_FOLDER", "")  # process_job sets it; restored after the test
        with mock.job_context("12_1"):
            submission.process_job(runs / "logs")
    cell = json.loads((spec.plan(Cell("paper", "all", 0.1, 3)).run_dir / CELL_FILE).read_text())
    assert cell["status"] == "ok" and cell["job_id"] == "12_1" and cell["config_hash"]
    out = capsys.readouterr().out
    assert main([*args, "--status"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in table[1:4]] == ["done", "pending", "done"] and "job 12_1" in table[3]
    assert "submitted as Slurm job 12_0" in out


def test_a_failed_cell_is_reported_with_its_log_and_the_grid_goes_on(tmp_path, monkeypatch, capsys):
    papermill = pytest.importorskip("papermill")
    from papermill.exceptions import PapermillExecutionError

    import dkuxnet.grid.collect
    from dkuxnet.cli import main

    def fake_execute(source, output, parameters, **kwargs):
        if parameters["seed"] == 1:
            raise PapermillExecutionError(3, 3, "train(...)", "NonFiniteLossError", "nan at 7", [])
        (Path(parameters["run_dir"]) / "eval").mkdir(parents=True, exist_ok=True)
        (Path(parameters["run_dir"]) / "eval" / "summary.json").write_text('{"metrics": {"dice": {"mean": 0.5}}}')

    def broken_collect(run_dir, *args):
        if run_dir.name.endswith("s3"):
            raise ValueError("result field 'config' is missing")
        return {}

    monkeypatch.setattr(papermill, "execute_notebook", fake_execute)
    monkeypatch.setattr(dkuxnet.grid.collect, "collect_cell", broken_collect)
    runs = tmp_path / "runs"
    args = ["reproduce", "--profile", "cpu", "--ablations", "seg", "--seeds", "1", "2", "3", "4",
            "--runs-dir", str(runs)]
    spec = GridSpec("cpu", runs, runs / "results")
    _write_lock(spec.plan(Cell("cpu", "seg", 0.1, 4)).run_dir, os.getpid(), job="99")  # running elsewhere
    assert main(args) == 1
    records = json.loads((runs / "summary.json").read_text())
    assert [r["status"] for r in records] == ["failed", "ok", "failed", "running"]
    assert records[0]["log"].endswith("cpu-seg-r0.1-s1/03_train.ipynb")
    assert "ValueError: result field 'config'" in records[2]["traceback"]
    captured = capsys.readouterr()
    assert "error: cpu-seg-r0.1-s1: NonFiniteLossError: nan at 7 (log: " in captured.err
    log = records[2]["log"]
    assert f"error: cpu-seg-r0.1-s3: ValueError: result field 'config' is missing (log: {log})" in captured.err
    states = [line.split()[1] for line in captured.out.splitlines()[-5:-1]]
    assert states == ["failed", "done", "failed", "running"]
