"""data.resample: mean pooling, majority vote, odd sizes, the way back, and evaluation at full resolution."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dkuxnet.data.resample import downsample_image, downsample_label, spacing_mm, upsample_probs
from dkuxnet.evaluate import PROTOCOL_STRIDE, predict_mask, protocol_stride


def test_image_is_block_mean_by_hand():
    """3×2×2 volume, f = 2: blocks {x 0-1} and the partial {x 2}; means (0+1+…)/n by hand."""
    x = torch.arange(12.0).reshape(3, 2, 2)  # x-major: x=0 → 0..3, x=1 → 4..7, x=2 → 8..11
    got = downsample_image(x, 2)
    assert got.shape == (2, 1, 1)
    assert got[0, 0, 0] == pytest.approx(sum(range(8)) / 8)  # 3.5
    assert got[1, 0, 0] == pytest.approx(sum(range(8, 12)) / 4)  # 9.5: the partial block averages what it has


def test_label_majority_vote_ties_go_to_foreground():
    y = np.zeros((4, 2, 2), np.uint8)
    y[0, :, :] = 1  # block 0: 4 of 8 → tie → 1
    y[2, 0, 0] = 1  # block 1: 1 of 8 → 0 ... then 5 of 8 below
    got = downsample_label(y, 2)
    assert got.tolist() == [[[1]], [[0]]] and got.dtype == torch.uint8
    y[2:, :, :] = 1
    y[3, 0, 0] = 0  # 7 of 8
    assert downsample_label(y, 2)[1, 0, 0] == 1


def test_factor_one_keeps_the_volume_and_bad_factors_are_rejected():
    x = np.random.default_rng(0).normal(size=(5, 4, 3)).astype(np.float32)
    assert torch.equal(downsample_image(x, 1), torch.from_numpy(x))
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="data.resample"):
            downsample_image(x, bad)
    with pytest.raises(ValueError, match="smaller than the resampling factor"):
        downsample_image(x, 4)


def test_spacing_and_stride():
    assert spacing_mm(1) == 0.625 and spacing_mm(2) == 1.25
    assert protocol_stride(1) == PROTOCOL_STRIDE and protocol_stride(2) == (9, 9, 2) and protocol_stride(3) == (6, 6, 2)


def test_upsample_probs_inverts_a_constant_and_crops_odd_sizes():
    probs = torch.rand(2, 3, 2, 2)
    fine = upsample_probs(probs, 2, (5, 4, 3))
    assert fine.shape == (2, 5, 4, 3)
    const = torch.full((2, 3, 2, 2), 0.25)
    assert torch.allclose(upsample_probs(const, 2, (5, 4, 4)), torch.tensor(0.25))
    with pytest.raises(ValueError, match="do not downsample"):
        upsample_probs(probs, 2, (8, 4, 3))


def test_upsample_places_coarse_voxels_at_block_centres():
    """Linear ramp p(i) = i on the coarse grid → fine values (x − 0.5)/2 inside, clamped at the borders."""
    coarse = torch.arange(4.0).reshape(1, 4, 1, 1).expand(1, 4, 2, 2)
    fine = upsample_probs(coarse, 2, (8, 4, 4))[0, :, 0, 0]
    torch.testing.assert_close(fine, torch.tensor([0.0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0]))


class _Threshold(torch.nn.Module):
    """'Model' predicting foreground where the input > 0 (logits ±10): exact on any grid."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([-10 * torch.sign(x), 10 * torch.sign(x)], dim=1)


def test_predict_mask_scores_on_the_original_grid():
    image = -np.ones((21, 18, 13), np.float32)
    image[4:16] = 1.0  # a slab aligned to even indices: exact after pooling and trilinear upsampling
    # (a box's corners are not: there the weights multiply, 0.75³ < 1/2)
    mask = predict_mask(_Threshold(), image, "protocol", patch=(10, 10, 4), resample=2)
    assert mask.shape == image.shape
    assert np.array_equal(mask, image > 0)


def test_bank_holds_only_the_resampled_volumes(phantom_root, tmp_path):
    from dkuxnet.data import VolumeBank, read_case, read_list

    case = read_list(phantom_root / "train.list")[0]
    image, label = read_case(phantom_root, case)
    bank = VolumeBank.load(phantom_root, [case], cache_dir=tmp_path, progress=False, resample=2)
    assert tuple(bank.images[0].shape) == (1, *(-(-s // 2) for s in image.shape))
    torch.testing.assert_close(bank.images[0][0], downsample_image(image, 2))
    assert torch.equal(bank.labels[0], downsample_label(label, 2))
