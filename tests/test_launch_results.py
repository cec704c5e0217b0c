"""Tests of the results of a grid: ours_table's mean ± sd over seeds, the host and job_id fields, collect_cell."""

from __future__ import annotations

import json
import math

import pytest

from dkuxnet.config import get_preset
from dkuxnet.results import SCHEMA, OUR_SOURCE, build_result, load_results, ours_table, schedule_label, validate_result


def _result(seed: int, dice: float, ablation: str = "all", hd95: float = 10.0, **extra) -> dict:
    cfg = get_preset("tiny").override(**{"train.seed": seed, "loss.ablation": ablation, "train.max_iterations": 40})
    metrics = {m: {"mean": v, "std": 0.0} for m, v in (("dice", dice), ("jaccard", dice / (2 - dice)),
                                                         ("hd95", hd95), ("asd", 1.0))}
    return {
        "schema": SCHEMA, "source": OUR_SOURCE, "name": f"{ablation}-s{seed}", "git_commit": "abc", "preset": "tiny",
        "config": cfg.to_dict(), "label_ratio": 0.1, "labeled_num": 8, "seed": seed, "iterations": 40,
        "schedule": schedule_label(40, "tiny"), "device": "cpu (x86_64, 2 cores)", "torch_version": "2.13.0",
        "wall_time_s": 60.0 * seed, "date": "2026-12-03", "eval_mode": "fast", "metrics": metrics, "n_cases": 4,
        "n_failed": seed % 2, **extra,
    }


def test_ours_table_averages_the_seeds_of_a_setting():
    # Dice 80, 84, 88 % over seeds 1, 2, 3: mean 84, sd sqrt((16 + 0 + 16) / 2) = 4 (hand-checked)
    results = [_result(3, 0.88), _result(1, 0.80), _result(2, 0.84), _result(1, 0.70, ablation="seg")]
    table = ours_table(results)
    assert list(table["losses"]) == ["L_seg", "L_seg + L_qdc + L_segc"] and list(table["n_seeds"]) == [1, 3]
    row = table.iloc[1]
    assert row["Dice %"] == pytest.approx(84.0) and row["Dice % sd"] == pytest.approx(4.0)
    assert row["wall min"] == pytest.approx(2.0) and row["wall min sd"] == pytest.approx(1.0)  # 1, 2, 3 min
    assert row["95HD"] == pytest.approx(10.0) and row["95HD sd"] == pytest.approx(0.0)
    assert row["failed"] == 2 and "seeds=1,2,3" in row["run"]  # failed cases summed: 1 + 0 + 1
    assert table.iloc[0]["Dice %"] == pytest.approx(70.0) and math.isnan(table.iloc[0]["Dice % sd"])
    assert "seed=1 " in table.iloc[0]["run"]
    columns = list(table.columns)
    assert columns.index("Dice % sd") == columns.index("Dice %") + 1 and "Dice % (other BN stats)" not in columns
    assert columns[:5] == ["method", "losses", "labeled", "Dice %", "Dice % sd"]  # the scores first


def test_ours_table_of_single_runs_has_no_sd_columns_and_refuses_duplicates():
    single = ours_table([_result(1, 0.8), _result(1, 0.7, ablation="seg")])
    assert list(single["n_seeds"]) == [1, 1] and not any(c.endswith(" sd") for c in single.columns)
    assert math.isnan(ours_table([_result(1, 0.8, hd95=math.nan), _result(2, 0.8)])["95HD"].iloc[0])  # NaN in, NaN out
    with pytest.raises(ValueError, match="same run"):
        ours_table([_result(1, 0.8), _result(1, 0.81)])


def test_host_and_job_id_are_optional_and_checked():
    validate_result(_result(1, 0.8, host="node7", job_id="12_3"))
    validate_result(_result(1, 0.8, host="ws", job_id=None))
    for extra, match in (({"host": ""}, "host"), ({"host": "n", "job_id": 5}, "job_id")):
        with pytest.raises(ValueError, match=match):
            validate_result(_result(1, 0.8, **extra))


def test_build_result_copies_host_and_job_id_from_the_provenance():
    cfg = get_preset("tiny").to_dict()
    summary = {"config": cfg, "iteration": 10, "device": "cpu", "torch_version": "2.13.0", "date": "2026-12-03",
               "mode": "fast", "seconds_per_volume": 0.1, "n_cases": 4, "n_failed": 0, "labeled_num": 1,
               "metrics": {m: {"mean": 0.5, "std": 0.1} for m in ("dice", "jaccard", "hd95", "asd")},
               "provenance": {"commit": "abc", "wall_s": 3.0, "host": "node7", "job_id": "4242"}}
    r = build_result(summary)
    assert (r["host"], r["job_id"]) == ("node7", "4242")
    del summary["provenance"]["host"], summary["provenance"]["job_id"]  # a checkpoint from before the fields
    assert "host" not in build_result(summary) and "job_id" not in build_result(summary)


def test_collect_cell_writes_a_result_load_results_reads(tmp_path):
    pytest.importorskip("torch")
    from dkuxnet.grid.collect import collect_cell

    run = tmp_path / "runs" / "tiny-all-r0.1-s1"
    (run / "eval").mkdir(parents=True)
    summary = {"config": get_preset("tiny").to_dict(), "iteration": 10, "device": "cpu", "torch_version": "2.13.0",
               "date": "2026-12-03", "mode": "fast", "seconds_per_volume": 0.1, "n_cases": 4, "n_failed": 0,
               "labeled_num": 1, "metrics": {m: {"mean": 0.5, "std": 0.1} for m in ("dice", "jaccard", "hd95", "asd")},
               "provenance": {"commit": "abc", "wall_s": 3.0, "host": "node7", "job_id": "4242"}}
    (run / "eval" / "summary.json").write_text(json.dumps(summary))
    (run / "eval" / "per_case.csv").write_text("case,dice\nA,0.5\n")
    (run / "metrics.jsonl").write_text('{"iteration": 10}\n')
    (run / "summary.json").write_text(json.dumps({"iterations": 10, "out_dir": "/home/me/runs", "checkpoint": "x"}))
    collect_cell(run, tmp_path / "results", "smoke", notes="phantom")
    [result] = load_results(tmp_path / "results")
    assert result["name"] == "tiny-all-r0.1-s1" and result["notes"] == "phantom" and result["job_id"] == "4242"
    files = tmp_path / "results" / "runs" / "tiny-all-r0.1-s1"
    assert (files / "per_case.csv").read_text() == "case,dice\nA,0.5\n" and (files / "metrics.jsonl").is_file()
    assert json.loads((files / "train_summary.json").read_text()) == {"iterations": 10}  # no local paths
    assert (tmp_path / "results" / "smoke" / "tiny-all-r0.1-s1.json").is_file()
