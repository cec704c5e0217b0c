"""ScalarBatchNorm (the kMaX affinity norm) equals ``nn.BatchNorm1d(1)`` in float64, forward and backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dkuxnet.models.kmax import AssignmentHead, ScalarBatchNorm

TOL = dict(rtol=1e-10, atol=1e-12)


def _pair(momentum: float | None = 0.01) -> tuple[ScalarBatchNorm, nn.BatchNorm1d]:
    ours = ScalarBatchNorm(eps=1e-3, momentum=momentum).double()
    ref = nn.BatchNorm1d(1, eps=1e-3, momentum=momentum).double()
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.fill_(0.7)
            m.bias.fill_(-0.2)
    return ours, ref


def _step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor, reshape: bool) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_(True)
    y = module(x.view(x.shape[0], 1, -1)).view_as(x) if reshape else module(x)
    (y * dy).sum().backward()
    return y.detach(), x.grad, module.weight.grad.clone(), module.bias.grad.clone()


@pytest.mark.parametrize("momentum", [0.01, 0.3, None])
def test_training_steps_match_batchnorm1d(momentum):
    """Outputs, input/weight/bias gradients and running buffers after several steps, ≤ 1e-10 relative."""
    gen = torch.Generator().manual_seed(0)
    ours, ref = _pair(momentum)
    for step in range(4):
        x = 3.0 + 2.0 * torch.randn(2, 5, 6, 4, 3, dtype=torch.float64, generator=gen)  # B×N×X×Y×Z
        dy = torch.randn(x.shape, dtype=torch.float64, generator=gen)
        for m in (ours, ref):
            m.zero_grad()
        got, want = _step(ours, x, dy, reshape=False), _step(ref, x, dy, reshape=True)
        for name, a, b in zip(("y", "dx", "dweight", "dbias"), got, want):
            torch.testing.assert_close(a, b, **TOL, msg=lambda m, n=name, s=step: f"step {s} {n}: {m}")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), **TOL)


def test_eval_mode_and_state_dict_interchangeable():
    """Eval normalises with the running statistics; a BatchNorm1d(1) state_dict loads and gives the same output."""
    gen = torch.Generator().manual_seed(1)
    ours, ref = _pair()
    with torch.no_grad():
        ref.running_mean.fill_(0.4)
        ref.running_var.fill_(2.5)
    assert set(ours.state_dict()) == set(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    ours.eval(), ref.eval()
    x = torch.randn(3, 4, 10, dtype=torch.float64, generator=gen)
    dy = torch.randn(x.shape, dtype=torch.float64, generator=gen)
    got, want = _step(ours, x, dy, reshape=False), _step(ref, x, dy, reshape=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)
    expected = 0.7 * (x - 0.4) / (2.5 + 1e-3) ** 0.5 - 0.2  # hand-written eval formula
    torch.testing.assert_close(got[0], expected, **TOL)
    assert ours.running_mean.item() == 0.4 and ours.num_batches_tracked.item() == 0


def test_hand_computed_values():
    """x = [0, 1, 2, 3]: μ = 1.5, σ² = 1.25, running_var takes the unbiased 5/3; γ = 1, β = 0, ε = 0."""
    bn = ScalarBatchNorm(eps=0.0, momentum=1.0).double()
    y = bn(torch.tensor([[0.0, 1.0, 2.0, 3.0]], dtype=torch.float64))
    torch.testing.assert_close(y, (torch.tensor([[0.0, 1.0, 2.0, 3.0]], dtype=torch.float64) - 1.5) / 1.25**0.5)
    assert bn.running_mean.item() == pytest.approx(1.5) and bn.running_var.item() == pytest.approx(5 / 3)


def test_calls_no_batch_norm_kernel():
    """Neither forward nor backward dispatches a batch-norm operator (the slow single-channel kernels)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    bn = ScalarBatchNorm()
    x = torch.randn(2, 3, 8, requires_grad=True)
    with Ops() as ops:
        bn(x).square().sum().backward()
    assert ops.names and not [n for n in ops.names if "norm" in n], ops.names


def test_frozen_recompute_leaves_running_stats_alone():
    """Under activation checkpointing the recompute (momentum 0) does not update the statistics twice."""
    torch.manual_seed(0)
    head = AssignmentHead(4, 8, 6).double()
    ref = AssignmentHead(4, 8, 6).double()
    ref.load_state_dict(head.state_dict())
    pixels = torch.randn(2, 4, 4, 4, 4, dtype=torch.float64)
    queries = torch.randn(2, 8, 5, dtype=torch.float64)
    head(pixels, queries, checkpoint=True).square().sum().backward()
    ref(pixels, queries, checkpoint=False).square().sum().backward()
    for a, b in zip(head.state_dict().values(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, **TOL)
    for a, b in zip(head.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, **TOL)


def test_hand_computed_input_gradient():
    """x = [0, 1, 2, 3], dy = [1, 0, 0, 0], γ = 1, ε = 0: r = 1/√1.25, Σdy = 1, Σdy·x̂ = −1.5r, so
    dx = r(dy − 1/4 − x̂·(−1.5r)/4) = r·[0.3, −0.4, −0.1, 0.2]."""
    bn = ScalarBatchNorm(eps=0.0).double()
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0]], dtype=torch.float64, requires_grad=True)
    (dx,) = torch.autograd.grad(bn(x)[0, 0], x)
    expected = torch.tensor([[0.3, -0.4, -0.1, 0.2]], dtype=torch.float64) / 1.25**0.5
    torch.testing.assert_close(dx, expected, **TOL)


def test_bf16_autocast_is_an_fp32_island():
    """bf16 input under CPU bf16 autocast: fp32 output and statistics equal to the fp32 run on the same values
    (bf16 → fp32 is exact), the input gradient equal to fp32's rounded to bf16, the parameter gradients to
    within 1e-6 relative (the fp32 run's upstream gradient is the same tensor)."""
    gen = torch.Generator().manual_seed(2)
    x16 = (3.0 + torch.randn(2, 5, 40, generator=gen)).bfloat16().requires_grad_(True)
    x32 = x16.detach().float().requires_grad_(True)
    dy = torch.randn(2, 5, 40, generator=gen)
    ours, ref = ScalarBatchNorm(), ScalarBatchNorm()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = ours(x16)
    y32 = ref(x32)
    assert y16.dtype == torch.float32 and ours.running_mean.dtype == ours.running_var.dtype == torch.float32
    torch.testing.assert_close(y16, y32, rtol=0, atol=0)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), rtol=0, atol=0)
    (y16 * dy).sum().backward()
    (y32 * dy).sum().backward()
    assert x16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x16.grad, x32.grad.bfloat16(), rtol=0, atol=0)
    for a, b in ((ours.weight.grad, ref.weight.grad), (ours.bias.grad, ref.bias.grad)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


class _PeakBytes:
    """Peak bytes of the storages created inside (alive together), counted per aten op."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                import weakref

                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in counter.alive:
                        key, size = t.untyped_storage()._cdata, t.untyped_storage().nbytes()
                        counter.alive[key] = size
                        weakref.finalize(t.untyped_storage(), counter.alive.pop, key, None)
                counter.peak = max(counter.peak, sum(counter.alive.values()))
                return out

        self.alive: dict[int, int] = {}
        self.peak = 0
        self.mode = Mode()


def test_backward_holds_one_full_size_temporary():
    """Backward creates one input-sized tensor, the temporary that becomes dx (x̂ and dy·x̂ made it two)."""
    bn = ScalarBatchNorm()
    x = torch.randn(2, 8, 4096, requires_grad=True)
    dy = torch.randn_like(x)
    y = bn(x)
    counter = _PeakBytes()
    with counter.mode:
        y.backward(dy)
    full = x.numel() * x.element_size()
    assert full <= counter.peak < full + 4096, counter.peak  # + a few scalars
