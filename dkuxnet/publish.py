"""Commit a finished run: its result file, its own files, optionally its model and two cases for the book.

:func:`publish_run` turns a run folder (``train`` output with ``last.pt``) into what ``results/`` holds
(``results/README.md``):

* ``<results>/<kind>/<run>.json`` — the run result (schema ``dkuxnet-result-v1``), evaluated with the
  BatchNorm statistics evaluation picks by default, and with the other set in ``bn_stats_other``;
* ``<results>/runs/<run>/`` — ``per_case.csv`` (and ``per_case_<other>.csv``), ``metrics.jsonl`` (the
  training log), ``train_summary.json`` (without the training machine's paths); with ``model=True`` a ``model.pt`` (weights, config, both sets of
  BatchNorm statistics, provenance; no optimiser) and with ``cases`` > 0 ``cases/<id>.npz`` for the first
  test cases (:func:`export_case`).

Evaluations already in the run folder (``eval_<bn>/summary.json`` of the same checkpoint iteration) are
reused; missing ones are computed with the protocol.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dkuxnet.checkpoint import bn_stats_used, checkpoint_state, load_checkpoint, model_from_state, save_checkpoint
from dkuxnet.config import Config
from dkuxnet.data.la import read_case, read_list
from dkuxnet.data.resample import downsample_image, downsample_label, spacing_mm
from dkuxnet.evaluate import evaluate_checkpoint, predict_mask
from dkuxnet.metrics import case_metrics
from dkuxnet.results import RUNS_FOLDER, build_result, save_result, write_json

MODEL_KEYS = ("format", "config", "model", "iteration", "provenance", "bn_recomputed")  # what model.pt keeps
SHOWCASE_RUN = "cpu-all-r0.1-s1337"
LOCAL_PATHS = ("out_dir", "checkpoint")  # training-summary fields naming the training machine's folders  # the committed model the book's model and visualisation pages use


def _evaluation(run_dir: Path, data_dir: Path, bn: str, iteration: int, progress: bool) -> dict[str, Any]:
    out = run_dir / f"eval_{bn}"
    path = out / "summary.json"
    if path.is_file():
        summary = json.loads(path.read_text())
        if summary["iteration"] == iteration and summary["mode"] == "protocol":
            return summary
    return evaluate_checkpoint(run_dir / "last.pt", data_dir, out, mode="protocol", device="cpu",
                               progress=progress, bn_stats=bn)


def strip_checkpoint(src: Path, dest: Path) -> None:
    """Write ``src`` without optimiser, generator and sampler state: what evaluation and figures need."""
    state = load_checkpoint(src)
    save_checkpoint(dest, {k: state[k] for k in MODEL_KEYS if k in state})


def export_case(model: nn.Module, cfg: Config, data_dir: Path, case_id: str, out: Path) -> dict[str, Any]:
    """Small arrays of one test case for the book, written to ``out`` (``.npz``, compressed).

    Keys: ``image_crop`` (float16) and ``label_crop`` (uint8), one ``data.patch_size`` window of the
    resampled image and label centred on the atrium, ``crop_origin`` (its corner on the resampled grid);
    ``image_slice`` (float16), the resampled image's middle axial slice; ``truth`` and ``pred``, the
    full-resolution label and the model's protocol prediction as ``np.packbits`` of the flattened mask,
    with ``shape``; ``resample``, ``spacing_mm`` (of the resampled grid) and ``dice`` (of ``pred``).
    """
    image, label = read_case(data_dir, case_id)
    f = cfg.data.resample
    small, small_label = downsample_image(image, f).numpy(), downsample_label(label, f).numpy()
    patch = np.array(cfg.data.patch_size)
    centre = np.round(np.argwhere(small_label).mean(0)).astype(int)
    origin = np.clip(centre - patch // 2, 0, np.maximum(np.array(small.shape) - patch, 0))
    box = tuple(slice(o, o + p) for o, p in zip(origin, patch))
    pred = predict_mask(model, image, "protocol", cfg.data.patch_size, device="cpu", resample=f)
    arrays = {
        "image_crop": small[box].astype(np.float16), "label_crop": small_label[box].astype(np.uint8),
        "crop_origin": origin, "image_slice": small[:, :, small.shape[2] // 2].astype(np.float16),
        "truth": np.packbits(label.astype(bool).ravel()), "pred": np.packbits(pred.ravel()),
        "shape": np.array(label.shape), "resample": np.array(f), "spacing_mm": np.array(spacing_mm(f)),
        "dice": np.array(case_metrics(pred, label)["dice"]),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    return arrays


def load_case(path: Path) -> dict[str, Any]:
    """Inverse of :func:`export_case`: the arrays with ``truth`` and ``pred`` unpacked to bool volumes."""
    with np.load(path) as z:
        d = {k: z[k] for k in z.files}
    shape = tuple(int(s) for s in d["shape"])
    for key in ("truth", "pred"):
        d[key] = np.unpackbits(d[key], count=int(np.prod(shape))).reshape(shape).astype(bool)
    return d


def copy_run_files(run_dir: Path, per_case: Path, files: Path) -> None:
    """Write a finished run's own files into ``files``: ``per_case`` as ``per_case.csv``, the training log
    ``metrics.jsonl`` and ``train_summary.json`` (the run's ``summary.json`` without this machine's paths)."""
    files.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(per_case, files / "per_case.csv")
    shutil.copyfile(run_dir / "metrics.jsonl", files / "metrics.jsonl")
    train_summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    write_json(files / "train_summary.json", {k: v for k, v in train_summary.items() if k not in LOCAL_PATHS})


def publish_run(
    run_dir: Path, data_dir: Path, results_dir: Path, kind: str, name: str | None = None, model: bool = False,
    cases: int = 0, notes: str | None = None, progress: bool = True,
) -> dict[str, Any]:
    """Evaluate (if needed) and commit a finished run into ``results_dir``; returns the result written.

    Args:
        run_dir: the run folder (``last.pt``, ``metrics.jsonl``, ``summary.json``).
        data_dir: the LA folder it was trained on.
        results_dir: the repository's ``results/``.
        kind: sub-folder of the result file (``cpu`` for the cpu profile's runs).
        name: run name (default: the run folder's name).
        model: also write ``runs/<name>/model.pt``.
        cases: export that many test cases (the first of ``test.list``) for the book; needs ``model``.
        notes: free text stored with the result.
        progress: progress bars.

    Raises:
        CheckpointError: ``run_dir/last.pt`` is missing or invalid.
        ValueError: ``cases`` without ``model``.
    """
    if cases and not model:
        raise ValueError("cases > 0 needs model=True: the case files show the committed model's predictions")
    run_dir, data_dir, results_dir = Path(run_dir), Path(data_dir), Path(results_dir)
    name = name or run_dir.name
    state = load_checkpoint(run_dir / "last.pt")
    main_bn = bn_stats_used(state)
    other_bn = "ema" if main_bn == "recomputed" else None
    summary = _evaluation(run_dir, data_dir, main_bn, int(state["iteration"]), progress)
    other = _evaluation(run_dir, data_dir, other_bn, int(state["iteration"]), progress) if other_bn else None
    result = build_result(summary, name=name, notes=notes, other_bn_summary=other)
    save_result(results_dir / kind / f"{name}.json", result)
    files = results_dir / RUNS_FOLDER / name
    copy_run_files(run_dir, run_dir / f"eval_{main_bn}" / "per_case.csv", files)
    if other_bn:
        shutil.copyfile(run_dir / f"eval_{other_bn}" / "per_case.csv", files / f"per_case_{other_bn}.csv")
    if model:
        strip_checkpoint(run_dir / "last.pt", files / "model.pt")
        net, cfg = model_from_state(load_checkpoint(files / "model.pt"), "cpu")
        if cfg.train.channels_last:
            net = net.to(memory_format=torch.channels_last_3d)
        for case_id in read_list(data_dir / "test.list")[:cases]:
            export_case(net, cfg, data_dir, case_id, files / "cases" / f"{case_id}.npz")
    return result
