"""Checkpoints: round trip, atomic write, and a clear CheckpointError for every bad file (library and CLI)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dkuxnet.checkpoint import FORMAT, checkpoint_state, load_checkpoint, load_model, save_checkpoint
from dkuxnet.cli import main
from dkuxnet.config import get_preset
from dkuxnet.errors import CheckpointError
from dkuxnet.models import create_model


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    return create_model(cfg), cfg


@pytest.fixture
def saved(tmp_path, tiny):
    model, cfg = tiny
    path = tmp_path / "run" / "last.pt"
    save_checkpoint(path, checkpoint_state(model, cfg, 7, provenance={"git_commit": "abc", "wall_s": 1.5}))
    return path


def test_round_trip_and_load_model(saved, tiny):
    model, cfg = tiny
    state = load_checkpoint(saved)
    assert state["format"] == FORMAT and state["iteration"] == 7
    assert state["provenance"] == {"git_commit": "abc", "wall_s": 1.5}
    loaded, cfg2 = load_model(saved, "cpu")
    assert cfg2 == cfg and not loaded.training
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_training_state_round_trips_under_its_keys(tmp_path, tiny):
    """checkpoint_state stores optimizer, rng and sampler under those keys; they load back equal."""
    _, cfg = tiny
    model = create_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(1, 1, 32, 16, 16)).seg_logits.sum().backward()
    optimizer.step()
    rng, sampler = {"torch": torch.get_rng_state()}, {"epoch": 3, "order": [2, 0, 1]}
    path = tmp_path / "full.pt"
    save_checkpoint(path, checkpoint_state(model, cfg, 5, optimizer=optimizer, rng=rng, sampler=sampler))
    state = load_checkpoint(path)
    assert set(state) == {"format", "config", "model", "iteration", "optimizer", "rng", "sampler"}
    assert torch.equal(state["rng"]["torch"], rng["torch"]) and state["sampler"] == sampler
    expected = optimizer.state_dict()
    assert state["optimizer"]["param_groups"] == expected["param_groups"]
    for p, entry in expected["state"].items():
        for k, v in entry.items():
            assert torch.equal(state["optimizer"]["state"][p][k], v), (p, k)


def test_str_subclasses_are_stored_as_plain_str(tmp_path, tiny):
    model, cfg = tiny
    path = tmp_path / "v.pt"
    save_checkpoint(path, checkpoint_state(model, cfg, 1, provenance={"torch": torch.__version__}))
    stored = load_checkpoint(path)["provenance"]["torch"]
    assert type(stored) is str and stored == str(torch.__version__)


def test_save_is_atomic_and_leaves_no_temporary_files(saved, tiny):
    model, cfg = tiny
    save_checkpoint(saved, checkpoint_state(model, cfg, 8))  # overwrite in place
    assert load_checkpoint(saved)["iteration"] == 8
    assert sorted(os.listdir(saved.parent)) == ["last.pt"]


def test_unloadable_values_are_refused_and_keep_previous_file(saved, tiny):
    model, cfg = tiny
    with pytest.raises(ValueError, match="ndarray"):
        save_checkpoint(saved, checkpoint_state(model, cfg, 9, rng={"numpy": np.zeros(3)}))
    assert load_checkpoint(saved)["iteration"] == 7
    assert sorted(os.listdir(saved.parent)) == ["last.pt"]


def test_crash_while_writing_keeps_the_previous_checkpoint(saved, tiny, monkeypatch):
    """``torch.save`` dying halfway (half the bytes written, then an error) leaves the previous ``last.pt`` loadable,
    nothing partial under the final name and no temporary file."""
    model, cfg = tiny
    real_save = torch.save

    def crash_halfway(obj, f, *args, **kwargs) -> None:
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        Path(f).write_bytes(buffer.getvalue()[: buffer.tell() // 2])
        raise OSError("no space left on device")

    monkeypatch.setattr(torch, "save", crash_halfway)
    with pytest.raises(OSError, match="no space"):
        save_checkpoint(saved, checkpoint_state(model, cfg, 8))
    monkeypatch.undo()
    assert load_checkpoint(saved)["iteration"] == 7
    assert sorted(os.listdir(saved.parent)) == ["last.pt"]


@pytest.mark.parametrize(
    ("state", "word"),
    [({"config": {}, "model": {}}, "iteration"), ({"format": "other", "config": {}, "model": {}, "iteration": 0},
                                                  "format"),
     ({"config": {}, "model": {}, "iteration": 0, "extra": 1}, "extra")],
)
def test_save_rejects_bad_states(tmp_path, state, word):
    with pytest.raises(ValueError, match=word):
        save_checkpoint(tmp_path / "x.pt", state)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_truncated_file(saved, tmp_path):
    data = saved.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(cut)


def test_foreign_files(tmp_path, tiny):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match=str(text)):
        load_checkpoint(text)
    bare = tmp_path / "bare.pt"
    torch.save(tiny[0].state_dict(), bare)  # a plain state_dict: no 'format' key
    with pytest.raises(CheckpointError, match="not a dkuxnet checkpoint"):
        load_checkpoint(bare)
    other = tmp_path / "other.pt"
    torch.save({"format": "someone-else-v3"}, other)
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_checkpoint(other)


def test_config_that_cannot_build_a_model(tmp_path, tiny):
    model, cfg = tiny
    state = checkpoint_state(model, cfg, 1)
    bad_cfg = tmp_path / "bad_cfg.pt"
    save_checkpoint(bad_cfg, {**state, "config": {**state["config"], "model": {"no_such_field": 1}}})
    with pytest.raises(CheckpointError, match="config"):
        load_model(bad_cfg, "cpu")
    wrong_weights = tmp_path / "wrong_weights.pt"
    save_checkpoint(wrong_weights, {**state, "config": get_preset("vnet").to_dict()})
    with pytest.raises(CheckpointError, match="weights do not match"):
        load_model(wrong_weights, "cpu")


def test_cli_reports_bad_checkpoint_in_one_line(tmp_path, capsys):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(b"PK\x03\x04 truncated")
    rc = main(["evaluate", "--checkpoint", str(cut), "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: checkpoint") and str(cut) in err


def test_python_m_dkuxnet_evaluate_missing_checkpoint(tmp_path):
    missing = tmp_path / "missing.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "dkuxnet", "evaluate", "--checkpoint", str(missing), "--data-dir", str(tmp_path),
         "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: checkpoint {missing} does not exist"]
