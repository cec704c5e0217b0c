"""model.depthwise_layout: the channels-last path computes the same model as the native one (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dkuxnet.config import get_preset
from dkuxnet.models import create_model
from dkuxnet.models.blocks import depthwise_input


def test_depthwise_input_layouts():
    x = torch.randn(1, 3, 4, 4, 2)
    assert depthwise_input(x, "native") is x
    cl = depthwise_input(x, "channels_last")
    assert cl.is_contiguous(memory_format=torch.channels_last_3d) and torch.equal(cl, x)
    with pytest.raises(ValueError, match="depthwise_layout"):
        depthwise_input(x, "nhwc")


def test_channels_last_depthwise_conv_equals_reference():
    """A 5³ depthwise conv on a channels-last input equals F.conv3d(groups=C) on the contiguous one."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 7, 6, 5, dtype=torch.float64, generator=gen)
    w = torch.randn(6, 1, 5, 5, 5, dtype=torch.float64, generator=gen)
    want = F.conv3d(x, w, padding=2, groups=6)
    got = F.conv3d(depthwise_input(x, "channels_last"), w, padding=2, groups=6)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_model_outputs_and_gradients_do_not_depend_on_layout():
    cfgs = [get_preset("tiny").override(**{"model.depthwise_layout": layout}).model for layout in ("native", "channels_last")]
    torch.manual_seed(0)
    native = create_model(cfgs[0]).double()
    fast = create_model(cfgs[1]).double()
    fast.load_state_dict(native.state_dict())
    x = torch.randn(2, 1, 32, 32, 32, dtype=torch.float64)
    results = []
    for model in (native, fast):
        out = model(x)
        (out.seg_logits.square().mean() + out.query_logits.mean()).backward()
        results.append((out.seg_logits.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-10, atol=1e-12)
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_unknown_layout_is_rejected():
    with pytest.raises(ValueError, match="depthwise_layout"):
        create_model(get_preset("tiny").override(**{"model.depthwise_layout": "nhwc"}))
