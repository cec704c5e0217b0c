"""Training-time sampling and augmentation on tensors (CPU or GPU, explicit generators).

* :func:`sample_patches` — the LA protocol's RandomRotFlip → RandomCrop (UA-MT's ``dataloaders/la_heart.py``) for a
  batch of cases of a :class:`~dkuxnet.data.cache.VolumeBank`. The crop is cut from the stored
  volume first and only the patch is rotated and flipped (equal result, no full-volume copy). This
  patch is the *weak view*.
* :func:`strong_view` — intensity-only perturbation of a batch of patches (the book's decisions page); no
  spatial change, so weak and strong views stay voxel-aligned by construction.
* :class:`TwoStreamSampler` — the 2 labeled + 2 unlabeled batch index stream, resumable.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from dkuxnet.config import DataConfig
from dkuxnet.data.cache import VolumeBank


def _randint(high: int, generator: torch.Generator) -> int:
    """Uniform integer in [0, high) drawn on the CPU generator; 0 when high ≤ 1 (no draw)."""
    return int(torch.randint(high, (1,), generator=generator)) if high > 1 else 0


def sample_patches(
    bank: VolumeBank, indices: list[int], patch: tuple[int, int, int], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut one randomly rotated, flipped, padded and cropped patch per index (UA-MT's LA protocol).

    Per case, in this order of draws: k ~ U{0..3} (rot90 in the X,Y plane), flip axis ~ U{X, Y}
    (always a flip), crop offsets o ~ U{0..size−patch−1} per axis (exclusive upper end as the
    protocol; offset 0 when size − patch ≤ 1). When any axis of the rotated volume is ≤ the patch,
    every axis is zero-padded by max((patch − size)//2 + 3, 0) on both sides first.

    Args:
        bank: cases; images 1×X×Y×Z, labels X×Y×Z.
        indices: bank positions, one patch each (repeats allowed).
        patch: (px, py, pz).
        generator: CPU generator for all draws (host-side, no device sync).

    Returns:
        images B×1×px×py×pz float32 and labels B×px×py×pz int64, on the bank's device.
    """
    if len(patch) != 3 or min(patch) < 1:
        raise ValueError(f"patch must be three positive sizes, got {patch!r}")
    images = torch.zeros((len(indices), 1, *patch), dtype=torch.float32, device=bank.device)  # B×1×P
    labels = torch.zeros((len(indices), *patch), dtype=torch.int64, device=bank.device)  # B×P
    for b, i in enumerate(indices):
        image, label = bank.images[i], bank.labels[i]
        size = tuple(label.shape)
        k, axis = _randint(4, generator), _randint(2, generator)
        seen = (size[1], size[0], size[2]) if k % 2 else size  # shape after rot90
        pad = [max((p - s) // 2 + 3, 0) for p, s in zip(patch, seen)] if any(
            s <= p for s, p in zip(seen, patch)) else [0, 0, 0]
        offset = [_randint(s + 2 * q - p, generator) for s, q, p in zip(seen, pad, patch)]
        lo = [max(o - q, 0) for o, q in zip(offset, pad)]  # crop box in rotated, unpadded coords
        hi = [min(o - q + p, s) for o, q, p, s in zip(offset, pad, patch, seen)]
        if any(h <= l for l, h in zip(lo, hi)):
            continue  # crop lies entirely in the zero padding
        at = [l - (o - q) for l, o, q in zip(lo, offset, pad)]  # where the box lands in the patch
        dst = (slice(at[0], at[0] + hi[0] - lo[0]), slice(at[1], at[1] + hi[1] - lo[1]),
               slice(at[2], at[2] + hi[2] - lo[2]))
        flips, swap = _rot_flip_as_flips(k, axis)
        box = [(lo[0], hi[0]), (lo[1], hi[1])][:: -1 if swap else 1]  # X,Y box before the transpose
        for d in flips:  # ... and before the flips: the stored volume's box
            box[d] = (size[d] - box[d][1], size[d] - box[d][0])
        (x0, x1), (y0, y1) = box
        crop = image[0, x0:x1, y0:y1, lo[2]:hi[2]]  # x×y×z view of the stored volume
        crop = crop.flip(flips) if flips else crop
        images[b, 0, dst[0], dst[1], dst[2]] = crop.transpose(0, 1) if swap else crop
        crop_label = label[x0:x1, y0:y1, lo[2]:hi[2]]
        crop_label = crop_label.flip(flips) if flips else crop_label
        labels[b, dst[0], dst[1], dst[2]] = crop_label.transpose(0, 1) if swap else crop_label
    return images, labels


def _rot_flip_as_flips(k: int, axis: int) -> tuple[tuple[int, ...], bool]:
    """``flip(rot90(v, k, (0, 1)), axis)`` written as ``v.flip(dims)``, then a transpose when ``swap``.

    rot90 by 1 = flip Y then swap X,Y; by 2 = flip X and Y; by 3 = flip X then swap; a flip after
    the swap is a flip of the other axis before it. One copy instead of two or three.
    """
    pre = {0: set(), 1: {1}, 2: {0, 1}, 3: {0}}[k]
    swap = k % 2 == 1
    return tuple(sorted(pre ^ {1 - axis if swap else axis})), swap


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur with one σ per batch item (replicate borders). x: B×C×X×Y×Z."""
    b, c = x.shape[:2]
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)  # T
    kernel = torch.exp(-0.5 * (taps[None, :] / sigma[:, None]) ** 2)  # B×T
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B·C)×T
    y = x.reshape(1, b * c, *x.shape[2:])  # 1×(B·C)×X×Y×Z
    for dim in range(3):
        shape = [b * c, 1, 1, 1, 1]
        shape[2 + dim] = 2 * radius + 1
        pads = [0] * 6
        pads[2 * (2 - dim)] = pads[2 * (2 - dim) + 1] = radius
        y = F.conv3d(F.pad(y, pads, mode="replicate"), kernel.view(shape), groups=b * c)
    return y.view_as(x)


def strong_view(x: torch.Tensor, cfg: DataConfig, generator: torch.Generator) -> torch.Tensor:
    """Intensity-only strong view of a batch (book: decisions page), each item drawn independently.

    In this order: with p = ``contrast_p``: x·c + s, c ~ U[contrast_range], s ~ U[±shift_range];
    with p = ``blur_p``: Gaussian blur, σ ~ U[blur_sigma] (separable, radius ⌈3·σ_max⌉); always:
    + clip(N(0, noise_std²), ±noise_clip) per voxel. Masks are Bernoulli tensors applied with
    ``torch.where``: no host sync, no data-dependent Python branch.

    Args:
        x: B×C×X×Y×Z float (the weak view).
        cfg: probabilities and ranges.
        generator: generator on ``x.device``.
    """
    b, dev = x.shape[0], x.device
    view = (b,) + (1,) * (x.dim() - 1)

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(b, generator=generator, device=dev, dtype=x.dtype) * (high - low) + low  # B

    use_contrast = torch.rand(b, generator=generator, device=dev) < cfg.contrast_p  # B
    c, s = uniform(*cfg.contrast_range), uniform(-cfg.shift_range, cfg.shift_range)
    x = torch.where(use_contrast.view(view), x * c.view(view) + s.view(view), x)
    use_blur = torch.rand(b, generator=generator, device=dev) < cfg.blur_p  # B
    sigma = uniform(*cfg.blur_sigma)
    radius = max(1, math.ceil(3 * max(cfg.blur_sigma)))
    x = torch.where(use_blur.view(view), _gaussian_blur(x, sigma, radius), x)
    noise = torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype) * cfg.noise_std
    return x + noise.clamp(-cfg.noise_clip, cfg.noise_clip)


class TwoStreamSampler:
    """Endless stream of ``(labeled_idx, unlabeled_idx)`` batches (UA-MT's ``TwoStreamBatchSampler``).

    An epoch is a random permutation of the labeled indices chunked by ``labeled_bs`` (drop last);
    when ``n_labeled < labeled_bs`` the epoch is ⌈labeled_bs / n_labeled⌉ chained permutations, so
    a batch may repeat a case. Unlabeled indices come ``unlabeled_bs`` at a time from an endless
    chain of permutations that restarts at every epoch. ``unlabeled_bs = 0`` gives empty lists.

    Randomness: one seed is drawn from ``generator`` at construction; afterwards the sampler uses
    its own CPU generator, so other users of ``generator`` do not change its stream and
    :meth:`state_dict` captures it completely (exact resume).
    """

    def __init__(self, n_labeled: int, n_unlabeled: int, labeled_bs: int, unlabeled_bs: int,
                 generator: torch.Generator) -> None:
        for name, value, low in (("n_labeled", n_labeled, 1), ("labeled_bs", labeled_bs, 1),
                                 ("n_unlabeled", n_unlabeled, 0), ("unlabeled_bs", unlabeled_bs, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if unlabeled_bs and not n_unlabeled:
            raise ValueError(f"n_unlabeled is 0 but unlabeled_bs={unlabeled_bs}; set unlabeled_bs=0")
        self.sizes = (n_labeled, n_unlabeled, labeled_bs, unlabeled_bs)
        self._gen = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        self._labeled: list[int] = []
        self._batch = 0  # batches taken from the current epoch's labeled order
        self._unlabeled: list[int] = []
        self._upos = 0

    def _perm(self, n: int) -> list[int]:
        return torch.randperm(n, generator=self._gen).tolist()

    def __iter__(self) -> TwoStreamSampler:
        return self

    def __next__(self) -> tuple[list[int], list[int]]:
        n_labeled, n_unlabeled, lbs, ubs = self.sizes
        if self._batch == len(self._labeled) // lbs:  # new epoch
            self._labeled = [i for _ in range(-(-lbs // n_labeled)) for i in self._perm(n_labeled)]
            self._batch, self._unlabeled, self._upos = 0, [], 0
        labeled = self._labeled[self._batch * lbs:(self._batch + 1) * lbs]
        self._batch += 1
        unlabeled = []
        while len(unlabeled) < ubs:
            if self._upos == len(self._unlabeled):
                self._unlabeled, self._upos = self._perm(n_unlabeled), 0
            take = min(ubs - len(unlabeled), len(self._unlabeled) - self._upos)
            unlabeled += self._unlabeled[self._upos:self._upos + take]
            self._upos += take
        return labeled, unlabeled

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the exact stream (plain types + a uint8 tensor)."""
        return {"sizes": list(self.sizes), "labeled": list(self._labeled), "batch": self._batch,
                "unlabeled": list(self._unlabeled), "upos": self._upos, "generator": self._gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; ``ValueError`` when it was made for other sizes."""
        if list(state["sizes"]) != list(self.sizes):
            raise ValueError(f"sampler state is for sizes {state['sizes']}, this sampler has {list(self.sizes)}")
        self._labeled, self._batch = list(state["labeled"]), int(state["batch"])
        self._unlabeled, self._upos = list(state["unlabeled"]), int(state["upos"])
        self._gen.set_state(state["generator"])
