"""A real grid on submitit's local executor: 2 smoke cells run, a re-run runs none, a re-run after one cell lost its
evaluation runs (and resumes) that one; --status prints the table; the results load into one mean ± sd row (slow)."""

from __future__ import annotations

import json
import shutil

import pytest

from dkuxnet.grid.lock import LOCK_FILE
from dkuxnet.grid.state import CELL_FILE

CELLS = ("tiny-seg-r0.1-s1", "tiny-seg-r0.1-s2")


@pytest.mark.slow
def test_local_grid_runs_skips_and_resumes(tmp_path, capsys):
    pytest.importorskip("papermill")
    pytest.importorskip("submitit")
    from dkuxnet.cli import main
    from dkuxnet.results import load_results, ours_table

    runs = tmp_path / "runs"
    grid = ["reproduce", "--profile", "smoke", "--ratios", "0.1", "--seeds", "1", "2", "--ablations", "seg",
            "--max-iterations", "2", "--device", "cpu", "--eval-mode", "fast", "--data-dir", str(tmp_path / "phantom"),
            "--runs-dir", str(runs)]
    local = [*grid, "--launcher", "local", "--jobs", "2"]

    def records() -> list[dict]:
        return json.loads((runs / "summary.json").read_text())

    assert main(local) == 0
    first = records()
    assert [r["cell"] for r in first] == list(CELLS) and [r["status"] for r in first] == ["ok", "ok"]
    assert [r["skipped"] for r in first] == [False, False] and first[0]["job_id"] != first[1]["job_id"]
    assert all(r["host"] and (runs / "logs" / f"{r['job_id']}_0_log.err").is_file() for r in first)
    assert not any((runs / cell / LOCK_FILE).exists() for cell in CELLS)  # released
    assert all((runs / cell / "last.pt").is_file() for cell in CELLS)  # kept: a smoke cell resumes until it is done

    assert main(local) == 0
    assert [r["skipped"] for r in records()] == [True, True]  # 0 cells executed

    shutil.rmtree(runs / CELLS[1] / "eval")  # the cell's output, as if it had been interrupted before evaluating
    (runs / CELLS[1] / CELL_FILE).unlink()
    assert main(local) == 0
    again = records()
    assert [r["skipped"] for r in again] == [True, False]  # 1 cell executed ...
    assert again[1]["resume"] is True and again[1]["status"] == "ok"  # ... from its last.pt
    capsys.readouterr()

    assert main([*grid, "--status"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in table[1:3]] == [[cell, "done"] for cell in CELLS]
    assert all(line.split()[3].replace(".", "").isdigit() for line in table[1:3])  # Dice (%) of each done cell
    assert table[-1] == "2 cells: 2 done, 0 running, 0 failed, 0 pending"

    results = load_results(runs / "results")
    assert sorted(r["name"] for r in results) == list(CELLS)
    assert {r["job_id"] for r in results} == {r["job_id"] for r in first}  # the jobs that trained them
    table = ours_table(results)
    assert len(table) == 1 and table["n_seeds"].iloc[0] == 2 and "seeds=1,2" in table["run"].iloc[0]
    dice = [100 * r["metrics"]["dice"]["mean"] for r in results]
    assert table["Dice %"].iloc[0] == pytest.approx(sum(dice) / 2)
    assert table["Dice % sd"].iloc[0] == pytest.approx(abs(dice[0] - dice[1]) / 2 ** 0.5)
