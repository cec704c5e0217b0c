"""A finished cell's result, written where :func:`dkuxnet.results.load_results` and the results page read it.

The layout is the one of the repository's ``results/`` (``results/README.md``), under the grid's results
folder (``<runs_dir>/results`` unless ``--results-dir`` names another):

* ``<results>/<profile>/<cell>.json`` — the run result (schema ``dkuxnet-result-v1``), built from the
  cell's own evaluation (``eval/summary.json``, the evaluation mode of the grid) with
  :func:`dkuxnet.results.build_result`;
* ``<results>/runs/<cell>/`` — ``per_case.csv``, ``metrics.jsonl`` (the training log) and
  ``train_summary.json`` (without the training machine's paths), as ``dkuxnet publish`` writes them.

Unlike ``dkuxnet publish`` it evaluates nothing again and copies no model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dkuxnet.publish import copy_run_files
from dkuxnet.results import RUNS_FOLDER, build_result, save_result


def result_path(results_dir: Path, profile: str, name: str) -> Path:
    """``<results_dir>/<profile>/<name>.json``."""
    return Path(results_dir) / profile / f"{name}.json"


def collect_cell(run_dir: Path, results_dir: Path, profile: str, notes: str | None = None) -> dict[str, Any]:
    """Write the result and the own files of the finished cell in ``run_dir`` (module docstring); return the result.

    Raises:
        FileNotFoundError: the cell has no ``eval/summary.json``, ``eval/per_case.csv`` or ``metrics.jsonl``.
        ValueError: the evaluation summary does not make a valid result.
    """
    run_dir, results_dir = Path(run_dir), Path(results_dir)
    name = run_dir.name
    summary = json.loads((run_dir / "eval" / "summary.json").read_text(encoding="utf-8"))
    result = build_result(summary, name=name, notes=notes)
    copy_run_files(run_dir, run_dir / "eval" / "per_case.csv", results_dir / RUNS_FOLDER / name)
    save_result(result_path(results_dir, profile, name), result)
    return result
