"""Synthetic LA-like phantom: the embedded default data set (SYNTHETIC — not patient data).

The real LA benchmark (100 LGE-MRI volumes, 233 MB) is a download; the book, the tests and Binder
need something that exists everywhere and runs in seconds. :func:`make_phantom` writes a folder with
exactly the LA layout (``2018LA_Seg_Training Set/<ID>/mri_norm2.h5`` with gzip ``image`` float32 and
``label`` uint8, ``train.list``, ``test.list``), so every code path (reader, checker, cache, sampler,
training, evaluation) runs on it unchanged. Numbers obtained on it say that the code works, nothing
about the method's accuracy on LA.

Each case: an atrium-like body (ellipsoid with a smooth random deformation, random pose), four
pulmonary-vein tubes and a tapered appendage form label 1. The image mimics LGE contrast: bright
blood pool (label 1), a slightly enhanced wall, an aorta-like bright tube outside the label, textured
background, then partial-volume blur, a smooth multiplicative bias field, Gaussian noise, and a
whole-volume z-score (like the LA preprocessing). X and Y vary per case (±1/12 of the nominal size,
88-104 for 96) like the real crops; Z is fixed (the real data always has 88 slices). Deterministic
for a seed: case ``i`` depends only on ``(seed, i)``.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
from scipy import ndimage

from dkuxnet.data.la import case_path
from dkuxnet.fileio import atomic_path, write_text_atomic


def _smooth_field(shape: tuple[int, int, int], rng: np.random.Generator, nodes: int = 4) -> np.ndarray:
    """Smooth random field (≈ unit std): Gaussian RBFs on a nodes³ grid, expanded separably."""
    grid = rng.standard_normal((nodes,) * 3, dtype=np.float32)
    basis = []
    for n in shape:
        t = np.linspace(0.0, nodes - 1.0, n, dtype=np.float32)[:, None]  # n×nodes
        w = np.exp(-0.5 * ((t - np.arange(nodes, dtype=np.float32)) / 0.8) ** 2)
        basis.append(w / w.sum(1, keepdims=True))
    small = np.einsum("abc,xa,yb->xyc", grid, basis[0], basis[1], optimize=True)  # X×Y×nodes
    field = small @ basis[2].T  # X×Y×Z
    return field / (small.std() + 1e-6)


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """Random rotation matrix from three angles in ±max_deg."""
    ax, ay, az = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _paint_capsule(mask: np.ndarray, p0: np.ndarray, p1: np.ndarray, r0: float, r1: float) -> None:
    """Set voxels within a tapered capsule (radius r0 at p0 to r1 at p1) to True, in place."""
    rmax = max(r0, r1)
    lo = np.maximum(np.floor(np.minimum(p0, p1) - rmax), 0).astype(int)
    hi = np.minimum(np.ceil(np.maximum(p0, p1) + rmax) + 1, mask.shape).astype(int)
    if np.any(hi <= lo):
        return
    w = [np.arange(lo[i], hi[i], dtype=np.float32) - p0[i] for i in range(3)]
    wx, wy, wz = w[0][:, None, None], w[1][None, :, None], w[2][None, None, :]
    v = (p1 - p0).astype(np.float32)
    t = np.clip((wx * v[0] + wy * v[1] + wz * v[2]) / max(float(v @ v), 1e-6), 0.0, 1.0)
    d2 = (wx - t * v[0]) ** 2 + (wy - t * v[1]) ** 2 + (wz - t * v[2]) ** 2
    region = tuple(slice(lo[i], hi[i]) for i in range(3))
    mask[region] |= d2 < (r0 + (r1 - r0) * t) ** 2


def phantom_case(shape: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic case: image float32 (X,Y,Z) z-scored, label uint8 (X,Y,Z) in {0,1}."""
    size = np.array(shape, dtype=np.float64)
    centre = size / 2 + rng.uniform(-0.06, 0.06, 3) * size
    radii = size * rng.uniform([0.22, 0.2, 0.24], [0.3, 0.27, 0.32])
    rot = _rotation(rng, 25.0)
    d = [np.arange(n, dtype=np.float32) - c for n, c in zip(shape, centre)]
    dx, dy, dz = d[0][:, None, None], d[1][None, :, None], d[2][None, None, :]
    r32, inv_radii = rot.astype(np.float32), (1 / radii).astype(np.float32)
    u = [(r32[i, 0] * dx + r32[i, 1] * dy + r32[i, 2] * dz) * inv_radii[i] for i in range(3)]  # body frame
    f = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2) - 1 + np.float32(0.2) * _smooth_field(shape, rng)
    label = f < 0
    r_mean = float(radii.mean())

    def to_world(direction: np.ndarray, scale: float) -> np.ndarray:
        return centre + rot.T @ (direction / np.linalg.norm(direction) * radii * scale)

    for sx, sz in ((-1, 1), (-1, -1), (1, 1), (1, -1)):  # left/right x superior/inferior veins
        direction = np.array([0.65 * sx, 0.55, 0.45 * sz]) + rng.normal(0, 0.12, 3)
        p0, p1 = to_world(direction, 0.7), to_world(direction, rng.uniform(1.5, 1.9))
        _paint_capsule(label, p0, p1, r_mean * rng.uniform(0.18, 0.24), r_mean * rng.uniform(0.12, 0.17))
    direction = np.array([0.8, -0.6, 0.3]) + rng.normal(0, 0.15, 3)  # appendage: anterior-lateral
    p0, p1 = to_world(direction, 0.8), to_world(direction, rng.uniform(1.4, 1.7))
    _paint_capsule(label, p0, p1, r_mean * rng.uniform(0.25, 0.32), r_mean * 0.06)

    aorta = np.zeros(shape, dtype=bool)  # vertical bright tube beside the atrium, not labeled
    angle = rng.uniform(0, 2 * np.pi)
    xy = np.clip(centre[:2] + 1.1 * radii.max() * np.array([np.cos(angle), np.sin(angle)]), 0, size[:2] - 1)
    _paint_capsule(aorta, np.array([*xy, -5.0]), np.array([*xy, size[2] + 5]), r_mean * 0.35, r_mean * 0.35)
    aorta &= ~label

    blood = rng.uniform(0.9, 1.1)
    image = np.float32(0.15) * _smooth_field(shape, rng, nodes=9)  # background texture
    image[(f >= 0) & (f < 0.12) & ~label] = 0.35 * blood  # enhanced wall
    image[aorta] = 0.75 * blood
    image[label] = blood
    image = ndimage.gaussian_filter(image, sigma=rng.uniform(0.6, 1.0), truncate=3.0)  # partial volume
    image *= np.exp(np.float32(0.2) * _smooth_field(shape, rng, nodes=3))  # bias field
    image += rng.standard_normal(shape, dtype=np.float32) * np.float32(rng.uniform(0.06, 0.12))
    image = (image - image.mean()) / image.std()
    return image.astype(np.float32, copy=False), label.astype(np.uint8)


def make_phantom(dest: Path, cases: int = 20, seed: int = 0, shape: tuple[int, int, int] = (96, 96, 64)) -> Path:
    """Write a synthetic data set in the LA layout (see the module docstring).

    Args:
        dest: folder to create (existing phantom files are overwritten).
        cases: number of cases, ≥ 2; the last ``max(1, cases // 5)`` go to ``test.list``
            (20 → 16 train + 4 test), the others to ``train.list``.
        seed: case ``i`` is drawn from ``numpy.random.default_rng([seed, i])``.
        shape: nominal (X, Y, Z); X and Y vary per case by up to ``±max(1, n // 12)``.

    Returns:
        ``dest``.
    """
    if isinstance(cases, bool) or not isinstance(cases, int) or cases < 2:
        raise ValueError(f"cases must be an integer >= 2, got {cases!r}")
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape must be three sizes >= 16, got {shape!r}")
    dest = Path(dest)
    ids = [f"PHANTOM{i:03d}" for i in range(cases)]
    n_test = max(1, cases // 5)
    for i, case_id in enumerate(ids):
        rng = np.random.default_rng([seed, i])
        jitter = [max(1, n // 12) for n in shape[:2]]
        case_shape = (int(shape[0] + rng.integers(-jitter[0], jitter[0] + 1)),
                      int(shape[1] + rng.integers(-jitter[1], jitter[1] + 1)), int(shape[2]))
        image, label = phantom_case(case_shape, rng)
        path = case_path(dest, case_id)
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
            f.create_dataset("image", data=image, compression="gzip", compression_opts=1)
            f.create_dataset("label", data=label, compression="gzip", compression_opts=1)
    write_text_atomic(dest / "train.list", "".join(f"{c}\n" for c in ids[:-n_test]))
    write_text_atomic(dest / "test.list", "".join(f"{c}\n" for c in ids[-n_test:]))
    return dest
