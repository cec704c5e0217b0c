"""``dkuxnet check-gpu``: does this machine run DKUXNet correctly, and how fast?

One command for a Colab runtime, a workstation or a cluster node. It runs these stages in order, each
recorded in one JSON report (rewritten atomically after every stage); a failing stage is recorded with
its error and the later stages still run:

* ``env``        card, memory, compute capability, driver, torch / CUDA / cuDNN versions, commit;
* ``smoke``      the ``tiny`` preset's training step and protocol inference on the device, and the
                 relative error of the device's fp32 and bf16-autocast outputs against the same model in
                 float64 on the CPU (TF32 off for the fp32 run);
* ``host_sync``  ``torch.cuda.set_sync_debug_mode("warn")`` around training steps: the training step
                 must not wait for the GPU (CUDA only);
* ``bench``      :func:`dkuxnet.bench.run_bench`: ms per training step, peak memory, protocol inference
                 seconds per volume of the preset, at batch 1 + 1, and of ``vnet``;
* ``train``      a short run of :func:`dkuxnet.train.train` on ``data_dir`` (needs the LA data);
* ``evaluate``   :func:`dkuxnet.evaluate.evaluate_checkpoint` in protocol mode on the test list, and the
                 result in the ``results/`` schema (labelled as a shortened check run);
* ``loop_check`` the batched protocol prediction against UA-MT's window-by-window loop (batch 1, host
                 accumulation) on the first test volumes: Dice between the masks and time of each.

The rehearsal (``rehearsal=True``) runs every stage with the ``tiny`` preset and a small synthetic data
set when no ``data_dir`` is given: well under a minute on a CPU. It checks the command, not a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dkuxnet.bench import run_bench, synchronize, synthetic_bank
from dkuxnet.checkpoint import load_checkpoint, model_from_state
from dkuxnet.config import PRESETS, get_preset
from dkuxnet.data.la import read_case, read_list
from dkuxnet.engine import build_run, train_step
from dkuxnet.errors import UserError
from dkuxnet.inference import predict_protocol, resolve_device
from dkuxnet.models import create_model
from dkuxnet.results import build_result, device_name, git_commit, write_json

SCHEMA = "dkuxnet-check-gpu-v1"
STAGES = ("env", "smoke", "host_sync", "bench", "train", "evaluate", "loop_check")
STATUSES = ("ok", "warning", "failed", "skipped", "not applicable")
SMALL_PATCH = tuple(get_preset("tiny").data.patch_size)  # the smoke and host-sync stages run the tiny preset
FP32_TOLERANCE = 1e-3  # relative error vs CPU float64 above which the smoke stage warns
BF16_TOLERANCE = 1e-1
LOOP_DICE_TOLERANCE = 0.999  # fp32 batched vs fp32 loop: Dice below this warns
HOST_SYNC_STEPS = 3
REHEARSAL = {"preset": "tiny", "iterations": 2, "bench_steps": 1, "bench_warmup": 1}
REHEARSAL_PHANTOM = {"cases": 10, "shape": (48, 48, 32)}
RESULT_NOTE = ("check run of `dkuxnet check-gpu`: a short schedule that shows training and evaluation work "
               "on this machine; not a reproduction of the paper's numbers")


@dataclasses.dataclass(frozen=True)
class CheckPlan:
    """Settings of one ``check-gpu`` run, resolved and validated by :func:`make_plan`."""

    device: torch.device
    preset: str
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
            "device": str(self.device), "preset": self.preset,
            "data_dir": str(self.data_dir) if self.data_dir else None,
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
    iterations: int | None = None,
    label_ratio: float = 0.1,
    bench_steps: int | None = None,
    loop_cases: int | None = None,
    rehearsal: bool = False,
    progress: bool = True,
) -> CheckPlan:
    """Validate the settings and fill the defaults (``paper``, 100 iterations, 1 loop case; rehearsal smaller).

    Raises:
        UserError: no CUDA device without ``rehearsal``, ``preset`` given with ``rehearsal``, a bad
            ``data_dir`` (not an LA-layout folder), or a bad number.
    """
    dev = resolve_device(device)
    if dev.type != "cuda" and not rehearsal:
        raise UserError(
            f"no CUDA GPU to check (device {dev}; torch {torch.__version__}, built for CUDA {torch.version.cuda}, "
            f"sees {torch.cuda.device_count()} GPU). On Colab choose a GPU runtime (Runtime > Change runtime type); "
            f"to rehearse the check on the CPU pass --rehearsal"
        )
    if rehearsal and preset not in (None, REHEARSAL["preset"]):
        raise UserError(f"--preset {preset}: the rehearsal always runs the {REHEARSAL['preset']} preset")
    preset = preset or (REHEARSAL["preset"] if rehearsal else "paper")
    if preset not in PRESETS:
        raise UserError(f"--preset must be one of {PRESETS}, got {preset!r}")
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
        device=dev, preset=preset, data_dir=Path(data_dir) if data_dir is not None else None, iterations=iterations,
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


def stage_env(plan: CheckPlan) -> dict[str, Any]:
    """Card, driver and software versions; warns when the card has no native bf16 (before sm_80)."""
    dev = plan.device
    out: dict[str, Any] = {
        "device": device_name(dev), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if dev.type == "cuda" else None, "commit": git_commit(),
        "python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "date": _now(), "warnings": [],
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        out |= {"memory_gib": props.total_memory / 2**30, "compute_capability": f"{props.major}.{props.minor}",
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


def stage_smoke(plan: CheckPlan) -> dict[str, Any]:
    """The tiny preset's step and inference on the device, and its outputs against CPU float64."""
    bench = run_bench(presets=["tiny"], device=plan.device, steps=plan.bench_steps or 2, warmup=1)
    row = bench["presets"]["tiny"]
    if "error" in row:
        raise RuntimeError(f"tiny training step or inference: {row['error']}")
    errors = relative_errors_vs_float64(plan.device)
    warns = [f"{name}: relative error {err:.1e} > {_tolerance(name):.0e}"
             for name, err in errors.items() if not err <= _tolerance(name)]
    return {"ms_per_step": row["ms_per_step"], "infer_s_per_volume": row["infer_s_per_volume"],
            "relative_error_vs_cpu_float64": errors,
            "tolerance": {"fp32": FP32_TOLERANCE, "bf16_autocast": BF16_TOLERANCE}, "warnings": warns}


def _tolerance(name: str) -> float:
    return FP32_TOLERANCE if name.startswith("fp32") else BF16_TOLERANCE


@contextlib.contextmanager
def true_fp32() -> Iterator[None]:
    """TF32 off for matrix products and cuDNN convolutions inside (restored afterwards)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def relative_errors_vs_float64(device: torch.device) -> dict[str, float]:
    """‖out − ref‖ / ‖ref‖ of the eval-mode tiny model on ``device`` against the same weights and input in
    float64 on the CPU, for ``seg_logits`` and ``query_probs``: fp32 (TF32 off) and, on CUDA, bf16 autocast.

    The hard k-means assignment is discontinuous, so a few flipped voxels can make these larger than the
    precision alone would.
    """
    torch.manual_seed(0)
    model = create_model(get_preset("tiny")).eval()
    x = torch.randn(1, 1, *SMALL_PATCH)
    out: dict[str, float] = {}
    with torch.no_grad(), true_fp32():
        ref = model.double()(x.double())
        model.float().to(device)
        runs: dict[str, Callable[[], Any]] = {"fp32": lambda: model(x.to(device))}
        if device.type == "cuda":
            runs["bf16_autocast"] = lambda: _bf16_call(model, x.to(device))
        for name, run in runs.items():
            got = run()
            for field in ("seg_logits", "query_probs"):
                r, g = getattr(ref, field), getattr(got, field).double().cpu()
                out[f"{name}.{field}"] = float((g - r).norm() / r.norm())
    return out


def _bf16_call(model: torch.nn.Module, x: torch.Tensor) -> Any:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return model(x)


def stage_host_sync(plan: CheckPlan) -> dict[str, Any]:
    """Host syncs in training steps of the tiny preset with activation checkpointing (the paper's path)."""
    if plan.device.type != "cuda":
        raise StageSkipped("not applicable on a CPU: a CPU step has no device to wait for", "not applicable")
    messages = host_syncs_in_step(plan.device)
    warns = [f"{len(messages)} kind(s) of host sync in the training step; it waits for the GPU"] if messages else []
    return {"steps": HOST_SYNC_STEPS, "host_syncs": messages, "warnings": warns}


def host_syncs_in_step(device: torch.device, steps: int = HOST_SYNC_STEPS) -> list[str]:
    """First lines of the ``torch.cuda.set_sync_debug_mode("warn")`` messages during ``steps`` training
    steps after a warm-up step (empty: no host sync). CUDA only."""
    cfg = get_preset("tiny").override(**{"model.checkpoint_activations": True})
    run = build_run(cfg, synthetic_bank(SMALL_PATCH, 4, device), 2, device)
    train_step(run)
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                train_step(run)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sorted({str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)})


def stage_bench(plan: CheckPlan) -> dict[str, Any]:
    """:func:`~dkuxnet.bench.run_bench` of the preset, of the preset at batch 1 + 1, and of ``vnet``
    (the rehearsal: the preset only)."""
    presets = [plan.preset] if plan.preset == "vnet" or plan.rehearsal else [plan.preset, "vnet"]
    variants = {} if plan.rehearsal else {
        f"{plan.preset}, batch 1+1": (plan.preset, {"data.labeled_bs": 1, "data.unlabeled_bs": 1})}
    result = run_bench(presets=presets, device=plan.device, out=None, data_dir=None, steps=plan.bench_steps,
                       warmup=plan.bench_warmup, overrides=None, variants=variants)
    failed = {name: row["error"] for name, row in result["presets"].items() if "error" in row}
    if len(failed) == len(result["presets"]):
        raise RuntimeError("every benchmark row failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    result["warnings"] = [f"{name}: {error}" for name, error in failed.items()]
    return result


def stage_train(plan: CheckPlan) -> dict[str, Any]:
    """A short training run in ``work_dir/run``: ms per step, peak memory, the logged loss curve.

    A non-finite loss stops the run with :class:`~dkuxnet.errors.NonFiniteLossError`: the stage fails.
    """
    from dkuxnet.train import train

    if plan.data_dir is None:
        raise StageSkipped("no --data-dir: training needs the LA data (`dkuxnet data download --dest DIR`)")
    cfg = get_preset(plan.preset).override(**{
        "data.label_ratio": plan.label_ratio, "train.max_iterations": plan.iterations,
        "train.checkpoint_every": plan.iterations,
    })
    summary = train(cfg, data_dir=plan.data_dir, out_dir=plan.run_dir, device=plan.device, progress=plan.progress)
    rows = [json.loads(line) for line in (plan.run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {k: summary[k] for k in ("iterations", "schedule", "wall_s", "ms_per_step", "peak_gib", "device")} | {
        "label_ratio": plan.label_ratio, "loss_curve": [[row["iteration"], row["loss"]] for row in rows],
    }


def stage_evaluate(plan: CheckPlan) -> dict[str, Any]:
    """Protocol evaluation of the train stage's checkpoint on ``test.list``, and its ``results/`` record."""
    from dkuxnet.evaluate import evaluate_checkpoint

    if plan.data_dir is None:
        raise StageSkipped("no --data-dir: evaluation needs the LA data")
    if not plan.checkpoint.is_file():
        raise StageSkipped("the train stage wrote no checkpoint")
    summary = evaluate_checkpoint(plan.checkpoint, data_dir=plan.data_dir, out_dir=plan.work_dir / "evaluate",
                                  mode="protocol", device=plan.device, progress=plan.progress)
    name = f"{plan.preset}-ratio{plan.label_ratio}-check-gpu"
    return {k: summary[k] for k in ("n_cases", "n_failed", "metrics", "seconds_per_volume", "window")} | {
        "result": build_result(summary, name=name, notes=RESULT_NOTE),
    }


def stage_loop_check(plan: CheckPlan) -> dict[str, Any]:
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


def loop_vs_batched(model: torch.nn.Module, data_dir: Path, case: str, patch: tuple[int, int, int],
                    device: torch.device) -> dict[str, Any]:
    """Masks (p₁ > 0.5) of one case by the UA-MT loop and by :func:`predict_protocol`: Dice, differing voxels,
    seconds. fp32 runs with TF32 off; the bf16 row (CUDA only) is the evaluation's own precision."""
    image, _ = read_case(data_dir, case)
    runs: dict[str, Callable[[], np.ndarray]] = {
        "loop": lambda: uamt_loop(model, image, patch, device)[1],
        "batched_fp32": lambda: predict_protocol(model, image, patch=patch, device=device, amp=False)[1].cpu().numpy(),
    }
    if device.type == "cuda":
        runs["batched_bf16"] = lambda: predict_protocol(model, image, patch=patch, device=device,
                                                        amp=True)[1].cpu().numpy()
    masks, seconds = {}, {}
    for name, run in runs.items():
        with true_fp32() if name != "batched_bf16" else contextlib.nullcontext():
            synchronize(device)
            t0 = time.perf_counter()
            masks[name] = run() > 0.5
            synchronize(device)
            seconds[name] = time.perf_counter() - t0
    loop = masks["loop"]
    row: dict[str, Any] = {"case": case, "foreground_voxels": int(loop.sum()), "loop_s": seconds["loop"]}
    for name in [n for n in runs if n != "loop"]:
        row |= {f"dice_{name}_vs_loop": dice(masks[name], loop),
                f"voxels_differing_{name}": int((masks[name] ^ loop).sum()), f"{name}_s": seconds[name]}
    return row


def uamt_loop(model: torch.nn.Module, image: np.ndarray, patch: tuple[int, int, int], device: torch.device,
              stride: tuple[int, int, int] = (18, 18, 4)) -> np.ndarray:
    """UA-MT's ``test_single_case``: one window at a time, fp32, numpy accumulation on the host; K×X×Y×Z.

    Written from UA-MT's code, independently of :mod:`dkuxnet.inference`, so that it checks it.
    """
    pads = [max(p - s, 0) for p, s in zip(patch, image.shape)]
    img = np.pad(image, [(q // 2, q - q // 2) for q in pads])
    starts = [[min(st * i, n - p) for i in range(math.ceil((n - p) / st) + 1)]
              for n, p, st in zip(img.shape, patch, stride)]
    score: np.ndarray | None = None
    count = np.zeros(img.shape, np.float32)
    model.eval()
    with torch.no_grad():
        for x in starts[0]:
            for y in starts[1]:
                for z in starts[2]:
                    win = (slice(x, x + patch[0]), slice(y, y + patch[1]), slice(z, z + patch[2]))
                    t = torch.from_numpy(np.ascontiguousarray(img[win]))[None, None].to(device)
                    out = model(t)
                    prob = torch.softmax(getattr(out, "seg_logits", out).float(), dim=1)[0].cpu().numpy()
                    if score is None:
                        score = np.zeros((prob.shape[0], *img.shape), np.float32)
                    score[(slice(None), *win)] += prob
                    count[win] += 1
    assert score is not None  # at least one window always exists
    score /= count[None]
    crop = tuple(slice(q // 2, q // 2 + s) for q, s in zip(pads, image.shape))
    return score[(slice(None), *crop)]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    denom = int(a.sum() + b.sum())
    return 2 * int((a & b).sum()) / denom if denom else 1.0


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


STAGE_FUNCS: dict[str, Callable[[CheckPlan], dict[str, Any]]] = {
    "env": stage_env, "smoke": stage_smoke, "host_sync": stage_host_sync, "bench": stage_bench,
    "train": stage_train, "evaluate": stage_evaluate, "loop_check": stage_loop_check,
}
STAGE_TITLES = {
    "env": "card and software versions", "smoke": "tiny step and inference, fp32 / bf16 vs CPU float64",
    "host_sync": "host syncs in the training step", "bench": "benchmark of the training step and inference",
    "train": "short training run", "evaluate": "protocol evaluation on test.list",
    "loop_check": "batched prediction vs the UA-MT loop",
}


def run_stage(name: str, plan: CheckPlan) -> dict[str, Any]:
    """Run one stage: its numbers plus ``status`` (one of :data:`STATUSES`), ``seconds`` and, when it did
    not run or failed, ``reason`` or ``error`` + ``traceback``. Never raises (except KeyboardInterrupt)."""
    t0 = time.perf_counter()
    try:
        out = STAGE_FUNCS[name](plan)
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
        The report: ``schema``, ``ok`` (no stage failed), ``date``, ``options`` and ``stages``
        (name → the stage's numbers, ``status``, ``seconds``).
    """
    out = Path(out)
    report: dict[str, Any] = {"schema": SCHEMA, "ok": True, "date": _now(), "options": plan.options(), "stages": {}}
    if plan.rehearsal:
        echo("rehearsal: tiny preset and small inputs; this checks the command, not the GPU")
    for i, name in enumerate(STAGES, 1):
        echo(f"[{i}/{len(STAGES)}] {name}: {STAGE_TITLES[name]} …")
        stage = run_stage(name, plan)
        report["stages"][name] = stage
        report["ok"] = report["ok"] and stage["status"] != "failed"
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


def summary_table(report: dict[str, Any]) -> str:
    """One row per stage: status, seconds and its key numbers (more lines for the benchmark rows)."""
    stages = report["stages"]
    device = stages.get("env", {}).get("device", "?")
    lines = [f"check-gpu on {device}" + (" (rehearsal)" if report["options"]["rehearsal"] else ""),
             f"{'stage':<11} {'status':<15} {'time':>6}  numbers", "-" * 78]
    for name, stage in stages.items():
        details = _details(name, stage)
        lines.append(f"{name:<11} {stage['status']:<15} {stage['seconds']:>5.0f}s  {details[0] if details else ''}")
        lines += [f"{'':<36}{line}" for line in details[1:]]
    verdict = "no stage failed" if report["ok"] else "FAILED: " + ", ".join(
        n for n, s in stages.items() if s["status"] == "failed")
    return "\n".join([*lines, "-" * 78, verdict])


def _details(name: str, s: dict[str, Any]) -> list[str]:
    if s["status"] == "failed":
        return [s["error"].splitlines()[0][:160]]
    if "reason" in s:
        return [s["reason"]]
    warns = [f"warning: {w}" for w in s.get("warnings", [])]
    return _numbers(name, s) + warns


def _numbers(name: str, s: dict[str, Any]) -> list[str]:
    if name == "env":
        memory = f", {s['memory_gib']:.0f} GiB" if s.get("memory_gib") is not None else ""
        return [f"torch {s['torch']}, CUDA {s['cuda']}, cuDNN {s['cudnn']}{memory}"]
    if name == "smoke":
        errors = ", ".join(f"{k} {v:.1e}" for k, v in s["relative_error_vs_cpu_float64"].items())
        return [f"tiny step {s['ms_per_step']:.1f} ms, inference {s['infer_s_per_volume']:.2f} s",
                f"error vs CPU float64: {errors}"]
    if name == "host_sync":
        return [f"{len(s['host_syncs'])} host sync(s) in {s['steps']} steps", *s["host_syncs"][:3]]
    if name == "bench":
        return [f"{label}: " + (row["error"][:100] if "error" in row else
                                f"{row['ms_per_step']:.0f} ms/step{_peak(row['peak_gib'])}, "
                                f"{row['infer_s_per_volume']:.2f} s/volume")
                for label, row in s["presets"].items()]
    if name == "train":
        curve = s["loss_curve"]
        loss = f", loss {curve[0][1]:.3f} -> {curve[-1][1]:.3f}" if curve else ""
        return [f"{s['iterations']} its, {_fmt(s['ms_per_step'], '.0f')} ms/step{_peak(s['peak_gib'])}{loss}"]
    if name == "evaluate":
        dice_mean = s["metrics"]["dice"]["mean"]
        return [f"Dice {_fmt(dice_mean, '.4f')} on {s['n_cases']} volumes ({s['n_failed']} failed), "
                f"{s['seconds_per_volume']:.2f} s/volume"]
    if name == "loop_check":
        return [f"{c['case']}: Dice vs loop fp32 {c['dice_batched_fp32_vs_loop']:.5f}"
                + (f", bf16 {c['dice_batched_bf16_vs_loop']:.5f}" if "dice_batched_bf16_vs_loop" in c else "")
                + f"; loop {c['loop_s']:.1f} s, batched {c['batched_fp32_s']:.1f} s" for c in s["cases"]]
    return []


def _peak(gib: float | None) -> str:
    return "" if gib is None else f", peak {gib:.1f} GiB"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)
