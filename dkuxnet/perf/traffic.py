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

``--peak`` follows the live memory instead (storages from creation until they are freed) and prints what is alive at
the step's peak, by the op and source line (or backward node) that created it: where the peak memory is.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
import time
import traceback
import weakref
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

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
    frames = [f for f in traceback.extract_stack() if "/dkuxnet/" in f.filename and "/dkuxnet/perf/" not in f.filename]
    if not frames:
        node = torch._C._current_autograd_node()
        return f"(autograd {node.name()})" if node is not None else "(autograd)"
    f = frames[-1]
    return f"{Path(f.filename).name}:{f.lineno}"


class LiveMemory(TorchDispatchMode):
    """Bytes of the storages alive after each aten op; at the peak, what is alive, by creator and shape.

    A storage counts from the op that created it until it is freed (a finalizer on the storage), so tensors
    that autograd saves for backward, gradients and temporaries are all in; views add nothing.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.peak_op = ""
        self.owners: dict[int, tuple[str, tuple[int, ...], int]] = {}  # storage → (creator, shape, bytes)
        self.at_peak: collections.Counter[tuple[str, tuple[int, ...]]] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.owners:
                    self.owners[key] = (f"{func.__name__.split('.')[0]} {_source()}", tuple(t.shape), storage.nbytes())
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._free, key)
        if self.live > self.peak:
            self.peak, self.peak_op = self.live, f"{func.__name__.split('.')[0]} {_source()}"
            self.at_peak = collections.Counter()
            for creator, shape, nbytes in self.owners.values():
                self.at_peak[(creator, shape)] += nbytes
        return out

    def _free(self, key: int) -> None:
        self.live -= self.owners.pop(key)[2]


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


def _build(preset: str, overrides: dict[str, Any]) -> tuple[Any, torch.nn.Module, torch.Tensor, torch.Tensor, int]:
    from dkuxnet.config import get_preset
    from dkuxnet.engine import effective_unlabeled_bs
    from dkuxnet.models import create_model

    cfg = get_preset(preset).override(**overrides)
    n_lab, views = cfg.data.labeled_bs, cfg.data.views
    batch = views * (n_lab + effective_unlabeled_bs(cfg))
    with torch.device("meta"):
        model = create_model(cfg).train()
        x = torch.empty(batch, 1, *cfg.data.patch_size)
        y = torch.zeros(n_lab, *cfg.data.patch_size, dtype=torch.long)
    return cfg, model, x, y, batch


def _loss(cfg: Any, model: torch.nn.Module, out: Any, y: torch.Tensor) -> torch.Tensor:
    from dkuxnet.losses import semi_supervised_loss

    views = cfg.data.views
    return semi_supervised_loss(out, y, cfg.data.labeled_bs, views, cfg.loss, 10**6, getattr(model, "group_sizes", ()))[0]


def peak(preset: str, overrides: dict[str, Any], top: int = 15) -> dict[str, Any]:
    """Live bytes of one training step on the meta device: after forward + loss, and at the peak, with what is alive then.

    fp32-sized like :func:`count` (bf16 activations of a CUDA step are half as large); parameters, their
    gradients and the optimiser state are not included (the model is built before counting starts).
    """
    cfg, model, x, y, batch = _build(preset, overrides)
    live = LiveMemory()
    with _meta_islands(), live:
        out = model(x)
        loss = _loss(cfg, model, out, y)
        kept, forward_peak = live.live, live.peak
        del out
        loss.backward()
    return {
        "preset": preset, "overrides": overrides, "batch": batch, "patch": list(cfg.data.patch_size),
        "after_forward_gib": kept / 2**30, "forward_peak_gib": forward_peak / 2**30, "peak_gib": live.peak / 2**30,
        "peak_op": live.peak_op,
        "alive_at_peak": [{"creator": c, "shape": list(sh), "gib": n / 2**30} for (c, sh), n in live.at_peak.most_common(top)],
    }


def count(preset: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Eager bytes of one training step of ``preset`` (+ dotted ``overrides``) at its batch and patch."""
    cfg, model, x, y, batch = _build(preset, overrides)
    patch = tuple(cfg.data.patch_size)
    voxels = patch[0] * patch[1] * patch[2]
    counter = TrafficCounter(large=cfg.data.labeled_bs * cfg.model.num_queries * voxels)
    with _meta_islands(), counter:
        out = model(x)
        counter.phase = "loss"
        loss = _loss(cfg, model, out, y)
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
    ap.add_argument("--peak", action="store_true", help="instead: live memory at the step's peak and what is alive")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.peak:
        p = peak(args.preset, _parse_set(args.set))
        print(f"{args.preset} at {p['batch']} × {'×'.join(map(str, p['patch']))} (fp32-sized, without parameters): "
              f"{p['after_forward_gib']:.1f} GiB alive after forward + loss, peak {p['peak_gib']:.1f} GiB at "
              f"{p['peak_op']}; alive then:")
        for r in p["alive_at_peak"]:
            print(f"  {r['gib']:6.2f} GiB  {r['creator']:60s} {tuple(r['shape'])}")
        return 0
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
