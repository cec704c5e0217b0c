"""``dkuxnet check-gpu``: does this machine run DKUXNet correctly, what can it train, and how fast?

One command for a Colab runtime, a workstation or a cluster node. It runs these stages in order, each
recorded in one JSON report (rewritten atomically after every stage); a failing stage is recorded with
its error and the later stages still run:

* ``env``        card, memory, compute capability, driver, torch / CUDA / cuDNN versions, commit;
* ``smoke``      the ``tiny`` preset's training step and protocol inference on the device;
* ``numeric``    a train-mode forward + loss + backward in fp32 on the device (TF32 off) against float64 on
                 the CPU, per parameter group, replaying the float64 run's kMaX assignments
                 (:mod:`dkuxnet.perf.numeric`);
* ``checkpoint`` activation checkpointing with the kMaX assignment replay against the plain step;
* ``bf16``       the step under bf16 autocast (CUDA's, or the CPU's) against fp32: fp32 islands and the loss;
* ``optimizer``  the optimiser the run builds (fused AdamW on CUDA) against torch's reference;
* ``host_sync``  no host conversion of a device tensor in the training step (and, on CUDA, none that
                 ``torch.cuda.set_sync_debug_mode`` reports) (:mod:`dkuxnet.perf.rehearsal`);
* ``bench``      :func:`dkuxnet.perf.bench.run_bench` of the target (a preset or a profile): ms per training
                 step, peak memory, protocol inference; a target that runs out of memory and needs more
                 than the card has "does not fit", and the smaller profiles are tried (:mod:`dkuxnet.perf.fit`);
* ``train``      a short run of :func:`dkuxnet.train.train` of the largest target that trains, on
                 ``data_dir`` (needs the LA data), with the BatchNorm statistics recomputed at its end;
* ``evaluate``   :func:`dkuxnet.evaluate.evaluate_checkpoint` in protocol mode on the test list with those
                 statistics, its Dice against :data:`DICE_FLOOR`, and the result in the ``results/`` schema;
* ``loop_check`` the batched protocol prediction against UA-MT's window-by-window loop.

Failures are failures: an exception or a wrong result fails its stage and the command exits 1. A
tolerance not yet measured on a card gives a warning with its numbers. The report's ``verdict`` says what
this card can run. The rehearsal (``rehearsal=True``) runs every stage with the ``tiny`` preset and a small
synthetic data set when no ``data_dir`` is given: under a minute on a CPU. It checks the command, not a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dkuxnet.checkpoint import load_checkpoint, model_from_state
from dkuxnet.data.la import read_list
from dkuxnet.errors import UserError
from dkuxnet.inference import resolve_device
from dkuxnet.perf import rehearsal
from dkuxnet.perf.bench import Budget, Row, bench_row, run_bench
from dkuxnet.perf.checktable import summary_table, verdict
from dkuxnet.perf.core import card_memory_gib, environment, now
from dkuxnet.perf.fit import Target, out_of_memory_verdict, preset_target, profile_target, smaller_targets
from dkuxnet.perf.loopcheck import loop_vs_batched
from dkuxnet.perf.numeric import train_step_vs_float64
from dkuxnet.results import build_result, write_json

SCHEMA = "dkuxnet-check-gpu-v2"
STAGES = ("env", "smoke", "numeric", "checkpoint", "bf16", "optimizer", "host_sync", "bench", "train", "evaluate",
          "loop_check")
STATUSES = ("ok", "warning", "failed", "skipped", "not applicable")
LOOP_DICE_TOLERANCE = 0.999  # fp32 batched vs fp32 loop: Dice below this warns
# Dice of the train stage's 100 iterations (label ratio 0.1, recomputed BatchNorm statistics) below which it
# warns: a first guess ("clearly not empty"), not yet measured on a card
DICE_FLOOR = 0.3
BN_RECOMPUTE_BATCHES = 25  # for a preset that does not recompute its statistics itself
REHEARSAL = {"preset": "tiny", "iterations": 2, "bench_steps": 1, "bench_warmup": 1, "bn_batches": 2}
REHEARSAL_PHANTOM = {"cases": 10, "shape": (48, 48, 32)}
RESULT_NOTE = ("check run of `dkuxnet check-gpu`: a short schedule that shows training and evaluation work "
               "on this machine; not a reproduction of the paper's numbers")


@dataclasses.dataclass(frozen=True)
class CheckPlan:
    """Settings of one ``check-gpu`` run, resolved and validated by :func:`make_plan`."""

    device: torch.device
    target: Target  # the preset or profile to benchmark and train
    data_dir: Path | None  # None: train, evaluate and loop_check are skipped
    iterations: int
    label_ratio: float
    bench_steps: int | None  # None: run_bench's default
    bench_warmup: int | None
    loop_cases: int
    rehearsal: bool
    work_dir: Path  # the training run and evaluation folders
    progress: bool

    @property
    def run_dir(self) -> Path:
        return self.work_dir / "run"

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "last.pt"

    def options(self) -> dict[str, Any]:
        """The plan as JSON-ready values (the report's ``options``)."""
        return {
            "device": str(self.device), "target": self.target.label, "preset": self.target.preset,
            "changes": self.target.changes, "data_dir": str(self.data_dir) if self.data_dir else None,
            "iterations": self.iterations, "label_ratio": self.label_ratio, "bench_steps": self.bench_steps,
            "bench_warmup": self.bench_warmup, "loop_cases": self.loop_cases, "rehearsal": self.rehearsal,
            "work_dir": str(self.work_dir),
        }


class StageSkipped(Exception):
    """Raised by a stage that does not apply; ``status`` is ``"skipped"`` or ``"not applicable"``."""

    def __init__(self, reason: str, status: str = "skipped") -> None:
        super().__init__(reason)
        self.status = status


def make_plan(
    work_dir: Path,
    data_dir: Path | None = None,
    device: str | torch.device | None = None,
    preset: str | None = None,
    profile: str | None = None,
    iterations: int | None = None,
    label_ratio: float = 0.1,
    bench_steps: int | None = None,
    loop_cases: int | None = None,
    rehearsal: bool = False,
    progress: bool = True,
) -> CheckPlan:
    """Validate the settings and fill the defaults (``paper``, 100 iterations, 1 loop case; rehearsal smaller).

    Raises:
        UserError: no CUDA device without ``rehearsal``; both ``preset`` and ``profile``; with ``rehearsal``
            a preset other than ``tiny`` or a profile other than ``smoke``; a bad ``data_dir`` (not an
            LA-layout folder), or a bad number.
    """
    dev = resolve_device(device)
    if dev.type != "cuda" and not rehearsal:
        raise UserError(
            f"no CUDA GPU to check (device {dev}; torch {torch.__version__}, built for CUDA {torch.version.cuda}, "
            f"sees {torch.cuda.device_count()} GPU). On Colab choose a GPU runtime (Runtime > Change runtime type); "
            f"to rehearse the check on the CPU pass --rehearsal"
        )
    if preset is not None and profile is not None:
        raise UserError(f"--preset {preset} and --profile {profile}: give one of them")
    if rehearsal and preset not in (None, REHEARSAL["preset"]):
        raise UserError(f"--preset {preset}: the rehearsal always runs the {REHEARSAL['preset']} preset")
    if rehearsal and profile not in (None, "smoke"):
        raise UserError(f"--profile {profile}: the rehearsal runs the tiny preset (or the smoke profile)")
    try:
        target = profile_target(profile) if profile else preset_target(
            preset or (REHEARSAL["preset"] if rehearsal else "paper"))
    except ValueError as exc:
        raise UserError(f"--preset / --profile: {exc}") from None
    iterations = iterations if iterations is not None else (REHEARSAL["iterations"] if rehearsal else 100)
    loop_cases = loop_cases if loop_cases is not None else 1
    bench_steps = bench_steps if bench_steps is not None else (REHEARSAL["bench_steps"] if rehearsal else None)
    for name, value, low in (("--iterations", iterations, 1), ("--loop-cases", loop_cases, 0),
                             ("--bench-steps", bench_steps if bench_steps is not None else 1, 1)):
        if value < low:
            raise UserError(f"{name} must be >= {low}, got {value}")
    if not 0 < label_ratio <= 1:
        raise UserError(f"--label-ratio must be in (0, 1], got {label_ratio}")
    if data_dir is not None:
        _check_data_dir(Path(data_dir))
    return CheckPlan(
        device=dev, target=target, data_dir=Path(data_dir) if data_dir is not None else None, iterations=iterations,
        label_ratio=label_ratio, bench_steps=bench_steps, bench_warmup=REHEARSAL["bench_warmup"] if rehearsal else None,
        loop_cases=loop_cases, rehearsal=rehearsal, work_dir=Path(work_dir), progress=progress,
    )


def _check_data_dir(path: Path) -> None:
    if not path.is_dir():
        raise UserError(f"--data-dir {path}: no such folder (get the data with `dkuxnet data download --dest {path}`)")
    for name in ("train.list", "test.list"):
        if not (path / name).is_file():
            raise UserError(f"--data-dir {path}: no {name}, not an LA-layout data folder "
                            f"(check it with `dkuxnet data check --data-dir {path}`)")


Done = dict[str, dict[str, Any]]  # the stages run so far, by name


def stage_env(plan: CheckPlan, done: Done) -> dict[str, Any]:
    """Card, driver and software versions; warns when the card has no native bf16 (before sm_80)."""
    dev = plan.device
    out: dict[str, Any] = environment(dev) | {
        "python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count(), "warnings": [],
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        out |= {"memory_gib": card_memory_gib(dev), "compute_capability": f"{props.major}.{props.minor}",
                "gpu_count": torch.cuda.device_count(), "nvidia_smi": _nvidia_smi()}
        if (props.major, props.minor) < (8, 0):
            out["warnings"].append(
                f"compute capability {props.major}.{props.minor}: no native bf16, so the bf16 presets run slowly; "
                f"train with --set train.precision=fp32")
    return out


def _nvidia_smi() -> str | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    query = ["--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    try:
        return subprocess.run([smi, *query], capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def stage_smoke(plan: CheckPlan, done: Done) -> dict[str, Any]:
    """The tiny preset's training step and protocol inference on the device."""
    row = run_bench(presets=["tiny"], device=plan.device, steps=plan.bench_steps or 2, warmup=1)["presets"]["tiny"]
    if "error" in row:
        raise RuntimeError(f"tiny training step or inference: {row['error']}")
    return {"ms_per_step": row["ms_per_step"], "infer_s_per_volume": row["infer_s_per_volume"]}


def stage_numeric(plan: CheckPlan, done: Done) -> dict[str, Any]:
    """:func:`~dkuxnet.perf.numeric.train_step_vs_float64` on the device."""
    return train_step_vs_float64(plan.device)


def stage_checkpoint(plan: CheckPlan, done: Done) -> dict[str, Any]:
    """:func:`~dkuxnet.perf.rehearsal.check_checkpoint_replay` on the device."""
    return rehearsal.check_checkpoint_replay(plan.device)


def stage_bf16(plan: CheckPlan, done: Done) -> dict[str, Any]:
    """:func:`~dkuxnet.perf.rehearsal.check_bf16` on the device."""
    return rehearsal.check_bf16(plan.device)


def stage_optimizer(plan: CheckPlan, done: Done) -> dict[str, Any]:
    """:func:`~dkuxnet.perf.rehearsal.check_optimizer` on the device."""
    return rehearsal.check_optimizer(plan.device)


def stage_host_sync(plan: CheckPlan, done: Done) -> dict[str, Any]:
    """:func:`~dkuxnet.perf.rehearsal.check_host_sync` on the device."""
    return rehearsal.check_host_sync(plan.device)


def _bench_target(plan: CheckPlan, target: Target) -> dict[str, Any]:
    variants = {target.label: (target.preset, target.changes)}
    result = run_bench(presets=[], device=plan.device, steps=plan.bench_steps, warmup=plan.bench_warmup,
                       variants=variants)
    return result["presets"][target.label]


def stage_bench(plan: CheckPlan, done: Done) -> dict[str, Any]:
    """The target's training step and inference; when it does not fit, the smaller profiles, largest first.

    Each tried target's ``fit`` is ``"trains"`` or ``"does not fit: …"``; an error that is not an explained
    out of memory fails the stage. Without a target that trains, ``inference_only`` says whether the
    target's protocol inference runs. Outside the rehearsal, once a target trains, the ``vnet`` step is
    benchmarked too.
    """
    card = card_memory_gib(plan.device)
    rows: dict[str, Any] = {}
    fit: dict[str, str] = {}
    failures: list[str] = []
    queue = [plan.target]
    vnet = Target("preset vnet", "vnet")
    while queue:
        target = queue.pop(0)
        row = rows[target.label] = _bench_target(plan, target)
        if "error" in row and not row.get("out_of_memory"):
            failures.append(f"{target.label}: {row['error']}")
            break
        explained, text, need = (True, "trains", 0.0) if "error" not in row else out_of_memory_verdict(target, card)
        fit[target.label] = text
        if not explained:
            failures.append(f"{target.label}: {text}")
            break
        if text == "trains":
            queue = [vnet] if not plan.rehearsal and target != vnet and vnet.label not in rows else []
        elif target == plan.target:
            queue = [t for t in smaller_targets(need) if t.label != target.label]
    trains = [label for label, verdict_ in fit.items() if verdict_ == "trains" and label != vnet.label]
    out: dict[str, Any] = {"presets": rows, "fit": fit, "trains": trains, "card_memory_gib": card, "warnings": []}
    if failures:
        raise RuntimeError("; ".join(failures))
    if not trains:
        out["inference_only"] = _inference_runs(plan)
    return out


def _inference_runs(plan: CheckPlan) -> bool:
    """Whether the target's protocol inference runs on the device (after its training step did not fit)."""
    row = Row(f"{plan.target.label}, inference", "infer", plan.target.preset, plan.target.changes)
    try:
        bench_row(row, plan.device, Budget(steps=1, warmup=1, row_seconds=1.0))
    except torch.OutOfMemoryError:
        return False
    return True


def trained_target(plan: CheckPlan, done: Done) -> Target:
    """The target the bench stage found training on this card: the plan's, or the largest smaller one."""
    bench = done.get("bench", {})
    if bench.get("status") not in ("ok", "warning"):
        raise StageSkipped("the bench stage did not pass: nothing known to train on this card")
    if not bench["trains"]:
        raise StageSkipped("no tried preset or profile trains on this card (see the bench stage)")
    label = bench["trains"][0]
    if label == plan.target.label:
        return plan.target
    kind, name = label.split(" ", 1)
    return profile_target(name) if kind == "profile" else Target(label, name)


def stage_train(plan: CheckPlan, done: Done) -> dict[str, Any]:
    """A short training run in ``work_dir/run`` of :func:`trained_target`, its BatchNorm statistics recomputed
    at the end (the preset's ``train.bn_recompute_batches``, else :data:`BN_RECOMPUTE_BATCHES`).

    A non-finite loss stops the run with :class:`~dkuxnet.errors.NonFiniteLossError`: the stage fails.
    """
    from dkuxnet.config import get_preset
    from dkuxnet.train import train

    if plan.data_dir is None:
        raise StageSkipped("no --data-dir: training needs the LA data (`dkuxnet data download --dest DIR`)")
    target = trained_target(plan, done)
    base = get_preset(target.preset).override(**target.changes)
    batches = REHEARSAL["bn_batches"] if plan.rehearsal else (base.train.bn_recompute_batches or BN_RECOMPUTE_BATCHES)
    cfg = base.override(**{
        "data.label_ratio": plan.label_ratio, "train.max_iterations": plan.iterations,
        "train.checkpoint_every": plan.iterations, "train.bn_recompute_batches": batches,
    })
    summary = train(cfg, data_dir=plan.data_dir, out_dir=plan.run_dir, device=plan.device, progress=plan.progress)
    rows = [json.loads(line) for line in (plan.run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {k: summary[k] for k in ("iterations", "schedule", "wall_s", "ms_per_step", "peak_gib", "device")} | {
        "target": target.label, "label_ratio": plan.label_ratio, "bn_recompute_batches": batches,
        "loss_curve": [[row["iteration"], row["loss"]] for row in rows],
    }


def stage_evaluate(plan: CheckPlan, done: Done) -> dict[str, Any]:
    """Protocol evaluation of the train stage's checkpoint on ``test.list`` with its recomputed BatchNorm
    statistics, its Dice against :data:`DICE_FLOOR` (a warning below it; not checked in the rehearsal, whose
    two iterations on synthetic data learn nothing), and its ``results/`` record."""
    from dkuxnet.evaluate import evaluate_checkpoint

    if plan.data_dir is None:
        raise StageSkipped("no --data-dir: evaluation needs the LA data")
    if not plan.checkpoint.is_file():
        raise StageSkipped("the train stage wrote no checkpoint")
    summary = evaluate_checkpoint(plan.checkpoint, data_dir=plan.data_dir, out_dir=plan.work_dir / "evaluate",
                                  mode="protocol", device=plan.device, progress=plan.progress, bn_stats="auto")
    name = f"{done['train'].get('target', plan.target.label).replace(' ', '-')}-ratio{plan.label_ratio}-check-gpu"
    dice_mean = summary["metrics"]["dice"]["mean"]
    warns = [] if plan.rehearsal or dice_mean >= DICE_FLOOR else [
        f"Dice {dice_mean:.3f} < floor {DICE_FLOOR} after {plan.iterations} iterations (floor not yet measured "
        f"on a card)"]
    return {k: summary[k] for k in ("n_cases", "n_failed", "metrics", "seconds_per_volume", "window", "bn_stats")} | {
        "dice_floor": None if plan.rehearsal else DICE_FLOOR,
        "result": build_result(summary, name=name, notes=RESULT_NOTE),
        "warnings": warns,
    }


def stage_loop_check(plan: CheckPlan, done: Done) -> dict[str, Any]:
    """Batched protocol prediction (fp32, and bf16 on CUDA) against the UA-MT loop (fp32) on test volumes."""
    if plan.data_dir is None:
        raise StageSkipped("no --data-dir: the loop check needs the LA test volumes")
    if not plan.checkpoint.is_file():
        raise StageSkipped("the train stage wrote no checkpoint")
    if plan.loop_cases == 0:
        raise StageSkipped("--loop-cases 0")
    model, cfg = model_from_state(load_checkpoint(plan.checkpoint), plan.device, name=str(plan.checkpoint))
    patch = tuple(cfg.data.patch_size)
    rows = [loop_vs_batched(model, plan.data_dir, case, patch, plan.device)
            for case in read_list(plan.data_dir / "test.list")[: plan.loop_cases]]
    warns = [f"{r['case']}: Dice fp32 batched vs loop {r['dice_batched_fp32_vs_loop']:.5f} < {LOOP_DICE_TOLERANCE}"
             for r in rows if not r["dice_batched_fp32_vs_loop"] >= LOOP_DICE_TOLERANCE]
    return {"cases": rows, "tolerance_dice_fp32": LOOP_DICE_TOLERANCE, "warnings": warns}


STAGE_FUNCS: dict[str, Callable[[CheckPlan, Done], dict[str, Any]]] = {
    "env": stage_env, "smoke": stage_smoke, "numeric": stage_numeric, "checkpoint": stage_checkpoint,
    "bf16": stage_bf16, "optimizer": stage_optimizer, "host_sync": stage_host_sync, "bench": stage_bench,
    "train": stage_train, "evaluate": stage_evaluate, "loop_check": stage_loop_check,
}
STAGE_TITLES = {
    "env": "card and software versions", "smoke": "tiny step and inference",
    "numeric": "train-mode step, fp32 vs CPU float64, replayed assignments",
    "checkpoint": "activation checkpointing with the kMaX assignment replay",
    "bf16": "bf16 autocast vs fp32", "optimizer": "the run's optimiser vs torch's reference",
    "host_sync": "host syncs in the training step", "bench": "what this card trains, and how fast",
    "train": "short training run", "evaluate": "protocol evaluation on test.list",
    "loop_check": "batched prediction vs the UA-MT loop",
}


def run_stage(name: str, plan: CheckPlan, done: Done) -> dict[str, Any]:
    """Run one stage: its numbers plus ``status`` (one of :data:`STATUSES`), ``seconds`` and, when it did
    not run or failed, ``reason`` or ``error`` + ``traceback``. Never raises (except KeyboardInterrupt)."""
    t0 = time.perf_counter()
    try:
        out = STAGE_FUNCS[name](plan, done)
        out["status"] = "warning" if out.get("warnings") else "ok"
    except StageSkipped as skip:
        out = {"status": skip.status, "reason": str(skip)}
    except Exception as exc:  # a failing stage is recorded; the next one still runs
        out = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
    if plan.device.type == "cuda":
        torch.cuda.empty_cache()
    out["seconds"] = time.perf_counter() - t0
    return out


def check_gpu(out: Path, plan: CheckPlan, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every stage of ``plan``, writing the report to ``out`` after each; print progress and the table.

    Args:
        out: JSON report to write (atomically; its folder is created).
        plan: from :func:`make_plan`.
        echo: where progress lines and the summary table go.

    Returns:
        The report: ``schema``, ``ok`` (no stage failed), ``date``, ``options``, ``stages`` (name → the
        stage's numbers, ``status``, ``seconds``) and ``verdict`` (:func:`~dkuxnet.perf.checktable.verdict`).
    """
    out = Path(out)
    report: dict[str, Any] = {"schema": SCHEMA, "ok": True, "date": now(), "options": plan.options(), "stages": {}}
    if plan.rehearsal:
        echo("rehearsal: tiny preset and small inputs; this checks the command, not the GPU")
    for i, name in enumerate(STAGES, 1):
        echo(f"[{i}/{len(STAGES)}] {name}: {STAGE_TITLES[name]} …")
        stage = run_stage(name, plan, report["stages"])
        report["stages"][name] = stage
        report["ok"] = report["ok"] and stage["status"] != "failed"
        report["verdict"] = verdict(report)
        write_json(out, report)
        failure = f": {stage['error'].splitlines()[0][:200]}" if stage["status"] == "failed" else ""
        echo(f"[{i}/{len(STAGES)}] {name}: {stage['status']} ({stage['seconds']:.0f} s){failure}")
    echo(summary_table(report))
    echo(f"report: {out}")
    return report


def run_check_gpu(out: Path, work_dir: Path | None = None, echo: Callable[[str], None] = print,
                  **settings: Any) -> dict[str, Any]:
    """:func:`make_plan` + :func:`check_gpu`, in ``work_dir`` or in a temporary folder removed afterwards.

    A given ``work_dir`` must be empty or absent (it keeps the run and evaluation folders). In the
    rehearsal without ``data_dir`` a small synthetic data set is written there first.
    """
    if Path(out).is_dir():
        raise UserError(f"--out {out}: is a folder; give the report's file name, e.g. report.json")
    if work_dir is not None and Path(work_dir).exists() and any(Path(work_dir).iterdir()):
        raise UserError(f"--work-dir {work_dir}: must be empty or absent (it receives the run and evaluation folders)")
    with contextlib.ExitStack() as stack:
        folder = Path(work_dir) if work_dir is not None else Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="dkuxnet-check-gpu-")))
        plan = make_plan(folder, **settings)
        if plan.rehearsal and plan.data_dir is None:
            from dkuxnet.data.phantom import make_phantom

            phantom = make_phantom(folder / "phantom", cases=REHEARSAL_PHANTOM["cases"],
                                   shape=REHEARSAL_PHANTOM["shape"])
            plan = dataclasses.replace(plan, data_dir=phantom)
        return check_gpu(out, plan, echo=echo)
