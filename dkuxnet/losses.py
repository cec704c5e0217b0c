"""Training losses of DKUXNet (the book's method page, "The losses"): pure functions, fp32 inside, no host syncs.

Shapes: B volumes, K classes, N queries, G query groups, C channels, V voxels (``...`` = spatial dims).
Every function upcasts half-precision inputs to fp32 and runs with autocast disabled, so bf16 model outputs give
fp32 losses. No function calls ``.item()`` or branches on tensor values.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dkuxnet.config import ABLATIONS, LossConfig
from dkuxnet.ops import l2_normalize
from dkuxnet.precision import fp32_island, upcast

if TYPE_CHECKING:
    from dkuxnet.distributed import Shard

_EPS = 1e-8  # norm floor of the cosine similarity: a zero vector has cosine 0 with everything
GRANULARITIES = ("volume", "voxel")
REDUCTIONS = ("mean", "sum")
QDC_INPUTS = ("query_probs", "cluster_probs")
SEG_LOSSES = ("dice_ce", "uamt")


def _check_seg_inputs(logits: Tensor, target: Tensor) -> None:
    if logits.ndim < 3:
        raise ValueError(f"logits: expected B×K×... with spatial dims, got shape {tuple(logits.shape)}")
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"target: shape {tuple(target.shape)} does not match logits {tuple(logits.shape)} (B×K×...)")


def _check_total(total: int | None, b: int) -> None:
    if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < max(b, 1)):
        raise ValueError(f"total: must be an integer >= the batch's {max(b, 1)} volumes, got {total!r}")


def dice_ce_loss(logits: Tensor, target: Tensor, smooth: float = 1e-5, total: int | None = None) -> Tensor:
    r"""Dice + cross-entropy with MONAI ``DiceCELoss(to_onehot_y=True, softmax=True)`` semantics.

    .. math::
        p = \mathrm{softmax}_K(z),\quad g = \mathrm{onehot}(y),\quad
        L = \frac{1}{BK}\sum_{b,k}\Big(1 - \frac{2\sum_v p_{bkv} g_{bkv} + s}{\sum_v p_{bkv} + \sum_v g_{bkv} + s}\Big)
            - \frac{1}{BV}\sum_{b,v} \log p_{b,y_{bv},v}

    Background included, Dice per (volume, class) then averaged, weights 1 : 1.

    With ``total`` = T the call sees B of the T volumes of a whole batch (one rank's part under torchrun,
    :mod:`dkuxnet.distributed`) and both means divide by T instead of B: it returns this part's share, and
    the shares of all parts add up to the whole-batch loss (B = 0 gives 0).

    Args:
        logits: B×K×... class logits.
        target: B×... integer labels in [0, K) (not range-checked: that would need a host sync).
        smooth: s, added to numerator and denominator.
        total: T, volumes of the whole batch (default: B).

    Returns:
        0-dim fp32 tensor.
    """
    _check_seg_inputs(logits, target)
    _check_total(total, logits.shape[0])
    if smooth < 0:
        raise ValueError(f"smooth: must be >= 0, got {smooth}")
    with fp32_island(logits.device):
        z = upcast(logits)
        y = target.long()
        p = z.softmax(dim=1).flatten(2)  # B×K×V
        g = F.one_hot(y.flatten(1), z.shape[1]).transpose(1, 2).to(z.dtype)  # B×K×V
        inter = (p * g).sum(-1)  # B×K
        dice = 1.0 - (2.0 * inter + smooth) / (p.sum(-1) + g.sum(-1) + smooth)  # B×K
        if total is None:
            return dice.mean() + F.cross_entropy(z, y)
        return dice.sum() / (total * z.shape[1]) + F.cross_entropy(z, y, reduction="sum") / (total * p.shape[2])


def uamt_seg_loss(
    logits: Tensor, target: Tensor, total: int | None = None, batch_sum: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    r"""Supervised loss of the LA V-Net repositories (UA-MT ``train_LA.py``): 0.5 (CE + foreground Dice).

    .. math::
        L = \tfrac12\Big(-\frac{1}{BV}\sum_{b,v}\log p_{b,y_{bv},v}
            + 1 - \frac{2\sum_{b,v} p_{b1v} g_{bv} + \epsilon}{\sum_{b,v} p_{b1v}^2 + \sum_{b,v} g_{bv}^2 + \epsilon}\Big),
        \quad g = [y = 1],\ \epsilon = 10^{-5}

    The Dice sums run over the whole batch (one ratio, not a mean of per-volume ratios), as in UA-MT;
    the foreground is class 1.

    A call that sees B of the T volumes of a whole batch (one rank's part, :mod:`dkuxnet.distributed`) passes
    ``total`` = T and ``batch_sum``, which sums its three Dice sums over all parts (with gradient); it returns
    its share :math:`\tfrac12\big(\frac{1}{TV}\sum_{b,v} -\log p_{b,y_{bv},v} + \frac{B}{T}(1 - \mathrm{Dice})\big)`:
    the shares add up to L, and their gradients to L's.

    Args:
        logits: B×K×... class logits, K >= 2.
        target: B×... integer labels.
        total: T, volumes of the whole batch (default: B).
        batch_sum: sum over the parts of a 3-vector, with gradient (default: none, this call sees the whole batch).

    Returns:
        0-dim fp32 tensor.
    """
    _check_seg_inputs(logits, target)
    _check_total(total, logits.shape[0])
    if logits.shape[1] < 2:
        raise ValueError(f"logits: need K >= 2 classes for a foreground Dice, got K={logits.shape[1]}")
    with fp32_island(logits.device):
        z = upcast(logits)
        y = target.long()
        p1 = z.softmax(dim=1)[:, 1]  # B×...
        g = (y == 1).to(z.dtype)  # B×...
        eps = 1e-5
        inter, pp, gg = (p1 * g).sum(), (p1 * p1).sum(), (g * g).sum()
        if batch_sum is not None:
            inter, pp, gg = batch_sum(torch.stack([inter, pp, gg])).unbind()  # sums over the whole batch
        dice = 1.0 - (2.0 * inter + eps) / (pp + gg + eps)
        if total is None:
            return 0.5 * (F.cross_entropy(z, y) + dice)
        voxels = math.prod(y.shape[1:])
        return 0.5 * (F.cross_entropy(z, y, reduction="sum") / (total * voxels) + dice * (y.shape[0] / total))


def label_to_group(label: Tensor, num_groups: int) -> Tensor:
    r"""Query-group target :math:`\hat y = \min(y, G-1)` (book: method page); same dtype as ``label``."""
    if num_groups < 1:
        raise ValueError(f"num_groups: must be >= 1, got {num_groups}")
    return label.clamp(max=num_groups - 1)


def _check_groups(group_sizes: Sequence[int], n: int) -> None:
    if len(group_sizes) == 0 or any(int(s) < 1 for s in group_sizes) or sum(group_sizes) != n:
        raise ValueError(f"group_sizes: need positive sizes summing to N={n}, got {tuple(group_sizes)}")


class _GroupedLogSumExp(torch.autograd.Function):
    """logsumexp over consecutive slices of dim 1; backward writes each slice's softmax·grad in place."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, bounds: tuple[int, ...]) -> Tensor:
        lse = torch.stack([z[:, a:b].logsumexp(dim=1) for a, b in zip(bounds[:-1], bounds[1:])], dim=1)  # B×G×...
        ctx.save_for_backward(z, lse)
        ctx.bounds = bounds
        return lse

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        z, lse = ctx.saved_tensors
        dz = torch.empty_like(z)
        for g, (a, b) in enumerate(zip(ctx.bounds[:-1], ctx.bounds[1:])):
            out = dz[:, a:b]
            torch.sub(z[:, a:b], lse[:, g : g + 1], out=out)
            out.exp_().mul_(grad[:, g : g + 1])  # ∂lse_g/∂z_n = softmax within the group
        return dz, None


def grouped_logsumexp(z: Tensor, group_sizes: Sequence[int]) -> Tensor:
    r"""Per-group logsumexp over dim 1: :math:`\mathrm{lse}_g = \log\sum_{n\in g} e^{z_n}`, groups = consecutive slices.

    Same values and gradients as stacking ``z[:, a:b].logsumexp(dim=1)`` per group, with one read of
    ``z`` forward and one write of its gradient backward (autograd's slices would each allocate and add a
    full-size zero gradient).

    Args:
        z: B×N×... logits.
        group_sizes: G positive sizes summing to N.

    Returns:
        B×G×... tensor in ``z``'s dtype.
    """
    _check_groups(group_sizes, z.shape[1])
    return _GroupedLogSumExp.apply(z, tuple(itertools.accumulate((int(s) for s in group_sizes), initial=0)))


def qd_loss(
    query_logits: Tensor, group_target: Tensor, group_sizes: Sequence[int], reduction: str = "mean",
    total: int | None = None,
) -> Tensor:
    r"""Query-distribution (QD) loss: NLL of the query masses merged into groups (book: method page, "Supervised loss").

    .. math::
        \log O_{g,v} = \operatorname{logsumexp}_{n\in g} L_{n,v} - \operatorname{logsumexp}_{n} L_{n,v},\qquad
        \ell_{b} = -\sum_v \log O_{\hat y_{bv}, v}

    ``reduction="mean"``: :math:`\frac{1}{BV}\sum_b \ell_b` (mean over voxels and batch, the [decision]).
    ``reduction="sum"``: :math:`\frac{1}{B}\sum_b \ell_b` — sum over voxels, mean over batch; this is the
    official ``qd = -mean_b(sum_{g,v} onehot * log O)`` (the sum over groups only picks the target group).
    Computed in log space (no log 0), queries grouped by consecutive slices of ``group_sizes``; the total
    :math:`\operatorname{logsumexp}_n` is taken as the logsumexp of the G group values (the same number),
    so the full-resolution logits are read once (:func:`grouped_logsumexp`). With ``total`` = T (B of the T
    volumes of a whole batch, as :func:`dice_ce_loss`) the batch mean divides by T: this part's share.

    Args:
        query_logits: B×N×... per-voxel query logits (softmax over N = the assignment S).
        group_target: B×... integer group index in [0, G) (see :func:`label_to_group`).
        group_sizes: G positive sizes summing to N.
        reduction: "mean" or "sum".
        total: T, volumes of the whole batch (default: B).

    Returns:
        0-dim fp32 tensor.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if query_logits.ndim < 3 or group_target.shape != query_logits.shape[:1] + query_logits.shape[2:]:
        raise ValueError(
            f"group_target: shape {tuple(group_target.shape)} does not match query_logits "
            f"{tuple(query_logits.shape)} (B×N×...)"
        )
    _check_groups(group_sizes, query_logits.shape[1])
    _check_total(total, query_logits.shape[0])
    with fp32_island(query_logits.device):
        lse_g = grouped_logsumexp(upcast(query_logits), group_sizes)  # B×G×...
        log_o = lse_g - lse_g.logsumexp(dim=1, keepdim=True)  # B×G×...: log Σ_n e^z = log Σ_g e^(lse_g)
        y = group_target.long()
        if total is not None:
            nll = F.nll_loss(log_o, y, reduction="sum")
            return nll / (total * math.prod(y.shape[1:])) if reduction == "mean" else nll / total
        if reduction == "mean":
            return F.nll_loss(log_o, y)
        return F.nll_loss(log_o, y, reduction="sum") / query_logits.shape[0]


def downsample_nearest(label: Tensor, size: Sequence[int]) -> Tensor:
    r"""Nearest-neighbour resampling of a B×X×Y×Z label map to B×x×y×z by exact integer indexing.

    Output voxel (i, j, k) takes input voxel :math:`(\lfloor iX/x\rfloor, \lfloor jY/y\rfloor, \lfloor kZ/z\rfloor)`
    (the rule of ``F.interpolate(mode="nearest")``, without its float rounding); for an exact stride s this
    is ``label[:, ::s, ::s, ::s]``, the first voxel of every s×s×s block.
    """
    if len(size) != label.ndim - 1:
        raise ValueError(f"size: expected {label.ndim - 1} spatial sizes, got {tuple(size)}")
    out = label
    for d, (n_in, n_out) in enumerate(zip(label.shape[1:], size)):
        idx = torch.arange(n_out, device=label.device) * n_in // n_out  # n_out
        out = out.index_select(d + 1, idx)
    return out


def deep_supervision_loss(
    aux: Sequence[Tensor], label: Tensor, group_sizes: Sequence[int], reduction: str = "mean",
    total: int | None = None,
) -> Tensor:
    r"""Deep supervision of the per-layer kMaX assignments (book: method page, "Supervised loss").

    .. math::
        L_{ds} = \frac{1}{|\mathcal L|}\sum_{\ell} L_{qd}\big(M_\ell,\ \min(\mathrm{down}_\ell(y), G-1)\big)

    with :math:`\mathrm{down}_\ell` the nearest-neighbour resampling of :func:`downsample_nearest` to layer
    :math:`\ell`'s grid (strides 8/4/2 of the patch).

    Args:
        aux: per-layer affinity logits, each B×N×x×y×z.
        label: B×X×Y×Z integer labels (raw classes; mapped to groups here).
        group_sizes: G positive sizes summing to N.
        reduction: QD reduction, "mean" or "sum".
        total: volumes of the whole batch when ``label`` holds only some of them (:func:`qd_loss`); default B.

    Returns:
        0-dim fp32 tensor; zero (on ``label``'s device) when ``aux`` is empty.
    """
    if len(aux) == 0:
        return torch.zeros((), device=label.device)
    target = label_to_group(label, len(group_sizes))
    losses = []
    for i, m in enumerate(aux):
        if m.ndim != label.ndim + 1 or m.shape[0] != label.shape[0]:
            raise ValueError(f"aux: layer {i} has shape {tuple(m.shape)}, label {tuple(label.shape)} (B×N×x×y×z)")
        losses.append(qd_loss(m, downsample_nearest(target, m.shape[2:]), group_sizes, reduction, total))
    return torch.stack(losses).mean()


def _ntxent_rows(sim: Tensor, tau: float, mask: Tensor, half: int) -> Tensor:
    """Mean over rows a of -log softmax(sim[a] / tau, masked)[(a + half) mod n]; ``sim`` is overwritten."""
    n = sim.shape[-1]
    target = (torch.arange(n, device=sim.device) + half) % n  # n
    logits = sim.div_(tau).masked_fill_(mask, float("-inf"))  # ...×n×n, in place: no extra copies
    return F.cross_entropy(logits.reshape(-1, n), target.repeat(logits.numel() // (n * n)))


def ntxent_loss(
    x: Tensor,
    tau: float,
    granularity: str = "volume",
    num_samples: int = 4096,
    generator: torch.Generator | None = None,
    exclude_same_class: bool = False,
    volumes: tuple[int, int] | None = None,
) -> Tensor:
    r"""NT-Xent between the two views of each volume (book: method page, L_qdc and L_segc).

    Items are ordered [view 0 of B volumes, view 1 of B volumes]; the positive of item a is
    p(a) = (a + B) mod 2B. Volume granularity, with the voxel-averaged cosine similarity:

    .. math::
        \mathrm{sim}(X, Y) = \frac1V\sum_v \frac{X_{:,v}\cdot Y_{:,v}}{\max(\|X_{:,v}\|,\varepsilon)\max(\|Y_{:,v}\|,\varepsilon)},\quad
        L = \frac{1}{2B}\sum_{a}-\log\frac{\exp(\mathrm{sim}(X_a, X_{p(a)})/\tau)}{\sum_{k\ne a}\exp(\mathrm{sim}(X_a, X_k)/\tau)}

    The 2B×2B matrix is one matmul of the per-voxel normalised items flattened to 2B×(C·V) (TF32 if the
    caller enabled it for fp32 matmuls). B = 1 raises ``ValueError`` (no negatives: the loss is constant).

    Voxel granularity: per volume, M = min(num_samples, V) voxel positions are drawn without replacement
    (``generator`` on ``x``'s device); the 2M anchors are the sampled C-vectors of both views, the positive
    is the same voxel in the other view, the negatives are the other 2M − 2 vectors of that volume,
    sim is the plain cosine; L is the mean over the B·2M anchors (memory B×2M×2M).
    ``exclude_same_class`` (voxel only) also drops the negatives whose argmax over C equals the anchor's
    (a deviation used for L_segc on class probabilities).
    ``volumes`` = (first, T) (voxel only): ``x`` holds volumes first … first + B − 1 of a whole batch of T
    (one rank's part, :mod:`dkuxnet.distributed`); the voxel positions are drawn for all T volumes, as the
    whole batch draws them, and the result is this part's share: its anchors' mean × B / T.

    Args:
        x: (2B)×C×... per-voxel vectors (e.g. query assignment S or class probabilities).
        tau: temperature τ > 0.
        granularity: "volume" or "voxel".
        num_samples: M, voxels per volume for granularity="voxel".
        generator: optional torch.Generator on ``x.device`` for the voxel sampling.
        exclude_same_class: drop same-argmax negatives (granularity="voxel" only).
        volumes: (first, T) of a part of a whole batch (granularity="voxel" only); default: the whole batch.

    Returns:
        0-dim fp32 tensor.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity: expected one of {GRANULARITIES}, got {granularity!r}")
    if not tau > 0:
        raise ValueError(f"tau: must be > 0, got {tau}")
    if x.ndim < 2 or x.shape[0] % 2 or x.shape[0] == 0:
        raise ValueError(f"x: expected (2B)×C×... with an even number of items, got shape {tuple(x.shape)}")
    n, c, b = x.shape[0], x.shape[1], x.shape[0] // 2
    with fp32_island(x.device):
        z = upcast(x).reshape(n, c, -1)  # 2B×C×V
        v = z.shape[2]
        if granularity == "volume":
            if exclude_same_class or volumes is not None:
                raise ValueError("exclude_same_class, volumes: only defined for granularity='voxel'")
            if b < 2:
                raise ValueError(f"x: volume-level NT-Xent needs B >= 2 volumes (2B >= 4 items), got {n} items")
            flat = l2_normalize(z, dim=1, eps=_EPS).reshape(n, c * v)  # 2B×(C·V)
            sim = flat @ flat.T / v  # 2B×2B
            eye = torch.eye(n, dtype=torch.bool, device=x.device)  # 2B×2B
            return _ntxent_rows(sim, tau, eye, b)
        if num_samples < 1:
            raise ValueError(f"num_samples: must be >= 1, got {num_samples}")
        if generator is not None and torch.device(generator.device).type != x.device.type:
            raise ValueError(f"generator: on {generator.device}, x on {x.device}")
        first, total = (0, b) if volumes is None else volumes
        if not 0 <= first <= total - b:
            raise ValueError(f"volumes: (first, total) must hold the {b} volumes of x, got {volumes}")
        m = min(num_samples, v)
        idx = torch.rand(total, v, generator=generator, device=x.device).topk(m, dim=1).indices  # T×M
        idx = idx[first:first + b]  # B×M
        zs = z.reshape(2, b, c, v).gather(3, idx.view(1, b, 1, m).expand(2, b, c, m))  # 2×B×C×M
        anchors = F.normalize(zs, dim=2, eps=_EPS).permute(1, 0, 3, 2).reshape(b, 2 * m, c)  # B×2M×C
        sim = anchors @ anchors.transpose(1, 2)  # B×2M×2M
        mask = torch.eye(2 * m, dtype=torch.bool, device=x.device).expand(b, -1, -1)  # B×2M×2M
        if exclude_same_class:
            cls = zs.argmax(dim=2).transpose(0, 1).reshape(b, 2 * m)  # B×2M
            pos = mask.roll(m, dims=2)  # B×2M×2M, True at (a, p(a))
            mask = mask | ((cls[:, :, None] == cls[:, None, :]) & ~pos)
        loss = _ntxent_rows(sim, tau, mask, m)
        return loss if volumes is None else loss * (b / total)


def sigmoid_rampup(iteration: int, length: float = 40.0, every: int = 150) -> float:
    r"""Sigmoid ramp of the LA repositories: :math:`\exp(-5(1 - \min(t, T)/T)^2)`, t = iteration // every.

    T = ``length``; T = 0 gives 1.0 (no ramp). Defaults reach 1 at iteration 6000.
    """
    if iteration < 0:
        raise ValueError(f"iteration: must be >= 0, got {iteration}")
    if length < 0:
        raise ValueError(f"length: must be >= 0, got {length}")
    if every < 1:
        raise ValueError(f"every: must be >= 1, got {every}")
    if length == 0:
        return 1.0
    phase = 1.0 - min(iteration // every, length) / length
    return math.exp(-5.0 * phase * phase)


def _ntxent_share(
    x: Tensor, tau: float, granularity: str, num_samples: int, generator: torch.Generator | None,
    exclude_same_class: bool, shard: Shard | None,
) -> Tensor:
    """:func:`ntxent_loss` of the whole batch (``shard`` None), or this rank's share of it.

    Volume granularity: the NT-Xent of all ranks' items (gathered with gradient), divided by the N ranks;
    voxel granularity: the rank's volumes with the whole batch's voxel draws.
    """
    if shard is None:
        return ntxent_loss(x, tau, granularity, num_samples, generator, exclude_same_class)
    if granularity == "volume":
        return ntxent_loss(shard.gather_items(x, 2), tau, granularity, num_samples, generator) / shard.world
    return ntxent_loss(x, tau, granularity, num_samples, generator, exclude_same_class, (shard.start, shard.volumes))


def _check_loss_config(cfg: LossConfig) -> None:
    for name, value, allowed in (
        ("seg_loss", cfg.seg_loss, SEG_LOSSES),
        ("ablation", cfg.ablation, ABLATIONS),
        ("qd_reduction", cfg.qd_reduction, REDUCTIONS),
        ("qdc_on", cfg.qdc_on, QDC_INPUTS),
        ("qdc_granularity", cfg.qdc_granularity, GRANULARITIES),
        ("segc_granularity", cfg.segc_granularity, GRANULARITIES),
    ):
        if value not in allowed:
            raise ValueError(f"cfg.{name}: expected one of {allowed}, got {value!r}")


REPLICATED_PARTS = ("ramp",)  # parts of semi_supervised_loss that every rank holds whole (the others are shares)


def semi_supervised_loss(
    out: Any,
    labels: Tensor,
    n_labeled: int,
    views: int,
    cfg: LossConfig,
    iteration: int,
    group_sizes: Sequence[int],
    generator: torch.Generator | None = None,
    shard: Shard | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    r"""Total objective (the book's method page, "Total objective and schedule").

    .. math::
        L = L_{seg} + r(t)\,(\lambda_{qdc} L_{qdc} + \lambda_{segc} L_{segc}),\qquad
        L_{seg} = \frac{1}{|\mathrm{views}|}\sum_{\mathrm{view}} \big[L_{dice\,ce} + \lambda_{qd} L_{qd} + \lambda_{ds} L_{ds}\big]

    L_seg uses the labeled items of each view (``cfg.seg_loss``: :func:`dice_ce_loss` or
    :func:`uamt_seg_loss` on ``seg_logits``; :func:`qd_loss` on ``query_logits``;
    :func:`deep_supervision_loss` on ``aux``). QD and DS are skipped when ``group_sizes`` is empty or
    ``out.query_logits`` is None (V-Net). L_qdc = :func:`ntxent_loss` on ``query_probs`` (S; or on
    ``cluster_probs``, O, when ``cfg.qdc_on == "cluster_probs"``), L_segc on
    softmax_K(seg_logits) (same-class negatives excluded at voxel granularity), both over all items of both
    views. ``cfg.ablation``: "seg" → L_seg only; "qdc" / "segc" → one consistency term; "all" → both.
    Consistency terms are off when ``views == 1`` or their λ is 0. r(t) = :func:`sigmoid_rampup`.

    With ``shard`` (a :class:`~dkuxnet.distributed.Shard`: one rank's volumes of a batch split over ranks) the
    outputs and labels are the rank's items and the result is its share ℓ_r of the whole-batch loss,
    Σ_r ℓ_r = L: the supervised means divide by the whole batch's labeled count (``total``), the volume-level
    NT-Xent is computed from the items of all ranks (:meth:`~dkuxnet.distributed.Shard.gather_items`, with
    gradient) and counted 1/N on each of the N ranks, the voxel-level one is per volume
    (``ntxent_loss(volumes=…)``). The parts are shares too, except ``ramp``.

    Args:
        out: model output with ``seg_logits`` (views·(n_lab + n_unlab))×K×..., ``query_logits`` and
            ``query_probs`` ×N×... or None, ``aux`` list of ×N×x×y×z; view-major
            ([view 0: labeled, unlabeled][view 1: labeled, unlabeled]).
        labels: n_labeled×... integer labels of the labeled items (shared by the views).
        n_labeled: labeled items per view.
        views: 1 (weak only) or 2 (weak + strong).
        cfg: loss weights and switches.
        iteration: training iteration (for the ramp).
        group_sizes: query group sizes (empty for V-Net).
        generator: device generator for voxel-granularity sampling.
        shard: this rank's part of a batch split over ranks; None: the whole batch (``n_labeled`` >= 1).

    Returns:
        ``(total, parts)``; ``parts`` holds detached 0-dim fp32 tensors ``total``, ``seg`` (L_seg with its
        weights), unweighted ``dice_ce`` (the seg term, whichever ``cfg.seg_loss``), ``qd``, ``ds``, ``qdc``,
        ``segc``, and ``ramp``; disabled terms are 0.
    """
    _check_loss_config(cfg)
    seg = out.seg_logits
    if views not in (1, 2):
        raise ValueError(f"views: expected 1 or 2, got {views}")
    if seg.ndim < 3 or seg.shape[0] % views:
        raise ValueError(f"out.seg_logits: batch {tuple(seg.shape)} is not views={views} × items")
    items = seg.shape[0] // views
    least = 1 if shard is None else 0
    if not least <= n_labeled <= items:
        raise ValueError(f"n_labeled: must be in [{least}, {items}] (items per view), got {n_labeled}")
    if labels.shape != (n_labeled,) + seg.shape[2:]:
        raise ValueError(f"labels: shape {tuple(labels.shape)}, expected {(n_labeled,) + tuple(seg.shape[2:])}")
    zero = seg.new_zeros((), dtype=torch.float32)
    total = None if shard is None else shard.labeled  # labeled volumes per view of the whole batch
    with fp32_island(seg.device):
        if cfg.seg_loss == "dice_ce":
            seg_fn = functools.partial(dice_ce_loss, total=total)
        else:
            seg_fn = functools.partial(uamt_seg_loss, total=total, batch_sum=None if shard is None else shard.all_sum)
        use_qd = len(group_sizes) > 0 and out.query_logits is not None and cfg.lambda_qd != 0
        use_ds = len(group_sizes) > 0 and len(out.aux) > 0 and cfg.lambda_ds != 0
        group_target = label_to_group(labels, len(group_sizes)) if use_qd else labels
        dice_ce, qd, ds = zero, zero, zero
        for view in range(views):
            lab = slice(view * items, view * items + n_labeled)
            dice_ce = dice_ce + seg_fn(seg[lab], labels) / views
            if use_qd:
                qd = qd + qd_loss(out.query_logits[lab], group_target, group_sizes, cfg.qd_reduction, total) / views
            if use_ds:
                aux = [m[lab] for m in out.aux]
                ds = ds + deep_supervision_loss(aux, labels, group_sizes, cfg.qd_reduction, total) / views
        l_seg = dice_ce + cfg.lambda_qd * qd + cfg.lambda_ds * ds

        qdc, segc = zero, zero
        ramp = seg.new_full((), sigmoid_rampup(iteration, cfg.rampup_length, cfg.rampup_every), dtype=torch.float32)
        if views == 2 and cfg.ablation in ("qdc", "all") and cfg.lambda_qdc != 0:
            source = getattr(out, cfg.qdc_on)
            if source is None:
                raise ValueError(f"cfg.ablation: {cfg.ablation!r} with lambda_qdc > 0 needs out.{cfg.qdc_on}")
            qdc = _ntxent_share(source, cfg.tau, cfg.qdc_granularity, cfg.voxel_samples, generator, False, shard)
        if views == 2 and cfg.ablation in ("segc", "all") and cfg.lambda_segc != 0:
            probs = upcast(seg).softmax(dim=1)  # 2B×K×...
            voxel = cfg.segc_granularity == "voxel"
            segc = _ntxent_share(probs, cfg.tau, cfg.segc_granularity, cfg.voxel_samples, generator, voxel, shard)
        total = l_seg + ramp * (cfg.lambda_qdc * qdc + cfg.lambda_segc * segc)
    parts = {"total": total, "seg": l_seg, "dice_ce": dice_ce, "qd": qd, "ds": ds, "qdc": qdc, "segc": segc}
    parts = {k: v.detach() for k, v in parts.items()}
    parts["ramp"] = ramp
    return total, parts
