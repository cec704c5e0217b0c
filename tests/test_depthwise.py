"""model.depthwise_conv: every implementation computes the same depthwise conv and the same model (float64)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from dkuxnet.config import Config, get_preset
from dkuxnet.models import create_model
from dkuxnet.models.depthwise import DepthwiseConv3d, DepthwiseConv3dFn, resolve_depthwise, weight_grad_fft


def _autograd_reference(x, w, b, grad):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    b = None if b is None else b.detach().requires_grad_()
    y = F.conv3d(x, w, b, padding=w.shape[-1] // 2, groups=w.shape[0])
    y.backward(grad)
    return y.detach(), x.grad, w.grad, None if b is None else b.grad


def test_fft_function_passes_gradcheck():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 4, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(3, 1, 3, 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(DepthwiseConv3dFn.apply, (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: DepthwiseConv3dFn.apply(x, w, None), (x, w))


@pytest.mark.parametrize("k, layout, bias", itertools.product((3, 5, 7), ("contiguous", "channels_last"), (True, False)))
def test_fft_function_equals_autograd_on_odd_shapes(k, layout, bias):
    """Output and all three gradients equal autograd's within 1e-5 (relative) in float32."""
    gen = torch.Generator().manual_seed(k + 10 * bias)
    x = torch.randn(3, 5, 11, 9, 7, generator=gen)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(5, 1, k, k, k, generator=gen)
    b = torch.randn(5, generator=gen) if bias else None
    grad = torch.randn(3, 5, 11, 9, 7, generator=gen)
    want = _autograd_reference(x, w, b, grad)
    xs, ws = x.detach().requires_grad_(), w.detach().requires_grad_()
    bs = None if b is None else b.detach().requires_grad_()
    y = DepthwiseConv3dFn.apply(xs, ws, bs)
    y.backward(grad)
    got = (y.detach(), xs.grad, ws.grad, None if bs is None else bs.grad)
    for name, g, r in zip(("output", "grad x", "grad w", "grad b"), got, want):
        if r is None:
            assert g is None
            continue
        scale = r.abs().max()
        assert (g - r).abs().max() <= 1e-5 * scale, name


def test_weight_grad_fft_formula_by_hand():
    """1 channel, 1×1×1 input x = 2 and gradient 3, k = 3: only the centre lag sees x, dw = 6 there, 0 elsewhere."""
    x = torch.full((1, 1, 1, 1, 1), 2.0, dtype=torch.float64)
    g = torch.full((1, 1, 1, 1, 1), 3.0, dtype=torch.float64)
    want = torch.zeros(1, 1, 3, 3, 3, dtype=torch.float64)
    want[0, 0, 1, 1, 1] = 6.0
    torch.testing.assert_close(weight_grad_fft(x, g, 3), want, rtol=0, atol=1e-12)


def test_resolve_depthwise():
    assert resolve_depthwise("auto", torch.device("cpu")) == "fft"
    assert resolve_depthwise("auto", torch.device("meta")) == "native"
    assert resolve_depthwise("channels_last", torch.device("cpu")) == "channels_last"
    with pytest.raises(ValueError, match="model.depthwise_conv"):
        resolve_depthwise("nhwc", torch.device("cpu"))
    with pytest.raises(ValueError, match="odd"):
        DepthwiseConv3d(4, 4)


def test_depthwise_module_keeps_conv3d_state_dict_keys():
    conv = DepthwiseConv3d(4, 5, bias=False, impl="fft")
    assert set(conv.state_dict()) == {"weight"} and conv.weight.shape == (4, 1, 5, 5, 5)


def test_model_outputs_and_gradients_do_not_depend_on_the_implementation():
    impls = ("native", "channels_last", "fft", "auto")
    models = []
    for impl in impls:
        torch.manual_seed(0)  # same initialisation for every implementation
        models.append(create_model(get_preset("tiny").override(**{"model.depthwise_conv": impl}).model).double())
    for m in models[1:]:
        for (n, a), (_, b) in zip(m.state_dict().items(), models[0].state_dict().items()):
            assert torch.equal(a, b), n
    x = torch.randn(2, 1, 32, 32, 32, dtype=torch.float64)
    results = []
    for model in models:
        out = model(x)
        (out.seg_logits.square().mean() + out.query_logits.mean()).backward()
        results.append((out.seg_logits.detach(), [p.grad for p in model.parameters()]))
    for seg, grads in results[1:]:
        torch.testing.assert_close(seg, results[0][0], rtol=1e-10, atol=1e-12)
        for a, b in zip(grads, results[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_unknown_implementation_is_rejected():
    with pytest.raises(ValueError, match="depthwise_conv"):
        create_model(get_preset("tiny").override(**{"model.depthwise_conv": "nhwc"}))


def test_old_configs_with_depthwise_layout_still_load():
    d = get_preset("tiny").to_dict()
    d["model"]["depthwise_layout"] = d["model"].pop("depthwise_conv")
    d["model"]["depthwise_layout"] = "channels_last"
    assert Config.from_dict(d).model.depthwise_conv == "channels_last"


@pytest.mark.parametrize("k", (3, 7))
def test_fft_function_under_cpu_bf16_autocast_matches_native(k):
    """Under CPU bf16 autocast both paths compute y = bf16(x) ⋆ bf16(w) + bf16(b) in bf16.

    Output and all gradients within 2⁻⁷ (one bf16 epsilon) of ``native``'s, relative to the largest entry;
    the fft's ∂L/∂w and ∂L/∂b (fp32, not rounded to bf16 as native's are) within 1e-5 of the float64
    gradient of that same bf16-rounded function.
    """
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(2, 4, 9, 8, 7, generator=gen)
    grad = torch.randn(2, 4, 9, 8, 7, generator=gen).bfloat16()
    got = {}
    for impl in ("native", "fft"):
        torch.manual_seed(0)  # the same weights for both
        conv = DepthwiseConv3d(4, k, impl=impl)
        xs = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(xs)
        y.backward(grad)
        assert y.dtype == torch.bfloat16 and xs.grad.dtype == conv.weight.grad.dtype == torch.float32
        got[impl] = (y.detach(), xs.grad, conv.weight.grad, conv.bias.grad)
    for name, a, b in zip(("output", "grad x", "grad w", "grad b"), got["fft"], got["native"]):
        assert (a.double() - b.double()).abs().max() <= 2**-7 * b.double().abs().max(), name
    w, b = (p.detach().bfloat16().double() for p in (conv.weight, conv.bias))
    want = _autograd_reference(x.bfloat16().double(), w, b, grad.double())
    for name, g, r in zip(("grad w", "grad b"), got["fft"][2:], want[2:]):
        assert (g.double() - r).abs().max() <= 1e-5 * r.abs().max(), name
