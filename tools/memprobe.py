#!/usr/bin/env python3
"""CPU proxy of a training step's activation memory: what the GPU peak will be, before a GPU is at hand.

For each ``--set`` variant, a fresh process runs one forward (bf16 autocast on the CPU, fp32 islands as on
the GPU) + loss + backward of the real model and loss at a reduced patch and reports, per voxel of the
batch (2 views × (labeled + unlabeled) volumes):

* ``saved``: bytes autograd keeps between forward and backward, in total and by model part
  (:func:`dkuxnet.bench.saved_tensor_bytes_by_part`; the loss and the model-level output ops are parts too);
* ``peak``: the peak resident memory of the process above its level before the forward (with glibc's
  mmap threshold at 64 KiB, so that freed tensors leave the process at once and RSS follows live tensors).

Activation memory is linear in the voxel count, so ``bytes/voxel × voxels`` extrapolates to 112×112×80.
Parameters, gradients and AdamW state (16 bytes per parameter) are added to the extrapolated peak.
This is an estimate, not a GPU measurement: CUDA autocast keeps a few more ops (layer_norm) in fp32,
and cuDNN workspaces and allocator fragmentation come on top.

    python tools/memprobe.py --preset paper --patch 48 48 32 --set model.checkpoint_activations=false \\
        --set model.checkpoint_activations=true --out results/perf/memprobe_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

TARGET_PATCH = (112, 112, 80)


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def probe(preset: str, patch: tuple[int, int, int], overrides: dict[str, object]) -> dict[str, object]:
    """One measurement in this process (run it in a fresh process: peak RSS is per process)."""
    import torch

    from dkuxnet.bench import saved_tensor_bytes_by_part
    from dkuxnet.config import get_preset
    from dkuxnet.engine import effective_unlabeled_bs
    from dkuxnet.losses import semi_supervised_loss
    from dkuxnet.models import DKUXNet, create_model, named_parts

    cfg = get_preset(preset).override(**overrides)
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
    saved = sum(by_part.values())
    voxels = batch * patch[0] * patch[1] * patch[2]
    target = batch * TARGET_PATCH[0] * TARGET_PATCH[1] * TARGET_PATCH[2]
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "preset": preset, "overrides": overrides, "batch": batch, "patch": list(patch),
        "saved_bytes_per_voxel": saved / voxels, "peak_bytes_per_voxel": peak / voxels,
        "saved_bytes_per_voxel_by_part": {k: v / voxels for k, v in sorted(by_part.items(), key=lambda kv: -kv[1])},
        "parameters": n_params, "seconds": seconds,
        "estimate_at": [batch, 1, *TARGET_PATCH],
        "estimated_saved_gib": saved / voxels * target / 2**30,
        "estimated_peak_gib": (peak / voxels * target + 16 * n_params) / 2**30,
    }


def _parse_set(text: str) -> dict[str, object]:
    from dkuxnet.cli import _parse_set as parse

    return parse([item for item in text.split(",") if item])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--patch", type=int, nargs=3, default=(48, 48, 32), metavar=("X", "Y", "Z"))
    ap.add_argument("--set", action="append", default=[], metavar="K=V[,K=V]",
                    help="one variant per --set (dotted config keys); default: the preset as is")
    ap.add_argument("--out", type=Path, help="write the JSON here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(probe(args.preset, tuple(args.patch), _parse_set(args.child))))
        return 0
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    rows = []
    for variant in args.set or [""]:
        cmd = [sys.executable, __file__, "--preset", args.preset, "--patch", *map(str, args.patch), "--child", variant]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"memprobe: variant {variant!r} failed:\n{done.stderr[-2000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{args.preset} {variant or '(preset)'}: saved {r['saved_bytes_per_voxel']:.0f} B/voxel, "
              f"peak {r['peak_bytes_per_voxel']:.0f} B/voxel -> at {r['estimate_at']}: "
              f"~{r['estimated_peak_gib']:.1f} GiB peak (CPU proxy)", flush=True)
    if args.out:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        import torch

        from dkuxnet.results import git_commit, write_json

        write_json(args.out, {
            "kind": "CPU proxy estimate of GPU activation memory (not a GPU measurement)",
            "method": "tools/memprobe.py: bf16 CPU autocast, peak RSS with MALLOC_MMAP_THRESHOLD_=65536, "
                      "linear extrapolation in voxels, + 16 B/parameter for weights, grads and AdamW state",
            "commit": git_commit(), "torch": torch.__version__, "device": "cpu",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows,
        })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
