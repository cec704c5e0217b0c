"""Benchmark of the training step, of forward + backward and of protocol inference (``dkuxnet bench``).

:func:`run_bench` measures rows. Each row builds its own model on the device and reports the median
ms over its timed steps (``torch.cuda.synchronize`` around each timed step — only here, never in
training), the peak memory (``torch.cuda.max_memory_allocated``, GiB) and its own wall time:

* ``step`` rows time :func:`dkuxnet.engine.train_step` — the code :func:`dkuxnet.train.train` runs:
  sampling and augmentation on the device, both views in one pass, the full
  :func:`~dkuxnet.losses.semi_supervised_loss`, the optimiser step — on volumes resident on the device
  (synthetic random volumes by default, a "no data loading" mode as nnU-Net's
  ``nnUNetTrainerBenchmark_5epochs_noDataLoading``; or the first cases of an LA folder). The first
  warm-up step also counts FLOPs (``torch.utils.flop_counter``; it overcounts grouped-convolution
  backward, so the MFU against the card's dense bf16 peak is an upper bound);
* ``fwdbwd`` rows: forward + supervised loss + backward of one volume (no optimiser);
* ``infer`` rows: seconds per LA-shaped test volume (175×132×88, scaled with the patch for small
  patches) through :func:`dkuxnet.inference.predict_protocol` (UA-MT grid, stride 18/18/4).

The default rows (:func:`default_rows`) are the ``paper`` step at 2 views × (2 + 2) volumes, the same
step with activation checkpointing toggled, forward + backward of one volume, the ``vnet`` step,
protocol inference and the ``colab`` notebook profile's step. On the CPU they use the ``tiny`` preset
at a 32×32×16 patch (:data:`CPU_CHANGES`), so that CI rehearses the command in seconds.

Time budget. On CUDA the defaults are sized to finish within 120 s on an H100 / H200 (our estimate, about
80 s even if a ``paper`` step took 1.5 s): each row runs 2 untimed warm-up steps (the first one autotunes cuDNN),
then at most 5 timed steps and stops before a step that would end more than ``row_seconds`` (5 s)
after the first timed step began (at least one step is always timed; ``steps_timed`` records how
many were). cuDNN autotuning is capped with ``torch.backends.cudnn.benchmark_limit`` =
:data:`CUDNN_BENCHMARK_LIMIT` (1: each convolution shape runs cuDNN's first heuristic choice once,
instead of up to 10 candidates, torch's default, which cost 33 s in the first ``paper`` step at batch
1 on an H200); ``first_step_s`` records what the first step cost per row. Training keeps torch's default.
``profile`` adds one step under ``torch.profiler`` after the timed ones, outside the budget.
"""

from __future__ import annotations

import contextlib
import gc
import re
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from dkuxnet.config import Config, get_preset
from dkuxnet.data import VolumeBank, make_split, read_case
from dkuxnet.data.resample import downsample_image
from dkuxnet.engine import (
    build_run, configure_backends, device_name, effective_unlabeled_bs, resolve_device, train_step, write_json,
)
from dkuxnet.inference import predict_protocol, protocol_windows
from dkuxnet.losses import semi_supervised_loss
from dkuxnet.models import create_model
from dkuxnet.perf.core import environment, is_out_of_memory, peak_gib, reset_peak, synchronize, timed_calls
from dkuxnet.perf.report import summary_line
from dkuxnet.reproduce import COLAB_CHANGES

LA_TEST_SHAPE = (175, 132, 88)  # an example LA test case; 45 windows of the UA-MT grid at 112×112×80
LA_PATCH = (112, 112, 80)
CPU_CHANGES = {  # every row on the CPU: a small patch (divisible by 16 for V-Net), fewer voxel-level NT-Xent samples
    "data.patch_size": (32, 32, 16), "loss.voxel_samples": 512,
}
PEAK_BF16_TFLOPS = (  # dense bf16 tensor-core peak per card (datasheets); first substring match wins
    ("H100", 989.0), ("H200", 989.0), ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("T4", 65.0),
)
SYNTHETIC_CASES = 4  # labeled and unlabeled volumes each in the synthetic bank
INFER_BATCH = 4  # windows per forward pass in predict_protocol (its default)
CUDNN_BENCHMARK_LIMIT = 1  # cuDNN algorithms tried per convolution shape in the bench (torch's default: 10)
DEFAULTS = {  # device type -> (timed steps, warm-up steps, seconds of timed steps per row)
    "cuda": (5, 2, 5.0),
    "cpu": (1, 1, 1.0),
}
PROFILE_TOP = 25
KINDS = ("step", "fwdbwd", "infer")
# opt-in rows (--variants): name -> (preset, or None for the default rows' preset; label; dotted changes)
VARIANTS: dict[str, tuple[str | None, str, dict[str, Any]]] = {
    "channels-last": (None, "channels_last_3d", {"train.channels_last": True}),
    "depthwise-channels-last": (None, "depthwise convolutions channels_last", {"model.depthwise_conv": "channels_last"}),
    "batch-1+1": (None, "batch 1+1 per view", {"data.labeled_bs": 1, "data.unlabeled_bs": 1}),
    "compile": (None, "torch.compile", {"train.compile": True}),
    "fp32": (None, "fp32", {"train.precision": "fp32"}),
    "official": ("official", "official preset", {}),
}


@dataclass(frozen=True)
class Row:
    """One measurement: ``kind`` (:data:`KINDS`) of ``preset`` with dotted config ``changes``.

    ``infer`` (step rows only) also times protocol inference with the row's model.
    """

    label: str
    kind: str
    preset: str
    changes: Mapping[str, Any] = field(default_factory=dict)
    infer: bool = False


def default_rows(preset: str) -> list[Row]:
    """The rows of a plain ``dkuxnet bench`` for ``preset`` (``paper`` on CUDA, ``tiny`` on the CPU)."""
    ckpt = get_preset(preset).model.checkpoint_activations
    return [
        Row(preset, "step", preset),
        Row(f"{preset}, checkpointing {'off' if ckpt else 'on'}", "step", preset,
            {"model.checkpoint_activations": not ckpt}),
        Row(f"{preset}, forward+backward, 1 volume", "fwdbwd", preset),
        Row("vnet", "step", "vnet"),
        Row(f"{preset}, protocol inference", "infer", preset),
        Row(f"colab profile ({preset})", "step", preset, dict(COLAB_CHANGES)),
    ]


def cpu_track_rows() -> list[Row]:
    """The CPU track (``dkuxnet bench --cpu-track``), every row at the ``cpu`` preset's own patch and grid.

    The ``cpu`` step with the fast depthwise conv (its default on the CPU) and with PyTorch's native one,
    side by side; the same step without ``channels_last_3d``, and with neither (the code before the fast
    path); the V-Net step (4 volumes, the field's
    baseline) on the same patch; and protocol inference. Compare steps by ``ms_per_volume``: a DKUXNet
    step trains 2 views × (2 + 2) = 8 volumes, a V-Net step 4.
    """
    cpu = get_preset("cpu").data
    own = {"data.patch_size": tuple(cpu.patch_size), "data.resample": cpu.resample}
    return [
        Row("cpu", "step", "cpu", own),
        Row("cpu, depthwise native", "step", "cpu", {**own, "model.depthwise_conv": "native"}),
        Row("cpu, contiguous layout", "step", "cpu", {**own, "train.channels_last": False}),
        Row("cpu, before (native, contiguous)", "step", "cpu",
            {**own, "model.depthwise_conv": "native", "train.channels_last": False}),
        Row("vnet, cpu patch", "step", "vnet", own),
        Row("cpu, protocol inference", "infer", "cpu", own),
    ]


def variant_rows(names: Iterable[str], preset: str) -> list[Row]:
    """Opt-in step rows from :data:`VARIANTS`; an unknown name raises ``ValueError`` naming the choices."""
    rows = []
    for name in names:
        if name not in VARIANTS:
            raise ValueError(f"variants: unknown variant {name!r}; choose from {sorted(VARIANTS)}")
        base, label, changes = VARIANTS[name]
        rows.append(Row(f"{base or preset}, {label}", "step", base or preset, changes))
    return rows


def peak_tflops(name: str) -> float | None:
    """Dense bf16 peak of a card from its name (H100 989, A100 312, L4 121, T4 65 …), else None."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def scaled_shape(patch: tuple[int, int, int]) -> tuple[int, int, int]:
    """LA test-volume shape scaled by patch / 112×112×80 (the LA shape itself at the LA patch)."""
    return tuple(round(s * p / q) for s, p, q in zip(LA_TEST_SHAPE, patch, LA_PATCH))  # type: ignore[return-value]


def default_out(device: str | torch.device | None = None) -> Path:
    """``bench_<device>.json`` in the working folder, e.g. ``bench_nvidia-h200.json``."""
    name = device_name(resolve_device(device)).split(" (")[0]
    return Path(f"bench_{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}.json")


def bench_config(preset: str, device: torch.device, overrides: Mapping[str, Any] | None = None) -> Config:
    """The preset as trained; on the CPU with :data:`CPU_CHANGES` to stay fast. ``overrides`` (dotted) come last."""
    cfg = get_preset(preset)
    if device.type == "cpu":
        cfg = cfg.override(**CPU_CHANGES)
    return cfg.override(**overrides) if overrides else cfg


def synthetic_bank(shape: tuple[int, int, int], n: int, device: torch.device, seed: int = 0) -> VolumeBank:
    """``n`` random z-scored volumes with blob labels (foreground where smoothed noise is high)."""
    gen = torch.Generator().manual_seed(seed)
    images = [torch.randn((1, *shape), generator=gen) for _ in range(n)]  # 1×X×Y×Z each
    pooled = [torch.nn.functional.avg_pool3d(im[None], 5, 1, 2)[0, 0] for im in images]  # X×Y×Z
    labels = [(p > p.quantile(0.8)).to(torch.uint8) for p in pooled]
    return VolumeBank(images=images, labels=labels, ids=[f"synthetic{i}" for i in range(n)]).to(device)


def _amp(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast as in training (CUDA and ``train.precision == "bf16"``); the CPU runs fp32."""
    if device.type == "cuda" and cfg.train.precision == "bf16":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _precision(cfg: Config, device: torch.device) -> str:
    return "bf16 autocast" if device.type == "cuda" and cfg.train.precision == "bf16" else "fp32"


@dataclass(frozen=True)
class Budget:
    """Step counts and caps shared by every row of one :func:`run_bench`."""

    steps: int
    warmup: int  # >= 1: the first warm-up step also autotunes cuDNN and counts FLOPs
    row_seconds: float


def measure(
    step: Callable[[], Any], device: torch.device, budget: Budget, count_flops: bool, profile: bool = False,
) -> dict[str, Any]:
    """Warm up, then time ``step`` within ``budget``; optionally one more step under ``torch.profiler``."""
    reset_peak(device)
    t0 = time.perf_counter()
    counter = FlopCounterMode(display=False) if count_flops else None
    with counter or contextlib.nullcontext():
        step()
    synchronize(device)
    first_s = time.perf_counter() - t0
    for _ in range(budget.warmup - 1):
        step()
    synchronize(device)
    peak_warmup = peak_gib(device)
    reset_peak(device)
    times = timed_calls(step, device, budget.steps, budget.row_seconds)
    out: dict[str, Any] = {
        "ms_per_step": statistics.median(times), "ms_steps": times, "steps_timed": len(times),
        "first_step_s": first_s, "peak_gib": peak_gib(device), "peak_gib_with_warmup": peak_warmup,
        "tflop_per_step": counter.get_total_flops() / 1e12 if counter else None,
    }
    if profile:
        out["profile"] = profile_call(step, device)
    return out


def profile_call(fn: Callable[[], Any], device: torch.device, top: int = PROFILE_TOP) -> dict[str, Any]:
    """``torch.profiler`` of one call of ``fn``: the ``top`` operators (with input shapes) and kernels.

    On CUDA both tables are sorted by self CUDA time (an operator's self CUDA time is that of the
    kernels it launched itself); on the CPU there are no kernels and operators are sorted by self CPU time.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with torch_profile(activities=activities, record_shapes=True) as prof:
        fn()
        synchronize(device)
    events = prof.key_averages(group_by_input_shape=True)

    def self_us(e: Any) -> float:
        return float(e.self_device_time_total if cuda else e.self_cpu_time_total)

    kernels = [e for e in events if e.device_type != DeviceType.CPU]
    total_us = sum(self_us(e) for e in (kernels if cuda else events))

    def table(rows: list[Any], shapes: bool) -> list[dict[str, Any]]:
        rows = sorted((e for e in rows if self_us(e) > 0), key=self_us, reverse=True)[:top]
        return [{"name": e.key, "self_ms": self_us(e) / 1000, "percent": 100 * self_us(e) / max(total_us, 1e-9),
                 "calls": e.count, **({"input_shapes": e.input_shapes} if shapes else {})} for e in rows]

    return {
        "sort_by": "self CUDA time" if cuda else "self CPU time (no CUDA on this device)",
        "total_ms": total_us / 1000,
        "operators": table([e for e in events if e.device_type == DeviceType.CPU], shapes=True),
        "kernels": table(kernels, shapes=False),
    }


def _bench_data(cfg: Config, device: torch.device, data_dir: Path | None) -> tuple[VolumeBank, int]:
    """Bank (labeled first) + number labeled, synthetic or the first cases of ``data_dir``."""
    if data_dir is None:
        return synthetic_bank(scaled_shape(cfg.data.patch_size), 2 * SYNTHETIC_CASES, device), SYNTHETIC_CASES
    split = make_split(Path(data_dir), labeled_num=SYNTHETIC_CASES)
    ids = split.labeled + split.unlabeled[:SYNTHETIC_CASES]
    bank = VolumeBank.load(Path(data_dir), ids, progress=False, resample=cfg.data.resample)
    return bank.to(device), len(split.labeled)


def _test_volume(cfg: Config, device: torch.device, data_dir: Path | None) -> torch.Tensor:
    """One LA-shaped inference volume: synthetic, or the first test case of ``data_dir`` (on the config's grid)."""
    if data_dir is None:
        return synthetic_bank(scaled_shape(cfg.data.patch_size), 1, device).images[0][0]
    image, _ = read_case(Path(data_dir), make_split(Path(data_dir), labeled_num=1).test[0])
    return downsample_image(image, cfg.data.resample)


def _inference(model: torch.nn.Module, volume: torch.Tensor, cfg: Config, device: torch.device,
               budget: Budget) -> dict[str, Any]:
    """Seconds per volume of :func:`predict_protocol`, after a warm-up forward of each batch shape it uses."""
    patch, amp = cfg.data.patch_size, _precision(cfg, device) != "fp32"
    n = len(protocol_windows(tuple(volume.shape), patch))
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    with torch.inference_mode(), _amp(cfg, device):
        for batch in sorted({min(INFER_BATCH, n), n % INFER_BATCH} - {0}):
            model(torch.zeros((batch, 1, *patch), device=device))
    synchronize(device)
    warmup_s = time.perf_counter() - t0
    model.train(was_training)
    seconds = [ms / 1000 for ms in timed_calls(
        lambda: predict_protocol(model, volume, patch=patch, batch_size=INFER_BATCH, device=device, amp=amp),
        device, budget.steps, budget.row_seconds)]
    return {"infer_volume_shape": list(volume.shape), "infer_windows": n, "infer_warmup_s": warmup_s,
            "infer_s_per_volume": statistics.median(seconds), "infer_s_all": seconds}


def _flop_rates(result: dict[str, Any], device: torch.device) -> dict[str, Any]:
    flops = result["tflop_per_step"]
    achieved = flops / (result["ms_per_step"] / 1000) if flops is not None else None
    peak = peak_tflops(device_name(device)) if device.type == "cuda" else None
    return {"tflops_achieved": achieved, "peak_tflops_bf16": peak,
            "mfu": achieved / peak if peak and achieved is not None else None}


def _step_row(row: Row, cfg: Config, device: torch.device, budget: Budget, data_dir: Path | None,
              profile: bool) -> dict[str, Any]:
    bank, n_labeled = _bench_data(cfg, device, data_dir)
    run = build_run(cfg, bank, n_labeled, device)
    result = measure(lambda: train_step(run), device, budget, count_flops=not cfg.train.compile, profile=profile)
    views, n_lab, n_unl = cfg.data.views, cfg.data.labeled_bs, effective_unlabeled_bs(cfg)
    volumes = views * (n_lab + n_unl)
    result |= _flop_rates(result, device) | {
        "batch": {"views": views, "labeled": n_lab, "unlabeled": n_unl, "volumes": volumes},
        "ms_per_volume": result["ms_per_step"] / volumes}
    if row.infer:
        result |= _inference(run.model, _test_volume(cfg, device, data_dir), cfg, device, budget)
    return result


def _fwdbwd_row(cfg: Config, device: torch.device, budget: Budget, profile: bool) -> dict[str, Any]:
    """Forward + supervised loss (L_seg: one volume, one view) + backward; gradients reset, no optimiser."""
    torch.manual_seed(cfg.train.seed)
    model = create_model(cfg).to(device).train()
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    forward = torch.compile(model) if cfg.train.compile else model
    patch = cfg.data.patch_size
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed)
    x = torch.randn((1, 1, *patch), device=device, generator=gen)
    y = (torch.nn.functional.avg_pool3d(x, 5, 1, 2)[:, 0] > 0.1).long()  # blob labels, 1×X×Y×Z

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with _amp(cfg, device):
            out = forward(x)
        semi_supervised_loss(out, y, 1, 1, cfg.loss, 0, model.group_sizes)[0].backward()

    result = measure(step, device, budget, count_flops=not cfg.train.compile, profile=profile)
    return result | _flop_rates(result, device) | {"batch": {"views": 1, "labeled": 1, "unlabeled": 0, "volumes": 1}}


def _infer_row(cfg: Config, device: torch.device, budget: Budget, data_dir: Path | None) -> dict[str, Any]:
    torch.manual_seed(cfg.train.seed)
    model = create_model(cfg).to(device)
    result = _inference(model, _test_volume(cfg, device, data_dir), cfg, device, budget)
    return result | {"first_step_s": result["infer_warmup_s"], "steps_timed": len(result["infer_s_all"]),
                     "peak_gib": peak_gib(device)}


def bench_row(row: Row, device: torch.device, budget: Budget, data_dir: Path | None = None,
              overrides: Mapping[str, Any] | None = None, profile: bool = False) -> dict[str, Any]:
    """Measure one row; raises what the row raises (:func:`run_bench` records it)."""
    if row.kind not in KINDS:
        raise ValueError(f"row.kind must be one of {KINDS}, got {row.kind!r}")
    t0 = time.perf_counter()
    cfg = bench_config(row.preset, device, {**(overrides or {}), **row.changes})
    configure_backends(cfg.train, device)
    reset_peak(device)
    if row.kind == "step":
        result = _step_row(row, cfg, device, budget, data_dir, profile)
    elif row.kind == "fwdbwd":
        result = _fwdbwd_row(cfg, device, budget, profile)
    else:
        result = _infer_row(cfg, device, budget, data_dir)
    head = {"kind": row.kind, "preset": row.preset, "changes": dict(row.changes), "config": cfg.to_dict(),
            "patch": list(cfg.data.patch_size), "precision": _precision(cfg, device)}
    return head | result | {"wall_s": time.perf_counter() - t0}


def _error(exc: BaseException) -> str:
    if is_out_of_memory(exc):
        return f"out of memory: {str(exc).splitlines()[0]}"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _rows(presets: list[str] | str | None, variants: Mapping[str, tuple[str, Mapping[str, Any]]] | Sequence[str] | None,
          base: str) -> list[Row]:
    if presets is not None:  # explicit presets: one training step + inference row each
        names = [presets] if isinstance(presets, str) else list(presets)
        rows = [Row(name, "step", name, infer=True) for name in names]
    else:
        rows = default_rows(base)
    if isinstance(variants, Mapping):  # custom rows: label -> (preset, dotted changes)
        rows += [Row(label, "step", name, dict(changes), infer=True) for label, (name, changes) in variants.items()]
    elif variants is not None:
        if isinstance(variants, str):
            raise ValueError(f"variants: expected a list of names or a mapping, got the string {variants!r}")
        rows += variant_rows(variants, base)
    labels = [row.label for row in rows]
    if len(set(labels)) != len(labels):
        raise ValueError(f"rows: duplicate labels in {labels}")
    return rows


def run_bench(
    presets: list[str] | str | None = None,
    device: str | torch.device | None = None,
    out: Path | None = None,
    data_dir: Path | None = None,
    steps: int | None = None,
    warmup: int | None = None,
    overrides: dict[str, Any] | None = None,
    variants: Mapping[str, tuple[str, Mapping[str, Any]]] | Sequence[str] | None = None,
    *,
    profile: bool | str = False,
    row_seconds: float | None = None,
    cudnn_benchmark_limit: int | None = CUDNN_BENCHMARK_LIMIT,
    log: Callable[[str], None] | None = None,
    cpu_track: bool = False,
) -> dict[str, Any]:
    """Measure the benchmark rows; optionally write the JSON to ``out``. A failing row is recorded, not raised.

    Args:
        presets: ``None``: the default rows (:func:`default_rows` of ``paper`` on CUDA, of ``tiny`` on the
            CPU). Preset names instead: one row per preset, its training step and protocol inference.
        device: default cuda if available, else cpu.
        out: JSON file to write atomically.
        data_dir: LA folder: its first cases replace the synthetic volumes, its first test case the
            synthetic inference volume.
        steps: most timed steps per row (default 5 on CUDA, 1 on the CPU).
        warmup: untimed steps first (default 2 on CUDA, 1 on the CPU; at least 1).
        overrides: dotted config changes applied to every row (e.g. a smaller ``data.patch_size``).
        variants: more rows: names of :data:`VARIANTS`, or a mapping label → (preset, its own dotted
            changes, applied after ``overrides``) for rows like those of ``presets``, e.g.
            ``{"paper, no checkpointing": ("paper", {"model.checkpoint_activations": False})}``.
        profile: ``True``: also profile one step of the first training-step row (``torch.profiler``,
            top :data:`PROFILE_TOP` operators with input shapes, and kernels); a label: of that row.
        row_seconds: seconds of timed steps per row before it stops early (default 5 on CUDA, 1 on the CPU).
        cudnn_benchmark_limit: ``torch.backends.cudnn.benchmark_limit`` during the bench (restored after);
            ``None`` leaves torch's setting.
        log: called with one line per finished row (e.g. ``print``).
        cpu_track: the rows of :func:`cpu_track_rows` (plus named ``variants``) instead of ``presets``.

    Returns:
        ``device``, ``torch``, ``cuda``, ``cudnn``, ``commit``, ``date``, ``steps``, ``warmup``,
        ``row_seconds``, ``cudnn_benchmark_limit``, ``data``, ``wall_s``, ``presets`` = {row label: its
        numbers (:func:`bench_row`), or ``{"error": …, "out_of_memory": bool}`` when it failed (out of
        memory, a config the code does not know, any error: the other rows still run)} and, when profiled,
        ``profile``.
    """
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    d_steps, d_warmup, d_seconds = DEFAULTS["cuda" if cuda else "cpu"]
    budget = Budget(steps=d_steps if steps is None else steps, warmup=max(d_warmup if warmup is None else warmup, 1),
                    row_seconds=d_seconds if row_seconds is None else row_seconds)
    if budget.steps < 1 or (warmup is not None and warmup < 0) or budget.row_seconds <= 0:
        raise ValueError(f"steps must be >= 1, warmup >= 0 and row_seconds > 0, got steps={steps}, "
                         f"warmup={warmup}, row_seconds={row_seconds}")
    if cudnn_benchmark_limit is not None and cudnn_benchmark_limit < 0:
        raise ValueError(f"cudnn_benchmark_limit must be >= 0 (0: try every algorithm), got {cudnn_benchmark_limit}")
    rows = cpu_track_rows() + variant_rows(variants or [], "cpu") if cpu_track else _rows(
        presets, variants, "paper" if cuda else "tiny")
    profiled = _profiled_label(profile, rows)
    t_start = time.perf_counter()
    cudnn = cuda and torch.backends.cudnn.is_available()
    previous_limit = torch.backends.cudnn.benchmark_limit if cudnn else None
    if cudnn and cudnn_benchmark_limit is not None:
        torch.backends.cudnn.benchmark_limit = cudnn_benchmark_limit
    results: dict[str, Any] = {}
    try:
        for row in rows:
            try:
                results[row.label] = bench_row(row, dev, budget, Path(data_dir) if data_dir else None, overrides,
                                               profile=row.label == profiled)
            except Exception as exc:  # one failing row must not lose the others' numbers
                results[row.label] = {"kind": row.kind, "preset": row.preset, "changes": dict(row.changes),
                                      "error": _error(exc), "out_of_memory": is_out_of_memory(exc)}
            if cuda:  # the next row starts with the device memory free (a failed row's frames may form cycles)
                if "error" in results[row.label]:
                    gc.collect()
                torch.cuda.empty_cache()
            if log is not None:
                log(summary_line(row.label, results[row.label]))
        limit = torch.backends.cudnn.benchmark_limit if cudnn else None
    finally:
        if cudnn:
            torch.backends.cudnn.benchmark_limit = previous_limit
    result = {
        **environment(dev),
        "steps": budget.steps,
        "warmup": budget.warmup,
        "row_seconds": budget.row_seconds,
        "cudnn_benchmark_limit": limit,
        "overrides": overrides or {},
        "data": f"the first cases of the LA folder {Path(data_dir).name!r}" if data_dir else "synthetic (no data loading)",
        "wall_s": time.perf_counter() - t_start,
        "presets": results,
    }
    if profiled is not None:
        row = results[profiled]
        result["profile"] = {"row": profiled, **row.pop("profile", {"error": row.get("error", "not profiled")})}
    if out is not None:
        write_json(Path(out), result)
    return result


def _profiled_label(profile: bool | str, rows: list[Row]) -> str | None:
    if profile is False:
        return None
    if profile is True:
        return next((r.label for r in rows if r.kind == "step"), rows[0].label)
    if profile not in [r.label for r in rows if r.kind != "infer"]:
        raise ValueError(f"profile: no training-step or forward+backward row named {profile!r}")
    return profile
