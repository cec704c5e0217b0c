"""Run profiles for the notebooks and the papermill driver behind ``dkuxnet reproduce``.

Three profiles fill in whatever a notebook's ``parameters`` cell leaves empty:

* ``smoke`` — the synthetic phantom (written on first use), the ``tiny`` preset and a shortened
  schedule; minutes on a CPU. Its numbers say the code runs, nothing about the paper.
* ``paper`` — the real LA folder, the ``paper`` preset and its full schedule; needs a GPU with room
  for 2 views × (2 + 2) volumes (an 80 GB card).
* ``colab`` — the ``paper`` profile with :data:`COLAB_CHANGES`, the smallest change to the method that
  fits a 16 GB card (Colab's T4, an L4); see :data:`COLAB_NOTE`.
* ``cpu`` — the real LA folder at ½ resolution on 2 CPU cores: the ``cpu`` preset (its full schedule, about
  45 min), and the V-Net baseline on the same grid and patch given the same wall-clock time
  (:data:`CPU_VNET_CHANGES`); see :data:`CPU_NOTE`.

Paths are relative to the notebooks' working directory (the repository's ``notebooks/`` folder),
so the same defaults work in Jupyter, in the book build and under :func:`reproduce`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dkuxnet.config import Config, get_preset
from dkuxnet.errors import DataError

PROFILES = ("smoke", "paper", "colab", "cpu")
NOTEBOOKS = ("03_train", "04_evaluate")
SMOKE_ITERATIONS = 40  # smoke training run (03_train) and each smoke ablation row (05_ablation)
SMOKE_PHANTOM_SHAPE = (64, 64, 48)  # small enough for a CPU protocol evaluation in seconds
# Smoke changes to the tiny preset: about 5x less work per step than its 48x48x32 patches at 2 + 2
# volumes, so that the whole book builds on a 2-core CPU in minutes; lr 0.01 so that 40 steps give
# non-empty phantom predictions (with the preset's 1e-3 they stay empty until ~150 steps).
SMOKE_TINY_CHANGES = (
    ("data.patch_size", (32, 32, 32)), ("data.labeled_bs", 1), ("data.unlabeled_bs", 1), ("train.lr", 0.01),
)
SMOKE_NOTE = (
    "synthetic phantom, tiny preset (32³ patches, batch 1 + 1, lr 0.01), {device}, shortened schedule — "
    "not comparable to the paper"
)
# Colab changes to the paper preset, the smallest we found that fits a 16 GB card (tools/memprobe.py estimates
# in results/perf/memprobe_cpu.json). Other presets run as they are (the V-Net fits; official and
# authors-script train 1 or 2 volumes per view).
# * one labeled + one unlabeled volume per view instead of 2 + 2: 4 volumes per step instead of 8
#   (activation memory is linear in the number of volumes);
# * activation checkpointing, the preset's default, stated because the fit depends on it;
# * L_qdc at voxel granularity (the other reading of the paper, ``LossConfig.qdc_granularity``): its volume-level
#   form keeps several full-resolution N×V copies of S through the loss's backward, which at 1 + 1 alone
#   still needs about twice the card. L_segc stays at volume level (2 volumes per view: one negative each).
COLAB_CHANGES = (
    ("data.labeled_bs", 1), ("data.unlabeled_bs", 1), ("model.checkpoint_activations", True),
    ("loss.qdc_granularity", "voxel"),
)
COLAB_NOTE = (
    "colab profile: LA data, preset {preset} at batch 1 + 1 per view (the paper's: 2 + 2) and voxel-level L_qdc, "
    "{iterations} iterations, {device} — no measured Dice for this setting"
)

# The V-Net baseline of the cpu profile: the cpu preset's grid and patch, and the wall-clock time of a cpu
# run (900 steps × 2.94 s ≈ 2,650 s at 1.19 s a V-Net step, results/perf/bench_cpu_2cores.json); UA-MT's
# recipe with its lr step moved to the same fraction of the run (2,500 of 6,000 → 917 of 2,200).
CPU_VNET_ITERATIONS = 2200
CPU_VNET_CHANGES = (
    ("data.patch_size", (64, 64, 32)), ("data.resample", 2), ("train.lr_step", 917),
    ("train.bn_recompute_batches", 25),
)
CPU_NOTE = "real LA, ½ resolution, CPU: preset {preset}, {iterations} iterations, {device} — not the paper's setting"


@dataclass(frozen=True)
class Settings:
    """Fully resolved parameters of one notebook run (see :func:`resolve_profile`)."""

    profile: str
    data_dir: Path
    preset: str
    label_ratio: float
    max_iterations: int
    seed: int
    device: str
    run_dir: Path

    @property
    def smoke(self) -> bool:
        """True for the smoke profile (phantom-sized, not comparable to the paper)."""
        return self.profile == "smoke"

    @property
    def colab(self) -> bool:
        """True when the colab profile changes this run's preset (:data:`COLAB_CHANGES`, ``paper`` only)."""
        return self.profile == "colab" and self.preset == "paper"

    @property
    def note(self) -> str:
        """One-line label to print next to every number this run produces."""
        if self.smoke:
            return SMOKE_NOTE.format(device=self.device.split(":")[0].upper())
        if self.colab:
            return COLAB_NOTE.format(preset=self.preset, iterations=self.max_iterations, device=self.device)
        if self.profile == "cpu":
            return CPU_NOTE.format(preset=self.preset, iterations=self.max_iterations, device=self.device)
        return f"{self.profile} profile: LA data, preset {self.preset}, {self.max_iterations} iterations, {self.device}"

    @property
    def result_note(self) -> str | None:
        """:attr:`note` for results that differ from the paper's setting (smoke, colab), else None."""
        return self.note if self.smoke or self.colab or self.profile == "cpu" else None

    def config(self, **changes: Any) -> Config:
        """The preset with this run's label ratio, schedule and seed (plus dotted ``changes``).

        A smoke run of the ``tiny`` preset also gets :data:`SMOKE_TINY_CHANGES`; a colab run
        :data:`COLAB_CHANGES`; the V-Net of the cpu profile :data:`CPU_VNET_CHANGES`.
        """
        profile_changes = dict(SMOKE_TINY_CHANGES) if self.smoke and self.preset == "tiny" else {}
        if self.colab:
            profile_changes = dict(COLAB_CHANGES)
        if self.profile == "cpu" and self.preset == "vnet":
            profile_changes = dict(CPU_VNET_CHANGES)
        return get_preset(self.preset).override(**{
            **profile_changes, "data.label_ratio": self.label_ratio, "train.max_iterations": self.max_iterations,
            "train.seed": self.seed, **changes,
        })


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_profile(
    profile: str, data_dir: str = "", preset: str = "", label_ratio: float = 0.1, max_iterations: int = 0,
    seed: int = 1337, device: str = "", run_dir: str = "",
) -> Settings:
    """Fill empty notebook parameters with the profile's defaults.

    Args:
        profile: one of :data:`PROFILES`.
        data_dir: data folder; empty means ``../_build/phantom`` (smoke) or ``../data/LA`` (paper, colab).
        preset: model preset; empty means ``tiny`` (smoke) or ``paper``.
        label_ratio: labeled fraction of ``train.list``.
        max_iterations: 0 means :data:`SMOKE_ITERATIONS` (smoke) or the preset's full schedule.
        seed: training seed.
        device: empty means ``cuda`` when available, else ``cpu``.
        run_dir: empty means ``../_build/runs/smoke-r{ratio}-s{seed}`` or ``../runs/{profile}-r{ratio}-s{seed}``.
    """
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    if not 0.0 < label_ratio <= 1.0:
        raise ValueError(f"label_ratio must be in (0, 1], got {label_ratio}")
    if max_iterations < 0:
        raise ValueError(f"max_iterations must be >= 0 (0 means the profile default), got {max_iterations}")
    smoke = profile == "smoke"
    preset = preset or {"smoke": "tiny", "cpu": "cpu"}.get(profile, "paper")
    if not max_iterations:
        full = get_preset(preset).train.max_iterations
        if profile == "cpu" and preset == "vnet":
            full = CPU_VNET_ITERATIONS
        max_iterations = SMOKE_ITERATIONS if smoke else full
    base = "../_build/runs" if smoke else "../runs"
    return Settings(
        profile=profile, data_dir=Path(data_dir or ("../_build/phantom" if smoke else "../data/LA")),
        preset=preset, label_ratio=label_ratio, max_iterations=max_iterations, seed=seed,
        device=device or ("cpu" if profile == "cpu" else _default_device()),
        run_dir=Path(run_dir or f"{base}/{profile}-r{label_ratio}-s{seed}"),
    )


def prepare_data(settings: Settings, cases: int = 20) -> Path:
    """Return the data folder, writing the deterministic phantom first when a smoke run lacks it.

    The smoke phantom has ``cases`` cases (20: 16 train + 4 test), seed 0, shape
    :data:`SMOKE_PHANTOM_SHAPE` — larger than the tiny preset's 48 x 48 x 32 patch, small enough that
    a protocol sliding window needs a few dozen windows per case.

    Raises:
        DataError: the paper or colab profile's folder has no ``train.list`` (with the download command).
    """
    root = settings.data_dir
    if (root / "train.list").is_file():
        return root
    if not settings.smoke:
        raise DataError(
            f"no LA data at {root}: download it with `python -m dkuxnet data download --dest {root}` "
            "or pass data_dir"
        )
    from dkuxnet.data.phantom import make_phantom

    make_phantom(root, cases=cases, seed=0, shape=SMOKE_PHANTOM_SHAPE)
    return root


def fresh_run_dir(run_dir: Path, smoke: bool, resume: bool = False) -> Path:
    """Create ``run_dir``; for a smoke run that does not resume, drop an old ``last.pt`` first.

    ``train`` refuses to overwrite a checkpoint without ``resume``. Smoke runs are throw-away, so
    re-running a smoke notebook starts over; a paper run keeps that protection.
    """
    run_dir = Path(run_dir)
    if smoke and not resume:
        (run_dir / "last.pt").unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def train_and_evaluate(settings: Settings, cfg: Config, out_dir: Path, mode: str = "protocol",
                       progress: bool = False) -> dict[str, Any]:
    """Train ``cfg`` into ``out_dir`` and evaluate its ``last.pt`` into ``out_dir/eval``.

    A smoke run always starts over; a paper run resumes an existing ``last.pt`` (a finished run is
    then only re-evaluated). Returns the evaluation summary of ``evaluate_checkpoint``.
    """
    from dkuxnet.evaluate import evaluate_checkpoint
    from dkuxnet.train import train

    resume = not settings.smoke and (Path(out_dir) / "last.pt").is_file()
    out_dir = fresh_run_dir(out_dir, settings.smoke, resume)
    train(cfg, data_dir=settings.data_dir, out_dir=out_dir, device=settings.device, resume=resume, progress=progress)
    return evaluate_checkpoint(out_dir / "last.pt", data_dir=settings.data_dir, out_dir=out_dir / "eval", mode=mode,
                               device=settings.device, progress=progress)


@dataclass(frozen=True)
class PlannedRun:
    """One (ratio, seed) run of :func:`reproduce`: its folder and papermill parameters."""

    name: str
    run_dir: Path
    parameters: dict[str, Any]


def plan_runs(
    profile: str, ratios: list[float], seeds: list[int], data_dir: Path | None = None,
    runs_dir: Path = Path("runs"), max_iterations: int | None = None, device: str | None = None,
) -> list[PlannedRun]:
    """The runs :func:`reproduce` executes, ratio-major, with absolute paths (cwd independent)."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    if not ratios or not seeds:
        raise ValueError("ratios and seeds must each name at least one value")
    runs: list[PlannedRun] = []
    for ratio in ratios:
        for seed in seeds:
            name = f"{profile}-r{ratio}-s{seed}"
            run_dir = Path(runs_dir).resolve() / name
            parameters = {
                "profile": profile, "label_ratio": float(ratio), "seed": int(seed), "run_dir": str(run_dir),
                "data_dir": str(Path(data_dir).resolve()) if data_dir else "",
                "max_iterations": int(max_iterations or 0), "device": device or "",
            }
            runs.append(PlannedRun(name=name, run_dir=run_dir, parameters=parameters))
    return runs


def notebooks_dir() -> Path:
    """The repository's ``notebooks/`` folder (present in a source checkout, not in a wheel)."""
    folder = Path(__file__).resolve().parents[1] / "notebooks"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found: reproduce needs a source checkout of dkuxnet")
    return folder


def reproduce(
    profile: str, ratios: list[float], seeds: list[int], data_dir: Path | None = None,
    runs_dir: Path = Path("runs"), max_iterations: int | None = None, device: str | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Execute ``03_train`` then ``04_evaluate`` with papermill for every ratio x seed.

    Each run folder ``runs_dir/<profile>-r<ratio>-s<seed>/`` receives the executed notebooks and the
    run's outputs (``last.pt``, ``metrics.jsonl``, ``eval/summary.json``, ...). The evaluation
    summaries, tagged with profile, ratio and seed, are collected into ``runs_dir/summary.json``
    and returned. A failing notebook raises papermill's ``PapermillExecutionError``.
    """
    import papermill as pm

    source = notebooks_dir()
    runs = plan_runs(profile, ratios, seeds, data_dir, runs_dir, max_iterations, device)
    records: list[dict[str, Any]] = []
    for run in runs:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        for name in NOTEBOOKS:
            pm.execute_notebook(
                source / f"{name}.ipynb", run.run_dir / f"{name}.ipynb", parameters=run.parameters,
                cwd=str(source), kernel_name="python3", progress_bar=progress,
            )
        summary = json.loads((run.run_dir / "eval" / "summary.json").read_text())
        records.append({"run": run.name, **run.parameters, **summary})
    out = Path(runs_dir) / "summary.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=2, default=str) + "\n")
    return records
