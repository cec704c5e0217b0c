"""CPU proxy of a training step's activation memory: what the GPU peak will be, before a GPU is at hand.

For each ``--set`` variant, a fresh process runs one forward (bf16 autocast on the CPU, fp32 islands as on
the GPU) + loss + backward of the real model and loss at a reduced patch, and a second one at twice its
depth; the two give, per voxel of the batch (2 views × (labeled + unlabeled) volumes) and as a constant
that does not grow with the patch (the bf16 weight copies autocast keeps):

* ``saved``: bytes autograd keeps between forward and backward, in total and by model part
  (:func:`saved_tensor_bytes_by_part`; the loss and the model-level output ops are parts too);
* ``peak``: the peak resident memory of the process above its level before the forward (with glibc's
  mmap threshold at 64 KiB, so that freed tensors leave the process at once and RSS follows live tensors).

Activation memory is linear in the voxel count, so ``constant + bytes/voxel × voxels`` extrapolates to 112×112×80.
Parameters, gradients and AdamW state (16 bytes per parameter) are added to the extrapolated peak.
This is an estimate, not a GPU measurement: CUDA autocast keeps a few more ops (layer_norm) in fp32,
and cuDNN workspaces and allocator fragmentation come on top.

3D convolutions under CPU autocast compute in fp32 here and keep their bf16 input and weight for backward,
as the bf16 CUDA kernels do (:class:`Bf16SavedConv3d`): torch's bf16 CPU convolution is a reference kernel,
hundreds of times slower than oneDNN's fp32 one on CPUs without AVX512-BF16. The saved bytes are those of
bf16 convolutions; the fp32 temporaries of each convolution add a little to the measured peak.

    python tools/memprobe.py --preset paper --patch 32 32 16 --set model.checkpoint_activations=false \\
        --set model.checkpoint_activations=true --set data.labeled_bs=1,data.unlabeled_bs=1 \\
        --out results/perf/memprobe_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _triple

TARGET_PATCH = (112, 112, 80)


def saved_tensor_bytes_by_part(
    fn: Callable[[], Any], parts: Mapping[str, torch.nn.Module], exclude: Iterable[torch.Tensor] = (),
    outside: str = "other",
) -> dict[str, int]:
    """Bytes of the distinct storages autograd keeps for backward while ``fn()`` runs, by part.

    Each storage is attributed to the innermost module of ``parts`` (name → module) whose forward was
    running when autograd saved it, else to ``outside``. Storages of ``exclude`` (the parameters) are not
    counted; nor is what a non-reentrant checkpoint inside ``fn`` recomputes in backward (its own hooks
    take precedence). The activation memory a training step holds between forward and backward, on any
    device (the book's performance page, "Activation memory: a CPU estimate").
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


def _bf16_saved_conv3d() -> Any:
    """``F.conv3d`` for the probe: under CPU autocast, computed in fp32, bf16 input and weight saved."""
    conv3d = F.conv3d

    class Bf16SavedConv3d(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any, w: Any, b: Any, stride: Any, padding: Any, dilation: Any, groups: int) -> Any:
            ctx.save_for_backward(x, w)
            ctx.conf = (stride, padding, dilation, groups, b is not None)
            with torch.autocast("cpu", enabled=False):
                y = conv3d(x.float(), w.float(), None if b is None else b.float(), stride, padding, dilation, groups)
            return y.to(x.dtype)

        @staticmethod
        def backward(ctx: Any, gy: Any) -> Any:
            x, w = ctx.saved_tensors
            stride, padding, dilation, groups, has_bias = ctx.conf
            mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]]
            gx, gw, gb = torch.ops.aten.convolution_backward(
                gy.float(), x.float(), w.float(), [w.shape[0]] if has_bias else None, stride, padding, dilation,
                False, [0, 0, 0], groups, mask)
            cast = [None if g is None else g.to(t.dtype) for g, t in ((gx, x), (gw, w), (gb, gy))]
            return (*cast, None, None, None, None)

    def patched(x: Any, w: Any, b: Any = None, stride: Any = 1, padding: Any = 0, dilation: Any = 1,
                groups: int = 1) -> Any:
        if not torch.is_autocast_enabled("cpu") or isinstance(padding, str):
            return conv3d(x, w, b, stride, padding, dilation, groups)
        dtype = torch.get_autocast_dtype("cpu")
        return Bf16SavedConv3d.apply(x.to(dtype), w.to(dtype), None if b is None else b.to(dtype), _triple(stride),
                                     _triple(padding), _triple(dilation), groups)

    return patched


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def probe(preset: str, patch: tuple[int, int, int], overrides: dict[str, object]) -> dict[str, object]:
    """One measurement in this process (run it in a fresh process: peak RSS is per process)."""
    from dkuxnet.config import get_preset
    from dkuxnet.engine import effective_unlabeled_bs
    from dkuxnet.losses import semi_supervised_loss
    from dkuxnet.models import DKUXNet, create_model, named_parts

    torch.nn.functional.conv3d = _bf16_saved_conv3d()
    # the GPU's depthwise path (the CPU's "auto" would pick the FFT function, whose saved tensors differ)
    cfg = get_preset(preset).override(**{"model.depthwise_conv": "native", **overrides})
    n_lab, views = cfg.data.labeled_bs, cfg.data.views
    batch = views * (n_lab + effective_unlabeled_bs(cfg))
    torch.manual_seed(0)
    model = create_model(cfg).train()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    x = torch.randn(batch, 1, *patch)
    y = (torch.rand(n_lab, *patch) > 0.7).long()

    class Loss(torch.nn.Module):  # a module only so that the breakdown can name the loss's share
        def forward(self, out: object) -> torch.Tensor:
            return semi_supervised_loss(out, y, n_lab, views, cfg.loss, 0, model.group_sizes)[0]

    loss = Loss()

    def step() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        return loss(out)

    base, t0 = _rss(), time.perf_counter()
    step().backward()  # first, so that the process's peak RSS belongs to this step
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    seconds = time.perf_counter() - t0
    named = {**(named_parts(model) if isinstance(model, DKUXNet) else {}), "loss": loss}
    by_part = saved_tensor_bytes_by_part(step, named, model.parameters(), outside="outputs (softmax, sums)")
    return {
        "preset": preset, "overrides": overrides, "batch": batch, "patch": list(patch),
        "voxels": batch * patch[0] * patch[1] * patch[2], "saved_bytes": sum(by_part.values()), "peak_bytes": peak,
        "saved_bytes_by_part": by_part, "parameters": sum(p.numel() for p in model.parameters()), "seconds": seconds,
    }


def fit(small: dict[str, Any], large: dict[str, Any]) -> dict[str, Any]:
    """Bytes per voxel (slope) and constant bytes (intercept) of two measurements at different patches.

    The constant part (bf16 copies of the weights that autocast saves, per-process overheads) does not grow
    with the patch; the estimate at 112×112×80 is ``constant + slope × voxels + 16 B × parameters``.
    """
    dv = large["voxels"] - small["voxels"]

    def line(a: float, b: float) -> tuple[float, float]:
        slope = (b - a) / dv
        return slope, a - slope * small["voxels"]

    saved, saved0 = line(small["saved_bytes"], large["saved_bytes"])
    peak, peak0 = line(small["peak_bytes"], large["peak_bytes"])
    parts = {k: line(small["saved_bytes_by_part"].get(k, 0), v)[0] for k, v in large["saved_bytes_by_part"].items()}
    batch = small["batch"]
    target = batch * TARGET_PATCH[0] * TARGET_PATCH[1] * TARGET_PATCH[2]
    return {
        "preset": small["preset"], "overrides": small["overrides"], "batch": batch,
        "patch": small["patch"], "patches": [small["patch"], large["patch"]],
        "saved_bytes_per_voxel": saved, "peak_bytes_per_voxel": peak,
        "constant_saved_bytes": saved0, "constant_peak_bytes": peak0,
        "saved_bytes_per_voxel_by_part": dict(sorted(parts.items(), key=lambda kv: -kv[1])),
        "parameters": small["parameters"], "seconds": small["seconds"] + large["seconds"],
        "estimate_at": [batch, 1, *TARGET_PATCH],
        "estimated_saved_gib": (saved0 + saved * target) / 2**30,
        "estimated_peak_gib": (max(peak0, 0.0) + peak * target + 16 * small["parameters"]) / 2**30,
    }


def _parse_set(text: str) -> dict[str, object]:
    from dkuxnet.cli import _parse_set as parse

    return parse([item for item in re.split(r",(?=\w+\.\w+=)", text) if item])  # commas inside [..] stay


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--patch", type=int, nargs=3, default=(32, 32, 16), metavar=("X", "Y", "Z"),
                    help="the smaller of the two patches (the other has twice its depth)")
    ap.add_argument("--set", action="append", default=[], metavar="K=V[,K=V]",
                    help="one variant per --set (dotted config keys); default: the preset as is")
    ap.add_argument("--out", type=Path, help="write the JSON here")
    ap.add_argument("--jobs", type=int, default=1, help="measurements run at the same time (one process each)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(probe(args.preset, tuple(args.patch), _parse_set(args.child))))
        return 0
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    x, y, z = args.patch
    variants = args.set or [""]

    def child(job: tuple[str, tuple[int, int, int]]) -> dict[str, Any]:
        variant, patch = job
        cmd = [sys.executable, "-m", "dkuxnet.perf.memprobe", "--preset", args.preset, "--patch", *map(str, patch),
               "--child", variant]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"memprobe: variant {variant!r} at {patch} failed:\n{done.stderr[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    jobs = [(variant, patch) for variant in variants for patch in ((x, y, 2 * z), (x, y, z))]  # larger first
    with ThreadPoolExecutor(args.jobs) as pool:  # each child is its own process: its peak RSS is its own
        done = list(pool.map(child, jobs))
    rows = []
    for i, variant in enumerate(variants):
        rows.append(fit(done[2 * i + 1], done[2 * i]))
        r = rows[-1]
        print(f"{args.preset} {variant or '(preset)'}: saved {r['saved_bytes_per_voxel']:.0f} B/voxel, "
              f"peak {r['peak_bytes_per_voxel']:.0f} B/voxel -> at {r['estimate_at']}: "
              f"~{r['estimated_peak_gib']:.1f} GiB peak (CPU proxy)", flush=True)
    if args.out:
        from dkuxnet.results import git_commit, write_json

        write_json(args.out, {
            "kind": "CPU proxy estimate of GPU activation memory (not a GPU measurement)",
            "method": "tools/memprobe.py: bf16 CPU autocast (3D convolutions computed in fp32, bf16 saved), peak RSS "
                      "with MALLOC_MMAP_THRESHOLD_=65536, linear fit in voxels over two patches, + 16 B/parameter "
                      "for weights, grads and AdamW state",
            "commit": git_commit(), "torch": torch.__version__, "device": "cpu",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows,
        })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
