"""Whole-volume prediction: the LA protocol grid (UA-MT) and a fast MONAI mode.

Protocol mode reproduces UA-MT's ``test_util.test_single_case`` window for window (https://github.com/yulequan/UA-MT):
an axis shorter than the patch is zero padded, ``(patch − size)//2`` before and the rest after; the
window starts along an axis of (padded) length S are ``min(i·s, S − p)`` for
``i < ceil((S − p)/s) + 1``; the softmax probabilities of all windows are summed and divided by the
number of windows covering each voxel, and the padding is cut off again. Unlike the reference loop,
windows run ``batch_size`` at a time and both sums stay on the device (no per-window host copies).
Because the windows form a Cartesian grid, the coverage count is the outer product of three 1-D
coverage counts.

Fast mode (validation during training) is MONAI's ``sliding_window_inference`` with overlap 0.5 and
Gaussian blending of the softmax probabilities: ~12 instead of ~54 windows on an LA volume.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Triplet = tuple[int, int, int]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` → ``cuda`` when available, else ``cpu``; a bad string raises ``ValueError``."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device: cannot parse {device!r} ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available")
    return dev


def protocol_padding(shape: Sequence[int], patch: Sequence[int]) -> list[tuple[int, int]]:
    """Zero padding ``(before, after)`` per axis, as UA-MT: only axes with size < patch are padded.

    Example: size 40, patch 48 → pad 8 → ``(4, 4)``; size 45 → pad 3 → ``(1, 2)``.
    """
    _check_triplet(shape, "shape")
    _check_triplet(patch, "patch")
    return [((p - s) // 2, (p - s) - (p - s) // 2) if s < p else (0, 0) for s, p in zip(shape, patch)]


def axis_starts(size: int, patch: int, stride: int) -> list[int]:
    """Window starts along one (padded, size ≥ patch) axis: ``min(i·stride, size − patch)``,
    ``i < ceil((size − patch)/stride) + 1``."""
    n = math.ceil((size - patch) / stride) + 1
    return [min(i * stride, size - patch) for i in range(n)]


def protocol_windows(shape: Sequence[int], patch: Sequence[int] = (112, 112, 80),
                     stride: Sequence[int] = (18, 18, 4)) -> list[Triplet]:
    """Window origins ``(x0, y0, z0)`` of the UA-MT grid, in padded coordinates, in UA-MT's loop order.

    Args:
        shape: volume size (X, Y, Z) before padding.
        patch: window size.
        stride: step per axis (LA protocol: 18, 18, 4).

    Returns:
        List of window origins; e.g. 45 windows for a 175×132×88 volume with the LA defaults.
    """
    _check_grid(patch, stride)
    padded = [s + a + b for s, (a, b) in zip(shape, protocol_padding(shape, patch))]
    xs, ys, zs = (axis_starts(s, p, st) for s, p, st in zip(padded, patch, stride))
    return [(x, y, z) for x in xs for y in ys for z in zs]


def predict_protocol(
    model: nn.Module,
    image: torch.Tensor | np.ndarray,
    patch: Sequence[int] = (112, 112, 80),
    stride: Sequence[int] = (18, 18, 4),
    batch_size: int = 4,
    device: str | torch.device | None = None,
    amp: bool = True,
    num_classes: int | None = None,
) -> torch.Tensor:
    """Average softmax probabilities over the UA-MT sliding-window grid.

    p(v) = (1 / |W(v)|) · Σ_{w ∈ W(v)} softmax(f(x_w))(v), W(v) = windows containing voxel v.

    Args:
        model: returns a ``ModelOutput`` (``.seg_logits`` B×K×px×py×pz) or a logits tensor. Put in eval
            mode for the call (its previous mode is restored) and moved to ``device``.
        image: one volume (X, Y, Z), numpy or torch.
        patch: window size (use the config's ``data.patch_size``).
        stride: window step per axis.
        batch_size: windows per forward pass.
        device: where the model runs; ``None`` = the model's own device.
        amp: bf16 autocast (CUDA only; ignored on CPU).
        num_classes: expected K; checked against the model output when given.

    Returns:
        Probabilities K×X×Y×Z (float32, on ``device``).
    """
    _check_grid(patch, stride)
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    dev = _place(model, device)
    vol = _as_volume(image, dev)  # X×Y×Z
    pads = protocol_padding(vol.shape, patch)
    padded = F.pad(vol, [n for pair in reversed(pads) for n in pair])  # X'×Y'×Z'
    windows = protocol_windows(vol.shape, patch, stride)
    px, py, pz = patch
    score: torch.Tensor | None = None
    with _eval_mode(model), torch.inference_mode(), _autocast(dev, amp):
        for first in range(0, len(windows), batch_size):
            chunk = windows[first:first + batch_size]
            batch = torch.stack([padded[x:x + px, y:y + py, z:z + pz] for x, y, z in chunk])[:, None]  # B×1×px×py×pz
            prob = torch.softmax(_logits(model(batch)).float(), dim=1)  # B×K×px×py×pz
            if score is None:
                _check_classes(prob.shape[1], num_classes)
                score = torch.zeros((prob.shape[1], *padded.shape), device=dev)  # K×X'×Y'×Z'
            for b, (x, y, z) in enumerate(chunk):
                score[:, x:x + px, y:y + py, z:z + pz] += prob[b]
        assert score is not None  # at least one window always exists
        score /= _coverage(padded.shape, patch, stride, dev)
    (xa, _), (ya, _), (za, _) = pads
    X, Y, Z = vol.shape
    return score[:, xa:xa + X, ya:ya + Y, za:za + Z].clone(memory_format=torch.contiguous_format)  # K×X×Y×Z


def predict_fast(
    model: nn.Module,
    image: torch.Tensor | np.ndarray,
    patch: Sequence[int] = (112, 112, 80),
    overlap: float = 0.5,
    mode: str = "gaussian",
    batch_size: int = 4,
    device: str | torch.device | None = None,
    amp: bool = True,
) -> torch.Tensor:
    """Softmax probabilities by MONAI ``sliding_window_inference`` (fast validation, not the protocol).

    Args:
        model: as in :func:`predict_protocol`.
        image: one volume (X, Y, Z), numpy or torch.
        patch: window size.
        overlap: fraction of overlap between neighbouring windows, in [0, 1).
        mode: MONAI blend mode, ``"gaussian"`` or ``"constant"``.
        batch_size: windows per forward pass.
        device: where the model runs; ``None`` = the model's own device.
        amp: bf16 autocast (CUDA only).

    Returns:
        Probabilities K×X×Y×Z (float32, on ``device``).
    """
    from monai.inferers import sliding_window_inference

    _check_triplet(patch, "patch")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    dev = _place(model, device)
    vol = _as_volume(image, dev)[None, None]  # 1×1×X×Y×Z

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        return torch.softmax(_logits(model(batch)).float(), dim=1)  # B×K×px×py×pz

    with _eval_mode(model), torch.inference_mode(), _autocast(dev, amp):
        out = sliding_window_inference(
            vol, roi_size=tuple(patch), sw_batch_size=batch_size, predictor=predictor, overlap=overlap, mode=mode
        )
    return torch.as_tensor(out)[0].float().clone()  # K×X×Y×Z, a normal (non-inference) tensor


def _coverage(shape: Sequence[int], patch: Sequence[int], stride: Sequence[int], dev: torch.device) -> torch.Tensor:
    counts = []
    for size, p, s in zip(shape, patch, stride):
        c = torch.zeros(size, device=dev)
        for start in axis_starts(size, p, s):
            c[start:start + p] += 1
        counts.append(c)
    cx, cy, cz = counts
    return cx[:, None, None] * cy[None, :, None] * cz[None, None, :]  # X'×Y'×Z'


def _logits(out: Any) -> torch.Tensor:
    logits = getattr(out, "seg_logits", out)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 5:
        raise ValueError("model must return a ModelOutput with seg_logits (B×K×X×Y×Z) or such a tensor")
    return logits


def _place(model: nn.Module, device: str | torch.device | None) -> torch.device:
    first = next(model.parameters(), None)
    own = first.device if first is not None else torch.device("cpu")
    dev = own if device is None else torch.device(device)
    if dev != own:
        model.to(dev)
    return dev


def _as_volume(image: torch.Tensor | np.ndarray, dev: torch.device) -> torch.Tensor:
    vol = torch.as_tensor(image)
    if vol.dim() != 3:
        raise ValueError(f"image must be one volume X×Y×Z, got shape {tuple(vol.shape)}")
    return vol.to(device=dev, dtype=torch.float32)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _autocast(dev: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    if amp and dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _check_classes(k: int, num_classes: int | None) -> None:
    if num_classes is not None and k != num_classes:
        raise ValueError(f"num_classes={num_classes} but the model outputs {k} channels")


def _check_triplet(x: Sequence[int], name: str) -> None:
    if len(x) != 3 or any(int(v) != v or v < 1 for v in x):
        raise ValueError(f"{name} must be three positive integers, got {tuple(x)}")


def _check_grid(patch: Sequence[int], stride: Sequence[int]) -> None:
    _check_triplet(patch, "patch")
    _check_triplet(stride, "stride")
    if any(s > p for s, p in zip(stride, patch)):
        raise ValueError(f"stride {tuple(stride)} must not exceed patch {tuple(patch)} (voxels would be skipped)")
