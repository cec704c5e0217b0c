"""3D UX-Net encoder (Lee et al., ICLR 2023), as in ``MASILab/3DUX-Net: networks/UXNet_3D/uxnet_encoder.py``.

Port notes:

* The "pointwise" 1×1×1 convolutions of the UX block are **grouped** (``groups=C``: each channel expands
  to 4 private channels, no channel mixing), as in the original code; its docstring (copied from ConvNeXt)
  says "Linear", which would be a dense MLP with C× more parameters. Grouped convs, not ``nn.Linear``.
* The channels-first LayerNorm is one ``F.layer_norm`` on a permuted view (:class:`LayerNorm3d`), the same
  function as the original hand-written mean/var chain.
* The unused GRN layer of the DK-UXNet copy, drop path (rate 0) and the commented-out init are omitted:
  PyTorch default initialisation, layer scale γ = 1e-6.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dkuxnet.models.blocks import LayerNorm3d
from dkuxnet.models.depthwise import DepthwiseConv3d


class UXBlock(nn.Module):
    """x + γ ⊙ pw2(GELU(pw1(LN(dwconv7³(x))))), pw1: C→4C and pw2: 4C→C 1×1×1 convs with groups = C."""

    def __init__(self, dim: int, layer_scale_init: float = 1e-6, depthwise_conv: str = "auto") -> None:
        super().__init__()
        self.dwconv = DepthwiseConv3d(dim, 7, impl=depthwise_conv)
        self.norm = LayerNorm3d(dim)
        self.pwconv1 = nn.Conv3d(dim, 4 * dim, kernel_size=1, groups=dim)
        self.pwconv2 = nn.Conv3d(4 * dim, dim, kernel_size=1, groups=dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pwconv1(self.norm(self.dwconv(x)))  # B×4C×X×Y×Z
        y = self.pwconv2(F.gelu(y))  # B×C×X×Y×Z
        return x + self.gamma.view(1, -1, 1, 1, 1) * y


class UXNetEncoder(nn.Module):
    """Stem (conv k7 s2 p3 + LN), then per stage: [LN + conv k2 s2 downsampling], UX blocks, output LN.

    Returns one feature map per stage (strides 2, 4, 8, 16 for four stages). The per-stage output
    LayerNorm only produces the returned map; the next stage continues from the un-normalised features.

    Args:
        in_channels: input channels.
        widths: channels per stage.
        depths: UX blocks per stage.
        depthwise_conv: implementation of the 7³ depthwise convs (:class:`~dkuxnet.models.depthwise.DepthwiseConv3d`).
    """

    def __init__(
        self, in_channels: int, widths: Sequence[int], depths: Sequence[int], depthwise_conv: str = "auto"
    ) -> None:
        super().__init__()
        if len(widths) != len(depths):
            raise ValueError(f"widths and depths must have the same length, got {len(widths)} and {len(depths)}")
        stem_conv = nn.Conv3d(in_channels, widths[0], kernel_size=7, stride=2, padding=3)
        stem = nn.Sequential(stem_conv, LayerNorm3d(widths[0]))
        self.downsample = nn.ModuleList([stem])
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            self.downsample.append(nn.Sequential(LayerNorm3d(c_in), nn.Conv3d(c_in, c_out, kernel_size=2, stride=2)))
        self.stages = nn.ModuleList(nn.Sequential(*[UXBlock(w, depthwise_conv=depthwise_conv) for _ in range(d)]) for w, d in zip(widths, depths))
        self.norms = nn.ModuleList(LayerNorm3d(w) for w in widths)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for down, stage, norm in zip(self.downsample, self.stages, self.norms):
            x = stage(down(x))  # B×C_i×(X/2^(i+1))×…
            outs.append(norm(x))
        return outs
