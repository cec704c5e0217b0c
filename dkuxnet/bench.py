"""Benchmark of the real training step and of protocol inference (``engineering.md`` B.5–B.7).

:func:`run_bench` times :func:`dkuxnet.engine.train_step` — the same code :func:`dkuxnet.train.train`
runs: sampling and augmentation on the device, both views in one pass, the full
:func:`~dkuxnet.losses.semi_supervised_loss`, the optimiser step — on volumes resident on the
device: by default synthetic random volumes (a "no data loading" mode, as nnU-Net's
``nnUNetTrainerBenchmark_5epochs_noDataLoading``), or the first cases of an LA folder. For each preset
it reports

* the median ms per step after warm-up (``torch.cuda.synchronize`` around each timed step — only
  here, never in training),
* the peak memory (``torch.cuda.max_memory_allocated``, GiB),
* FLOPs of one step (forward + backward + optimiser) counted by ``torch.utils.flop_counter.FlopCounterMode``
  and the achieved TFLOP/s against the card's dense bf16 peak (nanoGPT's MFU habit). The counter
  overcounts grouped-convolution backward (``engineering.md`` B.5), so treat the MFU as an upper bound;
* seconds per LA-shaped test volume (175×132×88; scaled with the patch for small presets) through
  :func:`dkuxnet.inference.predict_protocol` (UA-MT grid, stride 18/18/4, batched windows).
"""

from __future__ import annotations

import datetime
import json
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from dkuxnet.config import Config, get_preset
from dkuxnet.data import VolumeBank, make_split, read_case
from dkuxnet.engine import (
    build_run, configure_backends, device_name, effective_unlabeled_bs, git_commit, resolve_device, train_step,
    write_json,
)
from dkuxnet.inference import predict_protocol, protocol_windows

LA_TEST_SHAPE = (175, 132, 88)  # protocol.md §2.1 example case; 45 windows at 112×112×80
LA_PATCH = (112, 112, 80)
PEAK_BF16_TFLOPS = (  # dense bf16 tensor-core peak per card (datasheets); first substring match wins
    ("H100", 989.0), ("H200", 989.0), ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("T4", 65.0),
)
SYNTHETIC_CASES = 4  # labeled and unlabeled volumes each in the synthetic bank


def peak_tflops(name: str) -> float | None:
    """Dense bf16 peak of a card from its name (H100 989, A100 312, L4 121, T4 65 …), else None."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def scaled_shape(patch: tuple[int, int, int]) -> tuple[int, int, int]:
    """LA test-volume shape scaled by patch / 112×112×80 (the LA shape itself at the LA patch)."""
    return tuple(round(s * p / q) for s, p, q in zip(LA_TEST_SHAPE, patch, LA_PATCH))  # type: ignore[return-value]


def bench_config(preset: str, device: torch.device, overrides: dict[str, Any] | None = None) -> Config:
    """The preset as trained; on CPU presets other than ``tiny`` run at ``tiny``'s patch to stay fast.

    ``overrides`` (dotted ``Config.override`` keys) are applied last.
    """
    cfg = get_preset(preset)
    if device.type == "cpu" and preset != "tiny":
        cfg = cfg.override(**{"data.patch_size": get_preset("tiny").data.patch_size})
    return cfg.override(**overrides) if overrides else cfg


def synthetic_bank(shape: tuple[int, int, int], n: int, device: torch.device, seed: int = 0) -> VolumeBank:
    """``n`` random z-scored volumes with blob labels (foreground where smoothed noise is high)."""
    gen = torch.Generator().manual_seed(seed)
    images = [torch.randn((1, *shape), generator=gen) for _ in range(n)]  # 1×X×Y×Z each
    pooled = [torch.nn.functional.avg_pool3d(im[None], 5, 1, 2)[0, 0] for im in images]  # X×Y×Z
    labels = [(p > p.quantile(0.8)).to(torch.uint8) for p in pooled]
    return VolumeBank(images=images, labels=labels, ids=[f"synthetic{i}" for i in range(n)]).to(device)


def saved_tensor_bytes_by_part(
    fn: Callable[[], Any], parts: Mapping[str, torch.nn.Module], exclude: Iterable[torch.Tensor] = (),
    outside: str = "other",
) -> dict[str, int]:
    """Bytes of the distinct storages autograd keeps for backward while ``fn()`` runs, by part.

    Each storage is attributed to the innermost module of ``parts`` (name → module) whose forward was
    running when autograd saved it, else to ``outside``. Storages of ``exclude`` (the parameters) are not
    counted; nor is what a non-reentrant checkpoint inside ``fn`` recomputes in backward (its own hooks
    take precedence). The activation memory a training step holds between forward and backward, on any
    device (engineering.md B.2).
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, tuple[str, int]] = {}
    stack = [outside]
    handles = []
    for name, module in parts.items():
        handles.append(module.register_forward_pre_hook(lambda m, args, n=name: stack.append(n)))
        handles.append(module.register_forward_hook(lambda m, args, out: stack.pop() and None))

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip and storage.data_ptr() not in seen:
            seen[storage.data_ptr()] = (stack[-1], storage.nbytes())
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
    finally:
        for handle in handles:
            handle.remove()
    out: dict[str, int] = {}
    for name, nbytes in seen.values():
        out[name] = out.get(name, 0) + nbytes
    return out


def saved_tensor_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Total of :func:`saved_tensor_bytes_by_part`: the bytes autograd keeps for backward from ``fn()``."""
    return sum(saved_tensor_bytes_by_part(fn, {}, exclude).values())


def _bench_data(cfg: Config, device: torch.device, data_dir: Path | None) -> tuple[VolumeBank, int, torch.Tensor]:
    """Bank (labeled first) + number labeled + one test volume, synthetic or from ``data_dir``."""
    if data_dir is None:
        bank = synthetic_bank(scaled_shape(cfg.data.patch_size), 2 * SYNTHETIC_CASES, device)
        return bank, SYNTHETIC_CASES, bank.images[0][0]
    split = make_split(Path(data_dir), labeled_num=SYNTHETIC_CASES)
    ids = split.labeled + split.unlabeled[:SYNTHETIC_CASES]
    bank = VolumeBank.load(Path(data_dir), ids, progress=False).to(device)
    image, _ = read_case(Path(data_dir), split.test[0])
    return bank, len(split.labeled), torch.from_numpy(image)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_preset(
    preset: str, device: torch.device, steps: int, warmup: int, data_dir: Path | None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Time one preset's training step and protocol inference on ``device``.

    The first warm-up step runs under ``FlopCounterMode`` (an extra untimed step when ``warmup == 0``).
    """
    cfg = bench_config(preset, device, overrides)
    configure_backends(cfg.train, device)
    bank, n_labeled, volume = _bench_data(cfg, device, data_dir)
    run = build_run(cfg, bank, n_labeled, device)
    with FlopCounterMode(display=False) as counter:
        train_step(run)
    for _ in range(warmup - 1):
        train_step(run)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        train_step(run)
        _sync(device)
        times.append(1000 * (time.perf_counter() - t0))
    ms = statistics.median(times)
    flops = counter.get_total_flops()
    peak = peak_tflops(device_name(device)) if device.type == "cuda" else None
    achieved = flops / (ms / 1000) / 1e12
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    amp = device.type == "cuda" and cfg.train.precision == "bf16"
    run.model.eval()
    predict_protocol(run.model, volume, patch=cfg.data.patch_size, device=device, amp=amp)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    predict_protocol(run.model, volume, patch=cfg.data.patch_size, device=device, amp=amp)
    _sync(device)
    infer_s = time.perf_counter() - t0
    views, n_lab, n_unl = cfg.data.views, cfg.data.labeled_bs, effective_unlabeled_bs(cfg)
    return {
        "config": cfg.to_dict(),
        "batch": {"views": views, "labeled": n_lab, "unlabeled": n_unl, "volumes": views * (n_lab + n_unl)},
        "patch": list(cfg.data.patch_size),
        "precision": "bf16 autocast" if amp else "fp32",
        "ms_per_step": ms,
        "ms_steps": times,
        "peak_gib": peak_gib,
        "tflop_per_step": flops / 1e12,
        "tflops_achieved": achieved,
        "peak_tflops_bf16": peak,
        "mfu": achieved / peak if peak else None,
        "infer_volume_shape": list(volume.shape),
        "infer_windows": len(protocol_windows(tuple(volume.shape), cfg.data.patch_size)),
        "infer_s_per_volume": infer_s,
    }


def run_bench(
    presets: list[str] | str | None = None,
    device: str | torch.device | None = None,
    out: Path | None = None,
    data_dir: Path | None = None,
    steps: int | None = None,
    warmup: int | None = None,
    overrides: dict[str, Any] | None = None,
    variants: dict[str, tuple[str, dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Benchmark training step and inference of each preset; optionally write the JSON to ``out``.

    Args:
        presets: preset names; default ``["paper", "vnet"]`` on CUDA, ``["tiny", "vnet"]`` on CPU
            (``vnet`` at ``tiny``'s patch there).
        device: default cuda if available, else cpu.
        out: JSON file to write atomically.
        data_dir: LA folder: its first cases replace the synthetic volumes, its first test case the
            synthetic inference volume.
        steps: timed steps (default 8 on CUDA, 2 on CPU).
        warmup: untimed steps first (default 3 on CUDA, 1 on CPU; at least one runs, FLOP-counted).
        overrides: dotted config changes applied to every preset (e.g. a smaller ``data.patch_size``).
        variants: more rows, label → (preset, its own dotted changes, applied after ``overrides``), e.g.
            ``{"paper, no checkpointing": ("paper", {"model.checkpoint_activations": False})}``.

    Returns:
        ``device``, ``torch``, ``cuda``, ``cudnn``, ``commit``, ``date``, ``steps``, ``warmup``,
        ``data`` and ``presets`` = {name: numbers of :func:`bench_preset`, or ``{"error": …}`` when that
        row failed (out of memory, or any other error: the other rows still run)}.
    """
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    default = ["paper", "vnet"] if cuda else ["tiny", "vnet"]
    names = [presets] if isinstance(presets, str) else list(presets or default)
    steps = steps if steps is not None else (8 if cuda else 2)
    warmup = warmup if warmup is not None else (3 if cuda else 1)
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    rows = {name: (name, {}) for name in names} | dict(variants or {})
    results: dict[str, Any] = {}
    for label, (name, changes) in rows.items():
        try:
            results[label] = bench_preset(
                name, dev, steps, warmup, Path(data_dir) if data_dir else None, {**(overrides or {}), **changes}
            )
        except torch.cuda.OutOfMemoryError as exc:
            results[label] = {"error": f"out of memory: {str(exc).splitlines()[0]}"}
        except Exception as exc:  # one failing variant must not lose the others' numbers (GPU time is scarce)
            results[label] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        if cuda:
            torch.cuda.empty_cache()
    result = {
        "device": device_name(dev),
        "device_type": dev.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "steps": steps,
        "warmup": max(warmup, 1),
        "overrides": overrides or {},
        "data": str(data_dir) if data_dir else "synthetic (no data loading)",
        "presets": results,
    }
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(out), result)
    return result


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _bench_section(path: Path, d: dict[str, Any]) -> list[str]:
    versions = f"torch {d.get('torch')}, CUDA {d.get('cuda')}, cuDNN {d.get('cudnn')}"
    lines = [
        f"**{d.get('device')}** ({versions}; commit `{str(d.get('commit'))[:12]}`, {d.get('date')}; "
        f"median of {d.get('steps')} steps after {d.get('warmup')} warm-up; data: {d.get('data')}; "
        f"file `{path.name}`)",
        "",
        "| preset / variant | batch (volumes) | patch | ms per step | peak GiB | TFLOP per step | TFLOP/s | MFU "
        "| protocol inference s / volume |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in d.get("presets", {}).items():
        if "error" in r:
            lines.append(f"| {name} | | | {r['error'][:80]} | | | | | |")
            continue
        lines.append(
            f"| {name} | {r['batch']['volumes']} | {'×'.join(map(str, r['patch']))} | {r['ms_per_step']:.1f} "
            f"| {_fmt(r['peak_gib'], '.1f')} | {r['tflop_per_step']:.2f} | {r['tflops_achieved']:.1f} "
            f"| {_fmt(r['mfu'], '.1%')} | {r['infer_s_per_volume']:.2f} |"
        )
    return lines + [""]


def _memprobe_section(path: Path, d: dict[str, Any]) -> list[str]:
    lines = [
        f"**CPU estimate** ({d.get('method')}; commit `{str(d.get('commit'))[:12]}`, torch {d.get('torch')}, "
        f"{d.get('date')}; file `{path.name}`): not a GPU measurement.",
        "",
    ]
    rows = d.get("rows", [])
    if rows:
        lines += [
            f"| variant (measured at {rows[0]['batch']} × {'×'.join(map(str, rows[0]['patch']))}) | kept after forward "
            f"| peak | estimated peak at {'×'.join(map(str, rows[0]['estimate_at']))} |",
            "| --- | --- | --- | --- |",
        ]
    for r in rows:
        variant = ", ".join(f"`{k}={json.dumps(v)}`" for k, v in r["overrides"].items()) or "as preset"
        lines.append(
            f"| `{r['preset']}`, {variant} | {r['saved_bytes_per_voxel'] / 1000:.1f} kB / voxel "
            f"| {r['peak_bytes_per_voxel'] / 1000:.1f} kB / voxel | ≈ {r['estimated_peak_gib']:.0f} GiB |"
        )
    return lines + [""] + _breakdown_table(d.get("rows", []))


def _breakdown_table(rows: list[dict[str, Any]], top: int = 12) -> list[str]:
    """Kept bytes per voxel by model part, one column per variant; the ``top`` largest parts, then the rest."""
    rows = [r for r in rows if r.get("saved_bytes_per_voxel_by_part")]
    if not rows:
        return []
    first = rows[0]["saved_bytes_per_voxel_by_part"]
    names = list(first)[:top]
    heads = [", ".join(f"`{k.split('.')[-1]}={json.dumps(v)}`" for k, v in r["overrides"].items()) or r["preset"]
             for r in rows]
    lines = [
        "Where the kept bytes are saved (the part whose forward saved each tensor first; the loss and the "
        "model's output operations count as parts), kB per voxel:",
        "",
        "| part | " + " | ".join(heads) + " |",
        "| --- |" + " --- |" * len(rows),
    ]
    for name in [*names, "other parts"]:
        cells = []
        for r in rows:
            parts = r["saved_bytes_per_voxel_by_part"]
            value = sum(v for k, v in parts.items() if k not in names) if name == "other parts" else parts.get(name, 0.0)
            cells.append(f"{value / 1000:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def perf_report(folder: Path) -> str:
    """Markdown for the book's performance page from the committed files of ``folder`` (``results/perf``).

    ``bench_*.json`` (:func:`run_bench` output, one per card): a table per file, its card, software
    versions, commit and date in the caption. ``memprobe*.json`` (``tools/memprobe.py``): the CPU estimate
    of activation memory. Without a bench file the text says that no GPU benchmark is committed.
    """
    folder = Path(folder)
    benches = sorted(folder.glob("bench_*.json"))
    lines = ["### GPU benchmarks of this package", ""]
    for path in benches:
        lines += _bench_section(path, json.loads(path.read_text(encoding="utf-8")))
    if not benches:
        lines += ["No GPU benchmark of this package has been committed yet (`results/perf/bench_<card>.json`).", ""]
    probes = sorted(folder.glob("memprobe*.json"))
    if probes:
        lines += ["### Activation memory, estimated on the CPU", ""]
        for path in probes:
            lines += _memprobe_section(path, json.loads(path.read_text(encoding="utf-8")))
    return "\n".join(lines)
