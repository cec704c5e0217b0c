"""Fused full-resolution paths (QD logsumexp, query merge, L2 normalisation) equal their plain formulations in float64."""

from __future__ import annotations

import math

import pytest
import torch

from dkuxnet.losses import grouped_logsumexp, qd_loss

TOL = dict(rtol=1e-10, atol=1e-12)
GROUPS = (3, 1, 4)


def _logits(scale: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(2, sum(GROUPS), 5, 4, 3, dtype=torch.float64, generator=gen)).requires_grad_(True)


def _reference_lse(z: torch.Tensor) -> torch.Tensor:
    bounds = [0, 3, 4, 8]
    return torch.stack([z[:, a:b].logsumexp(dim=1) for a, b in zip(bounds[:-1], bounds[1:])], dim=1)


@pytest.mark.parametrize("scale", [1.0, 300.0])  # 300: exp would overflow without the max shift
def test_grouped_logsumexp_equals_per_slice_logsumexp(scale):
    z = _logits(scale)
    w = torch.randn(2, len(GROUPS), 5, 4, 3, dtype=torch.float64)
    got = grouped_logsumexp(z, GROUPS)
    (dz_got,) = torch.autograd.grad((got * w).sum(), z)
    want = _reference_lse(z)
    (dz_want,) = torch.autograd.grad((want * w).sum(), z)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(dz_got, dz_want, **TOL)


def test_grouped_logsumexp_hand_value():
    """Groups (1, 2) of [0, log 2, log 3]: lse = [0, log 5]; ∂lse₂/∂z = softmax within the group = [0, 2/5, 3/5]."""
    z = torch.tensor([[[0.0], [math.log(2)], [math.log(3)]]], dtype=torch.float64, requires_grad=True)
    lse = grouped_logsumexp(z, (1, 2))
    torch.testing.assert_close(lse[0, :, 0], torch.tensor([0.0, math.log(5)], dtype=torch.float64))
    (dz,) = torch.autograd.grad(lse[0, 1, 0], z)
    torch.testing.assert_close(dz[0, :, 0], torch.tensor([0.0, 0.4, 0.6], dtype=torch.float64))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_qd_loss_equals_two_logsumexp_formula(reduction):
    """L_qd with the group-wise total equals NLL of lse_g − logsumexp over all N queries."""
    z = _logits(5.0, seed=1)
    target = torch.randint(0, len(GROUPS), (2, 5, 4, 3), generator=torch.Generator().manual_seed(2))
    got = qd_loss(z, target, GROUPS, reduction)
    (dz_got,) = torch.autograd.grad(got, z)
    log_o = _reference_lse(z) - z.logsumexp(dim=1, keepdim=True)
    nll = -log_o.gather(1, target.unsqueeze(1)).squeeze(1)
    want = nll.mean() if reduction == "mean" else nll.sum() / 2
    (dz_want,) = torch.autograd.grad(want, z)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(dz_got, dz_want, **TOL)


def test_query_merge_equals_einsum_and_group_sums():
    """Y = Σ_n Φ[n]·S[n] (einsum) and O[g] = Σ_{n∈g} S[n] (slice sums) from the one merged product."""
    from dkuxnet.config import get_preset
    from dkuxnet.models import create_model

    torch.manual_seed(0)
    model = create_model(get_preset("tiny").model).double()
    captured = {}
    model.mlp.register_forward_hook(lambda m, a, out: captured.update(phi=out))
    out = model(torch.randn(2, 1, 32, 32, 32, dtype=torch.float64))
    phi = captured["phi"].view(2, model.num_queries, model.num_classes)  # B×N×K
    probs = out.query_logits.softmax(dim=1)
    torch.testing.assert_close(out.query_probs, probs, **TOL)
    torch.testing.assert_close(out.seg_logits, torch.einsum("bnk,bnxyz->bkxyz", phi, probs), **TOL)
    sums = [probs[:, a:b].sum(dim=1) for a, b in ((0, 4), (4, 8), (8, 12))]  # tiny: groups (4, 4, 4)
    torch.testing.assert_close(out.cluster_probs, torch.stack(sums, dim=1), **TOL)
    assert "group_indicator" not in model.state_dict()  # checkpoints keep their keys


@pytest.mark.parametrize("dim", [1, 2])
def test_l2_normalize_equals_f_normalize(dim):
    """Values and gradients of ops.l2_normalize equal F.normalize, zero vectors (clamped norm) included."""
    import torch.nn.functional as F

    from dkuxnet.ops import l2_normalize

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 7, dtype=torch.float64, generator=gen)
    x[0, :, 0] = 0.0
    x[1, 2, :] = 0.0
    x[2, :, 3] = 1e-9  # norm below eps: clamped
    dy = torch.randn(3, 5, 7, dtype=torch.float64, generator=gen)
    x.requires_grad_(True)
    got = l2_normalize(x, dim=dim, eps=1e-6)
    want = F.normalize(x, dim=dim, eps=1e-6)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(torch.autograd.grad(got, x, dy)[0], torch.autograd.grad(want, x, dy)[0], **TOL)


def test_l2_normalize_hand_value():
    """x = (3, 4): y = (0.6, 0.8); ∂(y₀)/∂x = (1 − y₀²,  −y₀y₁)/5 = (0.128, −0.096)."""
    from dkuxnet.ops import l2_normalize

    x = torch.tensor([[3.0], [4.0]], dtype=torch.float64, requires_grad=True)
    y = l2_normalize(x, dim=0)
    torch.testing.assert_close(y, torch.tensor([[0.6], [0.8]], dtype=torch.float64))
    (dx,) = torch.autograd.grad(y[0, 0], x)
    torch.testing.assert_close(dx, torch.tensor([[0.128], [-0.096]], dtype=torch.float64))
    with pytest.raises(ValueError, match="eps"):
        l2_normalize(x, eps=0.0)


def _bn(channels: int, momentum: float | None, seed: int) -> torch.nn.BatchNorm3d:
    gen = torch.Generator().manual_seed(seed)
    bn = torch.nn.BatchNorm3d(channels, eps=1e-3, momentum=momentum).double()
    with torch.no_grad():
        bn.weight.copy_(1 + 0.3 * torch.randn(channels, dtype=torch.float64, generator=gen))
        bn.bias.copy_(0.2 * torch.randn(channels, dtype=torch.float64, generator=gen))
    return bn


def _grads(out: torch.Tensor, dy: torch.Tensor, leaves: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(out, leaves, dy)


@pytest.mark.parametrize(("momentum", "training"), [(0.01, True), (None, True), (0.01, False)])
def test_batch_norm_gelu_equals_the_two_modules(momentum, training):
    """ops.batch_norm_gelu = F.gelu(BatchNorm3d): output, input/γ/β gradients, running statistics (float64)."""
    import copy

    import torch.nn.functional as F

    from dkuxnet.ops import batch_norm_gelu

    gen = torch.Generator().manual_seed(4)
    ours = _bn(3, momentum, seed=5).train(training)
    with torch.no_grad():
        ours.running_mean.fill_(0.3)
        ours.running_var.fill_(1.7)
    ref = copy.deepcopy(ours)
    x = (1.5 + torch.randn(2, 3, 4, 3, 5, dtype=torch.float64, generator=gen)).requires_grad_(True)
    dy = torch.randn(x.shape, dtype=torch.float64, generator=gen)
    for _ in range(2):  # the second step sees updated statistics
        got, want = batch_norm_gelu(x, ours), F.gelu(ref(x))
        torch.testing.assert_close(got, want, **TOL)
        for a, b in zip(_grads(got, dy, [x, ours.weight, ours.bias]), _grads(want, dy, [x, ref.weight, ref.bias])):
            torch.testing.assert_close(a, b, **TOL)
    for a, b in zip(ours.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, **TOL)


def test_batch_norm_gelu_hand_value_and_saved_tensors():
    """One channel, x = [−1, 1]: μ = 0, σ² = 1, ε = 0, so y = GELU(x) = [−0.158655…, 0.841344…]; autograd
    keeps one input-sized tensor for backward (the modules keep two)."""
    from dkuxnet.ops import batch_norm_gelu

    bn = torch.nn.BatchNorm1d(1, eps=0.0).double()
    x = torch.tensor([[[-1.0, 1.0]]], dtype=torch.float64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = batch_norm_gelu(x, bn)
    phi = 0.5 * (1 + math.erf(1 / math.sqrt(2)))  # Φ(1)
    torch.testing.assert_close(y, torch.tensor([[[-(1 - phi), phi]]], dtype=torch.float64))
    assert sum(t.numel() == x.numel() for t in saved) == 1
    with pytest.raises(TypeError, match="norm"):
        batch_norm_gelu(x, torch.nn.LayerNorm(2))


def _pixel_modules(momentum: float | None) -> tuple[torch.nn.Conv3d, torch.nn.BatchNorm3d, torch.nn.Conv3d]:
    torch.manual_seed(6)
    conv1 = torch.nn.Conv3d(3, 5, 1, bias=False).double()
    conv2 = torch.nn.Conv3d(5, 4, 1).double()
    return conv1, _bn(5, momentum, seed=7), conv2


@pytest.mark.parametrize(("slab_voxels", "momentum", "training"), [
    (2 * 3 * 4, 0.01, True),  # one X-plane per slab, 5 slabs
    (2 * 2 * 3 * 4, None, True),  # 2 planes: slabs of 2, 2, 1 (uneven last slab)
    (10**6, 0.3, True),  # one slab
    (2 * 3 * 4, 0.01, False),  # eval: running statistics
])
def test_pixel_mlp_equals_the_modules(slab_voxels, momentum, training):
    """pixel_mlp = conv2(GELU(BN(conv1(x)))) in float64: output, every gradient, running statistics, two steps."""
    import copy

    import torch.nn.functional as F

    from dkuxnet.models.pixel_mlp import pixel_mlp

    conv1, norm, conv2 = _pixel_modules(momentum)
    norm.train(training)
    ref = copy.deepcopy((conv1, norm, conv2))
    gen = torch.Generator().manual_seed(8)
    x = (0.5 + torch.randn(2, 3, 5, 3, 4, dtype=torch.float64, generator=gen)).requires_grad_(True)
    dy = torch.randn(2, 4, 5, 3, 4, dtype=torch.float64, generator=gen)
    leaves = [x, conv1.weight, norm.weight, norm.bias, conv2.weight, conv2.bias]
    ref_leaves = [x, ref[0].weight, ref[1].weight, ref[1].bias, ref[2].weight, ref[2].bias]
    for _ in range(2):
        got = pixel_mlp(x, conv1, norm, conv2, slab_voxels)
        want = ref[2](F.gelu(ref[1](ref[0](x))))
        torch.testing.assert_close(got, want, **TOL)
        for a, b in zip(_grads(got, dy, leaves), _grads(want, dy, ref_leaves)):
            torch.testing.assert_close(a, b, **TOL)
    for a, b in zip(norm.buffers(), ref[1].buffers()):
        torch.testing.assert_close(a, b, **TOL)


def test_pixel_mlp_never_holds_the_whole_hidden_layer():
    """No tensor that forward or backward creates has the hidden layer's size (B·H·X·Y·Z), only slabs of it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dkuxnet.models.pixel_mlp import pixel_mlp

    class Largest(TorchDispatchMode):
        hidden = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dim() == 5 and t.shape[1] == 5:  # H = 5 channels
                    Largest.hidden = max(Largest.hidden, t.numel())
            return out

    conv1, norm, conv2 = _pixel_modules(0.01)
    x = torch.randn(2, 3, 8, 3, 4, dtype=torch.float64, requires_grad=True)
    with Largest():
        pixel_mlp(x, conv1, norm, conv2, slab_voxels=2 * 2 * 3 * 4).sum().backward()
    assert Largest.hidden == 2 * 5 * 2 * 3 * 4  # one slab of 2 X-planes, a quarter of the 8
    with pytest.raises(ValueError, match="conv1"):
        pixel_mlp(x, conv2, norm, conv2, slab_voxels=8)


def test_pixel_mlp_under_bf16_autocast_follows_the_modules():
    """Under CPU bf16 autocast: bf16 output as the modules give, within bf16 rounding of them, fp32 statistics."""
    import copy

    import torch.nn.functional as F

    from dkuxnet.models.pixel_mlp import pixel_mlp

    conv1, norm, conv2 = (m.float() for m in _pixel_modules(0.01))
    ref = copy.deepcopy((conv1, norm, conv2))
    x = torch.randn(2, 3, 5, 3, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = pixel_mlp(x, conv1, norm, conv2, slab_voxels=24)
        want = ref[2](F.gelu(ref[1](ref[0](x))))
    assert got.dtype == want.dtype == torch.bfloat16 and norm.running_var.dtype == torch.float32
    torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.05)
    torch.testing.assert_close(norm.running_var, ref[1].running_var, rtol=1e-2, atol=1e-4)
    got.float().sum().backward()
    assert conv1.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
