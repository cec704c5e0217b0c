"""Benchmark: documented keys, positive numbers, JSON file; peak table and volume scaling."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from dkuxnet.bench import LA_PATCH, LA_TEST_SHAPE, peak_tflops, perf_report, run_bench, scaled_shape

ROOT = Path(__file__).resolve().parents[1]


def test_peak_table():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-40GB") == 312.0
    assert peak_tflops("NVIDIA L4") == 121.0 and peak_tflops("NVIDIA L40S") == 362.0
    assert peak_tflops("Tesla T4") == 65.0 and peak_tflops("Some Other GPU") is None


def test_scaled_shape():
    assert scaled_shape(LA_PATCH) == LA_TEST_SHAPE
    assert scaled_shape((56, 56, 40)) == (88, 66, 44)


def test_run_bench_cpu_tiny(tmp_path):
    out = tmp_path / "bench.json"
    small = {"data.patch_size": [32, 32, 16]}
    result = run_bench(presets=["tiny"], device="cpu", out=out, steps=2, warmup=1, overrides=small)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert {"device", "torch", "cuda", "cudnn", "commit", "date", "steps", "warmup", "data", "presets"} <= set(result)
    assert result["steps"] == 2 and result["warmup"] == 1 and result["device_type"] == "cpu"
    tiny = result["presets"]["tiny"]
    assert tiny["patch"] == [32, 32, 16] and result["overrides"] == small
    assert tiny["batch"] == {"views": 2, "labeled": 2, "unlabeled": 2, "volumes": 8}
    assert len(tiny["ms_steps"]) == 2
    for key in ("ms_per_step", "tflop_per_step", "tflops_achieved", "infer_s_per_volume"):
        assert tiny[key] > 0, key
    assert tiny["infer_volume_shape"] == list(scaled_shape(tuple(tiny["patch"])))
    assert tiny["infer_windows"] > 1 and tiny["peak_gib"] is None and tiny["mfu"] is None


def test_memprobe_tool_reports_less_activation_memory_with_checkpointing(tmp_path):
    out = tmp_path / "mem.json"
    cmd = [sys.executable, str(ROOT / "tools" / "memprobe.py"), "--preset", "tiny", "--patch", "32", "32", "32",
           "--set", "model.checkpoint_activations=false", "--set", "model.checkpoint_activations=true", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    rows = json.loads(out.read_text())["rows"]
    plain, ckpt = (r["saved_bytes_per_voxel"] for r in rows)
    assert [r["overrides"] for r in rows] == [{"model.checkpoint_activations": v} for v in (False, True)]
    assert 0 < ckpt < 0.5 * plain
    assert all(r["estimated_peak_gib"] > 0 and r["batch"] == 8 for r in rows)
    for r in rows:  # the breakdown by part adds up to the total
        by_part = r["saved_bytes_per_voxel_by_part"]
        assert abs(sum(by_part.values()) - r["saved_bytes_per_voxel"]) < 1e-6 * r["saved_bytes_per_voxel"]
    plain_parts, ckpt_parts = (r["saved_bytes_per_voxel_by_part"] for r in rows)
    assert plain_parts["predictor"] > 5 * ckpt_parts["predictor"] and plain_parts["dec0"] > 0 == ckpt_parts.get("dec0", 0)
    assert plain_parts["loss"] > 0


def test_perf_report_renders_bench_and_memory_files(tmp_path):
    assert "No GPU benchmark" in perf_report(tmp_path)
    small = {"data.patch_size": [32, 32, 16]}
    variants = {"tiny, with checkpointing": ("tiny", {"model.checkpoint_activations": True})}
    run_bench(presets=["tiny"], device="cpu", out=tmp_path / "bench_cpu.json", steps=1, warmup=1,
              overrides=small, variants=variants)
    (tmp_path / "bench_oom.json").write_text(json.dumps({"device": "NVIDIA T4", "presets": {"paper": {"error": "out of memory: x"}}}))
    (tmp_path / "memprobe_cpu.json").write_text((ROOT / "results" / "perf" / "memprobe_cpu.json").read_text())
    text = perf_report(tmp_path)
    bench = json.loads((tmp_path / "bench_cpu.json").read_text())
    row = next(line for line in text.splitlines() if line.startswith("| tiny, with checkpointing |"))
    assert f"| {bench['presets']['tiny, with checkpointing']['ms_per_step']:.1f} |" in row
    assert "**NVIDIA T4**" in text and "out of memory: x" in text and "No GPU benchmark" not in text
    assert text.count("kB / voxel") == 4 and "not a GPU measurement" in text
    assert "| predictor |" in text and "| other parts |" in text  # the breakdown table


def test_perf_report_cli(tmp_path, capsys):
    from dkuxnet.cli import main

    assert main(["perf-report", "--results", str(tmp_path / "missing")]) == 2
    assert "--results" in capsys.readouterr().err
    assert main(["perf-report", "--results", str(tmp_path), "--out", str(tmp_path / "t.inc")]) == 0
    assert (tmp_path / "t.inc").read_text().startswith("### GPU benchmarks")


def test_run_bench_records_a_failing_row_and_runs_the_others(tmp_path):
    small = {"data.patch_size": [32, 32, 16]}
    bad = {"broken": ("tiny", {"model.num_queries": 5})}  # query groups no longer sum to N: ValueError
    result = run_bench(presets=["tiny"], device="cpu", steps=1, warmup=1, overrides=small, variants=bad)
    assert result["presets"]["broken"]["error"].startswith("ValueError: query_groups")
    assert result["presets"]["tiny"]["ms_per_step"] > 0
