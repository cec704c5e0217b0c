r"""How hard L_segc pulls compared with Dice-CE: gradient norms against prediction confidence.

L_segc (:func:`dkuxnet.losses.ntxent_loss` on :math:`\operatorname{softmax}_K(Y)`) and Dice-CE act on
the same segmentation logits Y, so their gradients with respect to Y can be compared directly. The
probe builds logits of a chosen confidence p from label maps, makes a second view, and measures

.. math::
    g_{term}(p) = \big\| \Pi \, \partial L_{term} / \partial Y \big\|_2,\qquad
    \Pi z = z - \tfrac1K \textstyle\sum_k z_k \ \text{(per voxel)}

over the whole 2B×K×V logit tensor. :math:`\Pi` removes the per-voxel offset of the logits, which no
softmax output depends on, so :math:`g` is the part of the gradient that can change a prediction (for
the softmax-based terms it is the whole gradient). All numbers are unweighted: the training objective
multiplies L_segc by :math:`r(t)\,\lambda_{segc}` (at most 0.1 by default).

Pure functions on CPU tensors; a sweep over 6 confidences × 3 temperatures × 2 granularities on four
32³ phantom crops takes a few seconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dkuxnet.data import read_case, read_list
from dkuxnet.losses import GRANULARITIES, dice_ce_loss, ntxent_loss

CONFIDENCES = (0.6, 0.75, 0.88, 0.95, 0.99, 0.9975)  # p of the label class at every voxel
TAUS = (0.1, 0.3, 0.5)  # the temperature sweep (0.3 is the default)
INPUTS = ("probs", "logits")  # what the cosine similarity compares: softmax_K(Y) (the loss) or Y itself
PAPER_VOXELS = 112 * 112 * 80  # V of a paper patch


def matched_voxel_samples(voxels: int, samples: int = 4096) -> int:
    r"""M that samples the same fraction of a V-voxel patch as ``samples`` of a paper patch: max(1, round(M₀V/V₀)).

    At voxel granularity L_segc's gradient is spread over M voxels and Dice-CE's over all V, so their ratio
    scales like :math:`\sqrt{V/M}`; a small probe patch with this M keeps the paper's ratio.
    """
    if voxels < 1 or samples < 1:
        raise ValueError(f"voxels and samples: must be >= 1, got {voxels} and {samples}")
    return max(1, round(samples * voxels / PAPER_VOXELS))


def centre_crops(labels: Sequence[Any], size: Sequence[int] = (32, 32, 32)) -> Tensor:
    """Stack the central ``size`` crop of each X×Y×Z label map (numpy or torch) into a B×x×y×z int64 tensor."""
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"size: expected three positive sizes, got {tuple(size)}")
    if len(labels) == 0:
        raise ValueError("labels: need at least one label map")
    crops = []
    for i, lab in enumerate(labels):
        t = torch.as_tensor(lab)
        if t.ndim != 3 or any(n < c for n, c in zip(t.shape, size)):
            raise ValueError(f"labels: map {i} has shape {tuple(t.shape)}, smaller than the crop {tuple(size)}")
        starts = [(n - c) // 2 for n, c in zip(t.shape, size)]
        crops.append(t[tuple(slice(a, a + c) for a, c in zip(starts, size))].long())
    return torch.stack(crops)


def first_train_labels(root: Path, n: int = 4, size: Sequence[int] = (32, 32, 32)) -> Tensor:
    """:func:`centre_crops` of the labels of the first ``n`` cases of ``root/train.list`` (thin IO wrapper)."""
    ids = read_list(Path(root) / "train.list")
    if not 1 <= n <= len(ids):
        raise ValueError(f"n: must be in [1, {len(ids)}] (cases in train.list), got {n}")
    return centre_crops([read_case(root, case_id)[1] for case_id in ids[:n]], size)


def confident_logits(labels: Tensor, p: float, num_classes: int = 2) -> Tensor:
    r"""Logits that give probability p to the label class at every voxel.

    .. math::
        Y_{k,v} = m\,[k = y_v],\qquad m = \log\frac{p\,(K-1)}{1-p}
        \quad\Rightarrow\quad \operatorname{softmax}_K(Y)_{y_v, v} = p

    (the other K − 1 classes share 1 − p equally).

    Args:
        labels: B×... integer labels in [0, K).
        p: confidence, 1/K < p < 1.
        num_classes: K >= 2.

    Returns:
        B×K×... float32 logits.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes: need K >= 2, got {num_classes}")
    if not 1.0 / num_classes < p < 1.0:
        raise ValueError(f"p: must lie in (1/K, 1) = ({1.0 / num_classes:.3g}, 1), got {p}")
    if labels.dtype.is_floating_point or labels.ndim < 2:
        raise ValueError(f"labels: expected integer B×... labels, got {labels.dtype} of shape {tuple(labels.shape)}")
    margin = math.log(p * (num_classes - 1) / (1.0 - p))
    onehot = torch.nn.functional.one_hot(labels.long(), num_classes).movedim(-1, 1)  # B×K×...
    return onehot.float() * margin


def two_views(logits: Tensor, view_noise: float, generator: torch.Generator | None = None) -> Tensor:
    r"""View-major batch [weak; strong] of logits: the strong view is :math:`Y + \sigma\,\varepsilon`, ε ~ N(0, 1).

    Args:
        logits: B×K×... logits of the weak view.
        view_noise: σ >= 0; 0 gives two identical views.
        generator: CPU generator for ε.

    Returns:
        (2B)×K×... logits.
    """
    if view_noise < 0:
        raise ValueError(f"view_noise: must be >= 0, got {view_noise}")
    noise = torch.randn(logits.shape, generator=generator, dtype=logits.dtype) * view_noise
    return torch.cat([logits, logits + noise])


def centred_grad_norm(grad: Tensor) -> float:
    r""":math:`\|\Pi g\|_2` with :math:`\Pi g = g - \tfrac1K\sum_k g_k` per voxel (K = dim 1)."""
    if grad.ndim < 2:
        raise ValueError(f"grad: expected B×K×..., got shape {tuple(grad.shape)}")
    return float((grad - grad.mean(dim=1, keepdim=True)).norm())


def term_gradient(
    views: Tensor, labels: Tensor, term: str, tau: float = 0.3, granularity: str = "volume",
    inputs: str = "probs", voxel_samples: int = 4096, seed: int = 0,
) -> tuple[float, float]:
    r"""Value and :func:`centred_grad_norm` of one loss term at the logits ``views``.

    ``term="dice_ce"``: the supervised term as training computes it, the mean over the two views of
    :func:`dkuxnet.losses.dice_ce_loss` (every volume labeled). ``term="segc"``:
    :func:`dkuxnet.losses.ntxent_loss` of :math:`\operatorname{softmax}_K(Y)` (``inputs="probs"``, the
    loss) or of Y itself (``inputs="logits"``), same-class negatives excluded at voxel granularity.

    Args:
        views: (2B)×K×... logits, view-major (see :func:`two_views`).
        labels: B×... integer labels shared by the two views.
        term: "dice_ce" or "segc".
        tau: NT-Xent temperature (segc).
        granularity: "volume" or "voxel" (segc).
        inputs: "probs" or "logits" (segc).
        voxel_samples: M, voxels per volume at voxel granularity.
        seed: seed of the voxel sampling.

    Returns:
        ``(loss, gradient norm)``.
    """
    if term not in ("dice_ce", "segc"):
        raise ValueError(f"term: expected 'dice_ce' or 'segc', got {term!r}")
    if inputs not in INPUTS:
        raise ValueError(f"inputs: expected one of {INPUTS}, got {inputs!r}")
    if views.ndim < 3 or views.shape[0] != 2 * labels.shape[0]:
        raise ValueError(f"views: expected 2B×K×... for B={labels.shape[0]} labels, got shape {tuple(views.shape)}")
    z = views.detach().clone().requires_grad_(True)
    b = labels.shape[0]
    if term == "dice_ce":
        loss = (dice_ce_loss(z[:b], labels) + dice_ce_loss(z[b:], labels)) / 2
    else:
        x = z.softmax(dim=1) if inputs == "probs" else z
        gen = torch.Generator().manual_seed(seed)
        loss = ntxent_loss(x, tau, granularity, voxel_samples, gen, exclude_same_class=granularity == "voxel")
    (grad,) = torch.autograd.grad(loss, z)
    return float(loss.detach()), centred_grad_norm(grad)


def sweep(
    labels: Tensor, confidences: Sequence[float] = CONFIDENCES, taus: Sequence[float] = TAUS,
    granularities: Sequence[str] = GRANULARITIES, inputs: Sequence[str] = ("probs",), view_noise: float = 0.5,
    voxel_samples: int = 4096, seed: int = 0,
) -> list[dict[str, Any]]:
    """Loss and gradient norm of Dice-CE and of every L_segc variant at every confidence.

    For each p: logits :func:`confident_logits` of ``labels``, two views by :func:`two_views` (σ =
    ``view_noise``, generator seeded with ``seed``), then :func:`term_gradient` of Dice-CE and of
    L_segc for every (τ, granularity, inputs).

    Returns:
        One record per (p, term variant): ``confidence``, ``term`` ("dice_ce" or "segc"), ``tau``,
        ``granularity``, ``inputs`` (None for Dice-CE), ``loss``, ``grad_norm`` and ``ratio`` (grad_norm
        divided by Dice-CE's at the same p).
    """
    if labels.shape[0] < 2:
        raise ValueError(f"labels: volume-level NT-Xent needs B >= 2 volumes, got {labels.shape[0]}")
    for name, values in (("confidences", confidences), ("taus", taus), ("granularities", granularities),
                         ("inputs", inputs)):
        if len(values) == 0:
            raise ValueError(f"{name}: must not be empty")
    rows: list[dict[str, Any]] = []
    for p in confidences:
        views = two_views(confident_logits(labels, p), view_noise, torch.Generator().manual_seed(seed))
        loss, ref = term_gradient(views, labels, "dice_ce")
        rows.append({"confidence": p, "term": "dice_ce", "tau": None, "granularity": None, "inputs": None,
                     "loss": loss, "grad_norm": ref, "ratio": 1.0})
        for tau in taus:
            for gran in granularities:
                for inp in inputs:
                    loss, norm = term_gradient(views, labels, "segc", tau, gran, inp, voxel_samples, seed)
                    rows.append({"confidence": p, "term": "segc", "tau": tau, "granularity": gran, "inputs": inp,
                                 "loss": loss, "grad_norm": norm, "ratio": norm / ref})
    return rows


def gradient_figure(rows: Sequence[dict[str, Any]], title: str = "") -> Any:
    """Plotly log-log chart of gradient norm against 1 − p: Dice-CE and one line per L_segc variant."""
    import plotly.graph_objects as go

    if not rows:
        raise ValueError("rows: empty; run sweep() first")
    lines: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        name = "Dice-CE" if r["term"] == "dice_ce" else f"L_segc {r['granularity']}, τ={r['tau']}, {r['inputs']}"
        lines.setdefault(name, []).append((1.0 - r["confidence"], r["grad_norm"]))
    fig = go.Figure()
    for name, pts in lines.items():
        xs, ys = zip(*sorted(pts))
        width = 4 if name == "Dice-CE" else 2
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=name, line={"width": width}))
    fig.update_layout(
        title=title or "gradient norm of each term against prediction confidence",
        xaxis={"title": {"text": "1 − p (p: probability of the label class)"}, "type": "log",
               "autorange": "reversed"},
        yaxis={"title": {"text": "‖∂L/∂Y‖ (unweighted)"}, "type": "log", "exponentformat": "power"},
        height=480, legend={"orientation": "h", "y": -0.25},
    )
    return fig
