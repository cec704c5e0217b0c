"""The device script (tools/device/gpu_checks.py) rehearsed on the CPU: every stage runs, files and table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from dkuxnet.results import validate_result

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_checks", ROOT / "tools" / "device" / "gpu_checks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_checks_rehearsal_on_cpu(phantom_root, tmp_path, capsys):
    checks = _load()
    out, run = tmp_path / "out", tmp_path / "run"
    args = ["--out", str(out), "--data", str(phantom_root), "--run-dir", str(run), "--preset", "tiny",
            "--patch", "32", "32", "32", "--iterations", "2", "--steps", "1", "--loop-cases", "1", "--device", "cpu"]
    assert checks.main(["--stages", "env,smoke,fwdbwd,bench,train", *args]) == 0
    smoke = json.loads((out / "checks.json").read_text())["smoke"]
    assert smoke["host_syncs_in_step"] == []  # nothing to detect on a CPU; on CUDA the list names each sync
    assert set(smoke["relative_error_vs_cpu_fp64"]) == {"fp32.seg_logits", "fp32.query_probs"}
    assert max(smoke["relative_error_vs_cpu_fp64"].values()) < 1e-5
    assert checks.main(["--stages", "train,eval", *args, "--iterations", "3"]) == 0  # resumes 2 -> 3
    report = json.loads((out / "checks.json").read_text())
    assert set(report) >= {"args", "train", "eval"}
    first = json.loads((out / "bench_tiny.json").read_text())  # written by the first call's bench stage
    assert first["device"].startswith("cpu") and first["presets"]["tiny"]["ms_per_step"] > 0
    assert json.loads((out / "train_summary.json").read_text())["iterations"] == 3
    result = json.loads((out / "result.json").read_text())
    validate_result(result)  # valid in the results/ schema, labelled as a short check run
    assert result["iterations"] == 3 and result["schedule"].startswith("shortened") and "check run" in result["notes"]
    assert (out / "eval_per_case.csv").read_text().count("\n") == 1 + len((phantom_root / "test.list").read_text().split())
    (loop,) = report["eval"]["loop_check"]
    for name in ("batched_fp32", "batched_bf16"):  # on a CPU both are fp32: the same masks as the UA-MT loop
        assert loop[f"dice_{name}_vs_loop"] == 1.0 and loop[f"voxels_differing_{name}"] == 0
    bench = json.loads((out / "bench_tiny.json").read_text())
    assert set(bench["presets"]) == {"tiny", "vnet", "tiny, with checkpointing", "tiny, batch 1+1", "tiny, channels_last_3d"}
    assert len(list(out.iterdir())) <= 8  # what a device run can bring back
    table = capsys.readouterr().out
    assert "loop check" in table and "FAILED" not in table


def test_gpu_checks_records_a_failing_stage_and_goes_on(tmp_path, capsys):
    checks = _load()
    code = checks.main(["--stages", "eval,env", "--out", str(tmp_path), "--run-dir", str(tmp_path / "none"),
                        "--data", str(tmp_path / "missing"), "--preset", "tiny", "--device", "cpu"])
    report = json.loads((tmp_path / "checks.json").read_text())
    assert code == 1 and "error" in report["eval"] and report["env"]["device"].startswith("cpu")
    assert "eval: FAILED" in capsys.readouterr().out
