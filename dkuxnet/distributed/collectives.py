"""Collectives of a ``torchrun`` job: gather and sum over ranks with gradients, and the loop's host-side agreements.

Each returns its input unchanged in a single process.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from dkuxnet.distributed.launch import world


class _AllGather(torch.autograd.Function):
    """y = cat_r(x_r) on dim 0; backward: dx_r = rows r of Σ_r' dy_r' (the gradient of Σ_r' ℓ_r')."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        return torch.cat(parts)  # W·n×…

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> Tensor:
        total = dy.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total.narrow(0, ctx.rank * ctx.rows, ctx.rows)


class _AllSum(torch.autograd.Function):
    """y = Σ_r x_r on every rank; backward: dx_r = Σ_r' dy_r'."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        total = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> Tensor:
        total = dy.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total


def all_gather(x: Tensor) -> Tensor:
    r"""The tensors of all ranks concatenated on dim 0 (rank order), with gradient; ``x`` itself in one process.

    Every rank's ``x`` must have the same shape. Backward sums the incoming gradients over ranks and hands
    each rank its rows: the gradient of :math:`\sum_r \ell_r` when rank r's loss ℓ_r uses the result.
    """
    return _AllGather.apply(x) if world() > 1 else x


def all_sum(x: Tensor) -> Tensor:
    r""":math:`\sum_r x_r` on every rank, with gradient (backward: the incoming gradients summed over ranks); ``x`` in one process."""
    return _AllSum.apply(x) if world() > 1 else x


def sum_over_ranks(values: Tensor, replicated: list[bool]) -> Tensor:
    """Σ_r of each entry of ``values`` (one all-reduce), except the ``replicated`` ones, which are rank 0's."""
    if world() == 1:
        return values
    keep = torch.tensor(replicated, device=values.device) & (dist.get_rank() != 0)
    total = torch.where(keep, torch.zeros_like(values), values)
    dist.all_reduce(total)
    return total


def first_bad_over_ranks(first_bad: Tensor) -> Tensor:
    """The smallest non-negative ``first_bad`` (iteration of a non-finite loss) over ranks, or -1 when none has one."""
    if world() == 1:
        return first_bad
    big = torch.iinfo(first_bad.dtype).max
    lowest = torch.where(first_bad < 0, torch.full_like(first_bad, big), first_bad)
    dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
    return torch.where(lowest == big, torch.full_like(first_bad, -1), lowest)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on some rank (one all-reduce and one host sync)."""
    if world() == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
