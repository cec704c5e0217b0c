"""V-Net of the LA semi-supervised literature (``yulequan/UA-MT: code/networks/vnet.py``, batch norm).

The backbone of UA-MT, SASSNet, DTC, MC-Net, SS-Net and CAML (book: references page): 16 base filters,
channels 16/32/64/128/256; encoder stages of 1, 2, 3, 3, 3 conv3³ + BN + ReLU layers; downsampling
by a conv k2 s2 + BN + ReLU; decoder stages of 3, 3, 2, 1 layers with transposed-conv k2 s2 + BN + ReLU
upsampling and **additive** skips; Dropout3d(0.5) on the bottleneck features and before the final 1³
conv while training (``has_dropout=True``). 9,448,866 parameters for 1 input channel and 2 classes.
Module names follow UA-MT, so its ``state_dict`` files load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from dkuxnet.config import ModelConfig
from dkuxnet.models.dkuxnet import ModelOutput


def _conv_block(n_layers: int, c_in: int, c_out: int) -> nn.Module:
    """UA-MT ``ConvBlock``: n × (conv3³ + BN + ReLU)."""
    ops: list[nn.Module] = []
    for i in range(n_layers):
        ops += [nn.Conv3d(c_in if i == 0 else c_out, c_out, 3, padding=1), nn.BatchNorm3d(c_out), nn.ReLU(inplace=True)]
    return _Seq(ops)


def _resample_block(c_in: int, c_out: int, up: bool) -> nn.Module:
    """UA-MT ``DownsamplingConvBlock`` / ``UpsamplingDeconvBlock``: (transposed) conv k2 s2 + BN + ReLU."""
    conv = nn.ConvTranspose3d if up else nn.Conv3d
    return _Seq([conv(c_in, c_out, 2, stride=2), nn.BatchNorm3d(c_out), nn.ReLU(inplace=True)])


class _Seq(nn.Module):
    """Holds ``conv = nn.Sequential(...)`` so parameter names match UA-MT (``block_one.conv.0.weight``)."""

    def __init__(self, ops: list[nn.Module]) -> None:
        super().__init__()
        self.conv = nn.Sequential(*ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class VNet(nn.Module):
    """UA-MT's V-Net; ``forward(x: B×C_in×X×Y×Z) -> ModelOutput`` with only ``seg_logits`` (B×K×X×Y×Z).

    Args:
        cfg: architecture; uses ``in_channels``, ``num_classes``, ``vnet_filters``, ``vnet_dropout``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.arch != "vnet":
            raise ValueError(f"arch must be 'vnet' for VNet, got {cfg.arch!r}")
        for name in ("in_channels", "num_classes", "vnet_filters"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(cfg, name)}")
        f = cfg.vnet_filters
        self.group_sizes: tuple[int, ...] = ()
        self.has_dropout = cfg.vnet_dropout
        self.block_one = _conv_block(1, cfg.in_channels, f)
        self.block_one_dw = _resample_block(f, 2 * f, up=False)
        self.block_two = _conv_block(2, 2 * f, 2 * f)
        self.block_two_dw = _resample_block(2 * f, 4 * f, up=False)
        self.block_three = _conv_block(3, 4 * f, 4 * f)
        self.block_three_dw = _resample_block(4 * f, 8 * f, up=False)
        self.block_four = _conv_block(3, 8 * f, 8 * f)
        self.block_four_dw = _resample_block(8 * f, 16 * f, up=False)
        self.block_five = _conv_block(3, 16 * f, 16 * f)
        self.block_five_up = _resample_block(16 * f, 8 * f, up=True)
        self.block_six = _conv_block(3, 8 * f, 8 * f)
        self.block_six_up = _resample_block(8 * f, 4 * f, up=True)
        self.block_seven = _conv_block(3, 4 * f, 4 * f)
        self.block_seven_up = _resample_block(4 * f, 2 * f, up=True)
        self.block_eight = _conv_block(2, 2 * f, 2 * f)
        self.block_eight_up = _resample_block(2 * f, f, up=True)
        self.block_nine = _conv_block(1, f, f)
        self.out_conv = nn.Conv3d(f, cfg.num_classes, 1)
        self.dropout = nn.Dropout3d(p=0.5)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x) if self.has_dropout else x  # nn.Dropout3d is the identity in eval mode

    def forward(self, x: torch.Tensor) -> ModelOutput:
        if x.dim() != 5 or any(s % 16 for s in x.shape[2:]):
            raise ValueError(f"input must be B×C×X×Y×Z with X, Y, Z divisible by 16, got {tuple(x.shape)}")
        x1 = self.block_one(x)  # B×f×X×Y×Z
        x2 = self.block_two(self.block_one_dw(x1))  # B×2f×X/2×…
        x3 = self.block_three(self.block_two_dw(x2))  # B×4f×X/4×…
        x4 = self.block_four(self.block_three_dw(x3))  # B×8f×X/8×…
        x5 = self._drop(self.block_five(self.block_four_dw(x4)))  # B×16f×X/16×…
        x6 = self.block_six(self.block_five_up(x5) + x4)  # B×8f×X/8×…
        x7 = self.block_seven(self.block_six_up(x6) + x3)  # B×4f×X/4×…
        x8 = self.block_eight(self.block_seven_up(x7) + x2)  # B×2f×X/2×…
        x9 = self._drop(self.block_nine(self.block_eight_up(x8) + x1))  # B×f×X×Y×Z
        return ModelOutput(seg_logits=self.out_conv(x9))  # B×K×X×Y×Z
