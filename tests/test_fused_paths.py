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
