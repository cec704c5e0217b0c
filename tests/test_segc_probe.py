"""The L_segc gradient probe: hand-checked formulas and the claims the book makes from it."""

from __future__ import annotations

import math

import pytest
import torch

from dkuxnet.segc_probe import (
    PAPER_VOXELS, centre_crops, centred_grad_norm, confident_logits, first_train_labels, matched_voxel_samples, sweep,
    gradient_figure, term_gradient, two_views,
)


def _labels(b: int = 2) -> torch.Tensor:
    y = torch.zeros(b, 8, 8, 4, dtype=torch.long)
    for i in range(b):
        y[i, 2 + i : 6, 2:6, :] = 1  # a different box per volume
    return y


def test_confident_logits_give_probability_p():
    y = torch.tensor([[[0, 1]]])  # B=1, 1x2 voxels
    z = confident_logits(y, 0.88)
    assert z[0, :, 0, 0].tolist() == pytest.approx([math.log(0.88 / 0.12), 0.0])  # m = log(p/(1-p)) = 1.9924
    torch.testing.assert_close(z.softmax(1)[0, :, 0, 1], torch.tensor([0.12, 0.88]))
    p3 = confident_logits(torch.tensor([[[2]]]), 0.8, num_classes=3).softmax(1).flatten()  # m = log 8
    torch.testing.assert_close(p3, torch.tensor([0.1, 0.1, 0.8]))
    with pytest.raises(ValueError, match="p:"):
        confident_logits(y, 0.5)
    with pytest.raises(ValueError, match="labels:"):
        confident_logits(y.float(), 0.9)


def test_two_views_and_centred_norm():
    z = confident_logits(_labels(), 0.9)
    same = two_views(z, 0.0)
    assert same.shape == (4, 2, 8, 8, 4) and torch.equal(same[:2], same[2:])
    with pytest.raises(ValueError, match="view_noise"):
        two_views(z, -1.0)
    # per voxel g - mean_k g: (1, 3) -> (-1, 1), norm sqrt(2); a pure offset (2, 2) -> 0
    assert centred_grad_norm(torch.tensor([[[1.0], [3.0]]])) == pytest.approx(math.sqrt(2))
    assert centred_grad_norm(torch.tensor([[[2.0], [2.0]]])) == 0.0


def test_identical_items_give_log_2b_minus_1_and_no_gradient():
    y = torch.ones(2, 4, 4, 4, dtype=torch.long)  # both volumes alike: all four items identical
    loss, norm = term_gradient(two_views(confident_logits(y, 0.9), 0.0), y, "segc", tau=0.3)
    assert loss == pytest.approx(math.log(3), abs=1e-5) and norm == pytest.approx(0.0, abs=1e-7)


def test_centred_logits_give_no_gradient_for_two_classes():
    # K = 2: a centred logit vector is ±(1, -1)/sqrt(2) after normalisation, so the cosine only sees the sign
    y = _labels()
    views = two_views(confident_logits(y, 0.9), 0.5, torch.Generator().manual_seed(0))
    centred = views - views.mean(dim=1, keepdim=True)
    _, norm = term_gradient(centred, y, "segc", inputs="logits")
    _, raw = term_gradient(views, y, "segc", inputs="logits")
    assert raw > 1e-4 and norm < 1e-4 * raw  # zero up to float32 rounding


def test_sweep_rows_and_the_vanishing_gradient():
    rows = sweep(_labels(), confidences=(0.6, 0.9, 0.99), taus=(0.3,), voxel_samples=16)
    assert len(rows) == 3 * 3  # per p: Dice-CE + volume + voxel
    assert all(r["ratio"] == 1.0 for r in rows if r["term"] == "dice_ce")
    volume = [r["grad_norm"] for r in rows if r["granularity"] == "volume"]
    assert volume[0] > volume[1] > volume[2] > 0  # it falls with confidence, like Dice-CE's
    with pytest.raises(ValueError, match="labels"):
        sweep(_labels(1))
    with pytest.raises(ValueError, match="term"):
        term_gradient(two_views(confident_logits(_labels(), 0.9), 0.0), _labels(), "qd")


def test_matched_voxel_samples():
    assert matched_voxel_samples(PAPER_VOXELS) == 4096
    assert matched_voxel_samples(32**3) == 134  # 4096 * 32768 / 1003520 = 133.7
    assert matched_voxel_samples(10) == 1


def test_centre_crops_and_first_train_labels(phantom_root):
    lab = torch.arange(4 * 4 * 4).reshape(4, 4, 4)
    crop = centre_crops([lab], (2, 2, 2))  # starts (4 - 2) // 2 = 1 on every axis
    assert crop.shape == (1, 2, 2, 2) and crop.dtype == torch.long
    assert crop[0].flatten().tolist() == [21, 22, 25, 26, 37, 38, 41, 42]  # 16x + 4y + z, x, y, z in {1, 2}
    with pytest.raises(ValueError, match="labels"):
        centre_crops([lab], (5, 2, 2))
    labels = first_train_labels(phantom_root, n=2, size=(16, 16, 16))
    assert labels.shape == (2, 16, 16, 16) and set(labels.unique().tolist()) <= {0, 1}


def test_gradient_figure_has_one_line_per_variant():
    rows = sweep(_labels(), confidences=(0.6, 0.9), taus=(0.1, 0.3), voxel_samples=16)
    fig = gradient_figure(rows)
    assert len(fig.data) == 1 + 2 * 2  # Dice-CE + (2 taus x 2 granularities)
    assert fig.data[0].name == "Dice-CE" and list(fig.data[0].x) == pytest.approx([0.1, 0.4])  # 1 - p, sorted
    with pytest.raises(ValueError, match="rows"):
        gradient_figure([])
