"""End-to-end evaluation of a tiny checkpoint on a small phantom; results schema, paper data, tables."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from dkuxnet.checkpoint import checkpoint_state, load_model, save_checkpoint
from dkuxnet.config import get_preset
from dkuxnet.data.la import read_case, read_list
from dkuxnet.data.phantom import make_phantom
from dkuxnet.evaluate import evaluate_checkpoint
from dkuxnet.inference import predict_fast, predict_protocol
from dkuxnet.metrics import case_metrics
from dkuxnet.models import create_model
from dkuxnet.results import (
    PAPER_SOURCE,
    build_result,
    load_results,
    paper_results,
    save_result,
    schedule_label,
    validate_result,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 5-case phantom with volumes a little larger than the tiny patch and a saved tiny-preset checkpoint."""
    root = tmp_path_factory.mktemp("eval")
    data = make_phantom(root / "data", cases=5, shape=(40, 40, 32))  # 4 train + 1 test case
    torch.manual_seed(0)
    cfg = get_preset("tiny").override(**{"data.labeled_num": 2, "train.max_iterations": 10})
    ckpt = root / "last.pt"
    prov = {"commit": "0123abc", "device": "test-cpu", "torch": torch.__version__, "wall_s": 3.5}  # as train.py writes
    model = create_model(cfg)
    with torch.no_grad():  # sharp query assignments, half the queries voting foreground: a non-empty, partial mask
        model.predictor.affinity_norm.weight.fill_(5.0)
        model.mlp[2].weight.zero_()
        model.mlp[2].bias.copy_(torch.tensor([[3.0, -3.0], [-3.0, 3.0]]).repeat(cfg.model.num_queries // 2, 1).ravel())
    save_checkpoint(ckpt, checkpoint_state(model, cfg, 10, provenance=prov))
    return root, data, ckpt, cfg


@pytest.fixture(scope="module")
def evaluated(setup):
    root, data, ckpt, _ = setup
    return {mode: evaluate_checkpoint(ckpt, data, root / mode, mode=mode, device="cpu", lcc=mode == "protocol",
                                      progress=False, save_predictions=1)
            for mode in ("fast", "protocol")}


def _reference_mask(ckpt, image: np.ndarray, mode: str) -> np.ndarray:
    """argmax_K ≠ 0 of the checkpoint's probabilities: UA-MT grid stride (18, 18, 4), or MONAI Gaussian, overlap 0.5."""
    model, cfg = load_model(ckpt, "cpu")
    patch = tuple(cfg.data.patch_size)
    if mode == "protocol":
        prob = predict_protocol(model, image, patch, (18, 18, 4))
    else:
        prob = predict_fast(model, image, patch, overlap=0.5, mode="gaussian")
    return (prob.argmax(0) != 0).numpy()


def _largest_26_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(np.argmax(sizes)) if n else mask


@pytest.mark.parametrize("mode", ["fast", "protocol"])
def test_evaluate_checkpoint_writes_outputs(setup, evaluated, mode):
    """per_case.csv, summary.json and the saved mask agree with the checkpoint's own prediction recomputed through
    the inference and metric functions (LCC: 26-connected largest component); provenance is carried over."""
    root, data, ckpt, cfg = setup
    summary = evaluated[mode]
    out = root / mode
    ids = read_list(data / "test.list")
    df = pd.read_csv(out / "per_case.csv")
    assert list(df["case"]) == ids
    assert {"dice", "jaccard", "hd95", "asd", "assd", "hd95_mm", "failed", "hd95_legacy", "seconds"} <= set(df)
    assert (("dice_lcc" in df) and ("failed_lcc" in df)) == (mode == "protocol")
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["mode"] == mode and on_disk["n_cases"] == len(ids) == summary["n_cases"]
    assert on_disk["iteration"] == 10 and on_disk["config"] == cfg.to_dict()
    assert on_disk["window"]["patch"] == list(cfg.data.patch_size)
    assert on_disk["provenance"]["commit"] == "0123abc" and on_disk["labeled_num"] == 2
    assert on_disk["torch_version"] == torch.__version__ and on_disk["date"] and on_disk["device"].startswith("cpu")
    image, label = read_case(data, ids[0])
    mask = _reference_mask(ckpt, image, mode)
    pred = np.load(out / "predictions" / f"{ids[0]}.npz")["pred"]
    assert pred.dtype == np.uint8 and np.array_equal(pred, mask)
    variants = {"": mask, "_lcc": _largest_26_component(mask)} if mode == "protocol" else {"": mask}
    for suffix, variant in variants.items():
        expected = case_metrics(variant, label)
        assert not expected["failed"]
        block = on_disk["lcc"] if suffix else on_disk
        for name in ("dice", "jaccard", "hd95", "asd"):
            assert df[name + suffix].iloc[0] == pytest.approx(expected[name], rel=1e-6), name + suffix
            assert block["metrics"][name] == {"mean": pytest.approx(expected[name], rel=1e-6), "std": 0.0}


def test_evaluate_rejects_unknown_mode(setup):
    root, data, ckpt, _ = setup
    with pytest.raises(ValueError, match="mode"):
        evaluate_checkpoint(ckpt, data, root / "x", mode="slow", progress=False)


def _result(evaluated):
    return build_result(evaluated["protocol"], name="tiny-test")


def test_result_round_trip(tmp_path, evaluated):
    r = _result(evaluated)
    assert r["wall_time_s"] == 3.5 and r["device"] == "test-cpu" and r["git_commit"] == "0123abc"
    assert r["torch_version"] == str(torch.__version__)
    assert r["schedule"] == "shortened: 10 of 40 iterations" and r["labeled_num"] == 2 and r["eval_mode"] == "protocol"
    save_result(tmp_path / "runs" / "tiny.json", r)
    (loaded,) = load_results(tmp_path / "runs")
    validate_result(loaded)
    expected = json.loads(json.dumps(r, allow_nan=True).replace("NaN", "null"))
    assert loaded == expected


@pytest.mark.parametrize("field", ["git_commit", "config", "seed", "schedule", "device", "torch_version",
                                   "wall_time_s", "date", "metrics", "n_failed", "eval_mode", "labeled_num"])
def test_missing_provenance_field_is_a_clear_error(evaluated, tmp_path, field):
    r = _result(evaluated)
    del r[field]
    with pytest.raises(ValueError, match=field):
        validate_result(r)
    with pytest.raises(ValueError, match=field):
        save_result(tmp_path / "r.json", r)
    assert not (tmp_path / "r.json").exists()


def test_validation_catches_inconsistencies(evaluated):
    r = _result(evaluated)
    for change, word in [({"source": PAPER_SOURCE}, "source"), ({"schedule": "shortened: 5 of 40 iterations"},
                                                                "schedule"), ({"seed": 1}, "seed"),
                         ({"eval_mode": "slow"}, "eval_mode"), ({"iterations": True}, "iterations"),
                         ({"config": {"model": {"widths": 3, "nonsense": 1}}}, "'config' is not a valid config")]:
        bad = {**copy.deepcopy(r), **change}
        with pytest.raises(ValueError, match=word):
            validate_result(bad)


@pytest.mark.parametrize(("iterations", "schedule"), [
    (10, "full"),  # 10 < the tiny preset's 40
    (10, "shortened: 5 of 40 iterations"),
    (10, "shortened: 10 of 50 iterations"),  # M is the preset's schedule
    (10, "shortened: 10 of 40 iteration"),
    (10, "shortened: 10 of 40 iterations "),
    (10, "Full"),
    (40, "shortened: 40 of 40 iterations"),
    (50, "shortened: 50 of 40 iterations"),
])
def test_validation_rejects_every_inconsistent_schedule(evaluated, iterations, schedule):
    """'schedule' must equal schedule_label(iterations, preset): "full" iff iterations ≥ the preset's M, else
    exactly "shortened: N of M iterations" with N = iterations."""
    bad = {**_result(evaluated), "iterations": iterations, "schedule": schedule}
    with pytest.raises(ValueError, match="schedule"):
        validate_result(bad)


@pytest.mark.parametrize(("iterations", "schedule"), [
    (10, "shortened: 10 of 40 iterations"), (39, "shortened: 39 of 40 iterations"), (40, "full"), (50, "full"),
])
def test_validation_accepts_the_consistent_schedules(evaluated, iterations, schedule):
    """The labels schedule_label writes for the tiny preset (M = 40) validate."""
    validate_result({**_result(evaluated), "iterations": iterations, "schedule": schedule})


def test_build_result_needs_wall_time(evaluated):
    summary = {**evaluated["fast"], "provenance": {}}
    with pytest.raises(ValueError, match="wall_time_s"):
        build_result(summary)
    assert build_result(summary, wall_time_s=2.0)["device"] == summary["device"]


def test_schedule_label():
    full = get_preset("paper").train.max_iterations
    assert schedule_label(full, "paper") == "full"
    assert schedule_label(100, "paper") == f"shortened: 100 of {full} iterations"


def test_load_results_names_bad_file_and_skips_perf(tmp_path):
    (tmp_path / "perf").mkdir()
    (tmp_path / "perf" / "bench_cpu.json").write_text(json.dumps({"presets": {}}))  # not a run result
    assert load_results(tmp_path) == []
    (tmp_path / "bad.json").write_text(json.dumps({"schema": "dkuxnet-result-v1"}))
    with pytest.raises(ValueError, match="bad.json"):
        load_results(tmp_path)


def test_paper_records_are_labelled_and_match_method_targets():
    records = paper_results()
    assert records and all(r["source"] == PAPER_SOURCE for r in records)
    main = {(r["method"], r["labeled"]): r for r in paper_results("main")}
    assert [main[("DKUXNet", n)]["dice"] for n in (4, 8, 16, 80)] == [85.96, 90.41, 91.70, 92.62]
    assert main[("V-Net", 80)]["hd95"] == 8.58
    ablation = [(r["ablation"], r["dice"], r["jaccard"], r["hd95"], r["asd"]) for r in paper_results("ablation")]
    assert ablation == [("seg", 77.73, 64.42, 16.86, 3.92), ("qdc", 82.12, 70.16, 23.63, 5.99),
                        ("segc", 85.52, 75.49, 14.90, 3.73), ("all", 90.41, 82.69, 7.32, 1.71)]
    for r in records:  # mean Jaccard ≥ J(mean Dice) (J = D / (2 − D) is convex) up to rounding
        d = r["dice"] / 100
        assert r["jaccard"] / 100 >= d / (2 - d) - 1e-3


def test_paper_and_our_tables_never_mix(evaluated):
    from dkuxnet.results import ours_table, paper_table

    main = paper_table("main")
    assert list(main.columns) == ["method", "labeled", "label_ratio", "dice", "jaccard", "hd95", "asd", "note"]
    assert len(main) == len(paper_results("main")) and main["labeled"].is_monotonic_increasing
    assert list(paper_table("ablation")["method"]) == ["L_seg", "L_seg + L_qdc", "L_seg + L_segc", "L_seg + L_qdc + L_segc"]
    with pytest.raises(ValueError, match="table"):
        paper_table("other")
    ours = _result(evaluated)
    full = {**copy.deepcopy(ours), "iterations": 40, "schedule": schedule_label(40, "tiny"), "notes": "longer"}
    table = ours_table([ours, full])
    assert len(table) == 2 and list(table["iterations"]) == [10, 40]
    assert table["Dice %"].iloc[0] == pytest.approx(100 * ours["metrics"]["dice"]["mean"])
    assert "shortened: 10 of 40 iterations" in table["run"].iloc[0] and "40 it (full)" in table["run"].iloc[1]
    assert "Dice % (other BN stats)" not in table.columns  # no run has the other evaluation
    paper_dice = {float(d) for d in main["dice"]}
    assert not paper_dice & {float(d) for d in table["Dice %"]}  # none of the paper's numbers in our table
    assert not math.isnan(table["Dice %"].iloc[0])


def test_load_results_skips_the_runs_folder(tmp_path):
    (tmp_path / "runs" / "some-run").mkdir(parents=True)
    (tmp_path / "runs" / "some-run" / "summary.json").write_text(json.dumps({"iterations": 3}))  # a run's own file
    assert load_results(tmp_path) == []


def test_other_bn_stats_and_the_table_of_one_kind_of_run(setup, evaluated):
    from dkuxnet.results import CPU_KIND, ours_table, run_kind

    _, data, ckpt, _ = setup
    ema = evaluate_checkpoint(ckpt, data, setup[0] / "ema", mode="fast", device="cpu", progress=False, bn_stats="ema")
    assert ema["bn_stats"] == evaluated["fast"]["bn_stats"] == "ema"  # this checkpoint has no recomputed statistics
    with pytest.raises(ValueError, match="bn_stats_other"):  # the 'other' evaluation must use the other statistics
        build_result(evaluated["fast"], other_bn_summary=ema)
    recomputed = {**evaluated["fast"], "bn_stats": "recomputed"}
    r = build_result(recomputed, other_bn_summary=ema)
    assert r["bn_stats_other"]["bn_stats"] == "ema"
    assert r["bn_stats_other"]["metrics"]["dice"] == ema["metrics"]["dice"]
    with pytest.raises(ValueError, match="another checkpoint"):
        build_result(recomputed, other_bn_summary={**ema, "iteration": 3})
    assert run_kind(r) == "tiny preset on test-cpu"
    cpu = copy.deepcopy(r)
    cpu["config"]["data"]["resample"] = 2
    cpu["device"] = "cpu (x86_64, 2 cores)"
    assert run_kind(cpu) == CPU_KIND
    table = ours_table([r, cpu], CPU_KIND)
    assert len(table) == 1 and table["iterations"].iloc[0] == r["iterations"]
    assert table["Dice %"].iloc[0] == pytest.approx(100 * r["metrics"]["dice"]["mean"])
    assert table["Dice % (other BN stats)"].iloc[0] == pytest.approx(100 * ema["metrics"]["dice"]["mean"])
    assert "reported by the paper" not in table.to_string() and ours_table([r], CPU_KIND).empty
