"""Host syncs in the training step, found on any device.

A CUDA step that turns a device tensor into a Python value (``.item()``, ``.tolist()``, ``.cpu()``,
``.numpy()``, ``bool()``, ``float()``, ``int()``) waits for the GPU. On CUDA
``torch.cuda.set_sync_debug_mode("warn")`` reports such waits; on a CPU nothing waits, so
:class:`HostSyncWatch` finds the same calls by following which tensors live on the run's device.

A tensor counts as a device tensor when it is a parameter, buffer, gradient or optimiser state of the
model, a tensor of the run's data bank or counters, made with an explicit ``device=`` or with the run's
device generator, or computed from a device tensor. Host draws (the sampler's and the augmentation's CPU
generator) are host tensors on every machine, so turning them into numbers is no sync. The watch sees the
Python code of the step (sampling, forward, loss, optimiser); what runs inside ``backward`` (a custom
autograd function's backward, a checkpoint's recomputation) is not seen on a CPU — on CUDA the sync debug
mode covers it.
"""

from __future__ import annotations

import traceback
import warnings
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from dkuxnet.engine import Run, train_step

CONVERSIONS = {  # Tensor methods that copy a value to the host
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__bool__,
    torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__,
}


def _caller() -> str:
    """``file.py:line`` of the innermost package frame outside :mod:`dkuxnet.perf` (where the call was written)."""
    frames = [f for f in traceback.extract_stack() if "/dkuxnet/" in f.filename and "/dkuxnet/perf/" not in f.filename]
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "outside the package"


class HostSyncWatch(TorchFunctionMode):
    """Records every :data:`CONVERSIONS` call on a device tensor while active, as ``"item at engine.py:170"``.

    Args:
        device_tensors: the tensors that start on the device (parameters, buffers, data, counters).
        device_generator: the generator whose draws are on the device.
    """

    def __init__(self, device_tensors: Iterable[torch.Tensor], device_generator: torch.Generator | None) -> None:
        super().__init__()
        self._device: dict[int, weakref.ref] = {}
        self._generator = device_generator
        self.found: list[str] = []
        for t in device_tensors:
            self._mark(t)

    def _mark(self, t: torch.Tensor) -> None:
        self._device[id(t)] = weakref.ref(t)

    def is_device(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is a device tensor (see the module docstring)."""
        ref = self._device.get(id(t))
        return (ref is not None and ref() is t) or t.requires_grad

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_device = any(self.is_device(t) for t in inputs) or kwargs.get("device") is not None or (
            self._generator is not None and kwargs.get("generator") is self._generator)
        if func in CONVERSIONS and on_device:
            self.found.append(f"{func.__name__} at {_caller()}")
        out = func(*args, **kwargs)
        if on_device and func not in CONVERSIONS:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self._mark(t)
        return out


def run_tensors(run: Run) -> list[torch.Tensor]:
    """The tensors of ``run`` that live on its device: model state, gradients, optimiser state, data, counters."""
    tensors = [*run.model.parameters(), *run.model.buffers(), *run.bank.images, *run.bank.labels]
    tensors += [p.grad for p in run.model.parameters() if p.grad is not None]
    tensors += [v for state in run.optimizer.state.values() for k, v in state.items()
                if isinstance(v, torch.Tensor) and k != "step"]  # the step count is a host tensor unless fused
    tensors += [t for t in (run.step_count, run.first_bad, *run.sums.values()) if t is not None]
    return tensors


def conversions_in_step(run: Run, steps: int) -> list[str]:
    """Distinct host conversions of device tensors during ``steps`` calls of :func:`~dkuxnet.engine.train_step`
    (after the caller's warm-up step), sorted; empty: no host sync."""
    watch = HostSyncWatch(run_tensors(run), run.device_gen)
    with watch:
        for _ in range(steps):
            train_step(run)
    return sorted(set(watch.found))


def cuda_syncs_in_step(run: Run, steps: int) -> list[str]:
    """First lines of the ``torch.cuda.set_sync_debug_mode("warn")`` messages during ``steps`` training steps
    (after the caller's warm-up step); empty: no host sync. CUDA only."""
    torch.cuda.synchronize(run.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                train_step(run)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sorted({str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)})
