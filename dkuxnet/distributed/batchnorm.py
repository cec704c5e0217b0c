r"""BatchNorm with the statistics of the whole batch, all ranks' shares of it, forward and backward.

:func:`sync_batchnorm` changes the class of every BatchNorm of a model to its synced form, which is a
:class:`~dkuxnet.batch_stats.WholeBatchNorm` over the ranks: its moments and gradient sums are combined over
all ranks. The fused paths that compute a BatchNorm without calling it (``ops.batch_norm_gelu``,
``pixel_mlp``, :class:`~dkuxnet.models.kmax.ScalarBatchNorm`) take them through :mod:`dkuxnet.batch_stats`
too, so they keep their memory savings under torchrun and nothing else changes class.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dkuxnet.batch_stats import WholeBatchNorm, batch_sums, input_moments, update_running, whole_batch_input_grad
from dkuxnet.distributed.launch import world
from dkuxnet.models.kmax import ScalarBatchNorm


class _AllRanks(WholeBatchNorm):
    """A BatchNorm whose batch is the shares of all ranks, each holding as many entries (a :class:`Shard`'s)."""

    def combine_moments(self, mean: Tensor, var: Tensor, count: int) -> tuple[Tensor, Tensor, int]:
        r"""Each rank's mean m_r and biased variance v_r, gathered and combined in float64 (N ranks):

        .. math:: \mu = \frac1N\sum_r m_r,\qquad \sigma^2 = \frac1N\sum_r \big(v_r + (m_r - \mu)^2\big),
            \qquad n = N\cdot\text{count}.

        Returns μ, σ² in the dtype of ``mean``, ``var``.
        """
        if world() == 1:
            return mean, var, count
        parts = [torch.empty(2, *mean.shape, dtype=torch.float64, device=mean.device) for _ in range(world())]
        dist.all_gather(parts, torch.stack([mean, var]).double())
        means, variances = torch.stack(parts).unbind(1)  # N×C each
        mu = means.mean(0)
        return mu.to(mean.dtype), (variances + (means - mu) ** 2).mean(0).to(var.dtype), count * world()

    def combine_sums(self, sums: Tensor) -> Tensor:
        """Σ over ranks (one all-reduce)."""
        if world() == 1:
            return sums
        total = sums.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total


class _SyncBatchNormFn(torch.autograd.Function):
    r"""y = γ·(x − μ)·r + β with the whole batch's per-channel μ, σ² given, r = 1/√(σ² + ε); channels on dim 1.

    Backward: ∂x from the whole batch's Σdy, Σdy·x̂ (:func:`~dkuxnet.batch_stats.whole_batch_input_grad`);
    the parameter gradients are this rank's sums dγ = Σ_local dy·x̂, dβ = Σ_local dy (DDP sums them over ranks).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, var: Tensor, eps: float,
                norm: nn.Module, count: int) -> Tensor:
        ctx.save_for_backward(x, weight, mean, var)
        ctx.eps, ctx.norm, ctx.count = eps, norm, count
        return torch.native_batch_norm(x, weight, bias, mean, var, False, 0.0, eps)[0]

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, var = ctx.saved_tensors
        rstd = torch.rsqrt(var + ctx.eps)
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            dy, x, weight, mean, var, mean, rstd, False, ctx.eps, [True, True, True]
        )  # eval mode: dx = γr·dy, dw = Σ dy·x̂, db = Σ dy
        dx = whole_batch_input_grad(dx, x, weight, mean, rstd, batch_sums(ctx.norm, torch.stack([db, dw])), ctx.count)
        return dx, dw, db, None, None, None, None, None


class _Synced(_AllRanks):
    """``forward`` of a BatchNorm whose training statistics are the whole batch's (all ranks'); eval: its own."""

    def forward(self, x: Tensor) -> Tensor:
        bn: Any = self
        if not bn.training and bn.running_mean is not None:
            return super().forward(x)  # type: ignore[misc]
        bn._check_input_dim(x)
        mean, var, count = input_moments(bn, x, (0, *range(2, x.dim())))  # C each
        if bn.training and bn.track_running_stats:
            bn.num_batches_tracked.add_(1)
            m = 1.0 / bn.num_batches_tracked.to(mean.dtype) if bn.momentum is None else bn.momentum
            update_running(bn, mean, var, count, m)
        return _SyncBatchNormFn.apply(x, bn.weight, bn.bias, mean, var, bn.eps, bn, count)


class SyncBatchNorm1d(_Synced, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with whole-batch statistics in training (same parameters, buffers and state_dict keys)."""


class SyncBatchNorm2d(_Synced, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with whole-batch statistics in training (same parameters, buffers and state_dict keys)."""


class SyncBatchNorm3d(_Synced, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` with whole-batch statistics in training (same parameters, buffers and state_dict keys)."""


class SyncScalarBatchNorm(_AllRanks, ScalarBatchNorm):
    """:class:`~dkuxnet.models.kmax.ScalarBatchNorm` (one channel over every entry) with whole-batch statistics.

    Its own ``forward``, which takes its moments and gradient sums through :mod:`dkuxnet.batch_stats`.
    """


SYNCED = {nn.BatchNorm1d: SyncBatchNorm1d, nn.BatchNorm2d: SyncBatchNorm2d, nn.BatchNorm3d: SyncBatchNorm3d,
          ScalarBatchNorm: SyncScalarBatchNorm}


def sync_batchnorm(model: nn.Module) -> int:
    """Give every BatchNorm of ``model`` whole-batch statistics, in place; returns how many were converted.

    Each layer keeps its identity, parameters, buffers and ``state_dict`` keys (only its class changes, to the
    :data:`SYNCED` form), so checkpoints load into a synced or a plain model alike; the modules that compute
    their norms without calling them read the synced statistics through :mod:`dkuxnet.batch_stats`. Unlike
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` it keeps :class:`ScalarBatchNorm`'s one statistic over all
    entries, and it runs on gloo (CPU) as well as NCCL.

    Raises:
        ValueError: a BatchNorm type without a synced form here, or one without affine parameters.
    """
    converted = 0
    for name, m in model.named_modules():
        if type(m) in SYNCED.values() or not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        if type(m) not in SYNCED or m.weight is None:
            raise ValueError(f"model: BatchNorm {name!r} ({type(m).__name__}) has no synced form (affine "
                             f"{', '.join(t.__name__ for t in SYNCED)} only)")
        m.__class__ = SYNCED[type(m)]
        converted += 1
    return converted
