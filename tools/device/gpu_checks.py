#!/usr/bin/env python3
"""The GPU measurements of issues #3, #4, #5 and #7 in one script, stage by stage, for a short device lease.

Stages (comma-separated ``--stages``; each writes into ``--out`` and never stops the next one on error):

* ``env``      card, driver, torch / CUDA / cuDNN versions, commit;
* ``smoke``    the ``tiny`` preset's training step and protocol inference on the device (finds CUDA-path
               bugs in seconds, before the expensive stages), and the host syncs of the training step
               (``torch.cuda.set_sync_debug_mode("warn")``; the list should be empty), and the relative
               error of the device's fp32 and bf16 outputs against float64 on the CPU;
* ``fwdbwd``   (#3) forward + backward of the model at 1×1×112×112×80 with the supervised loss, bf16
               autocast: median ms and peak GiB, with and without activation checkpointing;
* ``bench``    (#7) :func:`dkuxnet.bench.run_bench` on synthetic volumes: the preset's training step
               (2 views × (2 + 2)) as configured, with checkpointing toggled, at batch 1 + 1, in
               channels_last_3d (and compiled with ``--compile``), and ``vnet``; protocol inference
               s/volume for each;
* ``train``    (#4) ``dkuxnet train`` at ``--label-ratio`` on ``--data`` for ``--iterations`` (resumes
               when the run folder already holds a checkpoint, so a long run spans several commands);
* ``eval``     (#5) ``dkuxnet evaluate --mode protocol`` of the train stage's checkpoint on the 20 test
               volumes, and (#7) the batched protocol prediction against the UA-MT window-by-window
               loop (batch 1, fp32, host accumulation) on ``--loop-cases`` test volumes: Dice and time.

Files in ``--out`` (at most 8, small): ``checks.json`` (env, smoke, fwdbwd, bench, loop check),
``bench_<preset>.json``, ``train_summary.json`` (config included), ``train_metrics.jsonl``,
``eval_summary.json``, ``eval_per_case.csv``, ``result.json`` (the evaluated run in the ``results/`` schema,
schedule labelled "shortened"), ``commands.log`` (output of the dkuxnet commands). The script prints a short table last. On a CPU it rehearses everything with
``--preset tiny --patch 32 32 32`` on a phantom folder (tests/test_gpu_checks.py does that).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from dkuxnet.bench import run_bench, synthetic_bank  # noqa: E402
from dkuxnet.checkpoint import load_checkpoint  # noqa: E402
from dkuxnet.config import Config, get_preset  # noqa: E402
from dkuxnet.data import read_case  # noqa: E402
from dkuxnet.engine import build_run, train_step  # noqa: E402
from dkuxnet.inference import predict_protocol, resolve_device  # noqa: E402
from dkuxnet.losses import semi_supervised_loss  # noqa: E402
from dkuxnet.models import create_model  # noqa: E402
from dkuxnet.results import build_result, device_name, git_commit, save_result, write_json  # noqa: E402

STAGES = ("env", "smoke", "fwdbwd", "bench", "train", "eval")
CHECKPOINT_EVERY = 50  # train stage: a run cut off by the device command's limit resumes from here
RESULT_NOTE = ("check run of tools/device/gpu_checks.py: a short schedule that shows training and evaluation "
               "work on the real data; not a reproduction of the paper's numbers")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _peak_gib(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None


def stage_env(a: argparse.Namespace, dev: torch.device) -> dict[str, Any]:
    smi = shutil.which("nvidia-smi")
    return {
        "device": device_name(dev), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if dev.type == "cuda" else None, "commit": git_commit(),
        "nvidia_smi": subprocess.run([smi, "-L"], capture_output=True, text=True).stdout.strip() if smi else None,
        "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def host_syncs_in_step(cfg: Config, dev: torch.device, steps: int = 3) -> list[str]:
    """Messages of ``torch.cuda.set_sync_debug_mode("warn")`` during ``steps`` training steps after a warm-up
    step (empty = no host sync). On a CPU there is nothing to detect: always empty."""
    bank = synthetic_bank(tuple(cfg.data.patch_size), 4, dev)
    run = build_run(cfg, bank, 2, dev)
    train_step(run)
    if dev.type != "cuda":
        return []
    torch.cuda.synchronize(dev)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                train_step(run)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sorted({str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)})


def device_vs_cpu(cfg: Config, dev: torch.device) -> dict[str, float]:
    """‖out − ref‖ / ‖ref‖ of the eval-mode model on ``dev`` (fp32 with TF32 off, and bf16 autocast on CUDA)
    against the same weights and input in float64 on the CPU (METHOD.md "correct first"). The hard k-means assignment is
    discontinuous, so a few flipped voxels can make these larger than the precision alone would."""
    torch.manual_seed(0)
    model = create_model(cfg).eval()
    x = torch.randn(2, 1, *cfg.data.patch_size)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # true fp32, not TF32
    try:
        return _device_vs_cpu(model, x, dev)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _device_vs_cpu(model: torch.nn.Module, x: torch.Tensor, dev: torch.device) -> dict[str, float]:
    with torch.no_grad():
        ref = model.double()(x.double())
        model.float().to(dev)
        runs = {"fp32": lambda: model(x.to(dev))}
        if dev.type == "cuda":
            runs["bf16_autocast"] = lambda: _autocast_call(model, x.to(dev))
        out = {}
        for name, fn in runs.items():
            got = fn()
            for field in ("seg_logits", "query_probs"):
                r, g = getattr(ref, field), getattr(got, field).double().cpu()
                out[f"{name}.{field}"] = float((g - r).norm() / r.norm())
    return out


def _autocast_call(model: torch.nn.Module, x: torch.Tensor) -> Any:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return model(x)


def stage_smoke(a: argparse.Namespace, dev: torch.device) -> dict[str, Any]:
    small = {"data.patch_size": [32, 32, 32]}
    result = run_bench(presets=["tiny"], device=dev, steps=2, warmup=1, overrides=small)["presets"]["tiny"]
    checkpointed = get_preset("tiny").override(**small, **{"model.checkpoint_activations": True})  # paper's path
    result["host_syncs_in_step"] = host_syncs_in_step(checkpointed, dev)
    result["relative_error_vs_cpu_fp64"] = device_vs_cpu(get_preset("tiny").override(**small), dev)
    return result


def _fwdbwd(cfg: Config, dev: torch.device, patch: tuple[int, int, int], steps: int) -> dict[str, Any]:
    """Median ms and peak GiB of model forward + supervised loss + backward on one volume."""
    torch.manual_seed(0)
    model = create_model(cfg).to(dev).train()
    x = torch.randn(1, 1, *patch, device=dev)
    y = (torch.nn.functional.avg_pool3d(torch.randn(1, 1, *patch, device=dev), 5, 1, 2)[:, 0] > 0.1).long()
    loss_cfg = dataclasses.replace(cfg.loss, ablation="seg")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    times = []
    for i in range(steps + 2):
        _sync(dev)
        if i == 2 and dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        with amp:
            out = model(x)
        loss = semi_supervised_loss(out, y, 1, 1, loss_cfg, 0, model.group_sizes)[0]
        loss.backward()
        model.zero_grad(set_to_none=True)
        _sync(dev)
        times.append(1000 * (time.perf_counter() - t0))
    return {"ms": statistics.median(times[2:]), "ms_all": times, "peak_gib": _peak_gib(dev),
            "input": [1, 1, *patch], "precision": "bf16 autocast" if dev.type == "cuda" else "fp32"}


def stage_fwdbwd(a: argparse.Namespace, dev: torch.device) -> dict[str, Any]:
    out = {}
    for ckpt in (True, False):
        cfg = get_preset(a.preset).override(**{"model.checkpoint_activations": ckpt})
        try:
            out[f"checkpoint_activations={ckpt}"] = _fwdbwd(cfg, dev, tuple(a.patch), a.steps)
        except torch.cuda.OutOfMemoryError as exc:
            out[f"checkpoint_activations={ckpt}"] = {"error": f"out of memory: {str(exc).splitlines()[0]}"}
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


def stage_bench(a: argparse.Namespace, dev: torch.device) -> dict[str, Any]:
    patch = {"data.patch_size": list(a.patch)}
    ckpt = get_preset(a.preset).model.checkpoint_activations
    variants = {
        f"{a.preset}, {'no' if ckpt else 'with'} checkpointing": (a.preset, {"model.checkpoint_activations": not ckpt}),
        f"{a.preset}, batch 1+1": (a.preset, {"data.labeled_bs": 1, "data.unlabeled_bs": 1}),
        f"{a.preset}, channels_last_3d": (a.preset, {"train.channels_last": True}),
    }
    if a.compile:
        variants[f"{a.preset}, torch.compile"] = (a.preset, {"train.compile": True})
    result = run_bench(presets=[a.preset, "vnet"], device=dev, steps=a.steps, warmup=3, overrides=patch,
                       variants=variants)
    write_json(Path(a.out) / f"bench_{a.preset}.json", result)
    return result


def _dkuxnet(args: list[str], log: Path) -> None:
    cmd = [sys.executable, "-m", "dkuxnet", *args]
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd[2:4])} exited {done.returncode}; see {log}")


def stage_train(a: argparse.Namespace, dev: torch.device) -> dict[str, Any]:
    run, out = Path(a.run_dir), Path(a.out)
    args = ["train", "--preset", a.preset, "--label-ratio", str(a.label_ratio), "--data-dir", str(a.data),
            "--out", str(run), "--max-iterations", str(a.iterations), "--device", str(dev), "--seed", "1337",
            "--set", f"train.checkpoint_every={CHECKPOINT_EVERY}"]  # the same on every call: resume needs it
    if a.patch != list(get_preset(a.preset).data.patch_size):
        args += ["--set", f"data.patch_size={json.dumps(a.patch)}"]
    if (run / "last.pt").exists():
        args.append("--resume")
    try:
        _dkuxnet(args, out / "commands.log")
    finally:  # a run stopped by the command's time limit still leaves its loss curve
        if (run / "metrics.jsonl").exists():
            shutil.copy(run / "metrics.jsonl", out / "train_metrics.jsonl")
    shutil.copy(run / "summary.json", out / "train_summary.json")
    return json.loads((run / "summary.json").read_text())


def uamt_loop(model: torch.nn.Module, image: np.ndarray, patch: tuple[int, int, int], dev: torch.device,
              stride: tuple[int, int, int] = (18, 18, 4)) -> np.ndarray:
    """UA-MT ``test_single_case``: one window at a time, fp32, numpy accumulation on the host; K×X×Y×Z."""
    pads = [max(p - s, 0) for p, s in zip(patch, image.shape)]
    img = np.pad(image, [(q // 2, q - q // 2) for q in pads])
    starts = [[min(st * i, n - p) for i in range(math.ceil((n - p) / st) + 1)]
              for n, p, st in zip(img.shape, patch, stride)]
    score, cnt = None, np.zeros(img.shape, np.float32)
    model.eval()
    with torch.no_grad():
        for x in starts[0]:
            for y in starts[1]:
                for z in starts[2]:
                    win = (slice(x, x + patch[0]), slice(y, y + patch[1]), slice(z, z + patch[2]))
                    t = torch.from_numpy(np.ascontiguousarray(img[win]))[None, None].to(dev)
                    prob = torch.softmax(model(t).seg_logits.float(), dim=1)[0].cpu().numpy()
                    score = np.zeros((prob.shape[0], *img.shape), np.float32) if score is None else score
                    score[(slice(None), *win)] += prob
                    cnt[win] += 1
    score /= cnt[None]
    crop = tuple(slice(q // 2, q // 2 + s) for q, s in zip(pads, image.shape))
    return score[(slice(None), *crop)]


def stage_eval(a: argparse.Namespace, dev: torch.device) -> dict[str, Any]:
    run, out, ev = Path(a.run_dir), Path(a.out), Path(a.run_dir) / "eval"
    _dkuxnet(["evaluate", "--checkpoint", str(run / "last.pt"), "--data-dir", str(a.data), "--out", str(ev),
              "--mode", "protocol", "--device", str(dev)], out / "commands.log")
    for name in ("summary.json", "per_case.csv"):
        shutil.copy(ev / name, out / f"eval_{name}")
    summary = json.loads((ev / "summary.json").read_text())
    save_result(out / "result.json", build_result(summary, name=f"{a.preset}-ratio{a.label_ratio}-gpu-check",
                                                  notes=RESULT_NOTE))
    ckpt = load_checkpoint(run / "last.pt", map_location=dev)
    cfg = Config.from_dict(ckpt["config"])
    model = create_model(cfg).to(dev)
    model.load_state_dict(ckpt["model"])
    patch = tuple(cfg.data.patch_size)
    cases = (Path(a.data) / "test.list").read_text().split()[: a.loop_cases]
    rows = []
    for case in cases:
        image, _ = read_case(Path(a.data), case)
        timed = {}
        for name, fn in (
            ("loop", lambda: uamt_loop(model, image, patch, dev)[1]),
            ("batched_fp32", lambda: predict_protocol(model, image, patch=patch, device=dev, amp=False)[1].cpu().numpy()),
            ("batched_bf16", lambda: predict_protocol(model, image, patch=patch, device=dev, amp=True)[1].cpu().numpy()),
        ):
            _sync(dev)
            t0 = time.perf_counter()
            timed[name] = (fn() > 0.5, time.perf_counter() - t0)
        loop = timed["loop"][0]
        row = {"case": case, "loop_s": timed["loop"][1], "foreground_voxels": int(loop.sum())}
        for name in ("batched_fp32", "batched_bf16"):
            mask, seconds = timed[name]
            row |= {f"dice_{name}_vs_loop": _dice(mask, loop), f"{name}_s": seconds,
                    f"voxels_differing_{name}": int((mask ^ loop).sum())}
        rows.append(row)
    return {"eval_summary": summary, "loop_check": rows}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    denom = int(a.sum() + b.sum())
    return 2 * int((a & b).sum()) / denom if denom else 1.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", default="env,smoke,fwdbwd,bench", help=f"comma-separated, from {STAGES}")
    ap.add_argument("--out", required=True, help="output folder ($OUT on the device machine)")
    ap.add_argument("--data", default="/tmp/la", help="LA-layout folder (train and eval stages)")
    ap.add_argument("--run-dir", default="/tmp/dkuxnet_run", help="training run folder (kept between commands)")
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--patch", type=int, nargs=3, default=None, help="default: the preset's patch")
    ap.add_argument("--label-ratio", type=float, default=0.1)
    ap.add_argument("--iterations", type=int, default=300, help="train stage: total iterations of the run")
    ap.add_argument("--steps", type=int, default=8, help="timed steps in fwdbwd and bench")
    ap.add_argument("--loop-cases", type=int, default=2, help="eval stage: test volumes for the loop check")
    ap.add_argument("--compile", action="store_true", help="bench stage: also a torch.compile variant (slow start)")
    ap.add_argument("--device", default=None)
    a = ap.parse_args(argv)
    a.patch = list(a.patch or get_preset(a.preset).data.patch_size)
    stages = [s for s in a.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        ap.error(f"--stages: unknown {unknown}; choose from {STAGES}")
    dev = resolve_device(a.device)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"args": vars(a)}
    funcs: dict[str, Callable[[argparse.Namespace, torch.device], dict[str, Any]]] = {
        "env": stage_env, "smoke": stage_smoke, "fwdbwd": stage_fwdbwd, "bench": stage_bench,
        "train": stage_train, "eval": stage_eval,
    }
    failed = []
    for stage in stages:
        t0 = time.perf_counter()
        print(f"== {stage}", flush=True)
        try:
            report[stage] = funcs[stage](a, dev)
        except Exception as exc:  # a stage's failure is recorded; the next stage still runs
            report[stage] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
            failed.append(stage)
            print(report[stage]["traceback"], flush=True)
        report[stage]["stage_seconds"] = time.perf_counter() - t0
        write_json(Path(a.out) / "checks.json", report)
    print(summary_table(report))
    return 1 if failed else 0


def summary_table(report: dict[str, Any]) -> str:
    """A few lines with the numbers each issue asks for."""
    lines = [f"device: {report.get('env', {}).get('device', '?')}"]
    for stage in STAGES:
        r = report.get(stage)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"{stage}: FAILED {r['error'][:200]}")
        elif stage == "smoke":
            errors = {k: f"{v:.1e}" for k, v in r["relative_error_vs_cpu_fp64"].items()}
            lines.append(f"smoke: tiny step {r['ms_per_step']:.1f} ms; host syncs in the step: "
                         f"{len(r['host_syncs_in_step'])} {r['host_syncs_in_step'][:3]}; vs CPU fp64: {errors}")
        elif stage == "fwdbwd":
            lines += [f"fwdbwd {k}: {v.get('ms', float('nan')):.1f} ms, peak {v.get('peak_gib')} GiB"
                      if "error" not in v else f"fwdbwd {k}: {v['error'][:120]}" for k, v in r.items()
                      if isinstance(v, dict)]
        elif stage == "bench":
            for k, v in r["presets"].items():
                lines.append(f"bench {k}: " + (v["error"][:120] if "error" in v else
                             f"{v['ms_per_step']:.1f} ms/step, peak {v['peak_gib']} GiB, "
                             f"{v['infer_s_per_volume']:.2f} s/volume"))
        elif stage == "train":
            lines.append(f"train: {r.get('iterations')} its, {r.get('ms_per_step')} ms/step, peak {r.get('peak_gib')} GiB")
        elif stage == "eval":
            s = r["eval_summary"]
            means = {k: None if v["mean"] is None else round(v["mean"], 4) for k, v in s.get("metrics", {}).items()}
            lines.append(f"eval: {s.get('seconds_per_volume')} s/volume, failed {s.get('n_failed')}, means {means}")
            lines += [f"loop check {c['case']}: Dice vs loop fp32-batched {c['dice_batched_fp32_vs_loop']:.5f}, "
                      f"bf16-batched {c['dice_batched_bf16_vs_loop']:.5f}; s: loop {c['loop_s']:.2f}, "
                      f"fp32 {c['batched_fp32_s']:.2f}, bf16 {c['batched_bf16_s']:.2f}" for c in r["loop_check"]]
        lines.append(f"  ({stage}: {r.get('stage_seconds', 0):.0f} s)")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
