"""Evaluate a model or a checkpoint on an LA-layout test list (the LA evaluation protocol).

Per case: whole-volume probabilities (protocol grid or fast MONAI mode), binary foreground
``argmax ≠ 0`` (for two classes the same as p₁ > 0.5), medpy metrics (:mod:`dkuxnet.metrics`), and
optionally the same metrics after keeping the largest connected component (columns ``*_lcc``).

A model trained on downsampled data (``data.resample`` = f > 1, the ``cpu`` preset) is evaluated on the
same grid it was trained on and scored on the original one: the image is mean-pooled by f, the sliding
window runs on it with the protocol stride divided by f (:func:`protocol_stride`: the same stride in mm;
(9, 9, 2) at ½ resolution), the class probabilities are interpolated trilinearly back to the original
grid (:func:`dkuxnet.data.resample.upsample_probs`, which also states how odd sizes are handled), and
the mask is scored against the original full-resolution label with the unchanged metrics (0.625 mm).
:func:`evaluate_checkpoint` writes ``per_case.csv`` and ``summary.json`` (atomically) with the
provenance needed to quote the numbers.
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from dkuxnet.checkpoint import bn_stats_used, load_checkpoint, model_from_state
from dkuxnet.data.download import dataset_sha256
from dkuxnet.data.la import make_split, read_case, read_list
from dkuxnet.data.resample import downsample_image, upsample_probs
from dkuxnet.errors import DataError
from dkuxnet.inference import predict_fast, predict_protocol, resolve_device
from dkuxnet.metrics import case_metrics, largest_connected_component, summarize
from dkuxnet.results import device_name, git_commit, write_json, write_text_atomic

MODES = ("protocol", "fast")
PROTOCOL_STRIDE = (18, 18, 4)
FAST_OVERLAP = 0.5


def protocol_stride(resample: int = 1) -> tuple[int, int, int]:
    """The protocol's window stride on a grid downsampled by ``resample``: ⌈(18, 18, 4) / f⌉, the same in mm."""
    if resample < 1:
        raise ValueError(f"resample must be ≥ 1, got {resample}")
    return tuple(-(-s // resample) for s in PROTOCOL_STRIDE)  # type: ignore[return-value]


def predict_mask(
    model: nn.Module,
    image: np.ndarray,
    mode: str = "protocol",
    patch: Sequence[int] = (112, 112, 80),
    batch_size: int = 4,
    device: str | torch.device | None = None,
    amp: bool = True,
    resample: int = 1,
) -> np.ndarray:
    """Binary foreground mask (X, Y, Z) bool of one volume, on its original grid: ``argmax_K p ≠ 0``.

    ``mode="protocol"`` uses the UA-MT grid (stride :func:`protocol_stride`), ``"fast"`` MONAI with
    overlap 0.5 and Gaussian blending. With ``resample`` = f > 1 the window runs on the mean-pooled image
    and the probabilities are interpolated back (see the module docstring). Only the mask is copied to
    the host.
    """
    small = downsample_image(image, resample)
    if mode == "protocol":
        prob = predict_protocol(
            model, small, patch, protocol_stride(resample), batch_size=batch_size, device=device, amp=amp
        )
    elif mode == "fast":
        prob = predict_fast(model, small, patch, overlap=FAST_OVERLAP, batch_size=batch_size, device=device, amp=amp)
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    prob = upsample_probs(prob, resample, tuple(np.shape(image)))  # K×X×Y×Z
    return (prob.argmax(0) != 0).cpu().numpy()  # X×Y×Z


def evaluate_model(
    model: nn.Module,
    data_dir: Path,
    ids: Sequence[str] | None = None,
    mode: str = "protocol",
    patch: Sequence[int] = (112, 112, 80),
    batch_size: int = 4,
    device: str | torch.device | None = None,
    amp: bool = True,
    lcc: bool = False,
    progress: bool = True,
    save_dir: Path | None = None,
    save_predictions: int = 0,
    resample: int = 1,
) -> list[dict[str, Any]]:
    """Per-case metrics of ``model`` on the cases ``ids`` (default: ``data_dir/test.list``).

    Args:
        model: network returning ``ModelOutput`` (or logits).
        data_dir: LA-layout folder.
        ids: case ids; ``None`` = every line of ``test.list`` in file order.
        mode: ``"protocol"`` or ``"fast"``.
        patch: window size (the config's ``data.patch_size``).
        batch_size: windows per forward pass.
        device: where the model runs; ``None`` = the model's own device.
        amp: bf16 autocast on CUDA.
        lcc: also score the largest connected component (``*_lcc`` keys).
        progress: tqdm progress bar.
        save_dir: folder for saved predictions (``<case>.npz`` with a uint8 array ``pred``).
        save_predictions: how many cases (the first ones) to save; needs ``save_dir``.
        resample: the factor the model was trained at (``data.resample``); masks are scored at full resolution.

    Returns:
        One dict per case: ``case``, the keys of :func:`dkuxnet.metrics.case_metrics`, ``seconds``
        (prediction wall time including the host copy of the mask), and ``*_lcc`` keys when ``lcc``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if save_predictions and save_dir is None:
        raise ValueError("save_predictions > 0 needs save_dir")
    data_dir = Path(data_dir)
    ids = list(ids) if ids is not None else read_list(data_dir / "test.list")
    rows = []
    for i, case_id in enumerate(tqdm(ids, desc=f"evaluate ({mode})", disable=not progress)):
        image, label = read_case(data_dir, case_id)
        start = time.perf_counter()
        mask = predict_mask(model, image, mode, patch, batch_size=batch_size, device=device, amp=amp, resample=resample)
        row: dict[str, Any] = {"case": case_id, **case_metrics(mask, label), "seconds": time.perf_counter() - start}
        if lcc:
            row.update({f"{k}_lcc": v for k, v in case_metrics(largest_connected_component(mask), label).items()})
        if save_dir is not None and i < save_predictions:
            Path(save_dir).mkdir(parents=True, exist_ok=True)
            np.savez_compressed(Path(save_dir) / f"{case_id}.npz", pred=mask.astype(np.uint8))
        rows.append(row)
    return rows


def evaluate_checkpoint(
    checkpoint: Path,
    data_dir: Path,
    out_dir: Path,
    mode: str = "protocol",
    device: str | torch.device | None = None,
    lcc: bool = False,
    progress: bool = True,
    batch_size: int = 4,
    amp: bool = True,
    save_predictions: int = 0,
    ids: Sequence[str] | None = None,
    bn_stats: str = "auto",
) -> dict[str, Any]:
    """Evaluate a checkpoint on ``data_dir/test.list``; write ``per_case.csv`` and ``summary.json``.

    The window size is the checkpoint config's ``data.patch_size``, the grid its ``data.resample``
    (the masks are scored on the original grid either way).

    Args:
        checkpoint: checkpoint file (:mod:`dkuxnet.checkpoint` format).
        data_dir: LA-layout folder with ``test.list``.
        out_dir: output folder (created).
        mode: ``"protocol"`` (UA-MT grid, the numbers to report) or ``"fast"`` (MONAI, overlap 0.5).
        device: ``None`` = CUDA when available, else CPU.
        lcc: also report largest-connected-component results.
        progress: tqdm progress bar.
        batch_size: windows per forward pass.
        amp: bf16 autocast on CUDA.
        save_predictions: save the masks of the first N cases to ``out_dir/predictions/<case>.npz``.
        ids: case IDs to evaluate; ``None`` = every line of ``test.list``.
        bn_stats: BatchNorm statistics to evaluate with: ``"auto"`` (the recomputed ones when the
            checkpoint holds them, else the training EMA), ``"ema"`` or ``"recomputed"``; the summary's
            ``bn_stats`` says which were used.

    Returns:
        The summary written to ``summary.json``.

    Raises:
        CheckpointError: the checkpoint is missing, corrupt, foreign or cannot build its model.
        DataError: the data folder or a case is missing or invalid.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    checkpoint, data_dir, out_dir = Path(checkpoint), Path(data_dir), Path(out_dir)
    dev = resolve_device(device)
    state = load_checkpoint(checkpoint)
    model, cfg = model_from_state(state, dev, name=str(checkpoint), bn_stats=bn_stats)
    if cfg.train.channels_last:  # the layout it trained in (faster windows on the CPU, same values)
        model = model.to(memory_format=torch.channels_last_3d)
    ids = list(ids) if ids is not None else read_list(data_dir / "test.list")
    patch, resample = tuple(cfg.data.patch_size), cfg.data.resample
    rows = evaluate_model(
        model, data_dir, ids, mode=mode, patch=patch, batch_size=batch_size, device=dev, amp=amp, lcc=lcc,
        progress=progress, save_dir=out_dir / "predictions", save_predictions=save_predictions, resample=resample,
    )
    seconds = [r["seconds"] for r in rows]
    summary = {
        "mode": mode,
        **summarize(rows),
        "lcc": summarize(rows, suffix="_lcc") if lcc else None,
        "seconds_per_volume": float(np.mean(seconds)),
        "seconds_total": float(np.sum(seconds)),
        "resample": resample,
        "bn_stats": bn_stats_used(state, bn_stats, name=str(checkpoint)),
        "bn_recompute": (state.get("bn_recomputed") or {}).get("record"),
        "window": {"patch": list(patch), "stride": list(protocol_stride(resample)) if mode == "protocol" else None,
                   "overlap": FAST_OVERLAP if mode == "fast" else None, "batch_size": batch_size,
                   "amp": bool(amp and dev.type == "cuda")},
        "device": device_name(dev),
        "torch_version": torch.__version__,
        "checkpoint": str(checkpoint.resolve()),
        "iteration": int(state["iteration"]),
        "config": cfg.to_dict(),
        "provenance": state.get("provenance") or {},
        "labeled_num": _labeled_num(data_dir, cfg.data.label_ratio, cfg.data.labeled_num),
        "data_dir": str(data_dir.resolve()),
        "data_sha256": _data_sha256(data_dir),
        "cases": ids,
        "git_commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_per_case_csv(out_dir / "per_case.csv", rows)
    write_json(out_dir / "summary.json", summary)
    return summary


def write_per_case_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write per-case rows as CSV atomically (NaN written as ``NaN``)."""
    import pandas as pd

    write_text_atomic(Path(path), pd.DataFrame(rows).to_csv(index=False, na_rep="NaN"))


def _data_sha256(data_dir: Path) -> str | None:
    try:
        return dataset_sha256(data_dir)
    except DataError:
        return None


def _labeled_num(data_dir: Path, label_ratio: float | None, labeled_num: int | None) -> int | None:
    try:
        return len(make_split(data_dir, label_ratio=label_ratio, labeled_num=labeled_num).labeled)
    except (DataError, ValueError):
        return labeled_num
