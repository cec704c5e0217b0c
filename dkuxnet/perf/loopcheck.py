"""The batched protocol prediction against UA-MT's window-by-window loop (``check-gpu``'s ``loop_check``)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dkuxnet.data.la import read_case
from dkuxnet.inference import predict_protocol
from dkuxnet.perf.core import synchronize
from dkuxnet.precision import true_fp32


def loop_vs_batched(model: torch.nn.Module, data_dir: Path, case: str, patch: tuple[int, int, int],
                    device: torch.device) -> dict[str, Any]:
    """Masks (p₁ > 0.5) of one case by the UA-MT loop and by :func:`predict_protocol`: Dice, differing voxels,
    seconds. fp32 runs with TF32 off; the bf16 row (CUDA only) is the evaluation's own precision."""
    image, _ = read_case(data_dir, case)
    runs: dict[str, Callable[[], np.ndarray]] = {
        "loop": lambda: uamt_loop(model, image, patch, device)[1],
        "batched_fp32": lambda: predict_protocol(model, image, patch=patch, device=device, amp=False)[1].cpu().numpy(),
    }
    if device.type == "cuda":
        runs["batched_bf16"] = lambda: predict_protocol(model, image, patch=patch, device=device,
                                                        amp=True)[1].cpu().numpy()
    masks, seconds = {}, {}
    for name, run in runs.items():
        with true_fp32() if name != "batched_bf16" else contextlib.nullcontext():
            synchronize(device)
            t0 = time.perf_counter()
            masks[name] = run() > 0.5
            synchronize(device)
            seconds[name] = time.perf_counter() - t0
    loop = masks["loop"]
    row: dict[str, Any] = {"case": case, "foreground_voxels": int(loop.sum()), "loop_s": seconds["loop"]}
    for name in [n for n in runs if n != "loop"]:
        row |= {f"dice_{name}_vs_loop": dice(masks[name], loop),
                f"voxels_differing_{name}": int((masks[name] ^ loop).sum()), f"{name}_s": seconds[name]}
    return row


def uamt_loop(model: torch.nn.Module, image: np.ndarray, patch: tuple[int, int, int], device: torch.device,
              stride: tuple[int, int, int] = (18, 18, 4)) -> np.ndarray:
    """UA-MT's ``test_single_case``: one window at a time, fp32, numpy accumulation on the host; K×X×Y×Z.

    Written from UA-MT's code, independently of :mod:`dkuxnet.inference`, so that it checks it.
    """
    pads = [max(p - s, 0) for p, s in zip(patch, image.shape)]
    img = np.pad(image, [(q // 2, q - q // 2) for q in pads])
    starts = [[min(st * i, n - p) for i in range(math.ceil((n - p) / st) + 1)]
              for n, p, st in zip(img.shape, patch, stride)]
    score: np.ndarray | None = None
    count = np.zeros(img.shape, np.float32)
    model.eval()
    with torch.no_grad():
        for x in starts[0]:
            for y in starts[1]:
                for z in starts[2]:
                    win = (slice(x, x + patch[0]), slice(y, y + patch[1]), slice(z, z + patch[2]))
                    t = torch.from_numpy(np.ascontiguousarray(img[win]))[None, None].to(device)
                    out = model(t)
                    prob = torch.softmax(getattr(out, "seg_logits", out).float(), dim=1)[0].cpu().numpy()
                    if score is None:
                        score = np.zeros((prob.shape[0], *img.shape), np.float32)
                    score[(slice(None), *win)] += prob
                    count[win] += 1
    assert score is not None  # at least one window always exists
    score /= count[None]
    crop = tuple(slice(q // 2, q // 2 + s) for q, s in zip(pads, image.shape))
    return score[(slice(None), *crop)]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    denom = int(a.sum() + b.sum())
    return 2 * int((a & b).sum()) / denom if denom else 1.0
