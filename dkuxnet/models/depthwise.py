"""Depthwise 3D convolution with a choice of implementation (``model.depthwise_conv``).

Every depthwise convolution of the model (the UX blocks' 7³, the kMaX pixel heads' 5³) is a
:class:`DepthwiseConv3d`: ``groups = channels``, stride 1, ``padding = k // 2``, odd ``k``. It is an
``nn.Conv3d`` (same parameters, same ``state_dict`` keys) whose ``forward`` picks one of four paths:

* ``"native"``        — ``F.conv3d`` on the input as it arrives (PyTorch's own kernels);
* ``"channels_last"`` — the input made ``channels_last_3d`` first (cuDNN on CUDA);
* ``"fft"``           — :class:`DepthwiseConv3dFn`, an exact autograd function whose backward avoids
  PyTorch's CPU depthwise ``conv3d`` backward, 10–50× slower than its forward (pytorch/pytorch#37406);
* ``"auto"``          — ``"fft"`` on the CPU, ``"native"`` elsewhere (the measured CUDA path).

The ``"fft"`` backward, for y = x ⋆ w + b (cross-correlation, per channel c, zero padding p = k // 2):

* ∂L/∂x = (∂L/∂y) ⋆ flip(w), padding p: one more depthwise *forward* conv;
* ∂L/∂w[c, i, j, l] = Σ_b Σ_{x,y,z} ∂L/∂y[b, c, x, y, z] · x_pad[b, c, x+i, y+j, z+l]: a
  cross-correlation of the padded input with the output gradient, computed as
  irfft(Σ_b rfft(x_pad) · conj(rfft(∂L/∂y))) on the padded grid and cropped to the first k³ lags
  (the circular wrap never reaches them: the gradient is zero beyond the unpadded size);
* ∂L/∂b[c] = Σ_{b,x,y,z} ∂L/∂y[b, c, x, y, z].

Forward and input gradient run in ``channels_last_3d`` (oneDNN's fast depthwise kernel on the CPU).
The output equals ``F.conv3d`` to rounding; the test suite checks gradients against autograd's.

Under autocast (CPU or CUDA, bf16 or fp16) the forward's ``F.conv3d`` runs in the autocast dtype d, as
the ``"native"`` path does: y = cast_d(x) ⋆ cast_d(w) + cast_d(b). The backward is the exact gradient of
that function, whatever the autocast state it runs in: ∂L/∂x = cast_d(∂L/∂y) ⋆ flip(cast_d(w)) in d
(as PyTorch's own conv backward), ∂L/∂w from cast_d(x) by the fp32 FFT and ∂L/∂b summed in fp32 (both
rounded once, to the parameter's dtype); each gradient is returned in its input's dtype.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

DEPTHWISE_CONVS = ("auto", "native", "channels_last", "fft")


def resolve_depthwise(impl: str, device: torch.device) -> str:
    """The concrete implementation ``impl`` means on ``device`` (``"auto"``: ``"fft"`` on CPU, else ``"native"``)."""
    if impl not in DEPTHWISE_CONVS:
        raise ValueError(f"model.depthwise_conv must be one of {DEPTHWISE_CONVS}, got {impl!r}")
    if impl == "auto":
        return "fft" if device.type == "cpu" else "native"
    return impl


def _cl(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last_3d)


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on ``device`` (a no-op where autocast does not exist): the backward's dtypes are explicit."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def weight_grad_fft(x: torch.Tensor, grad_out: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """∂L/∂w of a depthwise conv (stride 1, padding k // 2): C×1×k×k×k from B×C×X×Y×Z ``x`` and ``grad_out``.

    Σ_b x_pad ⋆ grad_out over the batch, by FFT on the padded grid (see the module docstring).
    """
    p = kernel_size // 2
    dtype = torch.promote_types(x.dtype, torch.float32)  # the FFT runs in fp32 at least
    x_pad = F.pad(x.to(dtype), (p,) * 6)  # B×C×(X+2p)×(Y+2p)×(Z+2p)
    size = x_pad.shape[2:]
    fx = torch.fft.rfftn(x_pad, dim=(2, 3, 4))
    fg = torch.fft.rfftn(grad_out.to(dtype), s=size, dim=(2, 3, 4))
    corr = torch.fft.irfftn((fx * fg.conj()).sum(0), s=size, dim=(1, 2, 3))  # C×(X+2p)×(Y+2p)×(Z+2p)
    k = kernel_size
    return corr[:, :k, :k, :k].unsqueeze(1).contiguous()  # C×1×k×k×k


class DepthwiseConv3dFn(torch.autograd.Function):
    """Exact depthwise conv3d (stride 1, padding k // 2) with the FFT weight gradient; see the module docstring."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        k = weight.shape[-1]
        y = F.conv3d(_cl(x), weight, bias, padding=k // 2, groups=weight.shape[0])  # in autocast's dtype if on
        ctx.save_for_backward(x, weight)
        ctx.compute_dtype = y.dtype  # d: the dtype the convolution ran in
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        k, c, d = weight.shape[-1], weight.shape[0], ctx.compute_dtype
        g = grad_out.to(d)  # B×C×X×Y×Z
        grad_x = grad_w = grad_b = None
        with _autocast_off(g.device):
            if ctx.needs_input_grad[0]:
                grad_x = F.conv3d(_cl(g), weight.to(d).flip(2, 3, 4), padding=k // 2, groups=c).to(x.dtype)
            if ctx.needs_input_grad[1]:
                grad_w = weight_grad_fft(x.to(d), g, k).to(weight.dtype)  # C×1×k×k×k
            if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
                grad_b = g.sum((0, 2, 3, 4), dtype=torch.promote_types(d, torch.float32)).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b


class DepthwiseConv3d(nn.Conv3d):
    """``nn.Conv3d(channels, channels, k, padding=k // 2, groups=channels)`` with a selectable implementation.

    Args:
        channels: input = output channels.
        kernel_size: odd cube size k.
        bias: learnable bias.
        impl: one of :data:`DEPTHWISE_CONVS`, resolved per call on the input's device.
    """

    def __init__(self, channels: int, kernel_size: int, bias: bool = True, impl: str = "auto") -> None:
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        resolve_depthwise(impl, torch.device("cpu"))  # validates the name
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=bias)
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        impl = resolve_depthwise(self.impl, x.device)
        if impl == "fft":
            return DepthwiseConv3dFn.apply(x, self.weight, self.bias)
        return super().forward(_cl(x) if impl == "channels_last" else x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, impl={self.impl!r}"
