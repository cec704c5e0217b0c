"""``dkuxnet check-gpu`` rehearsed on the CPU: every stage runs, one valid report, the summary table, the verdict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dkuxnet.perf import gpucheck
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
    assert {s["status"] for s in stages.values()} == {"ok"}
    assert stages["env"]["device"].startswith("cpu") and stages["env"]["commit"] is not None
    numeric = stages["numeric"]  # the CPU's fp32 step against float64, the 6 kMaX assignments replayed
    assert numeric["replayed_assignments"] == 6 and numeric["loss_relative_error"] < 1e-5
    assert max(numeric["gradient_error_by_group"].values()) < numeric["tolerance"]["gradient"]
    assert {"encoder", "predictor", "kmax.5"} <= set(numeric["gradient_error_by_group"])
    assert stages["checkpoint"]["replayed_layers"] == 2 and stages["checkpoint"]["assignments_in_backward"] == 0
    assert stages["bf16"]["autocast"] == "cpu bf16" and stages["bf16"]["relative_error"] < 5e-3
    assert stages["optimizer"]["optimizer"] == "AdamW" and stages["optimizer"]["relative_error"] < 1e-5
    assert stages["host_sync"]["host_conversions"] == [] and stages["host_sync"]["steps"] == 3
    assert stages["bench"]["fit"] == {"preset tiny": "trains"} and report["verdict"]["trains"] == ["preset tiny"]
    assert stages["bench"]["presets"]["preset tiny"]["ms_per_step"] > 0
    train = stages["train"]
    assert train["iterations"] == gpucheck.REHEARSAL["iterations"] and train["schedule"].startswith("shortened")
    assert train["bn_recompute_batches"] == gpucheck.REHEARSAL["bn_batches"]
    assert stages["evaluate"]["bn_stats"] == "recomputed" and stages["evaluate"]["dice_floor"] is None
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
    assert "this card trains: preset tiny" in printed and "loop fp32 1.00000" in printed
    assert "6 assignments replayed" in printed and "cpu bf16: loss" in printed and "0 host sync(s)" in printed


def test_check_gpu_records_a_failing_stage_and_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    def broken(plan: gpucheck.CheckPlan, done: dict) -> dict:
        raise RuntimeError("simulated failure")

    stages = {name: (lambda plan, done: {"numbers": 1}) for name in gpucheck.STAGES} | {"smoke": broken}
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
    assert "smoke: failed" in capsys.readouterr().out and report["verdict"]["text"] == "FAILED: smoke"


def test_summary_table_of_a_gpu_report() -> None:
    from dkuxnet.perf.checktable import summary_table

    report = {"ok": False, "options": {"rehearsal": False}, "stages": {
        "env": {"status": "warning", "seconds": 0.1, "device": "NVIDIA T4", "torch": "2.5", "cuda": "12.4",
                "cudnn": 90100, "memory_gib": 15.0, "warnings": ["compute capability 7.5: no native bf16"]},
        "smoke": {"status": "ok", "seconds": 9.0, "ms_per_step": 31.0, "infer_s_per_volume": 0.2},
        "numeric": {"status": "warning", "seconds": 2.0, "worst_group": "kmax.5", "loss_relative_error": 3e-5,
                    "gradient_error_by_group": {"kmax.5": 2e-3, "encoder": 1e-5}, "replayed_assignments": 6,
                    "tolerance": {"gradient": 1e-3, "loss": 1e-4},
                    "warnings": ["gradient fp32 vs float64, worst group 2.0e-03 > 1e-03 (tolerance not yet measured "
                                 "on a cuda card)"]},
        "host_sync": {"status": "failed", "seconds": 2.0, "error": "CheckFailed: host syncs in the training step: "
                      "item at engine.py:170\ntrace"},
        "bench": {"status": "ok", "seconds": 3.0, "card_memory_gib": 15.0, "trains": ["profile colab"],
                  "fit": {"preset paper": "does not fit: needs ≈ 57.3 GiB, this card has 15.0 GiB",
                          "profile colab": "trains"},
                  "presets": {"preset paper": {"error": "out of memory: x", "out_of_memory": True},
                              "profile colab": {"ms_per_step": 950.0, "peak_gib": 12.5, "infer_s_per_volume": 2.9}}},
        "train": {"status": "ok", "seconds": 120.0, "target": "profile colab", "iterations": 100, "ms_per_step": 950.0,
                  "peak_gib": 12.5, "loss_curve": [[20, 1.5], [100, 0.9]]},
        "evaluate": {"status": "warning", "seconds": 60.0, "metrics": {"dice": {"mean": 0.22}}, "n_cases": 20,
                     "n_failed": 0, "seconds_per_volume": 2.9, "bn_stats": "recomputed", "dice_floor": 0.3,
                     "warnings": ["Dice 0.220 < floor 0.3 after 100 iterations (floor not yet measured on a card)"]},
        "loop_check": {"status": "skipped", "seconds": 0.0, "reason": "--loop-cases 0"},
    }}
    table = summary_table(report)
    assert "check-gpu on NVIDIA T4" in table and "15 GiB" in table and "warning: compute capability 7.5" in table
    assert "worst gradient group kmax.5 2.0e-03 (≤ 1e-03)" in table and "not yet measured on a cuda card" in table
    assert "item at engine.py:170" in table and "trace" not in table
    assert "preset paper: does not fit: needs ≈ 57.3 GiB, this card has 15.0 GiB" in table
    assert "profile colab: trains, 950 ms/step, peak 12.5 GiB" in table
    assert "profile colab: 100 its, 950 ms/step, peak 12.5 GiB, loss 1.500 -> 0.900" in table
    assert "Dice 0.2200 on 20 volumes (0 failed, recomputed BatchNorm statistics, floor 0.3)" in table
    assert "--loop-cases 0" in table and table.endswith("FAILED: host_sync")
    report["stages"]["host_sync"] = {"status": "ok", "seconds": 1.0, "steps": 3, "host_conversions": [],
                                     "cuda_sync_messages": [], "method": "m"}
    assert summary_table(report).endswith(
        "this card trains: profile colab (smaller presets and profiles need less memory); preset paper does not "
        "fit: needs ≈ 57.3 GiB, this card has 15.0 GiB; 3 warning(s) above")


@pytest.mark.parametrize("args, message", [
    (["--data-dir", "{tmp}/missing"], "--data-dir {tmp}/missing: no such folder"),
    (["--data-dir", "{tmp}"], "no train.list"),
    (["--preset", "paper"], "the rehearsal always runs the tiny preset"),
    (["--profile", "colab"], "the rehearsal runs the tiny preset (or the smoke profile)"),
    (["--preset", "tiny", "--profile", "smoke"], "give one of them"),
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
