"""Which depthwise convolutions ``model.depthwise_conv = "channels_last"`` changes: the 7 kMaX 5³ ones only.

``"channels_last"`` makes a :class:`~dkuxnet.models.depthwise.DepthwiseConv3d` input ``channels_last_3d``
before the convolution. PyTorch computes a convolution channels-last when its input or its weight is
channels-last, and its output says which it did. The UX blocks' 7³ convolutions already receive
channels-last inputs (from ``LayerNorm3d`` or from a convolution of its output), so the setting changes
only the assignment heads' 5³ convolutions, whose inputs come from the instance-normed decoder; and
under ``train.channels_last`` not even those, since their weights are then channels-last. Counted on
the ``tiny`` preset (``paper``'s structure: 8 UX blocks, 6 kMaX layers + the final predictor).
"""

from __future__ import annotations

import pytest
import torch

from dkuxnet.config import get_preset
from dkuxnet.models import create_model
from dkuxnet.models.depthwise import DepthwiseConv3d


def _layouts(impl: str, channels_last: bool) -> list[tuple[int, bool, bool]]:
    """(kernel size, input channels-last, output channels-last) per DepthwiseConv3d call of one ``tiny`` forward."""
    cfg = get_preset("tiny").override(**{"model.depthwise_conv": impl, "train.channels_last": channels_last})
    torch.manual_seed(0)
    model = create_model(cfg)
    x = torch.randn(2, 1, 32, 32, 16)  # B×1×X×Y×Z
    if channels_last:  # as the training loop does for train.channels_last
        model, x = model.to(memory_format=torch.channels_last_3d), x.contiguous(memory_format=torch.channels_last_3d)
    seen: list[tuple[int, bool, bool]] = []
    cl = torch.channels_last_3d

    def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        inp = args[0]
        seen.append((module.kernel_size[0], inp.is_contiguous(memory_format=cl), out.is_contiguous(memory_format=cl)))

    for m in model.modules():
        if isinstance(m, DepthwiseConv3d):
            m.register_forward_hook(record)
    with torch.no_grad():
        model(x)
    return seen



@pytest.mark.parametrize(("channels_last", "changed"), [(False, 7), (True, 0)])
def test_channels_last_setting_changes_only_the_kmax_convolutions(channels_last: bool, changed: int):
    native, converted = _layouts("native", channels_last), _layouts("channels_last", channels_last)
    assert [k for k, _, _ in native] == [7] * 8 + [5] * 7  # 4 stages × 2 UX blocks, then 6 kMaX layers + predictor
    assert all(inp for k, inp, _ in native if k == 7)  # the UX blocks' inputs: channels-last already
    if not channels_last:  # the kMaX heads' inputs: contiguous (under train.channels_last their layout varies
        assert not any(inp for k, inp, _ in native if k == 5)  # with the thread count; the weights decide)
    differs = [k for (k, _, a), (_, _, b) in zip(native, converted) if a != b]
    assert differs == [5] * changed
