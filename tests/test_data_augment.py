"""Patch sampling (UA-MT's LA protocol), the strong view (book: decisions page) and the two-stream sampler."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from dkuxnet.config import DataConfig
from dkuxnet.data import TwoStreamSampler, VolumeBank, sample_patches, strong_view
from dkuxnet.data.augment import _rot_flip_as_flips


def make_bank(shapes, seed=0) -> VolumeBank:
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn((1, *s), generator=g) + 0.5 for s in shapes]
    labels = [(x[0] > 0.8).to(torch.uint8) for x in images]  # label is a function of the image
    return VolumeBank(ids=[f"c{i}" for i in range(len(shapes))], images=images, labels=labels)


def _draw(high: int, gen: torch.Generator) -> int:
    return int(torch.randint(high, (1,), generator=gen)) if high > 1 else 0


def reference_patch(image: np.ndarray, label: np.ndarray, patch, gen):
    """UA-MT's RandomRotFlip + RandomCrop on the whole volume (numpy), with the same draws."""
    k, axis = _draw(4, gen), _draw(2, gen)
    image, label = np.flip(np.rot90(image, k, (0, 1)), axis), np.flip(np.rot90(label, k, (0, 1)), axis)
    if any(s <= p for s, p in zip(image.shape, patch)):
        pad = [(max((p - s) // 2 + 3, 0),) * 2 for s, p in zip(image.shape, patch)]
        image, label = np.pad(image, pad), np.pad(label, pad)
    o = [_draw(s - p, gen) for s, p in zip(image.shape, patch)]
    window = tuple(slice(a, a + p) for a, p in zip(o, patch))
    return image[window], label[window]


@pytest.mark.parametrize("shapes, patch", [
    ([(30, 24, 20), (26, 31, 19)], (16, 12, 8)),  # crop only
    ([(10, 14, 6), (16, 12, 8)], (16, 12, 8)),  # smaller than / equal to the patch: zero padding
    ([(40, 9, 30)], (12, 12, 12)),  # one axis too small: every axis padded as in UA-MT
])
def test_patches_equal_the_protocol_reference(shapes, patch):
    bank = make_bank(shapes)
    indices = [0, len(shapes) - 1] * 24  # 48 draws: every (k, axis) pair many times
    images, labels = sample_patches(bank, indices, patch, torch.Generator().manual_seed(3))
    assert images.shape == (len(indices), 1, *patch) and images.dtype == torch.float32
    assert labels.shape == (len(indices), *patch) and labels.dtype == torch.int64
    gen = torch.Generator().manual_seed(3)
    for b, i in enumerate(indices):
        ref_image, ref_label = reference_patch(bank.images[i][0].numpy(), bank.labels[i].numpy(), patch, gen)
        assert np.array_equal(images[b, 0].numpy(), ref_image), b
        assert np.array_equal(labels[b].numpy(), ref_label), b


@pytest.mark.parametrize("k", range(4))
@pytest.mark.parametrize("axis", range(2))
def test_rot_flip_is_one_flip_and_a_transpose(k, axis):
    v = torch.arange(4 * 3 * 2).view(4, 3, 2)
    flips, swap = _rot_flip_as_flips(k, axis)
    w = v.flip(flips) if flips else v
    assert torch.equal(w.transpose(0, 1) if swap else w, torch.rot90(v, k, (0, 1)).flip(axis))


def test_patches_are_deterministic_for_a_seed_and_labels_stay_aligned():
    bank = make_bank([(40, 36, 20), (33, 45, 18)])
    a = sample_patches(bank, [0, 1, 1], (24, 24, 16), torch.Generator().manual_seed(5))
    b = sample_patches(bank, [0, 1, 1], (24, 24, 16), torch.Generator().manual_seed(5))
    c = sample_patches(bank, [0, 1, 1], (24, 24, 16), torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    assert torch.equal(a[1], (a[0][:, 0] > 0.8).long())  # same voxels in image and label


def test_crop_offset_upper_end_is_exclusive():
    z = torch.arange(10, dtype=torch.float32).expand(1, 8, 8, 10).contiguous()  # value = z index
    bank = VolumeBank(ids=["z"], images=[z], labels=[torch.zeros(8, 8, 10, dtype=torch.uint8)])
    images, _ = sample_patches(bank, [0] * 300, (4, 4, 8), torch.Generator().manual_seed(0))
    assert set(images[:, 0, 0, 0, 0].tolist()) == {0.0, 1.0}  # offsets 0..1 of the possible 0..2


def test_bad_patch_is_rejected():
    with pytest.raises(ValueError, match="patch"):
        sample_patches(make_bank([(8, 8, 8)]), [0], (8, 8), torch.Generator())


def _cfg(**changes) -> DataConfig:
    return DataConfig(**changes)


def test_strong_view_is_seeded_and_keeps_shape():
    x = torch.randn(4, 1, 12, 10, 8, generator=torch.Generator().manual_seed(0))
    a = strong_view(x, _cfg(), torch.Generator().manual_seed(1))
    b = strong_view(x, _cfg(), torch.Generator().manual_seed(1))
    c = strong_view(x, _cfg(), torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_noise_only_difference_is_bounded_and_has_no_spatial_structure():
    x = torch.randn(2, 1, 24, 24, 16, generator=torch.Generator().manual_seed(0))
    cfg = _cfg(contrast_p=0.0, blur_p=0.0)
    diff = strong_view(x, cfg, torch.Generator().manual_seed(1)) - x
    assert diff.abs().max() <= cfg.noise_clip + 1e-6 and diff.abs().max() > 0.5 * cfg.noise_clip
    assert abs(float(diff.mean())) < 0.01 and 0.07 < float(diff.std()) < cfg.noise_std
    neighbours = torch.corrcoef(torch.stack([diff[..., 1:].flatten(), diff[..., :-1].flatten()]))[0, 1]
    image_corr = torch.corrcoef(torch.stack([diff.flatten(), x.flatten()]))[0, 1]
    assert abs(float(neighbours)) < 0.05 and abs(float(image_corr)) < 0.05


def test_contrast_is_an_affine_map_in_range_with_its_probability():
    x = torch.randn(4000, 1, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    cfg = _cfg(noise_std=0.0, blur_p=0.0)
    y = strong_view(x, cfg, torch.Generator().manual_seed(1))
    changed = (y != x).flatten(1).any(1)
    assert 0.45 < float(changed.float().mean()) < 0.55
    xs, ys = x[changed].flatten(1), y[changed].flatten(1)
    c = ((xs - xs.mean(1, keepdim=True)) * (ys - ys.mean(1, keepdim=True))).sum(1) / (
        (xs - xs.mean(1, keepdim=True)) ** 2).sum(1)
    s = ys.mean(1) - c * xs.mean(1)
    assert torch.allclose(ys, c[:, None] * xs + s[:, None], atol=1e-4)
    assert c.min() >= 0.9 - 1e-4 and c.max() <= 1.1 + 1e-4 and s.abs().max() <= 0.1 + 1e-4


@pytest.mark.parametrize(("contrast_range", "shift_range"), [((0.9, 1.1), 0.1), ((2.0, 3.0), 5.0)])
def test_contrast_and_shift_are_both_drawn_uniformly_from_their_ranges(contrast_range, shift_range):
    """x·c + s with c ~ U[contrast_range] and s ~ U[±shift_range] independently: the (c, s) fitted per item fill
    their ranges with the uniform mean and standard deviation (width / √12); dropping either one fails."""
    x = torch.randn(4000, 1, 2, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cfg = _cfg(noise_std=0.0, blur_p=0.0, contrast_p=1.0, contrast_range=contrast_range, shift_range=shift_range)
    y = strong_view(x, cfg, torch.Generator().manual_seed(1))
    xs, ys = x.flatten(1), y.flatten(1)
    xc = xs - xs.mean(1, keepdim=True)
    c = (xc * (ys - ys.mean(1, keepdim=True))).sum(1) / (xc**2).sum(1)  # least squares per item
    s = ys.mean(1) - c * xs.mean(1)
    torch.testing.assert_close(ys, c[:, None] * xs + s[:, None])
    for values, low, high in ((c, *contrast_range), (s, -shift_range, shift_range)):
        width = high - low
        assert low - 1e-9 <= values.min() < low + 0.01 * width and high - 0.01 * width < values.max() <= high + 1e-9
        assert abs(float(values.mean()) - (low + high) / 2) < 0.02 * width
        assert abs(float(values.std()) - width / 12**0.5) < 0.02 * width
    assert abs(float(torch.corrcoef(torch.stack([c, s]))[0, 1])) < 0.05


def sampled_gaussian_variance(sigma: float, radius: int = 3) -> float:
    """Variance of exp(-t²/2σ²) sampled at t = -radius..radius and normalised to sum 1."""
    taps = torch.arange(-radius, radius + 1.0)
    w = torch.exp(-0.5 * (taps / sigma) ** 2)
    return float((w / w.sum()) @ taps**2)


def test_blur_is_a_normalised_gaussian_with_its_probability():
    x = torch.zeros(4000, 1, 9, 9, 9)
    x[:, :, 4, 4, 4] = 1.0  # delta
    cfg = _cfg(noise_std=0.0, contrast_p=0.0)
    y = strong_view(x, cfg, torch.Generator().manual_seed(2))
    blurred = y[:, 0, 4, 4, 4] < 1
    assert 0.17 < float(blurred.float().mean()) < 0.23
    profile = y[blurred][:, 0].sum((2, 3))  # n×X marginal along x
    variance = (profile * (torch.arange(9.0) - 4) ** 2).sum(1)
    assert torch.allclose(y[blurred].sum((1, 2, 3, 4)), torch.ones(int(blurred.sum())), atol=1e-5)
    sampled = [sampled_gaussian_variance(s) for s in cfg.blur_sigma]
    assert sampled[0] - 1e-4 < variance.min() and variance.max() < sampled[1] + 1e-4
    assert variance.max() - variance.min() > 0.5 * (sampled[1] - sampled[0])  # sigma is drawn per item
    flat = strong_view(torch.full((50, 1, 6, 6, 6), 2.0), cfg, torch.Generator().manual_seed(3))
    assert torch.allclose(flat, torch.full_like(flat, 2.0))  # replicate borders: no darkening


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampling_and_strong_view_do_not_sync_the_host_on_cuda():
    bank = make_bank([(40, 36, 20), (30, 30, 12)]).to("cuda")
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host synchronisation raises
    try:
        x, y = sample_patches(bank, [0, 1], (24, 24, 16), torch.Generator().manual_seed(0))
        s = strong_view(x, DataConfig(contrast_p=1.0, blur_p=1.0), torch.Generator(device="cuda").manual_seed(0))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert s.device.type == "cuda" and s.shape == x.shape and y.device.type == "cuda"


def take(sampler, n):
    return [next(sampler) for _ in range(n)]


def test_sampler_follows_the_protocol_epochs():
    sampler = TwoStreamSampler(8, 3, 2, 2, torch.Generator().manual_seed(0))
    batches = take(sampler, 12)  # 3 epochs of 8 // 2 = 4 batches
    for e in range(3):
        epoch = batches[4 * e:4 * e + 4]
        assert sorted(i for lab, _ in epoch for i in lab) == list(range(8))
        unlabeled = [i for _, unl in epoch for i in unl]
        assert len(unlabeled) == 8 and sorted(unlabeled[:3]) == [0, 1, 2]  # chain restarts per epoch
        assert sorted(unlabeled[3:6]) == [0, 1, 2]
    assert len({tuple(lab) for lab, _ in batches}) > 4  # epochs are reshuffled


@pytest.mark.parametrize("n_labeled, bs", [(1, 2), (3, 4)])
def test_sampler_with_fewer_labeled_cases_than_the_batch(n_labeled, bs):
    for lab, unl in take(TwoStreamSampler(n_labeled, 5, bs, 1, torch.Generator().manual_seed(0)), 6):
        assert len(lab) == bs and set(lab) == set(range(n_labeled)) and len(unl) == 1


def test_sampler_without_unlabeled_stream():
    for lab, unl in take(TwoStreamSampler(4, 0, 4, 0, torch.Generator().manual_seed(0)), 3):
        assert sorted(lab) == [0, 1, 2, 3] and unl == []


@pytest.mark.parametrize("args, name", [((4, 0, 2, 2), "n_unlabeled"), ((4, 4, 0, 2), "labeled_bs"),
                                        ((0, 4, 2, 2), "n_labeled"), ((4, 4, 2, -1), "unlabeled_bs")])
def test_sampler_rejects_bad_sizes(args, name):
    with pytest.raises(ValueError, match=name):
        TwoStreamSampler(*args, torch.Generator())


def test_sampler_resumes_exactly_from_a_saved_state():
    gen = torch.Generator().manual_seed(0)
    sampler = TwoStreamSampler(8, 5, 2, 2, gen)
    take(sampler, 7)
    buffer = io.BytesIO()
    torch.save(sampler.state_dict(), buffer)
    torch.rand(5, generator=gen)  # other users of the generator do not change the stream
    expected = take(sampler, 10)
    resumed = TwoStreamSampler(8, 5, 2, 2, torch.Generator().manual_seed(99))
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert take(resumed, 10) == expected
    with pytest.raises(ValueError, match="sizes"):
        TwoStreamSampler(8, 6, 2, 2, torch.Generator()).load_state_dict(sampler.state_dict())
