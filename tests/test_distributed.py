"""One run across processes (torchrun; dkuxnet.distributed): 2 gloo ranks on the CPU against one process.

The 2-rank runs start as torchrun starts them (the RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* variables, then
``train()``), spawned once per module.

Tolerances. The 2-rank run sums in another order (per-rank partial sums, all-reduces): fp32 differences of
≈ 1e-7 relative. The optimiser is SGD, so a weight differs by lr × its gradient's difference; AdamW would
turn the noise in mathematically zero gradients (a conv bias before a BatchNorm) into ±lr steps. The kMaX
hard argmax can flip a voxel whose two best queries tie within that noise; the flip moves that voxel's
value between two k-means centres, which shifts the k-means BatchNorm variances by up to ≈ 1e-3 relative
(measured after 3 steps: 9e-4, and 4e-3 with another summation order in the synced BatchNorm kernels, where
the third step, in one process from the 2-rank weights, flips a voxel) but not the outputs (the k-means
projection starts at γ = 0); every other running variance agrees within 5e-5. Hence: losses rtol 1e-5;
weights atol 1e-5; running variances rtol 1e-2; running means 1e-4 of their channel's std.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from dkuxnet.config import Config, get_preset
from dkuxnet.distributed import (
    SYNCED, Shard, ShardedDropout3d, SyncBatchNorm3d, SyncScalarBatchNorm, launch_from_env, shard_dropout,
    sync_batchnorm,
)
from dkuxnet.losses import dice_ce_loss, ntxent_loss, qd_loss, uamt_seg_loss
from dkuxnet.models import create_model
from dkuxnet.models.kmax import AssignmentHead, ScalarBatchNorm
from dkuxnet.train import train

STEPS = 2


def _cfg(**changes: object) -> Config:
    """The tiny preset (2 + 2 volumes, 2 views, all losses), SGD, every step logged, BN recompute over 2 batches."""
    base = {"train.max_iterations": STEPS, "train.log_every": 1, "train.checkpoint_every": STEPS,
            "train.bn_recompute_batches": 2, "train.optimizer": "sgd", "train.lr": 0.01}
    return get_preset("tiny").override(**{**base, **changes})


def _worker(rank: int, world: int, port: int, root: str, runs: list[tuple[str, dict]]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from dkuxnet.distributed import teardown

    for out, changes in runs:
        train(_cfg(**changes), Path(root), Path(out), device="cpu", progress=False)
    teardown()


def _head_batch() -> tuple[AssignmentHead, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A float64 assignment head and a batch of 4 whose halves differ in mean and spread: pixels 4×3×5×4×3,
    queries 4×6×5, and the upstream gradient of the affinity 4×5×5×4×3."""
    torch.manual_seed(11)
    head = AssignmentHead(3, 6, 4).double()
    gen = torch.Generator().manual_seed(12)
    pixels = torch.randn(4, 3, 5, 4, 3, dtype=torch.float64, generator=gen)
    pixels[2:] = 3 * pixels[2:] + 2  # the second rank's volumes: other statistics
    queries = torch.randn(4, 6, 5, dtype=torch.float64, generator=gen)
    return head, pixels, queries, torch.randn(4, 5, 5, 4, 3, dtype=torch.float64, generator=gen)


def _affinity(head: AssignmentHead, pixels: torch.Tensor, queries: torch.Tensor, dy: torch.Tensor) -> dict:
    """Two training steps of the head's fused paths (a depthwise ConvBN with GELU: ``ops.batch_norm_gelu``; the
    slabbed pixel MLP; the scalar affinity BatchNorm); returns the last affinity, input and parameter gradients,
    and the buffers."""
    pixels, queries = pixels.clone().requires_grad_(), queries.clone().requires_grad_()
    for _ in range(2):
        head.zero_grad()
        pixels.grad = queries.grad = None
        m = head.affinity(head.pixel_keys(pixels, slab_voxels=4 * 3), head.query_out(queries))  # slabs of 1 X-plane
        m.backward(dy)
    grads = {k: v.grad for k, v in head.named_parameters()}
    return {"m": m.detach(), "pixels": pixels.grad, "queries": queries.grad, "grads": grads,
            "buffers": dict(head.named_buffers())}


def _fused_worker(rank: int, world: int, port: int, out: str) -> None:
    """Rank ``rank`` of 2: the synced head on its 2 of the 4 volumes; the moments and sums of a hand example."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    head, pixels, queries, dy = _head_batch()
    sync_batchnorm(head)
    rows = slice(2 * rank, 2 * rank + 2)
    result = _affinity(head, pixels[rows], queries[rows], dy[rows])
    norm = head.affinity_norm  # a SyncScalarBatchNorm: rank 0 holds [0, 2], rank 1 [4, 6]
    result["moments"] = norm.combine_moments(torch.tensor(1.0 + 4 * rank), torch.tensor(1.0), 2)
    result["sums"] = norm.combine_sums(torch.tensor([1.0 + rank, 10.0]))
    torch.save(result, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_fused_paths_take_the_whole_batch_statistics(tmp_path: Path) -> None:
    """2 gloo ranks, each with 2 of 4 volumes whose halves differ, against one process on all 4 (float64): the
    affinity rows, the input gradients, the parameter gradients summed over ranks and the running statistics
    after two steps match, so batch_norm_gelu, pixel_mlp and ScalarBatchNorm normalise with the whole batch.
    Hand check of the combination: [0, 2] and [4, 6] give μ = 3, σ² = 5 over n = 4; sums 1 + 2 = 3."""
    mp.start_processes(_fused_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    want = _affinity(*_head_batch())
    tol = dict(rtol=1e-9, atol=1e-11)
    for key in ("m", "pixels", "queries"):
        torch.testing.assert_close(torch.cat([r[key] for r in ranks]), want[key], **tol, msg=key)
    for k, g in want["grads"].items():
        torch.testing.assert_close(ranks[0]["grads"][k] + ranks[1]["grads"][k], g, **tol, msg=k)
    for r in ranks:
        for k, b in want["buffers"].items():
            torch.testing.assert_close(r["buffers"][k], b, **tol, msg=k)
        mean, var, n = r["moments"]
        assert (mean.item(), var.item(), n) == (3.0, 5.0, 4)
        assert r["sums"].tolist() == [3.0, 20.0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(phantom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Run folders: ``two`` (2 ranks, synced), ``per_rank`` (2 ranks, sync_batchnorm=False, 1 step), ``one`` (1 process)."""
    base = tmp_path_factory.mktemp("dist")
    out = {name: base / name for name in ("two", "per_rank", "one")}
    per_rank = {"train.sync_batchnorm": False, "train.max_iterations": 1, "train.bn_recompute_batches": 0}
    jobs = [(str(out["two"]), {}), (str(out["per_rank"]), per_rank)]
    mp.start_processes(_worker, args=(2, _free_port(), str(phantom_root), jobs), nprocs=2, start_method="spawn")
    torch.set_num_threads(1)
    train(_cfg(), phantom_root, out["one"], device="cpu", progress=False)
    return out


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _ckpt(run: Path) -> dict:
    return torch.load(run / "last.pt", map_location="cpu", weights_only=True)


def _assert_state_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Weights within 1e-5; running variances within 1e-2 relative; running means within 1e-4 of their channel's
    standard deviation (the mean of the k-means sums is 0 in exact arithmetic, their spread ≈ 20)."""
    assert a.keys() == b.keys()
    for k in a:
        if not a[k].is_floating_point():
            assert torch.equal(a[k], b[k]), k
        elif k.endswith("running_var"):
            torch.testing.assert_close(a[k], b[k], rtol=1e-2, atol=0, msg=k)
        elif k.endswith("running_mean"):
            std = b[k.replace("running_mean", "running_var")].sqrt()
            assert ((a[k] - b[k]).abs() <= 1e-4 * std).all(), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)


def test_two_ranks_match_one_process(runs: dict[str, Path]) -> None:
    two, one = _metrics(runs["two"]), _metrics(runs["one"])
    assert [r["iteration"] for r in two] == [r["iteration"] for r in one] == list(range(1, STEPS + 1))
    for a, b in zip(two, one):
        for part in ("loss", "dice_ce", "qd", "ds", "qdc", "segc", "ramp"):
            assert a[part] == pytest.approx(b[part], rel=1e-5), (a["iteration"], part)
    ca, cb = _ckpt(runs["two"]), _ckpt(runs["one"])
    _assert_state_close(ca["model"], cb["model"])
    _assert_state_close(ca["bn_recomputed"]["buffers"], cb["bn_recomputed"]["buffers"])
    assert ca["provenance"]["world_size"] == 2 and cb["provenance"]["world_size"] == 1
    assert json.loads((runs["two"] / "summary.json").read_text())["world_size"] == 2


def test_per_rank_statistics_differ(runs: dict[str, Path]) -> None:
    """sync_batchnorm=False: each rank normalises with its own 2 of the 4 volumes, so step 1 already differs."""
    per_rank, one = _metrics(runs["per_rank"])[0], _metrics(runs["one"])[0]
    assert per_rank["iteration"] == one["iteration"] == 1
    for part in ("loss", "dice_ce", "qd", "ds"):  # outside the tolerance within which the synced run matches
        assert per_rank[part] != pytest.approx(one[part], rel=1e-5), part
    assert not _ckpt(runs["per_rank"])["config"]["train"]["sync_batchnorm"]


def test_resume_a_two_rank_checkpoint_in_one_process(runs: dict[str, Path], phantom_root: Path, tmp_path: Path) -> None:
    resumed, reference = tmp_path / "resumed", tmp_path / "reference"
    shutil.copytree(runs["two"], resumed)
    shutil.copytree(runs["one"], reference)
    cfg = _cfg(**{"train.max_iterations": STEPS + 1})
    a = train(cfg, phantom_root, resumed, device="cpu", resume=True, progress=False)
    b = train(cfg, phantom_root, reference, device="cpu", resume=True, progress=False)
    assert a["world_size"] == 1 and a["iterations"] == STEPS + 1
    assert a["final"]["loss"] == pytest.approx(b["final"]["loss"], rel=1e-5)
    _assert_state_close(_ckpt(resumed)["model"], _ckpt(reference)["model"])


def test_launch_from_env() -> None:
    assert launch_from_env({}) is None and launch_from_env({"WORLD_SIZE": "1"}) is None
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    launch = launch_from_env(env)
    assert (launch.rank, launch.world, launch.local_rank) == (1, 2, 1)
    with pytest.raises(ValueError, match="MASTER_PORT"):
        launch_from_env({k: v for k, v in env.items() if k != "MASTER_PORT"})


def test_shard_splits_view_major_batches() -> None:
    x = torch.arange(8)  # [view 0: L0 L1 U0 U1][view 1: L0 L1 U0 U1]
    first, second = Shard(0, 2, 4, 2), Shard(1, 2, 4, 2)
    assert first.items(x, 2).tolist() == [0, 1, 4, 5] and second.items(x, 2).tolist() == [2, 3, 6, 7]
    labels = torch.tensor([10, 11])
    assert first.labels(labels).tolist() == [10, 11] and second.labels(labels).tolist() == []
    assert (first.local_labeled, second.local_labeled) == (2, 0)
    assert Shard(0, 1, 4, 2).gather_items(x, 2).tolist() == x.tolist()  # one rank: the identity
    with pytest.raises(ValueError, match="cannot be split evenly over 3 ranks"):
        Shard(0, 3, 4, 2)


def test_synced_batchnorm_in_one_process_is_batchnorm() -> None:
    """World of one: the synced forms compute BatchNorm (float64): outputs, gradients and running statistics."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 4, 3, dtype=torch.float64) * 3 + 1
    dy = torch.randn_like(x)
    for plain, synced_cls in ((nn.BatchNorm3d(3, eps=1e-3, momentum=0.1), SyncBatchNorm3d),
                              (ScalarBatchNorm(momentum=None), SyncScalarBatchNorm)):
        plain = plain.double()
        with torch.no_grad():
            plain.weight.uniform_(0.5, 1.5)
            plain.bias.uniform_(-1, 1)
        synced = type(plain)(*([3] if synced_cls is SyncBatchNorm3d else []), eps=plain.eps, momentum=plain.momentum)
        synced = synced.double()
        synced.load_state_dict(plain.state_dict())
        synced.__class__ = synced_cls
        outs = []
        for m in (plain, synced):
            xi = x.clone().requires_grad_()
            y = m(xi)
            y.backward(dy)
            outs.append((y, xi.grad, m.weight.grad, m.bias.grad))
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b)
        for k, v in plain.state_dict().items():
            torch.testing.assert_close(synced.state_dict()[k], v, msg=k)
        synced.eval()
        torch.testing.assert_close(synced(x), plain.eval()(x))


def test_sync_batchnorm_keeps_state_dict_and_refuses_unknown_norms() -> None:
    model = create_model(get_preset("tiny"))
    keys = list(model.state_dict())
    n = sum(isinstance(m, tuple(SYNCED)) for m in model.modules())
    assert sync_batchnorm(model) == n > 0
    assert list(model.state_dict()) == keys
    assert not any(type(m) in SYNCED for m in model.modules())
    with pytest.raises(ValueError, match="has no synced form"):
        sync_batchnorm(nn.Sequential(nn.SyncBatchNorm(2)))


def test_sharded_dropout_draws_the_whole_batch_mask() -> None:
    x = torch.ones(4, 3, 2, 2, 2)
    torch.manual_seed(5)
    whole = nn.Dropout3d(0.5)(x)
    halves = []
    for rank in (0, 1):
        m = nn.Sequential(nn.Dropout3d(0.5))
        assert shard_dropout(m, rank, 2) == 1 and isinstance(m[0], ShardedDropout3d)
        torch.manual_seed(5)
        halves.append(m(x[2 * rank:2 * rank + 2]))
    assert torch.equal(torch.cat(halves), whole)


def test_loss_shares_add_up_to_the_whole_batch() -> None:
    """Two parts of 3 + 1 volumes with ``total`` = 4: the shares sum to the one-call loss (hand check of the split)."""
    torch.manual_seed(1)
    logits, target = torch.randn(4, 3, 4, 4, 2), torch.randint(0, 3, (4, 4, 4, 2))
    parts = (slice(0, 3), slice(3, 4))
    whole = dice_ce_loss(logits, target)
    assert sum(dice_ce_loss(logits[p], target[p], total=4) for p in parts) == pytest.approx(whole.item(), rel=1e-6)
    for reduction in ("mean", "sum"):
        whole = qd_loss(logits, target, (1, 1, 1), reduction)
        shares = sum(qd_loss(logits[p], target[p], (1, 1, 1), reduction, total=4) for p in parts)
        assert shares == pytest.approx(whole.item(), rel=1e-6)
    # uamt: the Dice ratio of the whole batch's sums, batch_sum standing in for the all-reduce
    fg = torch.softmax(logits, 1)[:, 1]
    g = (target == 1).double()
    sums = [torch.stack([(fg[p] * g[p]).sum(), (fg[p] ** 2).sum(), (g[p] ** 2).sum()]) for p in parts]
    shares = [uamt_seg_loss(logits[p], target[p], total=4, batch_sum=lambda s, i=i: s + sums[1 - i])
              for i, p in enumerate(parts)]
    assert sum(shares).item() == pytest.approx(uamt_seg_loss(logits, target).item(), rel=1e-6)
    assert uamt_seg_loss(logits[:0], target[:0], total=4).item() == 0  # a part without volumes: share 0
    # voxel NT-Xent: per volume, the whole batch's voxel draws
    emb = torch.randn(8, 3, 4, 4, 2)  # [view 0: 4 volumes][view 1: 4 volumes]
    whole = ntxent_loss(emb, 0.5, "voxel", 8, torch.Generator().manual_seed(3))
    shard = Shard(1, 2, 4, 2)
    mine = ntxent_loss(shard.items(emb, 2), 0.5, "voxel", 8, torch.Generator().manual_seed(3), volumes=(2, 4))
    other = ntxent_loss(Shard(0, 2, 4, 2).items(emb, 2), 0.5, "voxel", 8, torch.Generator().manual_seed(3),
                        volumes=(0, 4))
    assert (mine + other).item() == pytest.approx(whole.item(), rel=1e-6)
