"""check-gpu's checks fail when their path breaks: a break planted in each, and the hand-checked helpers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dkuxnet import engine
from dkuxnet.models import blocks, kmax
from dkuxnet.perf import fit, gpucheck, rehearsal
from dkuxnet.perf.checks import CheckFailed, Tolerance, parameter_group, relative_error
from dkuxnet.perf.hostsync import HostSyncWatch
from dkuxnet.perf.numeric import train_step_vs_float64

CPU = torch.device("cpu")


def test_tolerance_fails_where_measured_and_warns_elsewhere() -> None:
    tol = Tolerance("error", 1e-3, ("cpu",))
    assert tol.judge(1e-3, CPU) == [] and tol.judge(2e-3, torch.device("cuda")) == [
        "error 2.0e-03 > 1e-03 (tolerance not yet measured on a cuda card)"]
    for bad in (2e-3, math.nan):
        with pytest.raises(CheckFailed, match="error"):
            tol.judge(bad, CPU)


def test_relative_error_and_parameter_group_hand_values() -> None:
    assert relative_error(torch.tensor([3.0, 5.0]), torch.tensor([3.0, 4.0])) == pytest.approx(0.2)  # 1 / 5
    assert relative_error(torch.zeros(2), torch.zeros(2)) == 0.0
    assert parameter_group("kmax.3.head.conv.weight") == "kmax.3"
    assert parameter_group("encoder.stem.weight") == "encoder"
    assert parameter_group("cluster_centers") == "cluster_centers"


def test_host_sync_watch_flags_device_tensors_only() -> None:
    weight = torch.ones(3, requires_grad=True)
    host = torch.arange(3)  # a host draw: turning it into numbers is no sync
    with HostSyncWatch([], None) as watch:
        total = (weight * 2).detach().sum()  # computed from a device tensor
        total.item(), float(total), bool(total), total.cpu(), host.tolist(), int(host[0])
        torch.zeros(2, device="cpu").sum().tolist()  # made on the device
    assert [f.split(" at ")[0] for f in watch.found] == ["item", "__float__", "__bool__", "cpu", "tolist"]


def _wrong_replay(monkeypatch: pytest.MonkeyPatch) -> None:
    """The replay hands a checkpoint's recomputation a shifted assignment (the forward keeps its own)."""
    original = kmax.replayed

    def replayed(owner: torch.nn.Module, compute):  # noqa: ANN001, ANN202
        value = original(owner, compute)
        recomputing = bool(blocks._replay_scopes) and blocks._replay_scopes[-1][0]
        return value.roll(1, dims=-1) if recomputing else value

    monkeypatch.setattr(kmax, "replayed", replayed)


@pytest.mark.parametrize("plant, message", [
    (_wrong_replay, "an assignment the forward did not compute"),
    (lambda mp: mp.setattr(kmax, "replayed", lambda owner, compute: compute()), "computed again in backward"),
])
def test_checkpoint_check_fails_on_a_broken_replay(monkeypatch: pytest.MonkeyPatch, plant, message: str) -> None:
    plant(monkeypatch)  # 2.5 s each
    with pytest.raises(CheckFailed, match=message):
        rehearsal.check_checkpoint_replay(CPU)


def test_bf16_check_fails_on_a_batchnorm_in_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    def bf16_forward(self: kmax.ScalarBatchNorm, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(x.bfloat16(), correction=0)  # the statistics in bf16
        return (x.bfloat16() - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias

    monkeypatch.setattr(kmax.ScalarBatchNorm, "forward", bf16_forward)
    with pytest.raises(CheckFailed, match="statistics reduced in torch.bfloat16"):
        rehearsal.check_bf16(CPU)


def test_bf16_check_fails_on_an_output_wrong_under_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    from dkuxnet.models.dkuxnet import DKUXNet

    original = DKUXNet.forward

    def forward(self: DKUXNet, x: torch.Tensor):  # noqa: ANN202
        out = original(self, x)
        if torch.is_autocast_enabled("cpu"):
            out.seg_logits = out.seg_logits.flip(1)  # background and atrium swapped, under autocast only
        return out

    monkeypatch.setattr(DKUXNet, "forward", forward)
    with pytest.raises(CheckFailed, match="loss bf16 autocast vs fp32"):
        rehearsal.check_bf16(CPU)


def test_optimizer_check_fails_on_a_wrong_step(monkeypatch: pytest.MonkeyPatch) -> None:
    def make(model: torch.nn.Module, cfg, device: torch.device) -> torch.optim.Optimizer:  # noqa: ANN001
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr * 1.01, weight_decay=cfg.weight_decay)

    monkeypatch.setattr(engine, "_make_optimizer", make)
    with pytest.raises(CheckFailed, match="optimiser update"):
        rehearsal.check_optimizer(CPU)


@pytest.mark.parametrize("convert", ["item", "__bool__"])
def test_host_sync_check_finds_a_conversion_in_the_step(monkeypatch: pytest.MonkeyPatch, convert: str) -> None:
    original = engine.semi_supervised_loss

    def loss(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        total, parts = original(*args, **kwargs)
        getattr(total.detach(), convert)()  # a host sync written into the training step
        return total, parts

    monkeypatch.setattr(engine, "semi_supervised_loss", loss)
    with pytest.raises(CheckFailed, match=f"host syncs in the training step: {convert} at "):
        rehearsal.check_host_sync(CPU, steps=1)


def test_numeric_check_fails_when_fp32_differs_from_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    from dkuxnet import losses

    original = losses.grouped_logsumexp
    monkeypatch.setattr(losses, "grouped_logsumexp",  # a reduction off by 0.1 % in fp32 only
                        lambda z, sizes: original(z, sizes) * (1.001 if z.dtype == torch.float32 else 1.0))
    with pytest.raises(CheckFailed, match="fp32 vs float64"):
        train_step_vs_float64(CPU)


def test_numeric_check_replays_the_float64_assignments(monkeypatch: pytest.MonkeyPatch) -> None:
    """An fp32 argmax that disagrees with float64's everywhere is never computed: the replay decides."""
    original = kmax.hard_assignment
    monkeypatch.setattr(kmax, "hard_assignment",
                        lambda m: original(m) if m.dtype == torch.float64 else original(-m))
    result = train_step_vs_float64(CPU)
    assert result["replayed_assignments"] == 6 and result["warnings"] == []


def _bench_plan(tmp_path: Path) -> gpucheck.CheckPlan:
    return gpucheck.CheckPlan(device=CPU, target=fit.preset_target("paper"), data_dir=None, iterations=1,
                              label_ratio=0.1, bench_steps=1, bench_warmup=1, loop_cases=0, rehearsal=False,
                              work_dir=tmp_path, progress=False)


def _plant_bench(monkeypatch: pytest.MonkeyPatch, fits: set[str], needs: dict[str, float], card: float) -> None:
    """Bench rows that run out of memory unless their label is in ``fits``; estimates from ``needs``."""
    oom = {"error": "out of memory: CUDA out of memory", "out_of_memory": True}
    ok = {"ms_per_step": 900.0, "peak_gib": 12.0, "infer_s_per_volume": 2.0}
    monkeypatch.setattr(gpucheck, "_bench_target", lambda plan, t: dict(ok if t.label in fits else oom))
    monkeypatch.setattr(gpucheck, "card_memory_gib", lambda device: card)
    monkeypatch.setattr(fit, "need_gib", lambda t: needs[t.label])
    monkeypatch.setattr(gpucheck, "_inference_runs", lambda plan: True)


NEEDS = {"preset paper": 57.3, "profile paper": 57.3, "profile colab": 14.0, "profile cpu": 6.0, "profile smoke": 1.0}


def test_out_of_memory_above_the_estimate_is_a_verdict_and_smaller_profiles_are_tried(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _plant_bench(monkeypatch, {"profile colab", "preset vnet"}, NEEDS, card=15.0)
    stage = gpucheck.run_stage("bench", _bench_plan(tmp_path), {})
    assert stage["status"] == "ok" and stage["trains"] == ["profile colab"]
    assert stage["fit"] == {"preset paper": "does not fit: needs ≈ 57.3 GiB, this card has 15.0 GiB",
                            "profile colab": "trains", "preset vnet": "trains"}  # the V-Net once one trains
    done = {"bench": stage}
    assert gpucheck.trained_target(_bench_plan(tmp_path), done) == fit.profile_target("colab")


def test_out_of_memory_below_the_estimate_fails(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _plant_bench(monkeypatch, set(), NEEDS, card=80.0)
    stage = gpucheck.run_stage("bench", _bench_plan(tmp_path), {})
    assert stage["status"] == "failed"
    assert "out of memory although the estimate is ≈ 57.3 GiB and this card has 80.0 GiB" in stage["error"]


def test_nothing_trains_gives_inference_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _plant_bench(monkeypatch, set(), NEEDS, card=0.5)
    stage = gpucheck.run_stage("bench", _bench_plan(tmp_path), {})
    assert stage["status"] == "ok" and stage["trains"] == [] and stage["inference_only"] is True
    assert list(stage["fit"]) == ["preset paper", "profile colab", "profile cpu", "profile smoke"]
    from dkuxnet.perf.checktable import verdict

    text = verdict({"stages": {"bench": stage}})["text"]
    assert text.startswith("inference only: no tried preset or profile trains; preset paper does not fit")
