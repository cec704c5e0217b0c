"""Results with provenance, the paper's numbers as data, and "ours beside the paper" tables.

Two kinds of records never mix:

* the paper's Table 1 (ablation) and Table 2 (main comparison), shipped as
  ``dkuxnet/paper_results.json``; every record has ``"source": "reported by the paper"``;
* our run results, one JSON file per run (schema ``dkuxnet-result-v1``, documented in
  ``results/README.md``), with ``"source": "this repository"`` and every field needed to say where the
  number came from: git commit, preset and full config, labeled count, seed, iterations and whether the
  schedule was shortened, device, torch version, wall time, date, evaluation mode.

Dice / Jaccard are fractions in our files (as medpy returns them) and percent in the paper's;
:func:`paper_table` and :func:`ours_table` show both in percent, never in one table. Distances are in voxels
in both.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dkuxnet.config import Config, get_preset
from dkuxnet.fileio import write_text_atomic

if TYPE_CHECKING:
    import pandas as pd

SCHEMA = "dkuxnet-result-v1"
PAPER_SOURCE = "reported by the paper"
OUR_SOURCE = "this repository"
EVAL_MODES = ("protocol", "fast")
TABLE_METRICS = ("dice", "jaccard", "hd95", "asd")
ABLATION_ROWS = {"seg": "L_seg", "qdc": "L_seg + L_qdc", "segc": "L_seg + L_segc", "all": "L_seg + L_qdc + L_segc"}
REQUIRED_FIELDS: dict[str, tuple[type, ...]] = {
    "schema": (str,),
    "source": (str,),
    "git_commit": (str,),
    "preset": (str,),
    "config": (dict,),
    "label_ratio": (float, int, type(None)),
    "labeled_num": (int,),
    "seed": (int,),
    "iterations": (int,),
    "schedule": (str,),
    "device": (str,),
    "torch_version": (str,),
    "wall_time_s": (float, int),
    "date": (str,),
    "eval_mode": (str,),
    "metrics": (dict,),
    "n_cases": (int,),
    "n_failed": (int,),
}
_SHORTENED = re.compile(r"^shortened: (\d+) of (\d+) iterations$")
BN_STATS = ("ema", "recomputed")  # optional field bn_stats: the BatchNorm statistics the evaluated model used
_SHA256 = re.compile(r"[0-9a-f]{64}")
OPTIONAL_PROVENANCE = ("bn_stats", "data_sha256")  # copied from the evaluation summary when it has them
CPU_KIND = "real LA, ½ resolution, CPU"  # run_kind of the cpu profile's runs


def default_results_dir() -> Path:
    """Where results live: the checkout's ``results/`` when this package runs from a source checkout of the
    repository (how the book build finds the committed results), else ``./results`` in the working directory
    (after ``pip install``, never inside site-packages)."""
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file() and (root / "results").is_dir():
        return root / "results"
    return Path.cwd() / "results"


def paper_results(table: str | None = None) -> list[dict[str, Any]]:
    """Records of the paper's tables (``table`` = ``"main"``, ``"ablation"`` or ``None`` for both)."""
    if table not in (None, "main", "ablation"):
        raise ValueError(f"table must be 'main', 'ablation' or None, got {table!r}")
    doc = json.loads(resources.files("dkuxnet").joinpath("paper_results.json").read_text(encoding="utf-8"))
    return [r for r in doc["records"] if table is None or r["table"] == table]


def schedule_label(iterations: int, preset: str) -> str:
    """``"full"`` when ``iterations`` reaches the preset's schedule, else ``"shortened: N of M iterations"``."""
    full = get_preset(preset).train.max_iterations
    return "full" if iterations >= full else f"shortened: {iterations} of {full} iterations"


def validate_result(d: dict[str, Any]) -> None:
    """Check a run result against schema ``dkuxnet-result-v1``.

    Raises:
        ValueError: naming the first missing or wrong field.
    """
    if not isinstance(d, dict):
        raise ValueError(f"a result must be a dict, got {type(d).__name__}")
    for name, types in REQUIRED_FIELDS.items():
        if name not in d:
            raise ValueError(f"result is missing required provenance field {name!r}")
        value = d[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ValueError(f"result field {name!r} has type {type(value).__name__}; expected {types}")
    if d["schema"] != SCHEMA:
        raise ValueError(f"result field 'schema' must be {SCHEMA!r}, got {d['schema']!r}")
    if d["source"] != OUR_SOURCE:
        raise ValueError(f"result field 'source' must be {OUR_SOURCE!r} (paper numbers live in paper_results.json)")
    if not d["git_commit"]:
        raise ValueError("result field 'git_commit' is empty")
    try:
        cfg = Config.from_dict(d["config"])
    except (ValueError, TypeError) as exc:
        raise ValueError(f"result field 'config' is not a valid config: {exc}") from exc
    if cfg.preset != d["preset"] or cfg.train.seed != d["seed"]:
        raise ValueError("result fields 'preset' / 'seed' disagree with 'config'")
    if d["eval_mode"] not in EVAL_MODES:
        raise ValueError(f"result field 'eval_mode' must be one of {EVAL_MODES}, got {d['eval_mode']!r}")
    _check_schedule(d["schedule"], d["iterations"], d["preset"])
    for m in TABLE_METRICS:
        entry = d["metrics"].get(m)
        if not isinstance(entry, dict) or "mean" not in entry or "std" not in entry:
            raise ValueError(f"result field 'metrics' needs {{'mean', 'std'}} for {m!r}")
    _check_optional_provenance(d)


def _check_optional_provenance(d: dict[str, Any]) -> None:
    """``bn_stats`` one of :data:`BN_STATS`, ``data_sha256`` a lowercase hex SHA-256 digest,
    ``bn_stats_other`` the same evaluation with the other statistics, ``host`` a non-empty string and
    ``job_id`` a non-empty string or null, when present."""
    if "bn_stats" in d and d["bn_stats"] not in BN_STATS:
        raise ValueError(f"result field 'bn_stats' must be one of {BN_STATS}, got {d['bn_stats']!r}")
    other = d.get("bn_stats_other")
    if other is not None:
        if not isinstance(other, dict) or other.get("bn_stats") not in BN_STATS or other["bn_stats"] == d.get("bn_stats"):
            raise ValueError("result field 'bn_stats_other' must name the other BatchNorm statistics than 'bn_stats'")
        for m in TABLE_METRICS:
            if not isinstance(other.get("metrics", {}).get(m), dict) or "mean" not in other["metrics"][m]:
                raise ValueError(f"result field 'bn_stats_other' needs metrics {{'mean', 'std'}} for {m!r}")
        if not isinstance(other.get("n_failed"), int):
            raise ValueError("result field 'bn_stats_other' needs an integer 'n_failed'")
    if "host" in d and not (isinstance(d["host"], str) and d["host"]):
        raise ValueError(f"result field 'host' must be a non-empty string, got {d['host']!r}")
    if "job_id" in d and not (d["job_id"] is None or (isinstance(d["job_id"], str) and d["job_id"])):
        raise ValueError(f"result field 'job_id' must be a non-empty string or null, got {d['job_id']!r}")
    if "data_sha256" in d and not (isinstance(d["data_sha256"], str) and _SHA256.fullmatch(d["data_sha256"])):
        raise ValueError(
            f"result field 'data_sha256' must be a SHA-256 digest (64 lowercase hex digits), got {d['data_sha256']!r}"
        )


def build_result(
    summary: dict[str, Any],
    *,
    wall_time_s: float | None = None,
    device: str | None = None,
    name: str | None = None,
    notes: str | None = None,
    other_bn_summary: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Turn an ``evaluate_checkpoint`` summary into a validated run result.

    Training provenance comes from the checkpoint's ``provenance`` (keys ``commit`` or ``git_commit``,
    ``device``, ``torch`` or ``torch_version``, ``wall_s``), falling back to the evaluation's own values;
    the arguments override. ``bn_stats`` and ``data_sha256`` are copied from the summary when it has them,
    ``host`` and ``job_id`` (the machine and batch job that trained it) from the provenance when it has them.

    Args:
        summary: dict returned by :func:`dkuxnet.evaluate.evaluate_checkpoint`.
        wall_time_s: training wall time in seconds (required unless the checkpoint recorded ``wall_s``).
        device: training device name.
        name: optional short name of the run.
        notes: optional free text.
        other_bn_summary: the same checkpoint evaluated with the other BatchNorm statistics
            (``evaluate_checkpoint(..., bn_stats=...)``); its metrics go to ``bn_stats_other``.

    Raises:
        ValueError: the training wall time is unknown, the two summaries are not of the same checkpoint,
            or the result does not validate.
    """
    prov = summary.get("provenance") or {}
    cfg = summary["config"]
    wall = wall_time_s if wall_time_s is not None else prov.get("wall_s", prov.get("wall_time_s"))
    if wall is None:
        raise ValueError("wall_time_s is required: the checkpoint's provenance has no 'wall_s'")
    result = {
        "schema": SCHEMA,
        "source": OUR_SOURCE,
        "name": name,
        "git_commit": prov.get("commit") or prov.get("git_commit") or summary.get("git_commit") or "unknown",
        "preset": cfg["preset"],
        "ablation": cfg["loss"]["ablation"],
        "config": cfg,
        "label_ratio": cfg["data"]["label_ratio"],
        "labeled_num": summary.get("labeled_num") or cfg["data"]["labeled_num"],
        "seed": cfg["train"]["seed"],
        "iterations": summary["iteration"],
        "schedule": schedule_label(summary["iteration"], cfg["preset"]),
        "device": device or prov.get("device") or summary["device"],
        "torch_version": str(prov.get("torch") or prov.get("torch_version") or summary["torch_version"]),
        "wall_time_s": float(wall),
        "date": summary["date"],
        "eval_mode": summary["mode"],
        "eval_device": summary["device"],
        "eval_seconds_per_volume": summary["seconds_per_volume"],
        "metrics": summary["metrics"],
        "n_cases": summary["n_cases"],
        "n_failed": summary["n_failed"],
        "lcc": summary.get("lcc"),
        "notes": notes,
        **{k: summary[k] for k in OPTIONAL_PROVENANCE if summary.get(k) is not None},
        **({"host": prov["host"], "job_id": prov.get("job_id")} if prov.get("host") else {}),
    }
    if other_bn_summary is not None:
        if (other_bn_summary["checkpoint"], other_bn_summary["iteration"]) != (summary["checkpoint"], summary["iteration"]):
            raise ValueError("other_bn_summary evaluates another checkpoint than summary")
        result["bn_stats_other"] = {
            "bn_stats": other_bn_summary.get("bn_stats"), "n_failed": other_bn_summary["n_failed"],
            "metrics": {m: other_bn_summary["metrics"][m] for m in TABLE_METRICS},
        }
    validate_result(result)
    return result


def save_result(path: Path, d: dict[str, Any]) -> None:
    """Validate ``d`` and write it as JSON atomically (NaN written as ``null``)."""
    validate_result(d)
    write_json(Path(path), d)


PERF_FOLDER = "perf"  # results/perf/: benchmark and memory measurements, skipped by load_results
RUNS_FOLDER = "runs"  # results/runs/<run>/: per-case CSVs, training logs, models; skipped by load_results


def load_results(folder: Path) -> list[dict[str, Any]]:
    """All run results (``*.json``, recursively, sorted by path) of ``folder``, each validated.

    ``folder/perf/`` and ``folder/runs/`` are skipped: they hold performance measurements (``dkuxnet bench``
    and ``tools/memprobe.py`` JSON, their own formats) and each committed run's own files (per-case CSV,
    training log, model), not run results.

    Raises:
        ValueError: naming the file that is not a valid result.
        FileNotFoundError: ``folder`` does not exist.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"results folder {folder} does not exist")
    out = []
    for path in sorted(folder.rglob("*.json")):
        if path.relative_to(folder).parts[0] in (PERF_FOLDER, RUNS_FOLDER):
            continue
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            validate_result(d)
        except (ValueError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: {exc}") from exc
        out.append(d)
    return out


def paper_table(table: str = "main") -> pd.DataFrame:
    """One of the paper's tables, its numbers only (Dice / Jaccard in %, distances in voxels).

    Columns ``method, labeled, label_ratio, dice, jaccard, hd95, asd, note``, sorted by labeled count.
    Our numbers never join it: they go in :func:`ours_table`, one table per kind of run.

    Args:
        table: ``"main"`` (paper Table 2) or ``"ablation"`` (paper Table 1).
    """
    import pandas as pd

    if table not in ("main", "ablation"):
        raise ValueError(f"table must be 'main' or 'ablation', got {table!r}")
    rows = [{"method": r["method"] if table == "main" else ABLATION_ROWS[r["ablation"]], "labeled": r["labeled"],
             "label_ratio": r["label_ratio"], **{m: r[m] for m in TABLE_METRICS}, "note": r.get("note", "")}
            for r in paper_results(table)]
    return pd.DataFrame(rows).sort_values("labeled", kind="stable").reset_index(drop=True)


def run_kind(r: dict[str, Any]) -> str:
    """The kind of run a result is, the title of the table it belongs in: :data:`CPU_KIND` for a model trained
    on the CPU on resampled real data, else ``"<preset> preset on <device>"``."""
    if r["config"]["data"].get("resample", 1) == 2 and r["device"].startswith("cpu"):
        return CPU_KIND
    return f"{r['preset']} preset on {r['device']}"


MEAN_COLUMNS = ("wall min", "Dice %", "Jaccard %", "95HD", "ASD", "Dice % (other BN stats)")  # mean ± sd over seeds
OTHER_BN_COLUMN = "Dice % (other BN stats)"


def ours_table(results: list[dict[str, Any]], kind: str | None = None) -> pd.DataFrame:
    """Our runs of one :func:`run_kind` (``None``: all given), one row per setting, never beside the paper's numbers.

    Runs that differ only in their seed share a row: for each number x of :data:`MEAN_COLUMNS` the row shows
    the mean over its ``n`` runs and, in the column ``<x> sd``, the sample standard deviation

        mean = (x_1 + … + x_n) / n,    sd = sqrt(((x_1 − mean)² + … + (x_n − mean)²) / (n − 1))

    (NaN for one run; the ``sd`` columns are left out when no row has two runs). A NaN in one run makes
    the row's mean NaN.

    Columns, the scores first: ``method`` (DKUXNet / V-Net), ``losses`` (the loss ablation row), ``labeled``
    scans, ``Dice %``, ``Jaccard %``, ``95HD`` and ``ASD`` (voxels of 0.625 mm), ``Dice % (other BN stats)``
    when a result carries the evaluation with the other statistics (``bn_stats_other``; the column is left
    out when no run has it), then ``iterations``, ``schedule``, ``n_seeds`` (runs in the row), ``wall min``
    (training), ``failed`` cases (summed over the row's runs), ``BN stats`` used and ``run`` (the
    provenance label of :func:`run_label`, with every seed).

    Raises:
        ValueError: a result does not validate, or two results of one row have the same seed (the same run twice).
    """
    import pandas as pd

    groups: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        validate_result(r)
        if kind is None or run_kind(r) == kind:
            groups.setdefault(_setting_key(r), []).append(r)
    rows = [_table_row(runs) for runs in groups.values()]
    if not rows:
        return pd.DataFrame(rows)
    df = pd.DataFrame(rows).sort_values(["labeled", "method", "losses"], kind="stable").reset_index(drop=True)
    drop = [c for c in df.columns if c.endswith(" sd")] if df["n_seeds"].max() < 2 else []
    if df[OTHER_BN_COLUMN].isna().all():
        drop += [OTHER_BN_COLUMN, f"{OTHER_BN_COLUMN} sd"]
    return df.drop(columns=[c for c in drop if c in df.columns])


def _setting_key(r: dict[str, Any]) -> str:
    """Everything that makes a run but its seed: config without ``train.seed``, iterations, device, evaluation."""
    config = {**r["config"], "train": {k: v for k, v in r["config"]["train"].items() if k != "seed"}}
    return json.dumps([config, r["iterations"], r["device"], r["eval_mode"], r.get("bn_stats", "ema")], sort_keys=True)


def _table_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    seeds = [r["seed"] for r in runs]
    if len(set(seeds)) < len(seeds):
        names = ", ".join(str(r.get("name") or r["seed"]) for r in runs)
        raise ValueError(f"results {names} are the same run (same setting and seed) more than once")
    first = runs[0]
    values = {column: [_row_numbers(r)[column] for r in runs] for column in MEAN_COLUMNS}
    row: dict[str, Any] = {
        "method": "DKUXNet" if first["config"]["model"]["arch"] == "dkuxnet" else "V-Net",
        "losses": ABLATION_ROWS[first["config"]["loss"]["ablation"]], "labeled": first["labeled_num"],
    }
    for column in MEAN_COLUMNS[1:]:  # the scores first, where a reader looks
        row[column], row[f"{column} sd"] = _mean_sd(values[column])
    row.update({"iterations": first["iterations"], "schedule": first["schedule"], "n_seeds": len(runs)})
    row["wall min"], row["wall min sd"] = _mean_sd(values["wall min"])
    row["failed"] = sum(r["n_failed"] for r in runs)
    row["BN stats"] = first.get("bn_stats", "ema")
    row["run"] = run_label(first, seeds=sorted(seeds))
    return row


def _row_numbers(r: dict[str, Any]) -> dict[str, float]:
    other = r.get("bn_stats_other")
    return {
        "wall min": r["wall_time_s"] / 60, "Dice %": 100 * _num(r["metrics"]["dice"]["mean"]),
        "Jaccard %": 100 * _num(r["metrics"]["jaccard"]["mean"]), "95HD": _num(r["metrics"]["hd95"]["mean"]),
        "ASD": _num(r["metrics"]["asd"]["mean"]),
        OTHER_BN_COLUMN: 100 * _num(other["metrics"]["dice"]["mean"]) if other else math.nan,
    }


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; NaN for one value); NaN in, NaN out."""
    n = len(xs)
    mean = math.fsum(xs) / n
    if n < 2 or math.isnan(mean):
        return mean, math.nan
    return mean, math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))


def run_label(r: dict[str, Any], seeds: list[int] | None = None) -> str:
    """Short provenance label of one of our runs, e.g. ``preset=paper seed=1337 15000 it (full) …``; with
    ``seeds`` of more than one run, ``seeds=1337,1338,1339`` instead of the run's own seed."""
    sched = f"{r['iterations']} it (full)" if r["schedule"] == "full" else r["schedule"]
    seed = f"seeds={','.join(map(str, seeds))}" if seeds and len(seeds) > 1 else f"seed={r['seed']}"
    return f"preset={r['preset']} {seed} {sched} on {r['device']}, eval={r['eval_mode']}"


def git_commit(package: Path | None = None) -> str:
    """Commit of the package's own repository, ``+dirty`` when tracked files are modified.

    "Own" means the repository whose top level is the folder that holds the ``package`` folder (default:
    this package's folder), as in a clone of the project. A package copied into some other repository, or
    installed into site-packages, has none: then the ``DKUXNET_COMMIT`` environment variable (set it when
    running a copy of the tree without ``.git``), else ``"unknown"``.
    """
    pkg = Path(package or Path(__file__).resolve().parent).resolve()

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(pkg), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() == pkg.parent:
            dirty = git("status", "--porcelain", "--untracked-files=no")
            return git("rev-parse", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("DKUXNET_COMMIT") or "unknown"


def device_name(device: Any) -> str:
    """Human-readable device: the CUDA card's name, or ``cpu (<machine>)``."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{dev.type} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def to_json_safe(x: Any) -> Any:
    """Copy of ``x`` with NaN / ±inf floats as ``None`` and tuples as lists (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): to_json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_json(path: Path, obj: Any) -> None:
    """Write strict JSON atomically (temporary file in the same folder, fsync, :func:`os.replace`)."""
    write_text_atomic(Path(path), json.dumps(to_json_safe(obj), indent=1, allow_nan=False) + "\n")


def _num(x: Any) -> float:
    return math.nan if x is None else float(x)


def _check_schedule(schedule: str, iterations: int, preset: str) -> None:
    """``schedule`` must be exactly :func:`schedule_label` of ``iterations`` and the preset's full schedule."""
    if schedule != "full" and not _SHORTENED.match(schedule):
        raise ValueError(f"result field 'schedule' must be 'full' or 'shortened: N of M iterations', got {schedule!r}")
    expected = schedule_label(iterations, preset)
    if schedule != expected:
        raise ValueError(
            f"result field 'schedule' {schedule!r} disagrees with iterations={iterations} of preset {preset!r} "
            f"(expected {expected!r})"
        )
