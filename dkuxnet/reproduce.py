"""Run profiles for the notebooks and the papermill driver behind ``dkuxnet reproduce``.

Four profiles fill in whatever a notebook's ``parameters`` cell leaves empty:

* ``smoke`` — the synthetic phantom (written on first use), the ``tiny`` preset and a shortened
  schedule; minutes on a CPU. Its numbers say the code runs, nothing about the paper.
* ``paper`` — the real LA folder, the ``paper`` preset and its full schedule; needs a GPU with room
  for 2 views × (2 + 2) volumes (an 80 GB card).
* ``colab`` — the ``paper`` profile with :data:`COLAB_CHANGES`, the smallest change to the method that
  fits a 16 GB card (Colab's T4, an L4); see :data:`COLAB_NOTE`.
* ``cpu`` — the real LA folder at ½ resolution on 2 CPU cores: the ``cpu`` preset (its full schedule, about
  45 min), and the V-Net baseline on the same grid and patch given the same wall-clock time
  (:data:`CPU_VNET_CHANGES`); see :data:`CPU_NOTE`. Its default grid is :data:`CPU_CELLS`.

:func:`reproduce` runs a grid of :class:`Cell` (preset, loss ablation, label ratio, seed), inline or on a
local or Slurm executor, resumably (:mod:`dkuxnet.grid`); :func:`run_cell` executes the notebooks of one cell.

Paths are relative to the notebooks' working directory (the repository's ``notebooks/`` folder),
so the same defaults work in Jupyter, in the book build and under :func:`reproduce`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dkuxnet.config import ABLATIONS, PRESETS, Config, get_preset
from dkuxnet.errors import DataError
from dkuxnet.results import EVAL_MODES

if TYPE_CHECKING:
    from dkuxnet.grid.job import GridSpec
    from dkuxnet.grid.slurm import SlurmOptions

PROFILES = ("smoke", "paper", "colab", "cpu")
NOTEBOOKS = ("03_train", "04_evaluate")
DEFAULT_RATIOS = (0.05, 0.1, 0.2)  # the paper's label ratios: the grid of every profile but cpu
DEFAULT_SEEDS = (1337,)
SMOKE_ITERATIONS = 40  # smoke training run (03_train) and each smoke ablation row (05_ablation)
SMOKE_PHANTOM_SHAPE = (64, 64, 48)  # small enough for a CPU protocol evaluation in seconds
# Smoke changes to the tiny preset: about 5x less work per step than its 48x48x32 patches at 2 + 2
# volumes, so that the whole book builds on a 2-core CPU in minutes; lr 0.01 so that 40 steps give
# non-empty phantom predictions (with the preset's 1e-3 they stay empty until ~150 steps).
SMOKE_TINY_CHANGES = (
    ("data.patch_size", (32, 32, 32)), ("data.labeled_bs", 1), ("data.unlabeled_bs", 1), ("train.lr", 0.01),
)
SMOKE_NOTE = (
    "synthetic phantom, tiny preset (32³ patches, batch 1 + 1, lr 0.01), {device}, "
    f"a {SMOKE_ITERATIONS}-iteration test schedule (the tiny preset's own) — not comparable to the paper"
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


def default_preset(profile: str) -> str:
    """The preset a profile runs when none is named: ``tiny`` (smoke), ``cpu`` (cpu), else ``paper``."""
    return {"smoke": "tiny", "cpu": "cpu"}.get(profile, "paper")


def resolve_ablation(preset: str, ablation: str) -> str:
    """``ablation``, or the preset's own ``loss.ablation`` when it is empty.

    Raises:
        ValueError: ``ablation`` is neither empty nor one of :data:`ABLATIONS`, or ``preset`` is unknown.
    """
    if ablation and ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {ABLATIONS} or empty (the preset's own), got {ablation!r}")
    return ablation or get_preset(preset).loss.ablation


@dataclass(frozen=True)
class Cell:
    """One run of a :func:`reproduce` grid: preset, loss ablation, label ratio and seed.

    ``ablation`` is resolved (one of :data:`ABLATIONS`, never empty), so that :attr:`name` is stable.
    A cell is what a cluster launcher submits as one job (:func:`run_cell`).
    """

    preset: str
    ablation: str
    label_ratio: float
    seed: int

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {self.preset!r}")
        if self.ablation not in ABLATIONS:
            raise ValueError(f"ablation must be one of {ABLATIONS}, got {self.ablation!r}")
        if not 0.0 < self.label_ratio <= 1.0:
            raise ValueError(f"label_ratio must be in (0, 1], got {self.label_ratio}")

    @property
    def name(self) -> str:
        """``<preset>-<ablation>-r<ratio>-s<seed>``, e.g. ``cpu-all-r0.1-s1337``."""
        return f"{self.preset}-{self.ablation}-r{self.label_ratio}-s{self.seed}"


# The cpu profile's default grid: the cpu preset with all losses, its supervised ablation, and the V-Net
# baseline (CPU_VNET_CHANGES, CPU_VNET_ITERATIONS), at label ratio 0.1 and one seed; run one after the other.
CPU_CELLS = (Cell("cpu", "all", 0.1, 1337), Cell("cpu", "seg", 0.1, 1337), Cell("vnet", "seg", 0.1, 1337))


@dataclass(frozen=True)
class Settings:
    """Fully resolved parameters of one notebook run (see :func:`resolve_profile`)."""

    profile: str
    data_dir: Path
    preset: str
    ablation: str
    label_ratio: float
    max_iterations: int
    seed: int
    device: str
    run_dir: Path
    fallback: str = ""  # why the requested profile was replaced (:func:`colab_support`), else empty

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
            note = CPU_NOTE.format(preset=self.preset, iterations=self.max_iterations, device=self.device)
            return f"{note} ({self.fallback})" if self.fallback else note
        return f"{self.profile} profile: LA data, preset {self.preset}, {self.max_iterations} iterations, {self.device}"

    @property
    def result_note(self) -> str | None:
        """:attr:`note` for results that differ from the paper's setting (smoke, colab), else None."""
        return self.note if self.smoke or self.colab or self.profile == "cpu" else None

    def config(self, **changes: Any) -> Config:
        """The preset with this run's loss ablation, label ratio, schedule and seed (plus dotted ``changes``).

        A smoke run of the ``tiny`` preset also gets :data:`SMOKE_TINY_CHANGES`; a colab run
        :data:`COLAB_CHANGES`; the V-Net of the cpu profile :data:`CPU_VNET_CHANGES`.
        """
        profile_changes = dict(SMOKE_TINY_CHANGES) if self.smoke and self.preset == "tiny" else {}
        if self.colab:
            profile_changes = dict(COLAB_CHANGES)
        if self.profile == "cpu" and self.preset == "vnet":
            profile_changes = dict(CPU_VNET_CHANGES)
        return get_preset(self.preset).override(**{
            **profile_changes, "loss.ablation": self.ablation, "data.label_ratio": self.label_ratio,
            "train.max_iterations": self.max_iterations, "train.seed": self.seed, **changes,
        })


COLAB_CARDS = "an L4 (24 GB) or an A100"  # cards with bf16 and at least 16 GB that the colab profile is meant for
COLAB_FP32_GIB = 28  # tools/traffic.py --peak: the colab step without bf16, fp32-sized


def colab_support(card: str | None, bf16: bool) -> tuple[str, str]:
    """The profile a ``colab`` run really gets on this card, and why (empty when it is ``colab`` itself).

    The ``colab`` profile trains the ``paper`` preset in bf16 at 1 + 1 volumes per view (about 12.6 GiB
    estimated). Without a GPU it falls back to the ``cpu`` profile; on a card without bf16 (a T4) it does not
    fit in fp32 (about 28 GiB estimated), so the card runs the ``cpu`` profile's model instead. None of this
    has been measured on a GPU yet.
    """
    if card is None:
        return "cpu", "no GPU: the colab profile needs a CUDA card with bf16; running the cpu profile instead"
    if not bf16:
        return "cpu", (
            f"{card} has no bf16: the colab profile would need about {COLAB_FP32_GIB} GiB in fp32 (estimated, not "
            f"measured) and cannot train here; running the cpu profile's model on this card instead (use "
            f"{COLAB_CARDS} for the colab profile)"
        )
    return "colab", ""


def _card() -> tuple[str | None, bool]:
    import torch

    if not torch.cuda.is_available():
        return None, False
    return torch.cuda.get_device_name(), torch.cuda.is_bf16_supported()


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_profile(
    profile: str, data_dir: str = "", preset: str = "", label_ratio: float = 0.1, max_iterations: int = 0,
    seed: int = 1337, device: str = "", run_dir: str = "", ablation: str = "",
) -> Settings:
    """Fill empty notebook parameters with the profile's defaults.

    Args:
        profile: one of :data:`PROFILES`.
        data_dir: data folder; empty means ``../_build/phantom`` (smoke) or ``../data/LA`` (paper, colab).
        preset: model preset; empty means :func:`default_preset` (``tiny``, ``cpu`` or ``paper``).
        label_ratio: labeled fraction of ``train.list``.
        max_iterations: 0 means :data:`SMOKE_ITERATIONS` (smoke) or the preset's full schedule.
        seed: training seed.
        device: empty means ``cuda`` when available, else ``cpu``.
        run_dir: empty means ``../_build/runs/smoke/<cell>`` (smoke) or ``../runs/<profile>/<cell>``, ``<cell>``
            being the :attr:`Cell.name` of preset, ablation, ratio and seed, e.g. ``cpu-all-r0.1-s1337``.
        ablation: loss ablation, one of :data:`ABLATIONS`; empty means the preset's own.
    """
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    if not 0.0 < label_ratio <= 1.0:
        raise ValueError(f"label_ratio must be in (0, 1], got {label_ratio}")
    if max_iterations < 0:
        raise ValueError(f"max_iterations must be >= 0 (0 means the profile default), got {max_iterations}")
    fallback = ""
    if profile == "colab":
        card, bf16 = _card()
        profile, fallback = colab_support(card, bf16)
        if fallback:
            print(f"note: {fallback}")
            preset, device = "" if preset in ("", "paper") else preset, device or ("cuda" if card else "cpu")
    smoke = profile == "smoke"
    preset = preset or default_preset(profile)
    cell = Cell(preset, resolve_ablation(preset, ablation), label_ratio, seed)
    if not max_iterations:
        full = get_preset(preset).train.max_iterations
        if profile == "cpu" and preset == "vnet":
            full = CPU_VNET_ITERATIONS
        max_iterations = SMOKE_ITERATIONS if smoke else full
    base = "../_build/runs" if smoke else "../runs"
    return Settings(
        profile=profile, data_dir=Path(data_dir or ("../_build/phantom" if smoke else "../data/LA")),
        preset=preset, ablation=cell.ablation, label_ratio=label_ratio, max_iterations=max_iterations, seed=seed,
        device=device or ("cpu" if profile == "cpu" else _default_device()),
        run_dir=Path(run_dir or f"{base}/{profile}/{cell.name}"), fallback=fallback,
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
    """One cell of :func:`reproduce` in a profile: its run folder and papermill parameters."""

    cell: Cell
    run_dir: Path
    parameters: dict[str, Any]

    @property
    def name(self) -> str:
        """The cell's name, also the run folder's."""
        return self.cell.name


def plan_cells(
    profile: str, ratios: Sequence[float] | None = None, seeds: Sequence[int] | None = None,
    presets: Sequence[str] | None = None, ablations: Sequence[str] | None = None,
) -> list[Cell]:
    """The grid presets x ablations x ratios x seeds, ordered by ratio, seed, preset, then ablation.

    An axis left as None takes the profile's default: its preset (:func:`default_preset`), the preset's own
    ablation, :data:`DEFAULT_RATIOS` (0.1 in the cpu profile) and :data:`DEFAULT_SEEDS`. In the cpu profile
    with every axis None the grid is :data:`CPU_CELLS`.
    """
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    axes = {"ratios": ratios, "seeds": seeds, "presets": presets, "ablations": ablations}
    if profile == "cpu" and all(axis is None for axis in axes.values()):
        return list(CPU_CELLS)
    for name, axis in axes.items():
        if axis is not None and not axis:
            raise ValueError(f"{name} must name at least one value")
    return [
        Cell(preset, resolve_ablation(preset, ablation), float(ratio), int(seed))
        for ratio in ratios or ((0.1,) if profile == "cpu" else DEFAULT_RATIOS)
        for seed in seeds or DEFAULT_SEEDS
        for preset in presets or (default_preset(profile),)
        for ablation in ablations or ("",)
    ]


def default_runs_dir(profile: str) -> Path:
    """``runs/<profile>``: where :func:`reproduce` puts a profile's run folders when not told otherwise."""
    return Path("runs") / profile


def plan_cell(
    cell: Cell, profile: str, runs_dir: Path, data_dir: Path | None = None, max_iterations: int | None = None,
    device: str | None = None,
) -> PlannedRun:
    """The run folder ``runs_dir/<cell name>`` (absolute) and the notebooks' parameters for ``cell``."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    run_dir = Path(runs_dir).resolve() / cell.name
    parameters = {
        "profile": profile, "preset": cell.preset, "ablation": cell.ablation, "label_ratio": float(cell.label_ratio),
        "seed": int(cell.seed), "run_dir": str(run_dir), "data_dir": str(Path(data_dir).resolve()) if data_dir else "",
        "max_iterations": int(max_iterations or 0), "device": device or "",
    }
    return PlannedRun(cell=cell, run_dir=run_dir, parameters=parameters)


def plan_runs(
    profile: str, ratios: Sequence[float] | None = None, seeds: Sequence[int] | None = None,
    data_dir: Path | None = None, runs_dir: Path | None = None, max_iterations: int | None = None,
    device: str | None = None, presets: Sequence[str] | None = None, ablations: Sequence[str] | None = None,
) -> list[PlannedRun]:
    """The runs :func:`reproduce` executes (:func:`plan_cells`), with absolute paths (cwd independent).

    ``runs_dir`` None means ``runs/<profile>`` (:func:`default_runs_dir`).
    """
    return [
        plan_cell(cell, profile, runs_dir or default_runs_dir(profile), data_dir, max_iterations, device)
        for cell in plan_cells(profile, ratios, seeds, presets, ablations)
    ]


def notebooks_dir() -> Path:
    """The repository's ``notebooks/`` folder (present in a source checkout, not in a wheel)."""
    folder = Path(__file__).resolve().parents[1] / "notebooks"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found: reproduce needs a source checkout of dkuxnet")
    return folder


def run_cell(
    cell: Cell, profile: str, runs_dir: Path, data_dir: Path | None = None, max_iterations: int | None = None,
    device: str | None = None, progress: bool = True, eval_mode: str = "protocol",
) -> dict[str, Any]:
    """Execute ``03_train`` then ``04_evaluate`` (``mode=eval_mode``) with papermill for one cell; return its record.

    The run folder ``runs_dir/<cell name>/`` (:func:`plan_cell`) receives the executed notebooks and
    the run's outputs (``last.pt``, ``metrics.jsonl``, ``eval/summary.json``, ...). A run with a ``last.pt``
    resumes it (a finished run is then only re-evaluated), except a smoke run whose ``eval/summary.json``
    exists: that one starts over.

    Returns:
        the record ``{"cell", <parameters>, "resume", <evaluation summary>, "status", "start", "end", "seconds",
        "host", "job_id"}``: status ``ok``, or ``failed`` with ``error`` (the failing cell's exception) and
        ``log`` (the executed notebook that shows it) when a notebook raised; start and end are UTC ISO times,
        seconds the wall time of the cell; host and job id (:mod:`dkuxnet.grid.identity`) where it ran.

    Raises:
        ValueError: an unknown profile or evaluation mode.
    """
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    from dkuxnet.grid.identity import host, job_id

    if eval_mode not in EVAL_MODES:
        raise ValueError(f"eval_mode must be one of {EVAL_MODES}, got {eval_mode!r}")
    source = notebooks_dir()
    run = plan_cell(cell, profile, runs_dir, data_dir, max_iterations, device)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    evaluated = (run.run_dir / "eval" / "summary.json").is_file()
    resume = (run.run_dir / "last.pt").is_file() and not (profile == "smoke" and evaluated)
    start, clock = datetime.now(timezone.utc), time.perf_counter()
    summary: dict[str, Any] = {}
    status: dict[str, Any] = {"status": "ok"}
    extra = {"03_train": {"resume": resume}, "04_evaluate": {"mode": eval_mode}}
    try:
        for name in NOTEBOOKS:
            executed = run.run_dir / f"{name}.ipynb"
            pm.execute_notebook(
                source / f"{name}.ipynb", executed, parameters={**run.parameters, **extra[name]},
                cwd=str(source), kernel_name="python3", progress_bar=progress,
            )
        summary = json.loads((run.run_dir / "eval" / "summary.json").read_text())
    except PapermillExecutionError as exc:
        status = {"status": "failed", "error": f"{exc.ename}: {exc.evalue}", "log": str(executed)}
    return {
        "cell": cell.name, **run.parameters, "resume": resume, **summary, **status, "host": host(), "job_id": job_id(),
        "start": start.isoformat(timespec="seconds"),
        "end": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - clock, 1),
    }


def grid_spec(
    profile: str, data_dir: Path | None = None, runs_dir: Path | None = None, results_dir: Path | None = None,
    max_iterations: int | None = None, device: str | None = None, eval_mode: str = "protocol",
) -> GridSpec:
    """What the cells of one :func:`reproduce` grid share; ``runs_dir`` None means ``runs/<profile>``
    (:func:`default_runs_dir`), ``results_dir`` None means ``<runs_dir>/results``."""
    from dkuxnet.grid.job import GridSpec

    runs = Path(runs_dir or default_runs_dir(profile))
    return GridSpec(profile, runs, Path(results_dir) if results_dir else runs / "results", data_dir, max_iterations,
                    device, eval_mode)


def reproduce(
    profile: str, ratios: Sequence[float] | None = None, seeds: Sequence[int] | None = None,
    data_dir: Path | None = None, runs_dir: Path | None = None, max_iterations: int | None = None,
    device: str | None = None, progress: bool = True, presets: Sequence[str] | None = None,
    ablations: Sequence[str] | None = None, *, eval_mode: str = "protocol", results_dir: Path | None = None,
    launcher: str = "inline", gpus: int = 0, jobs: int = 1, slurm: SlurmOptions | None = None,
) -> list[dict[str, Any]]:
    """Run every cell of :func:`plan_cells` that is not done yet, with :func:`dkuxnet.grid.launch.run_grid`.

    Each cell runs in ``runs_dir/<cell name>/`` (:func:`grid_spec`) through :func:`run_cell`: ``inline``
    one after the other in this process, ``local`` on submitit's local executor (``gpus`` cells at once, one
    GPU each, or ``jobs`` CPU cells at once), ``slurm`` as Slurm jobs (``slurm`` options). A cell whose
    ``cell.json`` says it finished with the same configuration is skipped; an interrupted one resumes its
    ``last.pt``; a failed cell is recorded and the grid goes on. Each finished cell's result goes to
    ``results_dir/<profile>/<cell>.json`` (default ``<runs_dir>/results``), where
    :func:`dkuxnet.results.load_results` reads it. The records are written to ``runs_dir/summary.json`` and
    returned; :func:`dkuxnet.grid.state.status_table` of :func:`dkuxnet.grid.launch.grid_states` prints the
    grid's state.
    """
    from dkuxnet.grid.launch import run_grid

    spec = grid_spec(profile, data_dir, runs_dir, results_dir, max_iterations, device, eval_mode)
    cells = plan_cells(profile, ratios, seeds, presets, ablations)
    return run_grid(cells, spec, launcher, gpus=gpus, jobs=jobs, slurm=slurm, progress=progress)
