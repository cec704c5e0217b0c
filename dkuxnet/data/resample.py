"""Integer-factor resampling of LA volumes (``data.resample``) and back, for the CPU track.

The h5 files carry no spacing; LA volumes are isotropic 0.625 mm. Downsampling by an integer factor f
groups the voxels into f×f×f blocks:

* image: the block mean (mean pooling);
* label: majority vote, 1 where the block's foreground fraction is ≥ 1/2 (a tie goes to the atrium);
* odd sizes: an axis of n voxels gives ⌈n / f⌉ blocks; the last, partial block averages (or votes over)
  only the voxels it has, so no voxel is dropped and none is invented;
* spacing: 0.625 mm × f (:func:`spacing_mm`).

Evaluation goes the other way (:func:`upsample_probs`): class probabilities on the coarse grid are
interpolated trilinearly with scale f (``align_corners=False``: coarse voxel i sits at the centre of its
block, f·i + (f − 1)/2 in fine coordinates), then cropped to the original size, so predictions are
scored against the original full-resolution labels.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SPACING_MM = 0.625  # LA voxel size (isotropic), before any resampling


def spacing_mm(factor: int) -> float:
    """Voxel size in mm of an LA volume downsampled by ``factor`` (0.625 mm × factor)."""
    _check_factor(factor)
    return SPACING_MM * factor


def _check_factor(factor: int) -> None:
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"data.resample must be an integer ≥ 1, got {factor!r}")


def _block_mean(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Mean over f³ blocks of an X×Y×Z tensor; partial blocks at the far ends average what they hold."""
    if min(x.shape) < factor:
        raise ValueError(f"a volume of shape {tuple(x.shape)} is smaller than the resampling factor {factor}")
    return F.avg_pool3d(x[None, None].float(), factor, ceil_mode=True)[0, 0]  # ⌈X/f⌉×⌈Y/f⌉×⌈Z/f⌉


def downsample_image(image: np.ndarray | torch.Tensor, factor: int) -> torch.Tensor:
    """Mean-pooled float32 X×Y×Z volume, ⌈n / f⌉ voxels per axis (the input itself when f = 1)."""
    _check_factor(factor)
    x = torch.as_tensor(image)
    if x.ndim != 3:
        raise ValueError(f"image must be X×Y×Z, got shape {tuple(x.shape)}")
    return x.float() if factor == 1 else _block_mean(x, factor)


def downsample_label(label: np.ndarray | torch.Tensor, factor: int) -> torch.Tensor:
    """Majority-vote uint8 X×Y×Z label, ⌈n / f⌉ voxels per axis (foreground where its fraction ≥ 1/2)."""
    _check_factor(factor)
    y = torch.as_tensor(label)
    if y.ndim != 3:
        raise ValueError(f"label must be X×Y×Z, got shape {tuple(y.shape)}")
    return y.to(torch.uint8) if factor == 1 else (_block_mean(y, factor) >= 0.5).to(torch.uint8)


def upsample_probs(probs: torch.Tensor, factor: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """K×x×y×z coarse probabilities → K×X×Y×Z on the original grid (trilinear, then cropped to ``shape``)."""
    _check_factor(factor)
    if probs.ndim != 4:
        raise ValueError(f"probs must be K×X×Y×Z, got shape {tuple(probs.shape)}")
    need = tuple(-(-s // factor) for s in shape)
    if tuple(probs.shape[1:]) != need:
        raise ValueError(f"probs of spatial shape {tuple(probs.shape[1:])} do not downsample {shape} by {factor}")
    if factor == 1:
        return probs
    fine = F.interpolate(probs[None].float(), scale_factor=factor, mode="trilinear", align_corners=False)[0]
    X, Y, Z = shape
    return fine[:, :X, :Y, :Z]
