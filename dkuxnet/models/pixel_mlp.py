"""The predictor's pixel MLP, 1³ conv → BatchNorm → GELU → 1³ conv, with its hidden layer computed in slabs.

At ``paper`` size the hidden layer is 8 × 256 × 112·112·80 values (7.66 GiB in fp32), and autograd of the
plain modules holds up to four such tensors at once in backward. :func:`pixel_mlp` never holds one whole:
it walks the volume in slabs along X. BatchNorm statistics are over the whole batch, so they are gathered
in a first pass over the slabs and the slabs are normalised in a second; backward recomputes each slab
twice, first to sum the BatchNorm gradient terms, then to propagate. Same function and gradients as the
modules (tests compare them in float64); the cost is three extra 1³ convolutions over the volume.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from dkuxnet.batch_stats import batch_moments, batch_sums, update_running
from dkuxnet.precision import fp32_island

_NO_STRIDE = dict(stride=[1, 1, 1], padding=[0, 0, 0], dilation=[1, 1, 1], transposed=False,
                  output_padding=[0, 0, 0], groups=1)


def _layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last_3d if x.is_contiguous(memory_format=torch.channels_last_3d) else torch.contiguous_format


class _Slabs:
    """The per-slab computations shared by forward and backward, in one compute dtype, autocast off."""

    def __init__(self, x: torch.Tensor, w1: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, w2: torch.Tensor,
                 dtype: torch.dtype, step: int, eps: float) -> None:
        self.x, self.dtype, self.eps = x, dtype, eps
        self.w1, self.w2 = w1.to(dtype), w2.to(dtype)
        self.gamma, self.beta = gamma, beta
        self.slices = [slice(i, i + step) for i in range(0, x.shape[2], step)]
        self.stat_dtype = torch.promote_types(dtype, torch.float32)

    def hidden_pre(self, s: slice) -> torch.Tensor:
        """conv1 of one slab: B×H×x×Y×Z."""
        return F.conv3d(self.x[:, :, s].to(self.dtype), self.w1)

    def normalised(self, h: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """γ(h − μ)/√(σ² + ε) + β, the BatchNorm kernel with the given statistics."""
        return torch.native_batch_norm(h, self.gamma, self.beta, mean, var, False, 0.0, self.eps)[0]

    def moments(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Per-channel mean and biased variance of conv1(x) over batch and volume, slab by slab.

        Slab moments (m_i, v_i) of n_i values combine as μ = Σ n_i m_i / n, σ² = Σ n_i (v_i + (m_i − μ)²) / n.
        """
        parts = []
        for s in self.slices:
            h = self.hidden_pre(s)
            var, mean = torch.var_mean(h.to(self.stat_dtype), dim=(0, 2, 3, 4), correction=0)
            parts.append((h[0, 0].numel() * h.shape[0], mean, var))
        n = sum(k for k, _, _ in parts)
        mean = sum(k * m for k, m, _ in parts) / n
        var = sum(k * (v + (m - mean) ** 2) for k, m, v in parts) / n
        return mean, var, n


class _PixelMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w1: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                w2: torch.Tensor, b2: torch.Tensor, norm: nn.modules.batchnorm._BatchNorm, factor: float,
                dtype: torch.dtype, step: int) -> torch.Tensor:
        slabs = _Slabs(x, w1, gamma, beta, w2, dtype, step, norm.eps)
        batch_stats = norm.training or norm.running_mean is None
        with torch.no_grad():
            n = 0
            if batch_stats:
                mean, var, n = batch_moments(norm, *slabs.moments())  # the whole batch's (all ranks' when synced)
                if norm.training and norm.track_running_stats:
                    update_running(norm, mean, var, n, factor)
            else:
                mean, var = norm.running_mean.clone(), norm.running_var.clone()
            b, _, _, *yz = x.shape
            out = torch.empty((b, w2.shape[0], x.shape[2], *yz), dtype=dtype, device=x.device, memory_format=_layout(x))
            for s in slabs.slices:
                a = torch.ops.aten.gelu_(slabs.normalised(slabs.hidden_pre(s), mean, var))  # B×H×x×Y×Z
                out[:, :, s] = F.conv3d(a, slabs.w2, b2.to(dtype))
        ctx.save_for_backward(x, w1, gamma, beta, w2, mean, var)
        ctx.batch_stats, ctx.dtype, ctx.step, ctx.eps = batch_stats, dtype, step, norm.eps
        ctx.norm, ctx.count = norm, n
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        with fp32_island(dout.device):
            return _PixelMLP._backward(ctx, dout)

    @staticmethod
    def _backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w1, gamma, beta, w2, mean, var = ctx.saved_tensors
        slabs = _Slabs(x, w1, gamma, beta, w2, ctx.dtype, ctx.step, ctx.eps)
        sd, dims = slabs.stat_dtype, (0, 2, 3, 4)
        view = (1, -1, 1, 1, 1)
        invstd = torch.rsqrt(var + ctx.eps)
        dout = dout.to(ctx.dtype)
        dw1, dw2 = torch.zeros_like(w1, dtype=sd), torch.zeros_like(w2, dtype=sd)
        dgamma, dbeta = torch.zeros_like(gamma, dtype=sd), torch.zeros_like(beta, dtype=sd)
        dx = torch.empty_like(x)

        def slab_grads(s: slice, accumulate: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """Recompute one slab; return conv1's output h, x̂ and ∂L/∂(BN output) there."""
            h = slabs.hidden_pre(s)
            y = slabs.normalised(h, mean, var)
            g = dout[:, :, s]
            if accumulate:
                dw2.add_(torch.ops.aten.convolution_backward(g, F.gelu(y), slabs.w2, None, **_NO_STRIDE,
                                                            output_mask=[False, True, False])[1])
            da = F.conv_transpose3d(g, slabs.w2)  # ∂L/∂GELU output: W2ᵀ·g per voxel
            dy = torch.ops.aten.gelu_backward(da, y).to(sd)
            xhat = (h.to(sd) - mean.view(view)) * invstd.view(view)
            return h, xhat, dy

        for s in slabs.slices:  # pass 1: ∂L/∂W2, ∂L/∂γ = Σ dy·x̂, ∂L/∂β = Σ dy
            _, xhat, dy = slab_grads(s, accumulate=True)
            dbeta.add_(dy.sum(dims))
            dgamma.add_((dy * xhat).sum(dims))
        scale = (gamma * invstd).view(view)
        if ctx.batch_stats:  # the sums over the whole batch of n entries per channel (all ranks' when synced)
            sum_dy, sum_dy_xhat = batch_sums(ctx.norm, torch.stack([dbeta, dgamma]))
            mean_dy, mean_dy_xhat = sum_dy.view(view) / ctx.count, sum_dy_xhat.view(view) / ctx.count
        for s in slabs.slices:  # pass 2: ∂L/∂h = γ/√(σ² + ε)·(dy − Σdy/n − x̂·Σ(dy·x̂)/n) in training
            _, xhat, dy = slab_grads(s, accumulate=False)
            if ctx.batch_stats:
                dy = dy - mean_dy - xhat * mean_dy_xhat
            dh = (dy * scale).to(ctx.dtype)
            gx, gw = torch.ops.aten.convolution_backward(dh, slabs.x[:, :, s].to(ctx.dtype), slabs.w1, None, **_NO_STRIDE,
                                                         output_mask=[True, True, False])[:2]
            dx[:, :, s] = gx
            dw1.add_(gw)
        db2 = dout.sum(dims, dtype=sd)
        return (dx, dw1.to(w1.dtype), dgamma.to(gamma.dtype), dbeta.to(beta.dtype), dw2.to(w2.dtype),
                db2.to(w2.dtype), None, None, None, None)


def pixel_mlp(x: torch.Tensor, conv1: nn.Conv3d, norm: nn.BatchNorm3d, conv2: nn.Conv3d, slab_voxels: int) -> torch.Tensor:
    r"""``conv2(GELU(norm(conv1(x))))`` for 1³ convolutions (conv1 without bias), the hidden layer in slabs.

    .. math:: y = W_2\,\operatorname{GELU}\big(\gamma\,(W_1 x - \mu)/\sqrt{\sigma^2 + \varepsilon} + \beta\big) + b_2

    per voxel, with μ, σ² the batch statistics of :math:`W_1 x` (biased; the running statistics are updated
    as ``norm`` would, with the unbiased variance) in training and the running ones in eval. The batch is
    ``norm``'s: all ranks' for a synced norm (moments and gradient sums through :mod:`dkuxnet.batch_stats`).
    Each slab spans the whole batch and about ``slab_voxels`` voxels (whole X-planes). Under autocast the
    convolutions run in the autocast dtype, as the modules would; the statistics are fp32.

    Args:
        x: B×C×X×Y×Z.
        conv1: C→H, kernel 1, no bias.
        norm: BatchNorm over the H channels.
        conv2: H→E, kernel 1, with bias.
        slab_voxels: voxels per slab (at least one X-plane of the batch).
    """
    for name, conv, bias in (("conv1", conv1, False), ("conv2", conv2, True)):
        if conv.kernel_size != (1, 1, 1) or conv.groups != 1 or (conv.bias is not None) != bias:
            raise ValueError(f"{name}: expected a 1³ Conv3d {'with' if bias else 'without'} bias, groups 1, got {conv}")
    if slab_voxels < 1:
        raise ValueError(f"slab_voxels: must be >= 1, got {slab_voxels}")
    if x.dim() != 5:
        raise ValueError(f"x: expected B×C×X×Y×Z, got shape {tuple(x.shape)}")
    factor = 0.0 if norm.momentum is None else norm.momentum
    if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:  # cumulative moving average
            factor = 1.0 / float(norm.num_batches_tracked)
    device = x.device.type
    autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
    step = max(1, slab_voxels // (x.shape[0] * x.shape[3] * x.shape[4]))
    with fp32_island(x.device):
        return _PixelMLP.apply(x, conv1.weight, norm.weight, norm.bias, conv2.weight, conv2.bias, norm, factor, dtype, step)
