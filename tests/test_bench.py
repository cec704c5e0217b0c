"""Benchmark: default rows, time cap, variants, profile, JSON file, summary table; the book's report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dkuxnet.cli import main
from dkuxnet.perf.bench import (
    LA_PATCH, LA_TEST_SHAPE, VARIANTS, default_out, default_rows, peak_tflops, run_bench, scaled_shape, variant_rows,
)
from dkuxnet.perf.core import timed_calls
from dkuxnet.perf.report import format_summary, perf_report
from dkuxnet.reproduce import COLAB_CHANGES

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
    result = run_bench(presets=["tiny"], device="cpu", out=out, steps=2, warmup=1, overrides=small, row_seconds=60)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert {"device", "torch", "cuda", "cudnn", "commit", "date", "steps", "warmup", "data", "presets"} <= set(result)
    assert result["steps"] == 2 and result["warmup"] == 1 and result["device_type"] == "cpu"
    tiny = result["presets"]["tiny"]
    assert tiny["patch"] == [32, 32, 16] and result["overrides"] == small
    assert tiny["batch"] == {"views": 2, "labeled": 2, "unlabeled": 2, "volumes": 8}
    assert len(tiny["ms_steps"]) == 2 == tiny["steps_timed"] and tiny["kind"] == "step"
    for key in ("ms_per_step", "tflop_per_step", "tflops_achieved", "infer_s_per_volume"):
        assert tiny[key] > 0, key
    assert tiny["infer_volume_shape"] == list(scaled_shape(tuple(tiny["patch"])))
    assert tiny["infer_windows"] > 1 and tiny["peak_gib"] is None and tiny["mfu"] is None


def test_memprobe_tool_reports_less_activation_memory_with_checkpointing(tmp_path):
    out = tmp_path / "mem.json"
    cmd = [sys.executable, str(ROOT / "tools" / "memprobe.py"), "--preset", "tiny", "--patch", "32", "32", "16",
           "--set", "model.checkpoint_activations=false", "--set", "model.checkpoint_activations=true", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    rows = json.loads(out.read_text())["rows"]
    plain, ckpt = (r["saved_bytes_per_voxel"] for r in rows)
    assert [r["overrides"] for r in rows] == [{"model.checkpoint_activations": v} for v in (False, True)]
    assert 0 < ckpt < 0.5 * plain
    assert all(r["estimated_peak_gib"] > 0 and r["batch"] == 8 and r["patches"] == [[32, 32, 16], [32, 32, 32]]
               for r in rows)
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
    assert "No GPU benchmark" in perf_report(tmp_path)  # a CPU bench is not a GPU benchmark
    profile = {"row": "paper", "sort_by": "self CUDA time", "total_ms": 10.0,
               "operators": [{"name": "aten::cudnn_batch_norm_backward", "self_ms": 6.0, "percent": 60.0, "calls": 2,
                              "input_shapes": [[1, 1, 128450560], []]}],
               "kernels": [{"name": "void cudnn::bn_bw_1C11_kernel_new<float, float2, 512, true, 1>(x | y)",
                            "self_ms": 6.0, "percent": 60.0, "calls": 2}]}
    (tmp_path / "bench_oom.json").write_text(json.dumps({
        "device": "NVIDIA T4", "presets": {"paper": {"error": "out of memory: x"}}, "profile": profile}))
    (tmp_path / "memprobe_cpu.json").write_text((ROOT / "results" / "perf" / "memprobe_cpu.json").read_text())
    text = perf_report(tmp_path)
    bench = json.loads((tmp_path / "bench_cpu.json").read_text())
    row = next(line for line in text.splitlines() if line.startswith("| tiny, with checkpointing |"))
    assert f"| {bench['presets']['tiny, with checkpointing']['ms_per_step']:.1f} (1) |" in row
    assert "**NVIDIA T4**" in text and "out of memory: x" in text and "No GPU benchmark" not in text
    probe_rows = json.loads((tmp_path / "memprobe_cpu.json").read_text())["rows"]
    assert text.count("kB / voxel") == 2 * len(probe_rows) and "not a GPU measurement" in text
    assert "| predictor |" in text and "| other parts |" in text  # the breakdown table
    assert "Profile of one step of `paper` (`torch.profiler`, self CUDA time" in text  # the profile tables
    assert "| 6.00 | 60.0 | 2 | `aten::cudnn_batch_norm_backward` | `[[1, 1, 128450560], []]` |" in text
    assert "`void cudnn::bn_bw_1C11_kernel_new<float, float2, 512, true, 1>(x \\| y)`" in text  # pipe escaped


def test_perf_report_cli(tmp_path, capsys):
    assert main(["perf-report", "--results", str(tmp_path / "missing")]) == 2
    assert "--results" in capsys.readouterr().err
    assert main(["perf-report", "--results", str(tmp_path), "--out", str(tmp_path / "t.inc")]) == 0
    assert (tmp_path / "t.inc").read_text().startswith("### Benchmarks of this package")


def test_run_bench_records_a_failing_row_and_runs_the_others(tmp_path):
    small = {"data.patch_size": [32, 32, 16]}
    bad = {"broken": ("tiny", {"model.num_queries": 5})}  # query groups no longer sum to N: ValueError
    result = run_bench(presets=["tiny"], device="cpu", steps=1, warmup=1, overrides=small, variants=bad)
    assert result["presets"]["broken"]["error"].startswith("ValueError: query_groups")
    assert result["presets"]["broken"]["out_of_memory"] is False
    assert result["presets"]["tiny"]["ms_per_step"] > 0


def test_timed_calls_stop_at_the_time_cap():
    import time

    import torch

    cpu = torch.device("cpu")
    assert len(timed_calls(lambda: time.sleep(0.05), cpu, steps=10, seconds=0.12)) == 2  # a third would end at ~0.15 s
    assert len(timed_calls(lambda: time.sleep(0.05), cpu, steps=10, seconds=1e-6)) == 1  # at least one
    assert len(timed_calls(lambda: None, cpu, steps=3, seconds=60)) == 3


def test_default_rows_and_variant_registry():
    rows = default_rows("paper")
    assert [r.kind for r in rows] == ["step", "step", "fwdbwd", "step", "infer", "step"]
    assert rows[1].label == "paper, checkpointing off" and rows[1].changes == {"model.checkpoint_activations": False}
    assert default_rows("tiny")[1].changes == {"model.checkpoint_activations": True}  # toggled from the preset
    assert rows[3].preset == "vnet" and rows[5].changes == dict(COLAB_CHANGES)
    assert [r.label for r in variant_rows(["batch-1+1", "official"], "paper")] == [
        "paper, batch 1+1 per view", "official, official preset"]
    with pytest.raises(ValueError, match="variants: unknown variant 'nope'"):
        variant_rows(["nope"], "paper")
    with pytest.raises(ValueError, match="profile: no training-step"):
        run_bench(device="cpu", profile="no such row")
    help_text = subprocess.run([sys.executable, "-m", "dkuxnet", "bench", "--help"], capture_output=True, text=True,
                               cwd=ROOT, check=True).stdout
    assert all(name in help_text for name in VARIANTS)
    assert default_out("cpu") == Path("bench_cpu.json")


def test_bench_cli_default_rows_on_cpu(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    d = json.loads(out.read_text())
    rows = d["presets"]
    assert list(rows) == [r.label for r in default_rows("tiny")]
    assert not [label for label, r in rows.items() if "error" in r]
    assert rows["tiny, forward+backward, 1 volume"]["batch"]["volumes"] == 1
    assert rows["colab profile (tiny)"]["batch"] == {"views": 2, "labeled": 1, "unlabeled": 1, "volumes": 4}
    assert rows["tiny, checkpointing on"]["config"]["model"]["checkpoint_activations"] is True
    assert rows["tiny, protocol inference"]["infer_s_per_volume"] > 0 and rows["vnet"]["ms_per_step"] > 0
    assert all(r["patch"] == [32, 32, 16] and r["wall_s"] > 0 and r["steps_timed"] == 1 for r in rows.values())
    assert d["steps"] == 1 and d["warmup"] == 1 and d["cudnn_benchmark_limit"] is None and d["wall_s"] > 0
    assert "profile" not in d
    assert "ms/step" in printed and "colab profile (tiny)" in printed and f"wrote {out}" in printed


def test_bench_cli_profile_on_cpu(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", "--device", "cpu", "--profile", "--out", str(out), "--set", "train.seed=3"]) == 0
    printed = capsys.readouterr().out
    d = json.loads(out.read_text())
    p = d["profile"]
    assert p["row"] == "tiny" and p["sort_by"].startswith("self CPU time") and p["kernels"] == []
    assert 0 < len(p["operators"]) <= 25 and all({"name", "self_ms", "calls", "input_shapes"} <= set(e) for e in p["operators"])
    assert [e["self_ms"] for e in p["operators"]] == sorted((e["self_ms"] for e in p["operators"]), reverse=True)
    assert d["overrides"] == {"train.seed": 3} and "profile" not in d["presets"]["tiny"]
    assert "top operators by self CPU time" in printed


def test_format_summary_lists_failed_rows():
    d = {"device": "NVIDIA T4", "torch": "2", "cuda": "13", "cudnn": 9, "commit": "abc", "date": "today", "steps": 5,
         "warmup": 2, "row_seconds": 5.0, "cudnn_benchmark_limit": 1, "wall_s": 80.0,
         "presets": {"paper": {"kind": "step", "error": "out of memory: x"},
                     "vnet": {"kind": "step", "batch": {"volumes": 4}, "patch": [112, 112, 80], "ms_per_step": 120.0,
                              "steps_timed": 5, "peak_gib": 4.4, "first_step_s": 3.0, "wall_s": 5.0}}}
    text = format_summary(d)
    assert "FAILED paper: out of memory: x" in text and "120.0" in text and "cudnn.benchmark_limit 1" in text


def test_cpu_track_rows_run_at_the_cpu_presets_own_patch():
    from dkuxnet.perf.bench import bench_config, cpu_track_rows

    rows = {r.label: r for r in cpu_track_rows()}
    cpu = torch.device("cpu")
    for row in rows.values():
        cfg = bench_config(row.preset, cpu, row.changes)
        assert cfg.data.patch_size == (64, 64, 32) and cfg.data.resample == 2, row.label
    assert bench_config("cpu", cpu, rows["cpu"].changes).model.depthwise_conv == "auto"
    assert bench_config("cpu", cpu, rows["cpu, depthwise native"].changes).model.depthwise_conv == "native"
    assert bench_config("vnet", cpu, rows["vnet, cpu patch"].changes).model.arch == "vnet"
