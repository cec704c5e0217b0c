"""The printed view of a ``check-gpu`` report: one row per stage, and the verdict of what the card can run."""

from __future__ import annotations

import math
from typing import Any

RULE = "-" * 78


def verdict(report: dict[str, Any]) -> dict[str, Any]:
    """What the report says about this machine.

    ``text`` is "FAILED: <stages>" when a stage failed (never an "ok" over an unexplained error); else the
    bench stage's verdict: which targets train, which do not fit and why, or "inference only"; plus the
    number of warnings. ``trains`` and ``does_not_fit`` (label → reason) repeat it as data.
    """
    stages = report["stages"]
    failed = [name for name, s in stages.items() if s["status"] == "failed"]
    bench = stages.get("bench", {})
    fit = bench.get("fit", {}) if bench.get("status") in ("ok", "warning") else {}
    trains = [label for label, v in fit.items() if v == "trains"]
    no_fit = {label: v for label, v in fit.items() if v != "trains"}
    warnings = sum(len(s.get("warnings", [])) for s in stages.values())
    if failed:
        text = "FAILED: " + ", ".join(failed)
    elif trains:
        text = f"this card trains: {', '.join(trains)} (smaller presets and profiles need less memory)"
    elif "inference_only" in bench:
        text = "inference only: no tried preset or profile trains" if bench["inference_only"] else (
            "neither training nor inference fits this card")
    else:
        text = "no stage failed"
    if not failed and no_fit:
        text += "; " + "; ".join(f"{label} {reason}" for label, reason in no_fit.items())
    if not failed and warnings:
        text += f"; {warnings} warning(s) above"
    return {"ok": not failed, "text": text, "trains": trains, "does_not_fit": no_fit,
            "inference_only": bench.get("inference_only")}


def summary_table(report: dict[str, Any]) -> str:
    """One row per stage: status, seconds and its key numbers (more lines for the benchmark rows), then the verdict."""
    stages = report["stages"]
    device = stages.get("env", {}).get("device", "?")
    lines = [f"check-gpu on {device}" + (" (rehearsal)" if report["options"]["rehearsal"] else ""),
             f"{'stage':<11} {'status':<15} {'time':>6}  numbers", RULE]
    for name, stage in stages.items():
        details = _details(name, stage)
        lines.append(f"{name:<11} {stage['status']:<15} {stage['seconds']:>5.0f}s  {details[0] if details else ''}")
        lines += [f"{'':<36}{line}" for line in details[1:]]
    return "\n".join([*lines, RULE, verdict(report)["text"]])


def _details(name: str, s: dict[str, Any]) -> list[str]:
    if s["status"] == "failed":
        return [s["error"].splitlines()[0][:160]]
    if "reason" in s:
        return [s["reason"]]
    warns = [f"warning: {w}" for w in s.get("warnings", [])]
    return NUMBERS.get(name, lambda s: [])(s) + warns


def _env(s: dict[str, Any]) -> list[str]:
    memory = f", {s['memory_gib']:.0f} GiB" if s.get("memory_gib") is not None else ""
    return [f"torch {s['torch']}, CUDA {s['cuda']}, cuDNN {s['cudnn']}{memory}"]


def _bench(s: dict[str, Any]) -> list[str]:
    lines = []
    for label, row in s["presets"].items():
        fit = s.get("fit", {}).get(label, "")
        lines.append(f"{label}: " + (fit if fit and fit != "trains" else row["error"][:100] if "error" in row else
                                     f"trains, {row['ms_per_step']:.0f} ms/step{_peak(row.get('peak_gib'))}, "
                                     f"{row['infer_s_per_volume']:.2f} s/volume"))
    if "inference_only" in s:
        lines.append("inference runs" if s["inference_only"] else "inference does not fit either")
    return lines


def _numeric(s: dict[str, Any]) -> list[str]:
    worst = s["gradient_error_by_group"][s["worst_group"]]
    return [f"worst gradient group {s['worst_group']} {worst:.1e} (≤ {s['tolerance']['gradient']:.0e}), "
            f"loss {s['loss_relative_error']:.1e}, {s['replayed_assignments']} assignments replayed"]


def _train(s: dict[str, Any]) -> list[str]:
    curve = s["loss_curve"]
    loss = f", loss {curve[0][1]:.3f} -> {curve[-1][1]:.3f}" if curve else ""
    return [f"{s.get('target', '')}: {s['iterations']} its, {_fmt(s['ms_per_step'], '.0f')} ms/step"
            f"{_peak(s['peak_gib'])}{loss}"]


def _evaluate(s: dict[str, Any]) -> list[str]:
    floor = f", floor {s['dice_floor']}" if s.get("dice_floor") is not None else ""
    return [f"Dice {_fmt(s['metrics']['dice']['mean'], '.4f')} on {s['n_cases']} volumes ({s['n_failed']} failed, "
            f"{s.get('bn_stats', '?')} BatchNorm statistics{floor}), {s['seconds_per_volume']:.2f} s/volume"]


def _loop(s: dict[str, Any]) -> list[str]:
    lines = []
    for c in s["cases"]:
        bf16 = f", bf16 {c['dice_batched_bf16_vs_loop']:.5f}" if "dice_batched_bf16_vs_loop" in c else ""
        lines.append(f"{c['case']}: Dice vs loop fp32 {c['dice_batched_fp32_vs_loop']:.5f}{bf16}; "
                     f"loop {c['loop_s']:.1f} s, batched {c['batched_fp32_s']:.1f} s")
    return lines


NUMBERS = {
    "env": _env,
    "smoke": lambda s: [f"tiny step {s['ms_per_step']:.1f} ms, inference {s['infer_s_per_volume']:.2f} s"],
    "numeric": _numeric,
    "checkpoint": lambda s: [f"{s['replayed_layers']} kMaX layer(s) recomputed with the forward's assignment, "
                             f"gradients vs plain ≤ {s['gradient_error_by_group'][s['worst_group']]:.1e}"],
    "bf16": lambda s: [f"{s['autocast']}: loss {s['loss_bf16']:.5f} vs fp32 {s['loss_fp32']:.5f}, "
                       f"relative {s['relative_error']:.1e} (≤ {s['tolerance']:.0e}), fp32 islands hold"],
    "optimizer": lambda s: [f"{s['optimizer']} (fused {s['fused']}, foreach {s['foreach']}): update vs reference "
                            f"{s['relative_error']:.1e} after {s['steps']} steps"],
    "host_sync": lambda s: [f"{len(s['host_conversions']) + len(s['cuda_sync_messages'])} host sync(s) in "
                            f"{s['steps']} steps ({s['method']})"],
    "bench": _bench,
    "train": _train,
    "evaluate": _evaluate,
    "loop_check": _loop,
}


def _peak(gib: float | None) -> str:
    return "" if gib is None else f", peak {gib:.1f} GiB"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)
