"""Losses: hand-computed values, invariants, precision, gradients and argument checks."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dkuxnet.config import LossConfig
from dkuxnet.losses import (
    deep_supervision_loss,
    dice_ce_loss,
    downsample_nearest,
    label_to_group,
    ntxent_loss,
    qd_loss,
    semi_supervised_loss,
    sigmoid_rampup,
    uamt_seg_loss,
)

S = 1e-5
# Two voxels of one volume: softmax of (0, 0) = (1/2, 1/2), of (0, ln 3) = (1/4, 3/4); labels (0, 1).
TWO_VOXELS = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)]]])  # 1×K=2×V=2
TWO_LABELS = torch.tensor([[0, 1]])  # 1×V


def test_dice_ce_hand_computed():
    dice0 = 1 - (2 * 0.5 + S) / (0.75 + 1 + S)  # class 0: Σpg = 1/2, Σp = 3/4, Σg = 1
    dice1 = 1 - (2 * 0.75 + S) / (1.25 + 1 + S)  # class 1: Σpg = 3/4, Σp = 5/4, Σg = 1
    ce = (math.log(2) + math.log(4 / 3)) / 2
    got = dice_ce_loss(TWO_VOXELS, TWO_LABELS)
    assert got.dtype == torch.float32 and got.ndim == 0
    assert got.item() == pytest.approx((dice0 + dice1) / 2 + ce, rel=1e-6)


def test_dice_ce_matches_monai():
    from monai.losses import DiceCELoss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 3, 5, 4, 6, generator=g)
    target = torch.randint(0, 3, (3, 5, 4, 6), generator=g)
    ref = DiceCELoss(to_onehot_y=True, softmax=True)(logits, target[:, None])
    assert dice_ce_loss(logits, target.to(torch.uint8)).item() == pytest.approx(ref.item(), rel=1e-5)


def test_uamt_hand_computed():
    dice = 1 - (2 * 0.75 + S) / ((0.25 + 0.5625) + 1 + S)  # p1 = (1/2, 3/4), g = (0, 1)
    ce = (math.log(2) + math.log(4 / 3)) / 2
    assert uamt_seg_loss(TWO_VOXELS, TWO_LABELS).item() == pytest.approx(0.5 * (ce + dice), rel=1e-6)


def test_uamt_dice_sums_over_the_batch():
    # Volume 0: p1 = 1/2 on a background voxel; volume 1: p1 = 3/4 on a foreground voxel. One ratio, not two.
    logits = TWO_VOXELS.permute(2, 1, 0)  # 2×2×1
    labels = TWO_LABELS.T  # 2×1
    dice = 1 - (2 * 0.75 + S) / (0.8125 + 1 + S)
    ce = (math.log(2) + math.log(4 / 3)) / 2
    assert uamt_seg_loss(logits, labels).item() == pytest.approx(0.5 * (ce + dice), rel=1e-6)


def test_label_to_group():
    label = torch.tensor([0, 1, 2, 7], dtype=torch.uint8)
    assert label_to_group(label, 3).tolist() == [0, 1, 2, 2]
    assert label_to_group(label, 2).tolist() == [0, 1, 1, 1]
    assert label_to_group(label, 3).dtype == torch.uint8
    with pytest.raises(ValueError, match="num_groups"):
        label_to_group(label, 0)


# Queries (2 | 1). Voxel 0: exp = (1, 2, 3) -> O = (1/2, 1/2), target 0. Voxel 1: exp = (2, 1, 1) -> O = (3/4, 1/4), target 1.
QD_LOGITS = torch.tensor([[[0.0, math.log(2)], [math.log(2), 0.0], [math.log(3), 0.0]]])  # 1×N=3×V=2
QD_TARGET = torch.tensor([[0, 1]])


def test_qd_hand_computed_mean_and_sum():
    assert qd_loss(QD_LOGITS, QD_TARGET, (2, 1)).item() == pytest.approx((math.log(2) + math.log(4)) / 2, rel=1e-6)
    assert qd_loss(QD_LOGITS, QD_TARGET, (2, 1), "sum").item() == pytest.approx(math.log(2) + math.log(4), rel=1e-6)
    # Second volume with uniform logits: O = (2/3, 1/3), targets (1, 1) -> per-volume sum 2 ln 3.
    logits = torch.cat([QD_LOGITS, torch.zeros(1, 3, 2)])
    target = torch.cat([QD_TARGET, torch.tensor([[1, 1]])])
    vol_sums = [math.log(2) + math.log(4), 2 * math.log(3)]
    assert qd_loss(logits, target, (2, 1), "sum").item() == pytest.approx(sum(vol_sums) / 2, rel=1e-6)
    assert qd_loss(logits, target, (2, 1), "mean").item() == pytest.approx(sum(vol_sums) / 4, rel=1e-6)


def test_qd_equals_ce_with_one_query_per_group():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 3, 5, 2, generator=g)
    target = torch.randint(0, 4, (2, 3, 5, 2), generator=g)
    ce = F.cross_entropy(logits, target)
    assert qd_loss(logits, target, (1, 1, 1, 1)).item() == pytest.approx(ce.item(), rel=1e-6)


def test_qd_stable_for_extreme_logits():
    logits = torch.tensor([[[1000.0], [-1000.0], [-1000.0]]])  # all mass on group 0, target group 1
    loss = qd_loss(logits, torch.tensor([[1]]), (1, 2))
    assert loss.item() == pytest.approx(2000.0 - math.log(2), rel=1e-6)


def test_downsample_nearest_matches_interpolate():
    g = torch.Generator().manual_seed(2)
    label = torch.randint(0, 3, (2, 16, 12, 8), generator=g, dtype=torch.uint8)
    assert torch.equal(downsample_nearest(label, (4, 6, 2)), label[:, ::4, ::2, ::4])
    odd = torch.randint(0, 3, (1, 13, 7, 9), generator=g)
    ref = F.interpolate(odd[:, None].float(), size=(4, 3, 5), mode="nearest")[:, 0].long()
    assert torch.equal(downsample_nearest(odd, (4, 3, 5)), ref)


def test_deep_supervision_hand_computed():
    label = torch.zeros(1, 4, 4, 4, dtype=torch.uint8)
    label[0, 0, 0, 0] = 1  # taken by stride 2 and stride 4
    label[0, 1, 1, 1] = 1  # not taken (odd index)
    label[0, 2, 0, 2] = 5  # taken by stride 2, clamps to group 1
    aux = [torch.zeros(1, 3, 2, 2, 2), torch.zeros(1, 3, 1, 1, 1)]  # uniform logits: O = (2/3, 1/3) for groups (2, 1)
    stride2 = -(6 * math.log(2 / 3) + 2 * math.log(1 / 3)) / 8
    stride4 = -math.log(1 / 3)
    got = deep_supervision_loss(aux, label, (2, 1))
    assert got.item() == pytest.approx((stride2 + stride4) / 2, rel=1e-6)
    empty = deep_supervision_loss([], label, (2, 1))
    assert empty.ndim == 0 and empty.item() == 0.0


def _hand_ntxent(sim: np.ndarray, tau: float, keep: np.ndarray | None = None) -> float:
    """Direct NT-Xent over an explicit similarity matrix (positive of a = (a + n/2) mod n)."""
    n = sim.shape[0]
    total = 0.0
    for a in range(n):
        p = (a + n // 2) % n
        den = sum(math.exp(sim[a, k] / tau) for k in range(n) if k != a and (keep is None or keep[a, k] or k == p))
        total += -sim[a, p] / tau + math.log(den)
    return total / n


def test_ntxent_identical_items_give_log_2b_minus_1():
    x = torch.rand(1, 5, 3, 4).expand(6, -1, -1, -1)
    assert ntxent_loss(x, tau=0.3).item() == pytest.approx(math.log(5), rel=1e-5)


def test_ntxent_hand_computed_four_items():
    c = 1 / math.sqrt(2)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [1.0, 1.0]])  # 2B=4 items, C=2, V=1
    e = math.e
    expected = (
        (-1 + math.log(1 + e + math.exp(c)))  # item 0: positive 2 (cos 1), negatives cos 0, c
        + (-c + math.log(2 + math.exp(c)))  # item 1: positive 3 (cos c), negatives cos 0, 0
        + (-1 + math.log(e + 1 + math.exp(c)))  # item 2: positive 0
        + math.log(3)  # item 3: all three similarities equal c
    ) / 4
    assert ntxent_loss(x, tau=1.0).item() == pytest.approx(expected, rel=1e-6)
    # Extra voxel identical across items (cos 1 there): sim = (cos + 1) / 2, tau = 0.5.
    x2 = torch.stack([x, torch.ones(4, 2)], dim=-1)  # 4×2×V=2
    cos = np.array([[1, 0, 1, c], [0, 1, 0, c], [1, 0, 1, c], [c, c, c, 1]])
    assert ntxent_loss(x2, tau=0.5).item() == pytest.approx(_hand_ntxent((cos + 1) / 2, 0.5), rel=1e-6)


def test_ntxent_zero_vector_is_safe():
    x = torch.rand(4, 3, 5).index_fill(2, torch.tensor([2]), 0.0).requires_grad_(True)
    loss = ntxent_loss(x, tau=0.3)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


# Voxel granularity, B=1, V=2: view-0 voxels a0=(1,0), a1=(.8,.6); view-1 voxels b0=(1,0), b1=(.6,.8).
VOXEL_X = torch.tensor([[[1.0, 0.8], [0.0, 0.6]], [[1.0, 0.6], [0.0, 0.8]]])  # 2×C=2×V=2
VOXEL_COS = np.array([[1, 0.8, 1, 0.6], [0.8, 1, 0.8, 0.96], [1, 0.8, 1, 0.6], [0.6, 0.96, 0.6, 1]])  # a0 a1 b0 b1


def test_ntxent_voxel_hand_computed():
    e = math.exp
    expected = (
        (-1 + math.log(e(0.8) + e(1) + e(0.6)))  # a0: positive b0
        + (-0.96 + math.log(e(0.8) + e(0.8) + e(0.96)))  # a1: positive b1
        + (-1 + math.log(e(1) + e(0.8) + e(0.6)))  # b0: positive a0
        + (-0.96 + math.log(e(0.6) + e(0.96) + e(0.6)))  # b1: positive a1
    ) / 4
    gen = torch.Generator().manual_seed(0)
    got = ntxent_loss(VOXEL_X, tau=1.0, granularity="voxel", num_samples=4096, generator=gen)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_ntxent_voxel_exclude_same_class_hand_computed():
    # argmax classes: a0 0, a1 0, b0 0, b1 1; same-class negatives dropped, positives kept.
    e = math.exp
    expected = (
        (-1 + math.log(e(1) + e(0.6)))  # a0: a1 dropped
        + 0.0  # a1: a0 and b0 dropped, only the positive b1 left
        + (-1 + math.log(e(1) + e(0.6)))  # b0: a1 dropped
        + (-0.96 + math.log(e(0.6) + e(0.96) + e(0.6)))  # b1: nothing dropped
    ) / 4
    got = ntxent_loss(VOXEL_X, tau=1.0, granularity="voxel", exclude_same_class=True)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    keep = np.array([[1, 0, 1, 1], [0, 1, 0, 1], [1, 0, 1, 1], [1, 1, 1, 1]], dtype=bool)
    assert got.item() == pytest.approx(_hand_ntxent(VOXEL_COS, 1.0, keep), abs=1e-6)


def test_ntxent_voxel_sampling_is_reproducible_and_subsamples():
    x = torch.rand(4, 3, 6, 5, 4)
    a = ntxent_loss(x, 0.3, "voxel", num_samples=16, generator=torch.Generator().manual_seed(5))
    b = ntxent_loss(x, 0.3, "voxel", num_samples=16, generator=torch.Generator().manual_seed(5))
    c = ntxent_loss(x, 0.3, "voxel", num_samples=16, generator=torch.Generator().manual_seed(6))
    assert a.item() == b.item() and a.item() != c.item()
    # Sampling every voxel (M >= V) visits all anchors in a random order: the loss no longer depends on the seed.
    full = [ntxent_loss(x, 0.3, "voxel", 10**6, torch.Generator().manual_seed(s)).item() for s in (5, 6)]
    assert full[0] == pytest.approx(full[1], rel=1e-6)


def test_ntxent_argument_checks():
    x = torch.rand(4, 3, 5)
    with pytest.raises(ValueError, match="x"):
        ntxent_loss(torch.rand(2, 3, 5), 0.3)  # B = 1 at volume level
    with pytest.raises(ValueError, match="x"):
        ntxent_loss(torch.rand(5, 3, 5), 0.3)  # odd item count
    with pytest.raises(ValueError, match="granularity"):
        ntxent_loss(x, 0.3, granularity="pixel")
    with pytest.raises(ValueError, match="tau"):
        ntxent_loss(x, 0.0)
    with pytest.raises(ValueError, match="exclude_same_class"):
        ntxent_loss(x, 0.3, exclude_same_class=True)
    with pytest.raises(ValueError, match="num_samples"):
        ntxent_loss(x, 0.3, "voxel", num_samples=0)
    assert torch.isfinite(ntxent_loss(torch.rand(2, 3, 5), 0.3, "voxel"))  # B = 1 is fine per voxel


def test_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, 3, 5, dtype=torch.float64, generator=g).requires_grad_(True)
    q = torch.randn(2, 5, 3, 4, dtype=torch.float64, generator=g).requires_grad_(True)
    y = torch.randint(0, 3, (2, 3, 4), generator=g)
    checks = [
        (lambda t: ntxent_loss(t, 0.3), x),
        (lambda t: ntxent_loss(t, 0.3, "voxel", 3, torch.Generator().manual_seed(0), True), x),
        (lambda t: qd_loss(t, y, (1, 2, 2), "sum"), q),
        (lambda t: dice_ce_loss(t[:, :3], y), q),
        (lambda t: uamt_seg_loss(t[:, :2], y.clamp(max=1)), q),
    ]
    for fn, inp in checks:
        assert torch.autograd.gradcheck(fn, (inp,), fast_mode=True)


def test_sigmoid_rampup_values():
    assert sigmoid_rampup(0) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(149) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(150) == pytest.approx(math.exp(-5 * (39 / 40) ** 2))
    assert sigmoid_rampup(3000) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(6000) == 1.0 and sigmoid_rampup(15000) == 1.0
    assert sigmoid_rampup(0, length=0) == 1.0
    assert sigmoid_rampup(10, length=4, every=5) == pytest.approx(math.exp(-5 * 0.25))
    for kwargs, name in (({"iteration": -1}, "iteration"), ({"length": -1}, "length"), ({"every": 0}, "every")):
        with pytest.raises(ValueError, match=name):
            sigmoid_rampup(**{"iteration": 0, **kwargs})


def test_argument_checks_name_the_parameter():
    logits, target = torch.rand(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="reduction"):
        qd_loss(logits, target, (1, 2), reduction="none")
    with pytest.raises(ValueError, match="group_sizes"):
        qd_loss(logits, target, (1, 1))
    with pytest.raises(ValueError, match="group_target"):
        qd_loss(logits, target[:, :3], (1, 2))
    with pytest.raises(ValueError, match="target"):
        dice_ce_loss(logits, target[:1])
    with pytest.raises(ValueError, match="target"):
        uamt_seg_loss(logits, target[:, :, :2])
    with pytest.raises(ValueError, match="aux"):
        deep_supervision_loss([torch.rand(1, 3, 2, 2)], target, (1, 2))


def _rand_inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 2, 4, 4, 4, generator=g)
    target = torch.randint(0, 2, (2, 4, 4, 4), generator=g)
    q = torch.randn(4, 6, 4, 4, 4, generator=g)
    return logits.to(dtype), target, q.to(dtype)


def test_bf16_inputs_give_fp32_losses():
    logits, target, q = _rand_inputs()
    lb, qb, pb = logits.bfloat16(), q.bfloat16(), q.softmax(1).bfloat16()
    pairs = [
        (lambda a, b, p: dice_ce_loss(a, target)),
        (lambda a, b, p: uamt_seg_loss(a, target)),
        (lambda a, b, p: qd_loss(b[:2], target, (2, 4))),
        (lambda a, b, p: ntxent_loss(p, 0.3)),
        (lambda a, b, p: ntxent_loss(b, 0.3, "voxel", 8, torch.Generator().manual_seed(0))),
    ]
    for fn in pairs:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = fn(lb, qb, pb)
        ref = fn(lb.float(), qb.float(), pb.float())
        assert low.dtype == torch.float32
        assert low.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)


def _out(items=4, views=2, k=2, n=6, seed=0, dtype=torch.float32, vnet=False):
    g = torch.Generator().manual_seed(seed)
    seg = torch.randn(views * items, k, 4, 4, 4, generator=g).to(dtype).requires_grad_(True)
    if vnet:
        return SimpleNamespace(seg_logits=seg, query_logits=None, query_probs=None, cluster_probs=None, aux=[])
    q = torch.randn(views * items, n, 4, 4, 4, generator=g).to(dtype).requires_grad_(True)
    aux = [torch.randn(views * items, n, s, s, s, generator=g).to(dtype).requires_grad_(True) for s in (1, 2)]
    return SimpleNamespace(seg_logits=seg, query_logits=q, query_probs=q.softmax(1), cluster_probs=None, aux=aux)


LABELS = torch.randint(0, 2, (2, 4, 4, 4), generator=torch.Generator().manual_seed(9), dtype=torch.uint8)
GROUPS = (2, 1, 3)


def test_semi_supervised_all_combines_the_parts():
    out, cfg = _out(), LossConfig(lambda_qd=0.5, lambda_ds=0.25, lambda_qdc=0.1, lambda_segc=0.2)
    total, parts = semi_supervised_loss(out, LABELS, 2, 2, cfg, 3000, GROUPS)
    views = [slice(0, 2), slice(4, 6)]
    dice_ce = sum(dice_ce_loss(out.seg_logits[v], LABELS) for v in views) / 2
    qd = sum(qd_loss(out.query_logits[v], label_to_group(LABELS, 3), GROUPS) for v in views) / 2
    ds = sum(deep_supervision_loss([m[v] for m in out.aux], LABELS, GROUPS) for v in views) / 2
    qdc = ntxent_loss(out.query_probs, cfg.tau)
    segc = ntxent_loss(out.seg_logits.softmax(1), cfg.tau)
    ramp = math.exp(-1.25)
    for name, ref in (("dice_ce", dice_ce), ("qd", qd), ("ds", ds), ("qdc", qdc), ("segc", segc)):
        assert parts[name].item() == pytest.approx(ref.item(), rel=1e-6), name
    seg = dice_ce + 0.5 * qd + 0.25 * ds
    assert parts["seg"].item() == pytest.approx(seg.item(), rel=1e-6)
    assert parts["ramp"].item() == pytest.approx(ramp, rel=1e-6)
    assert total.item() == pytest.approx((seg + ramp * (0.1 * qdc + 0.2 * segc)).item(), rel=1e-6)
    assert all(v.ndim == 0 and not v.requires_grad and v.dtype == torch.float32 for v in parts.values())
    total.backward()
    for t in (out.seg_logits, out.query_logits, *out.aux):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def _ntxent_reference(x: torch.Tensor, tau: float, granularity: str, exclude_same_class: bool = False) -> float:
    """NT-Xent from its definition on (2B)×C×… (every voxel sampled at voxel level): per-voxel unit vectors;
    volume level: sim = voxel-mean cosine between items; voxel level: per volume the 2V anchors of both views,
    positives the same voxel in the other view, optionally without negatives of the anchor's argmax class."""
    z = x.detach().double().flatten(2).numpy()  # 2B×C×V
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    b = z.shape[0] // 2
    if granularity == "volume":
        return _hand_ntxent(np.einsum("acv,bcv->ab", z, z) / z.shape[2], tau)
    losses = []
    for i in range(b):
        vecs = np.concatenate([z[i].T, z[i + b].T])  # 2V×C
        cls = vecs.argmax(1)
        keep = cls[:, None] != cls[None, :] if exclude_same_class else None
        losses.append(_hand_ntxent(vecs @ vecs.T, tau, keep))
    return float(np.mean(losses))


def _seg_reference(out: SimpleNamespace, cfg: LossConfig, items: int = 4) -> float:
    """L_seg = mean over the two views of DiceCE + λ_qd QD + λ_ds DS on the labeled items (first 2 of each view)."""
    total = 0.0
    for view in (slice(0, 2), slice(items, items + 2)):
        total += (dice_ce_loss(out.seg_logits[view], LABELS).item()
                  + cfg.lambda_qd * qd_loss(out.query_logits[view], label_to_group(LABELS, 3), GROUPS).item()
                  + cfg.lambda_ds * deep_supervision_loss([m[view] for m in out.aux], LABELS, GROUPS).item()) / 2
    return total


@pytest.mark.parametrize("ablation, has_qdc, has_segc", [("seg", 0, 0), ("qdc", 1, 0), ("segc", 0, 1), ("all", 1, 1)])
def test_semi_supervised_ablation_rows(ablation, has_qdc, has_segc):
    """Each Table-1 row: L = L_seg + ramp·(λ_qdc·L_qdc·[row has qdc] + λ_segc·L_segc·[row has segc]), the NT-Xent
    terms computed from their definition (L_qdc on S, L_segc on softmax_K of the logits), ramp(6000) = 1."""
    out, cfg = _out(), LossConfig(ablation=ablation, lambda_qdc=0.3, lambda_segc=0.7)
    total, parts = semi_supervised_loss(out, LABELS, 2, 2, cfg, 6000, GROUPS)
    qdc = _ntxent_reference(out.query_probs, cfg.tau, "volume")
    segc = _ntxent_reference(out.seg_logits.softmax(1), cfg.tau, "volume")
    expected = _seg_reference(out, cfg) + 0.3 * qdc * has_qdc + 0.7 * segc * has_segc
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert parts["qdc"].item() == pytest.approx(qdc * has_qdc, rel=1e-6)
    assert parts["segc"].item() == pytest.approx(segc * has_segc, rel=1e-6)


def test_semi_supervised_disabled_terms_and_vnet():
    out = _out(items=2)  # labeled only
    _, parts = semi_supervised_loss(out, LABELS, 2, 2, LossConfig(lambda_qdc=0.0, lambda_segc=0.0), 0, GROUPS)
    assert parts["qdc"].item() == 0 and parts["segc"].item() == 0
    one_view = _out(views=1)
    _, parts = semi_supervised_loss(one_view, LABELS, 2, 1, LossConfig(), 0, GROUPS)
    assert parts["qdc"].item() == 0 and parts["segc"].item() == 0 and parts["qd"].item() > 0
    vnet = _out(items=2, views=1, vnet=True)
    cfg = LossConfig(seg_loss="uamt", lambda_qd=0.0, lambda_ds=0.0, ablation="seg")
    total, parts = semi_supervised_loss(vnet, LABELS, 2, 1, cfg, 0, ())
    assert total.item() == pytest.approx(uamt_seg_loss(vnet.seg_logits, LABELS).item(), rel=1e-6)
    assert parts["qd"].item() == 0 and parts["ds"].item() == 0
    total, parts = semi_supervised_loss(vnet, LABELS, 2, 1, LossConfig(), 0, GROUPS)  # no queries: QD/DS skipped
    assert parts["qd"].item() == 0 and parts["ds"].item() == 0


def test_semi_supervised_voxel_granularity_excludes_same_class_negatives_in_segc_only():
    """Voxel level with every voxel sampled: L_qdc is the plain voxel NT-Xent of S; L_segc that of softmax_K(Y) with
    the anchor's same-class negatives dropped (the result differs from keeping them)."""
    out = _out()
    cfg = LossConfig(qdc_granularity="voxel", segc_granularity="voxel", voxel_samples=10**6)
    total, parts = semi_supervised_loss(out, LABELS, 2, 2, cfg, 6000, GROUPS, torch.Generator().manual_seed(0))
    probs = out.seg_logits.softmax(1)
    qdc = _ntxent_reference(out.query_probs, cfg.tau, "voxel")
    segc = _ntxent_reference(probs, cfg.tau, "voxel", exclude_same_class=True)
    assert parts["qdc"].item() == pytest.approx(qdc, rel=1e-5)
    assert parts["segc"].item() == pytest.approx(segc, rel=1e-5)
    assert segc != pytest.approx(_ntxent_reference(probs, cfg.tau, "voxel"), rel=1e-2)
    expected = _seg_reference(out, cfg) + cfg.lambda_qdc * qdc + cfg.lambda_segc * segc
    assert total.item() == pytest.approx(expected, rel=1e-6)


def test_semi_supervised_bf16_close_to_fp32():
    cfg = LossConfig()
    out_b = _out(dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = semi_supervised_loss(out_b, LABELS, 2, 2, cfg, 6000, GROUPS)
    out_f = SimpleNamespace(**{k: v.float() for k, v in vars(out_b).items() if k not in ("aux", "cluster_probs")},
                            cluster_probs=None, aux=[m.float() for m in out_b.aux])
    ref, _ = semi_supervised_loss(out_f, LABELS, 2, 2, cfg, 6000, GROUPS)
    assert low.dtype == torch.float32 and low.item() == pytest.approx(ref.item(), rel=1e-5)


def test_semi_supervised_argument_checks():
    out = _out()
    cases = [
        ({"cfg": LossConfig(ablation="none")}, "ablation"),
        ({"cfg": LossConfig(seg_loss="dice")}, "seg_loss"),
        ({"cfg": LossConfig(qd_reduction="max")}, "qd_reduction"),
        ({"cfg": LossConfig(qdc_granularity="pixel")}, "qdc_granularity"),
        ({"labels": LABELS[:1]}, "labels"),
        ({"n_labeled": 5}, "n_labeled"),
        ({"views": 3}, "views"),
        ({"group_sizes": (2, 2)}, "group_sizes"),
    ]
    for change, name in cases:
        kwargs = {"out": out, "labels": LABELS, "n_labeled": 2, "views": 2, "cfg": LossConfig(),
                  "iteration": 0, "group_sizes": GROUPS, **change}
        with pytest.raises(ValueError, match=name):
            semi_supervised_loss(**kwargs)
    vnet = _out(vnet=True)
    with pytest.raises(ValueError, match="query_probs"):
        semi_supervised_loss(vnet, LABELS, 2, 2, LossConfig(ablation="qdc"), 0, ())


def test_semi_supervised_qdc_on_cluster_outputs():
    out = _out()
    groups = torch.stack([p.sum(1) for p in out.query_probs.split(GROUPS, dim=1)], dim=1)  # O: 8×3×4×4×4
    out.cluster_probs = groups
    cfg = LossConfig(ablation="qdc", qdc_on="cluster_probs")
    _, parts = semi_supervised_loss(out, LABELS, 2, 2, cfg, 0, GROUPS)
    assert parts["qdc"].item() == pytest.approx(ntxent_loss(groups, cfg.tau).item(), rel=1e-6)
    assert parts["qdc"].item() != pytest.approx(ntxent_loss(out.query_probs, cfg.tau).item(), rel=1e-3)
    with pytest.raises(ValueError, match="qdc_on"):
        semi_supervised_loss(out, LABELS, 2, 2, LossConfig(qdc_on="queries"), 0, GROUPS)
    out.cluster_probs = None
    with pytest.raises(ValueError, match="out.cluster_probs"):
        semi_supervised_loss(out, LABELS, 2, 2, cfg, 0, GROUPS)
