"""Text and markdown views of benchmark results: the terminal summary of ``dkuxnet bench`` and the book's tables.

:func:`format_summary` prints a :func:`dkuxnet.perf.bench.run_bench` result as a plain-text table;
:func:`perf_report` renders the committed files of ``results/perf`` (``bench_*.json`` and the CPU memory
estimate ``memprobe*.json`` of :mod:`dkuxnet.perf.memprobe`) as markdown for the performance page.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

KERNELS_IN_BOOK = 10  # the profile's operator table is shown in full, its kernel table this far


def _cell(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def summary_line(label: str, r: dict[str, Any]) -> str:
    """One line for a finished row: its time, peak memory and wall time (or its error)."""
    if "error" in r:
        return f"{label}: FAILED {r['error']}"
    parts = []
    if "ms_per_step" in r:
        parts.append(f"{r['ms_per_step']:.1f} ms/step (median of {r['steps_timed']})")
    if "infer_s_per_volume" in r:
        parts.append(f"{r['infer_s_per_volume']:.2f} s/volume")
    return f"{label}: " + ", ".join(parts) + f", peak {_cell(r.get('peak_gib'), '.1f')} GiB, {r['wall_s']:.1f} s"


def _columns(lines: list[list[str]]) -> list[str]:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]


def format_summary(d: dict[str, Any]) -> str:
    """Plain-text table of a :func:`dkuxnet.perf.bench.run_bench` result (and its profile), for the terminal."""
    head = (f"dkuxnet bench on {d['device']} (torch {d['torch']}, CUDA {d['cuda']}, cuDNN {d['cudnn']}, "
            f"commit {str(d['commit'])[:12]}, {d['date']})\nup to {d['steps']} timed steps after {d['warmup']} "
            f"warm-up per row, timed steps capped at {d['row_seconds']:g} s per row, cudnn.benchmark_limit "
            f"{d['cudnn_benchmark_limit']}; total {d['wall_s']:.1f} s")
    table = [["row", "kind", "volumes", "patch", "ms/step", "timed", "peak GiB", "s/volume", "first s", "wall s"]]
    failed = []
    for label, r in d["presets"].items():
        if "error" in r:
            failed.append(f"FAILED {label}: {r['error']}")
            continue
        table.append([
            label, r["kind"], str(r.get("batch", {}).get("volumes", "")), "×".join(map(str, r["patch"])),
            _cell(r.get("ms_per_step"), ".1f"), str(r.get("steps_timed", "")), _cell(r.get("peak_gib"), ".2f"),
            _cell(r.get("infer_s_per_volume"), ".2f"), _cell(r.get("first_step_s"), ".1f"), f"{r['wall_s']:.1f}",
        ])
    text = [head, "", *_columns(table), *failed]
    profile = d.get("profile")
    if profile and "error" in profile:
        text += ["", f"profile of {profile['row']!r}: {profile['error']}"]
    elif profile:
        for name in ("operators", "kernels"):
            if not profile[name]:
                continue
            text += ["", f"profile of one step of {profile['row']!r}: top {name} by {profile['sort_by']} "
                         f"(total {profile['total_ms']:.1f} ms)"]
            rows = [["self ms", "%", "calls", "name", *(["input shapes"] if name == "operators" else [])]]
            rows += [[f"{e['self_ms']:.2f}", f"{e['percent']:.1f}", str(e["calls"]), e["name"][:70],
                      *([str(e["input_shapes"])[:100]] if name == "operators" else [])] for e in profile[name]]
            text += _columns(rows)
    return "\n".join(text)


def _md(text: str, limit: int = 80) -> str:
    """``text`` as an inline code span safe inside a markdown table cell."""
    text = text.replace("`", "'").replace("|", "\\|")
    return f"`{text[:limit]}{'…' if len(text) > limit else ''}`"


def _bench_section(path: Path, d: dict[str, Any]) -> list[str]:
    versions = f"torch {d.get('torch')}, CUDA {d.get('cuda')}, cuDNN {d.get('cudnn')}"
    budget = f"up to {d.get('steps')} timed steps after {d.get('warmup')} warm-up"
    if d.get("row_seconds") is not None:
        budget += f", at most {d['row_seconds']:g} s of timed steps per row"
    if d.get("cudnn_benchmark_limit") is not None:
        budget += f", `cudnn.benchmark_limit` {d['cudnn_benchmark_limit']}"
    if d.get("wall_s") is not None:
        budget += f"; the whole bench took {d['wall_s']:.0f} s"
    lines = [
        f"**{d.get('device')}** ({versions}; commit `{str(d.get('commit'))[:12]}`, {d.get('date')}; "
        f"median over the timed steps, {budget}; data: {d.get('data')}; file `{path.name}`)",
        "",
        "| row | measures | volumes | patch | ms per step (timed steps) | ms per volume | peak GiB | TFLOP/s | MFU "
        "| protocol inference s / volume | row wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    what = {"step": "training step", "fwdbwd": "forward + backward", "infer": "protocol inference"}
    for name, r in d.get("presets", {}).items():
        if "error" in r:
            lines.append(f"| {name} | {what.get(r.get('kind', 'step'), '')} | | | {r['error'][:80]} | | | | | | |")
            continue
        ms = f"{r['ms_per_step']:.1f} ({r.get('steps_timed', len(r.get('ms_steps', [])))})" if "ms_per_step" in r else "—"
        lines.append(
            f"| {name} | {what[r.get('kind', 'step')]} | {r.get('batch', {}).get('volumes', '—')} "
            f"| {'×'.join(map(str, r['patch']))} | {ms} | {_cell(r.get('ms_per_volume'), '.1f')} "
            f"| {_cell(r.get('peak_gib'), '.1f')} "
            f"| {_cell(r.get('tflops_achieved'), '.1f')} | {_cell(r.get('mfu'), '.1%')} "
            f"| {_cell(r.get('infer_s_per_volume'), '.2f')} | {_cell(r.get('wall_s'), '.0f')} |"
        )
    return lines + [""] + _profile_section(d.get("profile"))


def _profile_section(p: dict[str, Any] | None) -> list[str]:
    if not p or "error" in p:
        return []
    lines = [
        f"Profile of one step of `{p['row']}` (`torch.profiler`, {p['sort_by']}, {p['total_ms']:.1f} ms in total): "
        "the operators that launched the most time, with their input shapes,",
        "",
        "| self ms | % | calls | operator | input shapes |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {e['self_ms']:.2f} | {e['percent']:.1f} | {e['calls']} | {_md(e['name'], 50)} "
              f"| {_md(json.dumps(e['input_shapes']), 90)} |" for e in p["operators"]]
    if p.get("kernels"):
        lines += ["", "and the kernels:", "", "| self ms | % | calls | kernel |", "| --- | --- | --- | --- |"]
        lines += [f"| {e['self_ms']:.2f} | {e['percent']:.1f} | {e['calls']} | {_md(e['name'], 90)} |"
                  for e in p["kernels"][:KERNELS_IN_BOOK]]
    return lines + [""]


def _memprobe_section(path: Path, d: dict[str, Any]) -> list[str]:
    lines = [
        f"**CPU estimate** ({d.get('method')}; commit `{str(d.get('commit'))[:12]}`, torch {d.get('torch')}, "
        f"{d.get('date')}; file `{path.name}`): not a GPU measurement.",
        "",
    ]
    rows = d.get("rows", [])
    if rows:
        lines += [
            "| preset, variant | measured at (volumes × patch) | kept after forward | peak | constant part of the peak "
            "| estimated peak at 112×112×80 |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
    for r in rows:
        variant = ", ".join(f"`{k}={json.dumps(v)}`" for k, v in r["overrides"].items()) or "as preset"
        patches = " and ".join("×".join(map(str, patch)) for patch in r.get("patches", [r["patch"]]))
        constant = r.get("constant_peak_bytes")
        lines.append(
            f"| `{r['preset']}`, {variant} | {r['batch']} × {patches} "
            f"| {r['saved_bytes_per_voxel'] / 1000:.1f} kB / voxel | {r['peak_bytes_per_voxel'] / 1000:.1f} kB / voxel "
            f"| {'—' if constant is None else f'{constant / 1e9:.1f} GB'} "
            f"| ≈ {r['estimated_peak_gib']:.1f} GiB ({r['batch']} volumes) |"
        )
    return lines + [""] + _breakdown_table(rows)


def _breakdown_table(rows: list[dict[str, Any]], top: int = 12) -> list[str]:
    """Kept bytes per voxel by model part, one column per variant; the ``top`` largest parts, then the rest."""
    rows = [r for r in rows if r.get("saved_bytes_per_voxel_by_part")]
    if not rows:
        return []
    first = rows[0]["saved_bytes_per_voxel_by_part"]
    names = list(first)[:top]
    heads = [", ".join(f"`{k.split('.')[-1]}={json.dumps(v)}`" for k, v in r["overrides"].items()) or r["preset"]
             for r in rows]
    lines = [
        "Where the kept bytes are saved (the part whose forward saved each tensor first; the loss and the "
        "model's output operations count as parts), kB per voxel:",
        "",
        "| part | " + " | ".join(heads) + " |",
        "| --- |" + " --- |" * len(rows),
    ]
    for name in [*names, "other parts"]:
        cells = []
        for r in rows:
            parts = r["saved_bytes_per_voxel_by_part"]
            value = sum(v for k, v in parts.items() if k not in names) if name == "other parts" else parts.get(name, 0.0)
            cells.append(f"{value / 1000:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def _traffic_section(path: Path, d: dict[str, Any]) -> list[str]:
    """One row per counted commit: total, full-resolution and per-phase eager bytes of the step."""
    lines = [
        f"**Counted on the meta device** ({_md(d.get('method', ''), 200)}; file `{path.name}`): "
        "not a GPU measurement; bf16 tensors are counted at fp32 size.",
        "",
        "| commit | preset, batch × patch | total GB | on full-resolution tensors | forward | loss | backward |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in d.get("rows", []):
        phases = r.get("by_phase_gb", {})
        lines.append(
            f"| `{str(r.get('commit'))[:12]}` | `{r['preset']}`, {r['batch']} × {'×'.join(map(str, r['patch']))} "
            f"| {r['total_gb']:.0f} | {r['full_resolution_gb']:.0f} | {phases.get('forward', 0):.0f} "
            f"| {phases.get('loss', 0):.0f} | {phases.get('backward', 0):.0f} |"
        )
    return lines + [""]


def perf_report(folder: Path) -> str:
    """Markdown for the book's performance page from the committed files of ``folder`` (``results/perf``).

    ``bench_*.json`` (:func:`dkuxnet.perf.bench.run_bench` output, one per card): a table per file, its card,
    software versions, budget, commit and date in the caption, and the profile when the file has one.
    ``memprobe*.json`` (:mod:`dkuxnet.perf.memprobe`): the CPU estimate of activation memory. ``traffic*.json``
    (:mod:`dkuxnet.perf.traffic`): the step's memory traffic counted on the meta device, a row per commit.
    Without a bench file the text says that no GPU benchmark is committed.
    """
    folder = Path(folder)
    benches = sorted(folder.glob("bench_*.json"))
    lines = ["### Benchmarks of this package", ""]
    loaded = [(path, json.loads(path.read_text(encoding="utf-8"))) for path in benches]
    for path, d in loaded:
        lines += _bench_section(path, d)
    if not any(d.get("device_type", "cuda") == "cuda" for _, d in loaded):
        lines += ["No GPU benchmark of this package has been committed yet (`results/perf/bench_<card>.json`).", ""]
    probes = sorted(folder.glob("memprobe*.json"))
    if probes:
        lines += ["### Activation memory, estimated on the CPU", ""]
        for path in probes:
            lines += _memprobe_section(path, json.loads(path.read_text(encoding="utf-8")))
    traffic = sorted(folder.glob("traffic*.json"))
    if traffic:
        lines += ["### Memory traffic of a training step, counted without a GPU", ""]
        for path in traffic:
            lines += _traffic_section(path, json.loads(path.read_text(encoding="utf-8")))
    return "\n".join(lines)
