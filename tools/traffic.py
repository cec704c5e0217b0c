#!/usr/bin/env python3
"""Memory traffic of one training step, counted on the meta device: where the passes over memory are.

Runs forward + :func:`dkuxnet.losses.semi_supervised_loss` + backward of a preset at its real batch and
patch on the ``meta`` device (shapes only: no memory, no arithmetic, seconds on any CPU) under a
``TorchDispatchMode`` that adds up, for every aten operator that moves data, the bytes of its tensor
inputs and outputs ("eager bytes": what the op reads and writes if nothing is fused or cached). View
operators (view, permute, slice, expand, …) move nothing and are not counted.

The count is a proxy of a GPU step's DRAM traffic, not a measurement: meta tensors have no autocast, so
the bf16 parts of a CUDA step are counted at fp32 size (about 2× too large there; the fp32 islands are
exact), and cuDNN/cuBLAS re-reads are ignored. It answers "how many passes over the full-resolution
tensors does this step make", before and after a rewrite, on a machine without a GPU:

    python tools/traffic.py --preset paper --out results/perf/traffic_meta.json
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

VIEWS = {
    "view", "_unsafe_view", "permute", "slice", "select", "expand", "transpose", "t", "detach", "alias",
    "unsqueeze", "squeeze", "as_strided", "split", "split_with_sizes", "unbind", "reshape", "lift_fresh",
}


class TrafficCounter(TorchDispatchMode):
    """Bytes read + written per aten operator, keyed by (phase, operator, source line in dkuxnet)."""

    def __init__(self, large: int) -> None:
        super().__init__()
        self.large = large  # element count from which a tensor is "full resolution"
        self.phase = "forward"
        self.bytes: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self.large_bytes: collections.Counter[tuple[str, str, str]] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if name in VIEWS:
            return out
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        moved = sum(t.numel() * t.element_size() for t in tensors)
        key = (self.phase, name, _source())
        self.bytes[key] += moved
        if any(t.numel() >= self.large for t in tensors):
            self.large_bytes[key] += moved
        return out


def _source() -> str:
    frames = [f for f in traceback.extract_stack() if "/dkuxnet/" in f.filename and "/tools/" not in f.filename]
    if not frames:
        node = torch._C._current_autograd_node()
        return f"(autograd {node.name()})" if node is not None else "(autograd)"
    f = frames[-1]
    return f"{Path(f.filename).name}:{f.lineno}"


@contextlib.contextmanager
def _meta_islands() -> Any:
    """fp32 islands as disabled CPU autocast (the meta device has none); restored afterwards."""
    patched = []
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("dkuxnet") and hasattr(module, "fp32_island"):
            patched.append((module, module.fp32_island))
            module.fp32_island = lambda device: torch.autocast("cpu", enabled=False)
    try:
        yield
    finally:
        for module, original in patched:
            module.fp32_island = original


def count(preset: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Eager bytes of one training step of ``preset`` (+ dotted ``overrides``) at its batch and patch."""
    from dkuxnet.config import get_preset
    from dkuxnet.engine import effective_unlabeled_bs
    from dkuxnet.losses import semi_supervised_loss
    from dkuxnet.models import create_model

    cfg = get_preset(preset).override(**overrides)
    n_lab, views = cfg.data.labeled_bs, cfg.data.views
    batch = views * (n_lab + effective_unlabeled_bs(cfg))
    patch = tuple(cfg.data.patch_size)
    voxels = patch[0] * patch[1] * patch[2]
    with torch.device("meta"):
        model = create_model(cfg).train()
        x = torch.empty(batch, 1, *patch)
        y = torch.zeros(n_lab, *patch, dtype=torch.long)
    counter = TrafficCounter(large=n_lab * cfg.model.num_queries * voxels)
    with _meta_islands(), counter:
        out = model(x)
        counter.phase = "loss"
        loss, _ = semi_supervised_loss(out, y, n_lab, views, cfg.loss, 10**6, getattr(model, "group_sizes", ()))
        counter.phase = "backward"
        loss.backward()

    def table(c: collections.Counter, top: int) -> list[dict[str, Any]]:
        return [{"phase": k[0], "op": k[1], "source": k[2], "gb": v / 1e9} for k, v in c.most_common(top)]

    by_phase = collections.Counter()
    for (phase, _, _), v in counter.bytes.items():
        by_phase[phase] += v
    return {
        "preset": preset, "overrides": overrides, "batch": batch, "patch": list(patch),
        "total_gb": sum(counter.bytes.values()) / 1e9,
        "by_phase_gb": {k: v / 1e9 for k, v in by_phase.items()},
        "full_resolution_gb": sum(counter.large_bytes.values()) / 1e9,
        "full_resolution_threshold_elements": counter.large,
        "top_full_resolution": table(counter.large_bytes, 25),
    }


def main(argv: list[str] | None = None) -> int:
    from dkuxnet.cli import _parse_set

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--set", action="append", default=[], metavar="K=V", help="dotted config change (repeatable)")
    ap.add_argument("--out", type=Path, help="write the JSON here (rows of an existing file are kept)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    row = count(args.preset, _parse_set(args.set))
    print(f"{args.preset} at {row['batch']} × {'×'.join(map(str, row['patch']))}: {row['total_gb']:.1f} GB eager "
          f"traffic (fp32-sized), {row['full_resolution_gb']:.1f} GB of it on full-resolution tensors "
          f"(≥ {row['full_resolution_threshold_elements']:,} elements); counted in {time.perf_counter() - t0:.0f} s")
    for r in row["top_full_resolution"][:15]:
        print(f"  {r['gb']:7.2f} GB  {r['phase']:8s} {r['op']:28s} {r['source']}")
    if args.out:
        from dkuxnet.results import git_commit, write_json

        row |= {"commit": git_commit(), "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        rows = json.loads(args.out.read_text(encoding="utf-8"))["rows"] if args.out.exists() else []
        write_json(args.out, {
            "kind": "eager memory traffic counted on the meta device (a proxy, not a GPU measurement)",
            "method": "tools/traffic.py: bytes of tensor inputs + outputs of every non-view aten op, fp32-sized",
            "rows": [*rows, row],
        })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
