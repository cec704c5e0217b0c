"""Precise BatchNorm statistics: the cumulative average, what the recompute leaves alone, both sets in the
checkpoint, recompute once, and eval mode agreeing with batch statistics after a short run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import dkuxnet.train as train_module
from dkuxnet.checkpoint import bn_stats_used, load_checkpoint, load_model, model_from_state, save_checkpoint
from dkuxnet.config import Config, get_preset
from dkuxnet.data.la import read_case, read_list
from dkuxnet.engine import Run, build_run
from dkuxnet.errors import CheckpointError
from dkuxnet.models.kmax import ScalarBatchNorm
from dkuxnet.precise_bn import batchnorm_layers, bn_buffers, recompute_bn_stats
from dkuxnet.results import build_result, validate_result
from dkuxnet.train import load_training_data, train

# the tiny preset at a smaller width and patch (as tests/test_train.py): a step takes well under a second
MICRO = {
    "model.widths": [4, 8, 8, 16], "model.depths": [1, 1, 1, 1], "model.hidden": 16, "model.num_queries": 6,
    "model.query_groups": [2, 2, 2], "model.query_dim": 8, "model.embed_dim": 8, "model.num_heads": 1,
    "model.ffn_dim": 16, "model.mlp_hidden": 8, "model.kmax_layers_per_scale": 1,
    "data.patch_size": [32, 32, 16], "data.labeled_bs": 1, "data.unlabeled_bs": 1,
    "train.max_iterations": 2, "train.log_every": 2, "train.checkpoint_every": 2, "train.bn_recompute_batches": 3,
}


def micro(**changes) -> Config:
    return get_preset("tiny").override(**{**MICRO, **changes})


def _run(cfg: Config, root: Path) -> Run:
    bank, n_labeled = load_training_data(cfg, root, torch.device("cpu"), progress=False)
    return build_run(cfg, bank, n_labeled, "cpu")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_momentum_none_is_the_plain_average_of_batch_statistics():
    """Hand-checked: batches {0, 2} and {4, 4, 10} have means 1 and 6 and unbiased variances 2 and 12, so the
    cumulative average holds mean (1 + 6)/2 = 3.5 and variance (2 + 12)/2 = 7 (torch's momentum=None)."""
    for bn in (nn.BatchNorm1d(1, momentum=None), ScalarBatchNorm(momentum=None)):
        for batch in ([0.0, 2.0], [4.0, 4.0, 10.0]):
            bn(torch.tensor(batch).view(-1, 1))
        assert bn.running_mean.item() == pytest.approx(3.5) and bn.running_var.item() == pytest.approx(7.0)
        assert bn.num_batches_tracked.item() == 2


class _Toy(nn.Module):
    """conv → BatchNorm3d → ReLU → ScalarBatchNorm, both norms with kMaX's momentum 0.01."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm3d(3, eps=1e-3, momentum=0.01)
        self.scalar = ScalarBatchNorm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scalar(self.bn(self.conv(x)).relu())


def test_recompute_is_the_mean_of_batch_means_and_unbiased_variances(phantom_root):
    """running_mean = (1/N) Σ_k mean(x_k), running_var = (1/N) Σ_k var_unbiased(x_k) over the N inputs each
    BatchNorm saw, per channel (BatchNorm3d) or over all entries (ScalarBatchNorm); the old EMA is discarded."""
    run = _run(micro(), phantom_root)
    run.model = toy = _Toy()
    with torch.no_grad():
        for bn in (toy.bn, toy.scalar):
            for name, value in (("running_mean", 5.0), ("running_var", 9.0), ("num_batches_tracked", 100)):
                getattr(bn, name).fill_(value)
    seen: dict[nn.Module, list[torch.Tensor]] = {toy.bn: [], toy.scalar: []}
    for bn in seen:
        bn.register_forward_pre_hook(lambda m, args: seen[m].append(args[0].detach().clone()))
    record = recompute_bn_stats(run, 5, seed=3)
    assert record == {"batches": 5, "seed": 3, "volumes_per_batch": 2, "cases": 8}  # 1 labeled + 7 unlabeled
    assert [x.shape[0] for x in seen[toy.bn]] == [2] * 5
    dims = (0, 2, 3, 4)
    expected = {
        toy.bn: (torch.stack([x.mean(dims) for x in seen[toy.bn]]).mean(0),
                 torch.stack([x.var(dims, correction=1) for x in seen[toy.bn]]).mean(0)),
        toy.scalar: (torch.stack([x.mean() for x in seen[toy.scalar]]).mean().view(1),
                     torch.stack([x.var(correction=1) for x in seen[toy.scalar]]).mean().view(1)),
    }
    for bn, (mean, var) in expected.items():
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)
        assert bn.num_batches_tracked.item() == 5 and bn.momentum == 0.01


def test_only_batchnorm_trains_and_everything_else_is_restored(phantom_root):
    """A V-Net with dropout gives the same statistics twice (dropout stays off); momenta, every module's mode,
    the run's generators, its sampler and the global RNG are as before."""
    cfg = get_preset("vnet").override(**{"data.patch_size": [32, 32, 32], "data.labeled_bs": 1,
                                         "model.vnet_filters": 4})
    run = _run(cfg, phantom_root)
    assert run.model.has_dropout
    dropout_modes = []
    run.model.dropout.register_forward_pre_hook(lambda m, args: dropout_modes.append(m.training))
    for model_mode in (True, False):
        run.model.train(model_mode)
        modes = {name: m.training for name, m in run.model.named_modules()}
        momenta = {name: m.momentum for name, m in batchnorm_layers(run.model).items()}
        rng = (run.host_gen.get_state(), run.device_gen.get_state(), torch.get_rng_state())
        sampler = run.sampler.state_dict()
        first = recompute_bn_stats(run, 2, seed=cfg.train.seed)
        stats = bn_buffers(run.model)
        assert recompute_bn_stats(run, 2, seed=cfg.train.seed) == first
        assert _same(bn_buffers(run.model), stats)
        assert first["cases"] == run.n_labeled == len(run.bank) and first["volumes_per_batch"] == 1  # labeled only
        assert {name: m.training for name, m in run.model.named_modules()} == modes
        assert {name: m.momentum for name, m in batchnorm_layers(run.model).items()} == momenta
        assert set(momenta.values()) == {0.1}
        after = (run.host_gen.get_state(), run.device_gen.get_state(), torch.get_rng_state())
        assert all(torch.equal(a, b) for a, b in zip(rng, after))
        now = run.sampler.state_dict()
        assert torch.equal(now.pop("generator"), sampler.pop("generator")) and now == sampler
    assert dropout_modes and not any(dropout_modes)


def test_two_networks_each_see_their_own_view(phantom_root):
    """The first network gets the weak view, the second the strong view of the same crops."""
    run = _run(micro(**{"model.two_networks": True, "loss.qdc_on": "cluster_probs"}), phantom_root)
    inputs: dict[str, list[torch.Tensor]] = {"first": [], "second": []}
    for name in inputs:
        getattr(run.model, name).register_forward_pre_hook(lambda m, args, n=name: inputs[n].append(args[0]))
    recompute_bn_stats(run, 2, seed=0)
    assert len(inputs["first"]) == len(inputs["second"]) == 2
    for weak, strong in zip(inputs["first"], inputs["second"]):
        assert weak.shape == strong.shape and not torch.equal(weak, strong)
    assert {m.num_batches_tracked.item() for m in batchnorm_layers(run.model).values()} == {2}


@pytest.fixture(scope="module")
def finished(phantom_root, tmp_path_factory):
    """A 2-iteration micro run with 3 recompute batches and its twin without recompute (else the same config)."""
    out = tmp_path_factory.mktemp("precise")
    train(micro(), phantom_root, out / "bn", device="cpu", progress=False)
    train(micro(**{"train.bn_recompute_batches": 0}), phantom_root, out / "plain", device="cpu", progress=False)
    return out


def test_checkpoint_holds_both_sets_and_the_loader_picks(finished):
    """``model`` keeps the training EMA (bit-equal to a run without recompute); ``bn_recomputed`` holds the
    recomputed buffers and the record; "auto" loads the recomputed ones, "ema" the EMA; an old checkpoint
    (no entry) loads with the EMA and refuses "recomputed"."""
    path, old_path = finished / "bn" / "last.pt", finished / "plain" / "last.pt"
    state, old = load_checkpoint(path), load_checkpoint(old_path)
    entry = state["bn_recomputed"]
    assert entry["record"] == {"batches": 3, "seed": 1337, "volumes_per_batch": 2, "cases": 8}
    assert _same(state["model"], old["model"])
    ema = {k: state["model"][k] for k in entry["buffers"]}
    assert set(entry["buffers"]) == set(bn_buffers(model_from_state(old)[0]))
    assert not _same(entry["buffers"], ema)
    assert json.loads((finished / "bn" / "summary.json").read_text())["bn_stats"] == {"recomputed": entry["record"]}
    assert json.loads((finished / "plain" / "summary.json").read_text())["bn_stats"] == {"recomputed": None}
    assert bn_stats_used(state) == "recomputed" and bn_stats_used(state, "ema") == "ema"
    assert _same(bn_buffers(model_from_state(state)[0]), entry["buffers"])
    assert _same(bn_buffers(load_model(path, "cpu", bn_stats="ema")[0]), ema)
    assert bn_stats_used(old) == "ema"
    assert _same(bn_buffers(model_from_state(old)[0]), {k: old["model"][k] for k in ema})
    with pytest.raises(CheckpointError, match=f"{old_path}.*no recomputed BatchNorm"):
        load_model(old_path, "cpu", bn_stats="recomputed")
    with pytest.raises(ValueError, match="bn_stats must be one of"):
        bn_stats_used(state, "precise")


def test_recompute_happens_once_per_final_iteration(finished, phantom_root, tmp_path, monkeypatch):
    """Training a finished run again keeps the stored statistics; a finished run without them recomputes (the
    same buffers: same weights and seed); resuming to a larger max_iterations recomputes at the new end."""
    run_dir = tmp_path / "bn"
    shutil.copytree(finished / "bn", run_dir)
    path = run_dir / "last.pt"
    stored = load_checkpoint(path)["bn_recomputed"]
    calls, recomputed = [], train_module.recomputed_bn_state

    def counted(*args, **kwargs):
        calls.append(1)
        return recomputed(*args, **kwargs)

    monkeypatch.setattr(train_module, "recomputed_bn_state", counted)
    summary = train(micro(), phantom_root, run_dir, device="cpu", resume=True, progress=False)
    assert calls == [] and summary["bn_stats"]["recomputed"] == stored["record"]
    assert _same(load_checkpoint(path)["bn_recomputed"]["buffers"], stored["buffers"])
    without = load_checkpoint(path)
    del without["bn_recomputed"]
    save_checkpoint(path, without)
    train(micro(), phantom_root, run_dir, device="cpu", resume=True, progress=False)
    assert len(calls) == 1 and _same(load_checkpoint(path)["bn_recomputed"]["buffers"], stored["buffers"])
    train(micro(**{"train.max_iterations": 3}), phantom_root, run_dir, device="cpu", resume=True, progress=False)
    state = load_checkpoint(path)
    assert len(calls) == 2 and state["iteration"] == 3
    assert state["bn_recomputed"]["record"] == stored["record"]
    assert not _same(state["bn_recomputed"]["buffers"], stored["buffers"])


def _dice(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Foreground Dice per item of B×K×X×Y×Z logits against B×X×Y×Z labels."""
    pred, truth = logits.argmax(1) == 1, labels == 1
    inter = (pred & truth).sum((1, 2, 3)).float()
    return 2 * inter / (pred.sum((1, 2, 3)) + truth.sum((1, 2, 3))).clamp(min=1)


def _foreground_crops(root: Path, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """One size³ crop per phantom case (train and test lists) centred on its foreground centroid."""
    images, labels = [], []
    for case in read_list(root / "train.list") + read_list(root / "test.list"):
        image, label = (torch.as_tensor(a) for a in read_case(root, case))
        centre = torch.nonzero(label).float().mean(0).round().long().tolist()
        box = tuple(slice(lo, lo + size) for lo in (min(max(c - size // 2, 0), s - size)
                                                    for c, s in zip(centre, label.shape)))
        images.append(image[box][None])
        labels.append(label[box])
    return torch.stack(images), torch.stack(labels)


@pytest.mark.slow  # ≈ 27 s on one thread
def test_eval_mode_with_recomputed_statistics_matches_batch_statistics(phantom_root, tmp_path):
    """The point of the recompute. The tiny preset (25 recompute batches) as a smoke run (32³ patches, batch
    1 + 1, lr 0.01) for its 40 iterations on the phantom (≈ 25 s on one thread). On 32³ crops around the
    foreground of all 10 phantom cases, the mean eval-mode Dice with the recomputed statistics is within
    0.1 of the mean training-mode Dice (batch statistics of the same crops in one batch). Measured for seeds
    0, 5 and 1337: within 0.02 (batch-statistics means 0.78–0.87), while the EMA's differs by up to 0.15."""
    cfg = get_preset("tiny").override(**{"data.patch_size": [32, 32, 32], "data.labeled_bs": 1,
                                         "data.unlabeled_bs": 1, "train.lr": 0.01, "train.log_every": 20})
    assert cfg.train.bn_recompute_batches == 25
    train(cfg, phantom_root, tmp_path, device="cpu", progress=False)
    state = load_checkpoint(tmp_path / "last.pt")
    model, _ = model_from_state(state)
    images, labels = _foreground_crops(phantom_root)
    with torch.no_grad():
        eval_dice = _dice(model(images).seg_logits, labels).mean().item()
        batch_dice = _dice(model.train()(images).seg_logits, labels).mean().item()
    assert batch_dice > 0.5, batch_dice
    assert abs(eval_dice - batch_dice) <= 0.1, (eval_dice, batch_dice)


def _summary(**extra) -> dict:
    cfg = get_preset("tiny").to_dict()
    return {"provenance": {"commit": "abc", "wall_s": 1.0}, "config": cfg, "labeled_num": 1, "iteration": 40,
            "device": "cpu", "torch_version": torch.__version__, "date": "2026-01-01T00:00:00+00:00",
            "mode": "fast", "seconds_per_volume": 0.1, "n_cases": 2, "n_failed": 0,
            "metrics": {m: {"mean": 0.5, "std": 0.1} for m in ("dice", "jaccard", "hd95", "asd")}, **extra}


def test_result_fields_bn_stats_and_data_sha256():
    """Optional in the results schema; copied from the evaluation summary; wrong values name the field."""
    assert "bn_stats" not in build_result(_summary())
    digest = "0123456789abcdef" * 4
    result = build_result(_summary(bn_stats="recomputed", data_sha256=digest))
    assert result["bn_stats"] == "recomputed" and result["data_sha256"] == digest
    validate_result({**result, "bn_stats": "ema"})
    for field, bad in (("bn_stats", "precise"), ("bn_stats", None), ("data_sha256", "ABC"),
                       ("data_sha256", digest + "\n"), ("data_sha256", 7)):
        with pytest.raises(ValueError, match=f"'{field}'"):
            validate_result({**result, field: bad})
