"""Per-case segmentation metrics (medpy definitions, as UA-MT's ``calculate_metric_percase``) and their aggregation.

For a predicted mask P and ground truth G (boolean volumes):

* Dice    = 2|P∩G| / (|P| + |G|)                    (``medpy.metric.binary.dc``)
* Jaccard = |P∩G| / |P∪G|                           (``jc``)
* surface ∂S = S minus its erosion by the 6-neighbourhood; d(P→G) = distances from the voxels of ∂P
  to the nearest voxel of ∂G (Euclidean distance transform)
* 95HD    = 95th percentile of d(P→G) ∪ d(G→P)      (``hd95``)
* ASD     = mean of d(P→G), one-directional        (``asd``, the LA papers' "ASD")
* ASSD    = (mean d(P→G) + mean d(G→P)) / 2        (``assd``)

Distances are in voxels (as every LA paper reports them) and in mm. The LA volumes are isotropic at
0.625 mm, and on an isotropic grid the distance transform, the percentile and the mean all scale
linearly, so ``*_mm = spacing_mm × voxels`` equals medpy with ``voxelspacing=spacing_mm`` up to
rounding (checked in the tests).

An empty prediction (or empty ground truth) is a **failed case**: Dice 0, Jaccard 0, distances NaN
(no surface to measure), ``failed=True``. The LA repositories instead score such a case as distance 0
(the best value); that convention is kept in ``hd95_legacy`` / ``asd_legacy`` so both means can be
reported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from medpy.metric import binary
from scipy import ndimage

from dkuxnet.data.resample import SPACING_MM  # the LA voxel size, re-exported

DISTANCES = ("hd95", "asd", "assd")
SUMMARY_KEYS = ("dice", "jaccard", *DISTANCES, *(f"{d}_mm" for d in DISTANCES), "hd95_legacy", "asd_legacy")


def case_metrics(pred: np.ndarray, gt: np.ndarray, spacing_mm: float = SPACING_MM) -> dict[str, Any]:
    """Dice, Jaccard, 95HD, ASD, ASSD (voxels and mm) of one binary prediction.

    Args:
        pred: predicted mask (any dtype; nonzero = foreground).
        gt: ground-truth mask of the same shape.
        spacing_mm: isotropic voxel size used for the ``*_mm`` columns.

    Returns:
        Dict with ``dice``, ``jaccard`` (fractions), ``hd95``, ``asd``, ``assd`` (voxels), their
        ``*_mm`` versions, ``failed``, ``hd95_legacy``, ``asd_legacy``, ``pred_voxels``, ``gt_voxels``.

    Raises:
        ValueError: shapes differ or ``spacing_mm`` is not positive.
    """
    p, g = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    if p.shape != g.shape:
        raise ValueError(f"pred shape {p.shape} differs from gt shape {g.shape}")
    if not spacing_mm > 0:
        raise ValueError(f"spacing_mm must be positive, got {spacing_mm}")
    counts = {"pred_voxels": int(p.sum()), "gt_voxels": int(g.sum())}
    if counts["pred_voxels"] == 0 or counts["gt_voxels"] == 0:
        nan = math.nan
        dist = dict.fromkeys((*DISTANCES, *(f"{d}_mm" for d in DISTANCES)), nan)
        return {"dice": 0.0, "jaccard": 0.0, **dist, "failed": True, "hd95_legacy": 0.0, "asd_legacy": 0.0,
                **counts}
    asd_pg = float(binary.asd(p, g))
    asd_gp = float(binary.asd(g, p))
    voxels = {"hd95": float(binary.hd95(p, g)), "asd": asd_pg, "assd": float(np.mean((asd_pg, asd_gp)))}
    return {
        "dice": float(binary.dc(p, g)),
        "jaccard": float(binary.jc(p, g)),
        **voxels,
        **{f"{k}_mm": spacing_mm * v for k, v in voxels.items()},
        "failed": False,
        "hd95_legacy": voxels["hd95"],
        "asd_legacy": voxels["asd"],
        **counts,
    }


def summarize(rows: Sequence[dict[str, Any]], suffix: str = "") -> dict[str, Any]:
    """Mean and standard deviation over cases of every metric, and the number of failed cases.

    Distance means (``hd95``, ``asd``, ``assd``, ``*_mm``) are over the non-failed cases (NaN if all
    failed); ``hd95_legacy`` / ``asd_legacy`` average with failed cases counted as 0, as the LA
    repositories do. Dice / Jaccard count failed cases as 0. ``std`` is the population standard
    deviation (``ddof=0``) over the same cases as the mean.

    Args:
        rows: per-case dicts from :func:`case_metrics` (keys may end in ``suffix``).
        suffix: key suffix of the variant to summarise, e.g. ``"_lcc"``.

    Returns:
        ``{"n_cases", "n_failed", "metrics": {name: {"mean", "std"}}}`` with names of :data:`SUMMARY_KEYS`.
    """
    if not rows:
        raise ValueError("rows must contain at least one case")
    failed = np.array([bool(r[f"failed{suffix}"]) for r in rows])
    metrics = {}
    for name in SUMMARY_KEYS:
        values = np.array([r[f"{name}{suffix}"] for r in rows], dtype=np.float64)
        finite = values[~np.isnan(values)]
        metrics[name] = (
            {"mean": float(finite.mean()), "std": float(finite.std())} if finite.size
            else {"mean": math.nan, "std": math.nan}
        )
    return {"n_cases": len(rows), "n_failed": int(failed.sum()), "metrics": metrics}


def largest_connected_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest foreground component (full connectivity: 26-neighbourhood in 3D).

    Same rule as the LA repositories' ``getLargestCC`` (scikit-image default connectivity, first of
    equal-size components), except that an empty mask is returned unchanged instead of failing.

    Args:
        mask: binary volume.

    Returns:
        Boolean mask of the same shape.
    """
    m = np.asarray(mask).astype(bool)
    labels, n = ndimage.label(m, structure=np.ones((3,) * m.ndim, dtype=bool))
    if n == 0:
        return m
    sizes = np.bincount(labels.ravel())[1:]
    return labels == int(np.argmax(sizes)) + 1
