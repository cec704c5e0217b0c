"""The committed real-data model (results/runs/cpu-all-r0.1-s1337) reproduces its committed per-case Dice.

CI has the LA data beside the repository; the test evaluates the committed ½-resolution DKUXNet-cpu model on
the first two test cases with the protocol and compares with the committed per-case CSV.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from dkuxnet.checkpoint import load_checkpoint, model_from_state
from dkuxnet.data import read_list
from dkuxnet.evaluate import evaluate_model
from dkuxnet.publish import load_case

REPO = Path(__file__).resolve().parents[1]
RUN = "cpu-all-r0.1-s1337"
FILES = REPO / "results" / "runs" / RUN
CASES = 2
TOLERANCE_PP = 0.1  # percentage points of Dice


def test_committed_files_agree_with_each_other():
    result = json.loads((REPO / "results" / "cpu" / f"{RUN}.json").read_text())
    state = load_checkpoint(FILES / "model.pt")
    assert FILES.joinpath("model.pt").stat().st_size <= 10 * 2**20
    assert state["provenance"]["commit"] == result["git_commit"] and state["iteration"] == result["iterations"]
    assert result["bn_stats"] == "recomputed" and state["bn_recomputed"]["record"]["batches"] == 25
    rows = {r["case"]: r for r in csv.DictReader((FILES / "per_case.csv").open())}
    for path in sorted((FILES / "cases").glob("*.npz")):
        # the case file's prediction was recomputed from model.pt (other thread count: rounding differs)
        assert float(load_case(path)["dice"]) == pytest.approx(float(rows[path.stem]["dice"]), abs=1e-4)


def test_committed_model_reproduces_its_per_case_dice(la_root):
    model, cfg = model_from_state(load_checkpoint(FILES / "model.pt"), "cpu")
    model = model.to(memory_format=torch.channels_last_3d)
    ids = read_list(la_root / "test.list")[:CASES]
    got = evaluate_model(model, la_root, ids, mode="protocol", patch=cfg.data.patch_size, device="cpu",
                         progress=False, resample=cfg.data.resample)
    committed = {r["case"]: float(r["dice"]) for r in csv.DictReader((FILES / "per_case.csv").open())}
    for row in got:
        assert abs(100 * row["dice"] - 100 * committed[row["case"]]) <= TOLERANCE_PP, row["case"]
