"""``dkuxnet check-gpu`` rehearsed on the CPU: every stage runs, one valid report, the summary table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dkuxnet import gpucheck
from dkuxnet.cli import main
from dkuxnet.results import validate_result


def test_check_gpu_rehearsal_on_cpu(phantom_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "report.json"
    code = main(["check-gpu", "--rehearsal", "--device", "cpu", "--data-dir", str(phantom_root), "--out", str(out),
                 "--quiet"])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["schema"] == gpucheck.SCHEMA and report["ok"] is True
    assert report["options"]["rehearsal"] is True and report["options"]["preset"] == "tiny"
    stages = report["stages"]
    assert list(stages) == list(gpucheck.STAGES)
    assert {s["status"] for s in stages.values()} == {"ok", "not applicable"}
    assert stages["env"]["device"].startswith("cpu") and stages["env"]["commit"] is not None
    errors = stages["smoke"]["relative_error_vs_cpu_float64"]
    assert set(errors) == {"fp32.seg_logits", "fp32.query_probs"} and max(errors.values()) < 1e-5
    assert stages["host_sync"]["status"] == "not applicable" and "CPU" in stages["host_sync"]["reason"]
    assert stages["bench"]["presets"]["tiny"]["ms_per_step"] > 0
    train = stages["train"]
    assert train["iterations"] == gpucheck.REHEARSAL["iterations"] and train["schedule"].startswith("shortened")
    assert train["loss_curve"][-1][0] == train["iterations"]
    result = stages["evaluate"]["result"]
    validate_result(result)  # a record in the results/ schema, labelled as a short check run
    assert result["eval_mode"] == "protocol" and "check run" in result["notes"]
    assert stages["evaluate"]["n_cases"] == len((phantom_root / "test.list").read_text().split())
    (case,) = stages["loop_check"]["cases"]  # on a CPU only fp32: the same mask as the UA-MT loop
    assert case["dice_batched_fp32_vs_loop"] == 1.0 and case["voxels_differing_batched_fp32"] == 0
    assert "dice_batched_bf16_vs_loop" not in case
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # the run folder was temporary
    printed = capsys.readouterr().out
    for name in gpucheck.STAGES:
        assert f"\n{name} " in printed
    assert "no stage failed" in printed and "loop fp32 1.00000" in printed


def test_check_gpu_records_a_failing_stage_and_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    def broken(plan: gpucheck.CheckPlan) -> dict:
        raise RuntimeError("simulated failure")

    stages = {name: (lambda plan: {"numbers": 1}) for name in gpucheck.STAGES} | {"smoke": broken}
    monkeypatch.setattr(gpucheck, "STAGE_FUNCS", stages)
    monkeypatch.setattr(gpucheck, "summary_table", lambda report: "table")
    out = tmp_path / "sub" / "report.json"
    code = main(["check-gpu", "--rehearsal", "--device", "cpu", "--out", str(out), "--work-dir",
                 str(tmp_path / "work"), "--quiet"])
    report = json.loads(out.read_text())
    assert code == 1 and report["ok"] is False
    assert report["stages"]["smoke"]["status"] == "failed"
    assert "simulated failure" in report["stages"]["smoke"]["error"]
    assert [s["status"] for n, s in report["stages"].items() if n != "smoke"] == ["ok"] * (len(gpucheck.STAGES) - 1)
    assert (tmp_path / "work" / "phantom" / "test.list").is_file()  # rehearsal data without --data-dir, kept
    assert "smoke: failed" in capsys.readouterr().out


def test_summary_table_of_a_gpu_report() -> None:
    report = {"ok": False, "options": {"rehearsal": False}, "stages": {
        "env": {"status": "warning", "seconds": 0.1, "device": "NVIDIA T4", "torch": "2.5", "cuda": "12.4",
                "cudnn": 90100, "memory_gib": 15.0, "warnings": ["compute capability 7.5: no native bf16"]},
        "smoke": {"status": "ok", "seconds": 9.0, "ms_per_step": 31.0, "infer_s_per_volume": 0.2,
                  "relative_error_vs_cpu_float64": {"fp32.seg_logits": 2e-7, "bf16_autocast.seg_logits": 4e-3}},
        "host_sync": {"status": "warning", "seconds": 2.0, "steps": 3, "host_syncs": ["called a synchronizing op"],
                      "warnings": ["1 kind(s) of host sync"]},
        "bench": {"status": "failed", "seconds": 3.0, "error": "RuntimeError: every benchmark row failed\ntrace"},
        "train": {"status": "ok", "seconds": 120.0, "iterations": 100, "ms_per_step": 950.0, "peak_gib": 41.5,
                  "loss_curve": [[20, 1.5], [100, 0.9]]},
        "evaluate": {"status": "ok", "seconds": 60.0, "metrics": {"dice": {"mean": 0.42}}, "n_cases": 20,
                     "n_failed": 0, "seconds_per_volume": 2.9},
        "loop_check": {"status": "skipped", "seconds": 0.0, "reason": "--loop-cases 0"},
    }}
    table = gpucheck.summary_table(report)
    assert "check-gpu on NVIDIA T4" in table and "15 GiB" in table and "warning: compute capability 7.5" in table
    assert "bf16_autocast.seg_logits 4.0e-03" in table and "called a synchronizing op" in table
    assert "every benchmark row failed" in table and "trace" not in table
    assert "peak 41.5 GiB, loss 1.500 -> 0.900" in table and "Dice 0.4200 on 20 volumes" in table
    assert "--loop-cases 0" in table and table.endswith("FAILED: bench")


@pytest.mark.parametrize("args, message", [
    (["--data-dir", "{tmp}/missing"], "--data-dir {tmp}/missing: no such folder"),
    (["--data-dir", "{tmp}"], "no train.list"),
    (["--preset", "paper"], "the rehearsal always runs the tiny preset"),
    (["--iterations", "0"], "--iterations must be >= 1"),
    (["--out", "{tmp}"], "is a folder"),
])
def test_check_gpu_bad_arguments_are_one_line_errors(args: list[str], message: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out = tmp_path / "report.json"
    assert main(["check-gpu", "--rehearsal", "--device", "cpu", "--out", str(out), *args]) == 2  # last --out wins
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message.replace("{tmp}", str(tmp_path)) in err and err.count("\n") == 1
    assert not out.exists()


def test_check_gpu_without_cuda_asks_for_a_gpu_runtime_or_the_rehearsal(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    assert main(["check-gpu", "--device", "cpu", "--out", str(tmp_path / "r.json")]) == 2
    assert "pass --rehearsal" in capsys.readouterr().err
