"""publish: a finished run becomes a result file, its own files, a model and case arrays; the model reproduces them."""

from __future__ import annotations

import csv
import json

import pytest

from dkuxnet.checkpoint import load_checkpoint, model_from_state
from dkuxnet.cli import main
from dkuxnet.config import get_preset
from dkuxnet.data.phantom import make_phantom
from dkuxnet.publish import load_case
from dkuxnet.results import load_results
from dkuxnet.train import train


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("publish")
    data = make_phantom(root / "data", cases=6, shape=(40, 40, 32))
    cfg = get_preset("tiny").override(**{
        "data.labeled_num": 2, "data.labeled_bs": 1, "data.unlabeled_bs": 1, "train.max_iterations": 3,
        "train.bn_recompute_batches": 2, "train.lr": 0.01,
    })
    train(cfg, data, root / "run", device="cpu", progress=False)
    assert main(["publish", str(root / "run"), "--data-dir", str(data), "--results", str(root / "results"),
                 "--kind", "smoke", "--model", "--cases", "1", "--quiet"]) == 0
    return root, data


def test_publish_writes_result_files_model_and_cases(published):
    root, data = published
    (result,) = load_results(root / "results")  # runs/ is skipped: only the result file counts
    assert result["bn_stats"] == "recomputed" and result["bn_stats_other"]["bn_stats"] == "ema"
    assert result["iterations"] == 3 and len(result["data_sha256"]) == 64
    files = root / "results" / "runs" / "run"
    assert {p.name for p in files.iterdir()} == {
        "per_case.csv", "per_case_ema.csv", "metrics.jsonl", "train_summary.json", "model.pt", "cases"}
    state = load_checkpoint(files / "model.pt")
    assert "optimizer" not in state and "bn_recomputed" in state and state["provenance"]["commit"]
    train_summary = json.loads((files / "train_summary.json").read_text())
    assert train_summary["iterations"] == 3 and "out_dir" not in train_summary
    assert str(root) not in "".join(p.read_text() for p in files.glob("*.json"))  # no path of the training machine


def test_case_file_holds_the_models_prediction(published):
    root, data = published
    files = root / "results" / "runs" / "run"
    (case_file,) = (files / "cases").iterdir()
    case = load_case(case_file)
    rows = {r["case"]: r for r in csv.DictReader((files / "per_case.csv").open())}
    assert float(case["dice"]) == pytest.approx(float(rows[case_file.stem]["dice"]), abs=1e-9)
    assert case["truth"].shape == case["pred"].shape == tuple(case["shape"])
    assert case["image_crop"].shape == (32, 32, 32) and case["label_crop"].any()
    model, cfg = model_from_state(load_checkpoint(files / "model.pt"))
    assert not model.training and cfg.preset == "tiny"


def test_cases_need_the_model(published, tmp_path):
    root, data = published
    with pytest.raises(ValueError, match="needs model"):
        from dkuxnet.publish import publish_run

        publish_run(root / "run", data, tmp_path, "smoke", cases=1)
