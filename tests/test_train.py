"""Training loop: learning, exact resume, the non-finite guard, run-folder rules, CLI."""

from __future__ import annotations

import datetime
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import dkuxnet.engine as engine
import dkuxnet.train as train_module
from dkuxnet.config import get_preset
from dkuxnet.data import make_split
from dkuxnet.engine import lr_at
from dkuxnet.errors import CheckpointError, NonFiniteLossError
from dkuxnet.train import config_diff, schedule_label, train

# The tiny preset's architecture at a smaller width, patch and batch: every part and loss term of the
# DKUXNet step is present, and a step takes well under a second on a 2-core CPU.
MICRO = {
    "model.widths": [4, 8, 8, 16], "model.depths": [1, 1, 1, 1], "model.hidden": 16, "model.num_queries": 6,
    "model.query_groups": [2, 2, 2], "model.query_dim": 8, "model.embed_dim": 8, "model.num_heads": 1,
    "model.ffn_dim": 16, "model.mlp_hidden": 8, "model.kmax_layers_per_scale": 1,
    "data.patch_size": [32, 32, 16], "data.labeled_bs": 1, "data.unlabeled_bs": 1,
    "train.log_every": 2, "train.checkpoint_every": 4,
}


def tiny(**changes):
    return get_preset("tiny").override(**{**MICRO, **changes})


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _load(run_dir: Path) -> dict:
    return torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["iteration"] == b["iteration"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for p in sa:
        for k in sa[p]:
            assert torch.equal(torch.as_tensor(sa[p][k]), torch.as_tensor(sb[p][k])), (p, k)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]


@pytest.fixture(scope="module")
def reference_run(phantom_root, tmp_path_factory):
    """8 uninterrupted iterations: the target of the resume test."""
    out = tmp_path_factory.mktemp("ref")
    train(tiny(**{"train.max_iterations": 8}), phantom_root, out, device="cpu", progress=False)
    return out


def test_lr_schedule_is_the_vnet_step_decay():
    sgd = get_preset("vnet").train  # lr 0.01, x0.1 every 2500 iterations
    assert [lr_at(sgd, i) for i in (0, 2499)] == [0.01, 0.01]
    assert lr_at(sgd, 2500) == pytest.approx(1e-3) and lr_at(sgd, 5000) == pytest.approx(1e-4)
    assert lr_at(get_preset("paper").train, 14999) == 1e-4  # constant


def test_schedule_label_and_config_diff():
    cfg = get_preset("paper")
    assert schedule_label(cfg) == "full"
    assert schedule_label(cfg.override(**{"train.max_iterations": 3000})) == "shortened: 3000 of 15000 iterations"
    changed = cfg.override(**{"loss.tau": 0.5, "data.patch_size": [64, 64, 48]})
    assert config_diff(cfg.to_dict(), changed.to_dict()) == ["data.patch_size", "loss.tau"]


def test_loss_falls(phantom_root, tmp_path):
    # lr 1e-2: the last 5-step window is 8-13% below the first for seeds 0, 1, 5 and 1337 (checked)
    cfg = tiny(**{"train.max_iterations": 20, "train.log_every": 5, "train.checkpoint_every": 20, "train.lr": 1e-2})
    summary = train(cfg, phantom_root, tmp_path, device="cpu", progress=False)
    rows = _metrics(tmp_path)
    assert [r["iteration"] for r in rows] == [5, 10, 15, 20]
    assert rows[-1]["loss"] < 0.95 * rows[0]["loss"], [r["loss"] for r in rows]
    assert summary["iterations"] == 20 and summary["schedule"] == "shortened: 20 of 40 iterations"
    assert summary["ms_per_step"] > 0 and summary["final"]["loss"] == rows[-1]["loss"]
    assert json.loads((tmp_path / "summary.json").read_text())["iterations"] == 20
    assert datetime.datetime.fromisoformat(summary["date"]).utcoffset() == datetime.timedelta(0)
    assert json.loads((tmp_path / "config.json").read_text()) == cfg.to_dict()


def test_stopped_and_interrupted_runs_resume_exactly(phantom_root, tmp_path, reference_run, monkeypatch):
    """Stop at 4, Ctrl-C at 6, resume to 8: same final state as 8 straight iterations, and metrics.jsonl holds
    exactly the logged iterations [2, 4, 6, 8] with the uninterrupted run's values (none lost, none twice);
    wall time and start date carry over."""
    still = SimpleNamespace(perf_counter=lambda: 100.0)  # a clock standing still: only carried-over wall time counts
    monkeypatch.setattr(train_module, "time", still)
    train(tiny(**{"train.max_iterations": 4}), phantom_root, tmp_path, device="cpu", progress=False)
    assert _load(tmp_path)["iteration"] == 4 and _load(tmp_path)["provenance"]["wall_s"] == 0.0
    started = _load(tmp_path)["provenance"]["started"]
    monkeypatch.setattr(train_module, "time", time)
    loss_fn, calls = engine.semi_supervised_loss, []

    def ctrl_c_at_second_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return loss_fn(*args, **kwargs)

    monkeypatch.setattr(engine, "semi_supervised_loss", ctrl_c_at_second_step)
    eight = tiny(**{"train.max_iterations": 8})
    with pytest.raises(KeyboardInterrupt):
        train(eight, phantom_root, tmp_path, device="cpu", resume=True, progress=False)
    assert _load(tmp_path)["iteration"] == 6  # the step in flight was finished and saved
    with (tmp_path / "metrics.jsonl").open("a") as f:  # a process killed after logging iteration 7, before saving
        f.write(json.dumps({"iteration": 7, "loss": 123.0}) + "\n")
    carried = _load(tmp_path)["provenance"]["wall_s"]
    monkeypatch.setattr(engine, "semi_supervised_loss", loss_fn)
    monkeypatch.setattr(train_module, "time", still)
    summary = train(eight, phantom_root, tmp_path, device="cpu", resume=True, progress=False)
    assert carried > 0 and summary["wall_s"] == carried  # carried over + this session's (none on the still clock)
    _assert_same_state(_load(tmp_path), _load(reference_run))
    timing = ("it_s", "elapsed_s")
    rows = [{k: v for k, v in r.items() if k not in timing} for r in _metrics(tmp_path)]
    expected = [{k: v for k, v in r.items() if k not in timing} for r in _metrics(reference_run)]
    assert [r["iteration"] for r in rows] == [2, 4, 6, 8]  # the checkpoint's line kept, the stale one dropped
    assert rows == expected  # and every logged value equals the uninterrupted run's
    assert _load(tmp_path)["provenance"]["started"] == started  # the run's start survives both resumes


@pytest.mark.parametrize("log_every", [2, 50])  # caught at a log sync / at the checkpoint sync
def test_non_finite_loss_keeps_last_good_checkpoint(phantom_root, tmp_path, monkeypatch, log_every):
    loss_fn, calls = engine.semi_supervised_loss, []

    def nan_at_third_step(*args, **kwargs):
        loss, parts = loss_fn(*args, **kwargs)
        calls.append(1)
        return (loss * math.nan if len(calls) == 3 else loss), parts

    monkeypatch.setattr(engine, "semi_supervised_loss", nan_at_third_step)
    cfg = tiny(**{"train.max_iterations": 6, "train.log_every": log_every, "train.checkpoint_every": 2})
    with pytest.raises(NonFiniteLossError, match="iteration 3"):
        train(cfg, phantom_root, tmp_path, device="cpu", progress=False)
    assert len(calls) == 4  # stopped at the first sync after the bad step
    ckpt = _load(tmp_path)
    assert ckpt["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_seg_ablation_uses_labeled_data_only(phantom_root, tmp_path, monkeypatch):
    sample, seen = engine.sample_patches, []

    def spy(bank, indices, patch, generator):
        seen.append((len(bank), list(indices)))
        return sample(bank, indices, patch, generator)

    monkeypatch.setattr(engine, "sample_patches", spy)
    cfg = tiny(**{"train.max_iterations": 2, "loss.ablation": "seg", "data.labeled_bs": 2})
    train(cfg, phantom_root, tmp_path, device="cpu", progress=False)
    n_labeled = len(make_split(phantom_root, label_ratio=cfg.data.label_ratio).labeled)
    assert seen == [(n_labeled, [0, 0])] * 2  # one labeled phantom case, chained to fill the batch


def test_vnet_baseline_runs_through_the_same_loop_and_resumes_exactly(phantom_root, tmp_path):
    # V-Net dropout draws from the global torch RNG, which the checkpoint must carry too
    vnet = get_preset("vnet").override(**{"data.patch_size": [32, 32, 32], "train.max_iterations": 4})
    summary = train(vnet, phantom_root, tmp_path / "ref", device="cpu", progress=False)
    assert summary["iterations"] == 4 and summary["schedule"] == "shortened: 4 of 6000 iterations"
    assert math.isfinite(summary["final"]["loss"]) and summary["final"]["qdc"] == 0
    train(vnet.override(**{"train.max_iterations": 2}), phantom_root, tmp_path / "b", device="cpu", progress=False)
    train(vnet, phantom_root, tmp_path / "b", device="cpu", resume=True, progress=False)
    _assert_same_state(_load(tmp_path / "b"), _load(tmp_path / "ref"))


def test_cli_train_and_run_folder_rules(phantom_root, tmp_path):
    sets = [a for k, v in MICRO.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    cmd = [sys.executable, "-m", "dkuxnet", "train", "--preset", "tiny", "--data-dir", str(phantom_root),
           "--out", str(tmp_path), "--max-iterations", "2", "--device", "cpu", "--quiet", *sets]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "summary.json").read_text())["iterations"] == 2
    cfg = tiny(**{"train.max_iterations": 2})
    ckpt = _load(tmp_path)  # weights_only=True
    assert ckpt["format"] == "dkuxnet-checkpoint-v1" and ckpt["config"] == cfg.to_dict()
    assert {"host", "device", "torch"} <= set(ckpt["rng"]) and ckpt["sampler"]["sizes"] == [1, 7, 1, 1]
    assert {"commit", "device", "torch", "date", "wall_s", "seed", "preset"} <= set(ckpt["provenance"])
    with pytest.raises(CheckpointError, match="resume"):
        train(cfg, phantom_root, tmp_path, device="cpu", progress=False)
    with pytest.raises(CheckpointError, match=r"loss\.tau \(checkpoint 0\.3, now 0\.5\)"):
        train(cfg.override(**{"loss.tau": 0.5}), phantom_root, tmp_path, device="cpu", resume=True, progress=False)
    with pytest.raises(CheckpointError, match="does not exist"):
        train(cfg, phantom_root, tmp_path / "empty", device="cpu", resume=True, progress=False)


def test_two_networks_ablation_trains_both_networks(phantom_root, tmp_path):
    with pytest.raises(ValueError, match="qdc_on='cluster_probs'"):
        train(tiny(**{"model.two_networks": True}), phantom_root, tmp_path / "bad", device="cpu", progress=False)
    cfg = tiny(**{"model.two_networks": True, "loss.qdc_on": "cluster_probs", "train.max_iterations": 2})
    summary = train(cfg, phantom_root, tmp_path / "run", device="cpu", progress=False)
    state = _load(tmp_path / "run")["model"]
    assert summary["iterations"] == 2 and summary["final"]["qdc"] > 0
    assert {k.split(".")[0] for k in state} == {"first", "second"}
    torch.manual_seed(cfg.train.seed)  # the initial weights, as train() draws them
    fresh = engine.create_model(cfg)
    moved = [k for k, v in fresh.state_dict().items() if v.is_floating_point() and not torch.equal(v, state[k])]
    assert any(k.startswith("first.") for k in moved) and any(k.startswith("second.") for k in moved)
