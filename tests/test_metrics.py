"""Metrics on hand-built masks: medpy equality, hand-computed Dice/Jaccard, mm scaling, failed cases, LCC."""

from __future__ import annotations

import math

import numpy as np
import pytest
from medpy.metric import binary

from dkuxnet.metrics import SUMMARY_KEYS, case_metrics, largest_connected_component, summarize


def _box(shape, lo, hi):
    m = np.zeros(shape, dtype=bool)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return m


@pytest.fixture
def boxes():
    gt = _box((40, 36, 30), (8, 8, 6), (24, 20, 18))  # 16 × 12 × 12
    pred = _box((40, 36, 30), (11, 8, 7), (27, 20, 19))  # same box shifted by (3, 0, 1)
    return pred, gt


def test_box_against_shifted_box_by_hand(boxes):
    pred, gt = boxes
    m = case_metrics(pred, gt)
    size = 16 * 12 * 12
    inter = 13 * 12 * 11
    assert m["dice"] == pytest.approx(2 * inter / (2 * size), abs=1e-12)
    assert m["jaccard"] == pytest.approx(inter / (2 * size - inter), abs=1e-12)
    assert not m["failed"]
    assert (m["pred_voxels"], m["gt_voxels"]) == (size, size)


def test_equal_to_medpy(boxes):
    pred, gt = boxes
    m = case_metrics(pred, gt)
    assert m["dice"] == binary.dc(pred, gt)
    assert m["jaccard"] == binary.jc(pred, gt)
    assert m["hd95"] == binary.hd95(pred, gt)
    assert m["asd"] == binary.asd(pred, gt)
    assert m["assd"] == pytest.approx(binary.assd(pred, gt), rel=1e-12)
    assert m["hd95_legacy"] == m["hd95"] and m["asd_legacy"] == m["asd"]


def test_asd_is_one_directional():
    gt = _box((30, 30, 30), (5, 5, 5), (25, 25, 25))
    pred = _box((30, 30, 30), (10, 10, 10), (20, 20, 20))  # inside gt, 5 voxels from its faces
    m = case_metrics(pred, gt)
    assert m["asd"] == pytest.approx(binary.asd(pred, gt))
    assert m["asd"] != pytest.approx(binary.asd(gt, pred))
    assert m["assd"] == pytest.approx((binary.asd(pred, gt) + binary.asd(gt, pred)) / 2)


def test_mm_is_spacing_times_voxels_and_equals_medpy_spacing(boxes):
    pred, gt = boxes
    m = case_metrics(pred, gt)
    for k in ("hd95", "asd", "assd"):
        assert m[f"{k}_mm"] == pytest.approx(0.625 * m[k], rel=1e-12)
    assert m["hd95_mm"] == pytest.approx(binary.hd95(pred, gt, voxelspacing=0.625), rel=1e-12)
    assert m["asd_mm"] == pytest.approx(binary.asd(pred, gt, voxelspacing=0.625), rel=1e-12)
    assert m["assd_mm"] == pytest.approx(binary.assd(pred, gt, voxelspacing=0.625), rel=1e-12)
    m2 = case_metrics(pred, gt, spacing_mm=2.0)
    assert m2["hd95_mm"] == pytest.approx(binary.hd95(pred, gt, voxelspacing=2.0), rel=1e-12)


@pytest.mark.parametrize("which", ["pred", "gt", "both"])
def test_empty_masks_are_failed_cases(boxes, which):
    pred, gt = boxes
    if which in ("pred", "both"):
        pred = np.zeros_like(pred)
    if which in ("gt", "both"):
        gt = np.zeros_like(gt)
    m = case_metrics(pred, gt)
    assert m["failed"] and m["dice"] == 0.0 and m["jaccard"] == 0.0
    assert all(math.isnan(m[k]) for k in ("hd95", "asd", "assd", "hd95_mm", "asd_mm", "assd_mm"))
    assert m["hd95_legacy"] == 0.0 and m["asd_legacy"] == 0.0


def test_summary_means_headline_and_legacy(boxes):
    pred, gt = boxes
    good = case_metrics(pred, gt)
    perfect = case_metrics(gt, gt)
    failed = case_metrics(np.zeros_like(pred), gt)
    s = summarize([good, perfect, failed])
    assert (s["n_cases"], s["n_failed"]) == (3, 1)
    assert s["metrics"]["dice"]["mean"] == pytest.approx((good["dice"] + 1.0 + 0.0) / 3)
    assert s["metrics"]["dice"]["std"] == pytest.approx(np.std([good["dice"], 1.0, 0.0]))
    assert s["metrics"]["hd95"]["mean"] == pytest.approx(good["hd95"] / 2)  # over the 2 non-failed cases
    assert s["metrics"]["hd95_legacy"]["mean"] == pytest.approx(good["hd95"] / 3)  # failed counted as 0
    assert s["metrics"]["asd_mm"]["mean"] == pytest.approx(0.625 * good["asd"] / 2)
    assert set(s["metrics"]) == set(SUMMARY_KEYS)


def test_summary_all_failed_and_suffix(boxes):
    _, gt = boxes
    row = {f"{k}_lcc": v for k, v in case_metrics(np.zeros_like(gt), gt).items()}
    s = summarize([row, row], suffix="_lcc")
    assert s["n_failed"] == 2
    assert math.isnan(s["metrics"]["hd95"]["mean"]) and s["metrics"]["hd95_legacy"]["mean"] == 0.0
    with pytest.raises(ValueError, match="rows"):
        summarize([])


def test_largest_connected_component_26_connectivity():
    m = np.zeros((10, 10, 10), dtype=bool)
    m[1:4, 1:4, 1:4] = True  # 27 voxels
    m[4, 4, 4] = True  # touches the big box only at a corner: same component with 26-connectivity
    m[7:9, 7:9, 7:9] = True  # separate island of 8
    out = largest_connected_component(m)
    assert out.sum() == 28 and out[4, 4, 4] and not out[7:9, 7:9, 7:9].any()
    assert not largest_connected_component(np.zeros((4, 4, 4))).any()


def test_shape_and_spacing_checks():
    with pytest.raises(ValueError, match="shape"):
        case_metrics(np.ones((3, 3, 3)), np.ones((3, 3, 4)))
    with pytest.raises(ValueError, match="spacing_mm"):
        case_metrics(np.ones((3, 3, 3)), np.ones((3, 3, 3)), spacing_mm=0)
