"""Autograd functions with lean backward passes for the full-resolution tensors of model and losses.

Each computes exactly what its plain PyTorch formulation computes (tests compare them in float64), but
saves and re-reads less: on a step at 8 × 112×112×80 the tensors they touch are 4 GB each in fp32.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from dkuxnet.batch_stats import batch_sums, input_moments, spans_batch, update_running, whole_batch_input_grad


class _L2Normalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, eps: float) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True)
        clamped = norm < eps  # there the norm is the constant eps: no gradient through it
        r = norm.clamp_min_(eps).reciprocal_()
        y = x * r
        ctx.save_for_backward(y, r, clamped)
        ctx.dim = dim
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        y, r, clamped = ctx.saved_tensors
        s = (dy * y).sum(dim=ctx.dim, keepdim=True).masked_fill_(clamped, 0.0)  # ⟨dy, y⟩ per vector
        return torch.addcmul(dy, y, s, value=-1.0).mul_(r), None, None


def l2_normalize(x: torch.Tensor, dim: int = 1, eps: float = 1e-12) -> torch.Tensor:
    r"""``F.normalize(x, p=2, dim=dim, eps=eps)``: :math:`y = x / \max(\lVert x\rVert_2, \varepsilon)` along ``dim``.

    Backward :math:`\partial x = (\partial y - y\,\langle \partial y, y\rangle)/\max(\lVert x\rVert, \varepsilon)`
    (without the projection where the norm is clamped), from the saved output and one reciprocal norm per
    vector: about half the memory traffic of the autograd graph of ``x / norm.clamp_min(eps)``, whose
    division backward materialises several full-size temporaries.
    """
    if eps <= 0:
        raise ValueError(f"eps: must be > 0, got {eps}")
    return _L2Normalize.apply(x, dim, eps)


class _BatchNormGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor | None,
                running_var: torch.Tensor | None, batch_stats: bool, momentum: float, eps: float,
                norm: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
        whole = batch_stats and spans_batch(norm)  # statistics of a batch beyond x (all ranks'): one more pass
        if whole:
            mean, var, count = input_moments(norm, x, (0, *range(2, x.dim())))  # C each
            if running_mean is not None:
                update_running(norm, mean, var, count, momentum)
            y = torch.native_batch_norm(x, weight, bias, mean, var, False, 0.0, eps)[0]
            invstd = torch.rsqrt(var + eps)
        else:
            y, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, batch_stats,
                                                      momentum, eps)
        if not batch_stats:  # eval: the running statistics normalise
            mean, invstd = running_mean.clone(), torch.rsqrt(running_var + eps)
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.batch_stats, ctx.eps, ctx.whole = batch_stats, eps, (norm, count) if whole else None
        return torch.ops.aten.gelu_(y)  # in place: no second full-size tensor in forward either

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, bias, mean, invstd = ctx.saved_tensors
        var = invstd.pow(-2) - ctx.eps  # σ² back from 1/√(σ² + ε), so the kernel below normalises as forward did
        y = torch.native_batch_norm(x, weight, bias, mean, var, False, 0.0, ctx.eps)[0]  # the forward's BN output
        dy = torch.ops.aten.gelu_backward(dout, y)
        del y
        if ctx.whole is None:
            dx, dw, db = torch.ops.aten.native_batch_norm_backward(
                dy, x, weight, mean, var, mean, invstd, ctx.batch_stats, ctx.eps, list(ctx.needs_input_grad[:3])
            )
            return dx, dw, db, None, None, None, None, None, None
        # whole batch: the eval-mode kernel gives γr·dy and this input's Σdy·x̂, Σdy; the batch's sums complete dx
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            dy, x, weight, mean, var, mean, invstd, False, ctx.eps, [True, True, True]
        )
        norm, count = ctx.whole
        dx = whole_batch_input_grad(dx, x, weight, mean, invstd, batch_sums(norm, torch.stack([db, dw])), count)
        return dx, dw, db, None, None, None, None, None, None


def batch_norm_gelu(x: torch.Tensor, norm: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    r"""``F.gelu(norm(x))`` for a BatchNorm module ``norm`` (any dims), saving only ``x`` for backward.

    .. math:: y = \operatorname{GELU}\big(\gamma\,(x - \mu)/\sqrt{\sigma^2 + \varepsilon} + \beta\big)

    with the batch statistics μ, σ² (biased) in training, the running ones in eval, and the running
    statistics updated exactly as ``norm`` would (momentum, or the cumulative average when it is None).
    Autograd of the two modules keeps two full-size tensors until backward, the BatchNorm input and its
    output (GELU's input); this keeps the input and, in backward, recomputes the normalised value with
    the saved per-channel statistics, then applies ``gelu_backward`` and ``native_batch_norm_backward``:
    the same kernels as autograd of the two modules. Not twice differentiable. A norm whose batch spans more
    than ``x`` (:func:`~dkuxnet.batch_stats.spans_batch`, the synced norms of a torchrun job) normalises with
    the whole batch's statistics and backpropagates with its gradient sums (:mod:`dkuxnet.batch_stats`).
    """
    if not isinstance(norm, nn.modules.batchnorm._BatchNorm) or not norm.affine:
        raise TypeError(f"norm: expected an affine BatchNorm module, got {type(norm).__name__}")
    norm._check_input_dim(x)
    factor = 0.0 if norm.momentum is None else norm.momentum
    if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:  # cumulative moving average
            factor = 1.0 / float(norm.num_batches_tracked)
    batch_stats = norm.training or norm.running_mean is None
    track = not norm.training or norm.track_running_stats
    return _BatchNormGelu.apply(
        x, norm.weight, norm.bias, norm.running_mean if track else None, norm.running_var if track else None,
        batch_stats, factor, norm.eps, norm,
    )
