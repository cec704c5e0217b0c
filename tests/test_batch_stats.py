"""dkuxnet.batch_stats: the fused BatchNorm paths take their batch statistics from the norm (float64, one process).

A norm whose batch is its input twice over (``Twice``: moments of n → the same μ, σ² over 2n, sums doubled) has
BatchNorm's output, input gradient and running mean, this input's dγ, dβ, and a running variance with the
unbiased factor 2n/(2n − 1): each fused path must show exactly that, so it reads both hooks and the count.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from dkuxnet.batch_stats import WholeBatchNorm, batch_moments, batch_sums, spans_batch, whole_batch_input_grad
from dkuxnet.models.kmax import ScalarBatchNorm
from dkuxnet.models.pixel_mlp import pixel_mlp
from dkuxnet.ops import batch_norm_gelu

TOL = dict(rtol=1e-10, atol=1e-12)
MOMENTUM = 0.1


class _Twice(WholeBatchNorm):
    def combine_moments(self, mean: Tensor, var: Tensor, count: int) -> tuple[Tensor, Tensor, int]:
        return mean, var, 2 * count

    def combine_sums(self, sums: Tensor) -> Tensor:
        return 2 * sums


class Twice3d(_Twice, nn.BatchNorm3d):
    """BatchNorm3d whose batch is its input twice over."""


class TwiceScalar(_Twice, ScalarBatchNorm):
    """ScalarBatchNorm whose batch is its input twice over."""


def _expected_running_var(h: Tensor, dims: tuple[int, ...]) -> Tensor:
    """(1 − m)·1 + m·σ²·2n/(2n − 1) after one step from running_var = 1."""
    n = h.numel() // h.var(dim=dims).numel()
    return (1 - MOMENTUM) + MOMENTUM * h.var(dim=dims, correction=0) * (2 * n / (2 * n - 1))


def _check(twice: nn.Module, plain: nn.Module, run: Callable[[nn.Module, Tensor], Tensor], x: Tensor, h: Tensor,
           dims: tuple[int, ...]) -> None:
    """``run(norm, x)`` with the two norms: equal outputs and gradients; the running statistics as stated above."""
    gen = torch.Generator().manual_seed(1)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = run(twice, xa), run(plain, xb)
    dy = torch.randn(ya.shape, dtype=ya.dtype, generator=gen)
    ya.backward(dy)
    yb.backward(dy)
    torch.testing.assert_close(ya, yb, **TOL)
    for a, b in ((xa.grad, xb.grad), (twice.weight.grad, plain.weight.grad), (twice.bias.grad, plain.bias.grad)):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(twice.running_mean, plain.running_mean, **TOL)
    torch.testing.assert_close(twice.running_var, _expected_running_var(h.detach(), dims).reshape(-1), **TOL)


def _pair(twice_cls: type, plain: nn.Module) -> tuple[nn.Module, nn.Module]:
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
        plain.bias.uniform_(-0.5, 0.5)
    twice = copy.deepcopy(plain)
    twice.__class__ = twice_cls
    return twice, plain


def test_batch_norm_gelu_reads_the_norms_batch() -> None:
    torch.manual_seed(0)
    twice, plain = _pair(Twice3d, nn.BatchNorm3d(3, momentum=MOMENTUM).double())
    x = torch.randn(2, 3, 4, 3, 2, dtype=torch.float64) * 2 + 1
    _check(twice, plain, lambda norm, xi: batch_norm_gelu(xi, norm), x, x, (0, 2, 3, 4))


def test_pixel_mlp_reads_the_norms_batch() -> None:
    torch.manual_seed(0)
    conv1, conv2 = nn.Conv3d(3, 5, 1, bias=False).double(), nn.Conv3d(5, 4, 1).double()
    twice, plain = _pair(Twice3d, nn.BatchNorm3d(5, momentum=MOMENTUM).double())
    x = torch.randn(2, 3, 4, 3, 2, dtype=torch.float64) + 0.5
    _check(twice, plain, lambda norm, xi: pixel_mlp(xi, conv1, norm, conv2, slab_voxels=2 * 3 * 2), x, conv1(x),
           (0, 2, 3, 4))


def test_scalar_batchnorm_reads_its_batch() -> None:
    torch.manual_seed(0)
    twice, plain = _pair(TwiceScalar, ScalarBatchNorm(momentum=MOMENTUM).double())
    x = torch.randn(2, 5, 7, dtype=torch.float64) * 3 - 1
    _check(twice, plain, lambda norm, xi: norm(xi), x, x.reshape(1, -1), (1,))


def test_plain_norms_keep_their_input_statistics() -> None:
    mean, var, sums = torch.ones(2), torch.full((2,), 3.0), torch.ones(2, 2)
    norm = nn.BatchNorm3d(2)
    assert not spans_batch(norm) and spans_batch(Twice3d(2))
    assert batch_moments(norm, mean, var, 5) == (mean, var, 5) and batch_sums(norm, sums) is sums
    with pytest.raises(NotImplementedError, match="combine_sums"):
        type("Half", (WholeBatchNorm, nn.BatchNorm1d), {})(2).combine_sums(sums)


def test_whole_batch_input_grad_hand_value() -> None:
    """x = [−1, 0, 1], μ = 0, r = 1, γ = 2, dy = [1, 0, 0]: Σdy = 1, Σdy·x̂ = −1, n = 3, so
    dx = γr(dy − 1/3 + x̂/3) = 2·[1/3, −1/3, 0]; the eval-mode input is γr·dy = [2, 0, 0]."""
    x = torch.tensor([[[-1.0, 0.0, 1.0]]], dtype=torch.float64)  # 1×1×3: one channel
    f64 = dict(dtype=torch.float64)
    dx = whole_batch_input_grad(torch.tensor([[[2.0, 0.0, 0.0]]], **f64), x, torch.tensor([2.0], **f64),
                                torch.zeros(1, **f64), torch.ones(1, **f64), torch.tensor([[1.0], [-1.0]], **f64), 3)
    torch.testing.assert_close(dx, torch.tensor([[[2 / 3, -2 / 3, 0.0]]], dtype=torch.float64))
