"""What every instrument shares: device synchronisation, timing, peak memory and the device report.

Only the instruments synchronise (:func:`synchronize`): the training step never does.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from typing import Any

import torch

from dkuxnet.results import device_name, git_commit


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); timing code only, never the training step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA; nothing on other devices)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """``torch.cuda.max_memory_allocated`` since the last :func:`reset_peak`, in GiB; None off CUDA."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def card_memory_gib(device: torch.device) -> float | None:
    """Total memory of the CUDA card in GiB; None off CUDA."""
    return torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a device out-of-memory error (``torch.OutOfMemoryError``, CUDA's included)."""
    return isinstance(exc, torch.OutOfMemoryError)


def timed_calls(fn: Callable[[], Any], device: torch.device, steps: int, seconds: float) -> list[float]:
    """Milliseconds of up to ``steps`` calls of ``fn``, each between two device synchronisations.

    Stops before a call that would end more than ``seconds`` after the first began (estimated from the
    previous call); at least one call is always timed.
    """
    if steps < 1 or seconds <= 0:
        raise ValueError(f"steps must be >= 1 and seconds > 0, got steps={steps}, seconds={seconds}")
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < steps and not (times and time.perf_counter() - start + times[-1] / 1000 > seconds):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(1000 * (time.perf_counter() - t0))
    return times


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def environment(device: torch.device) -> dict[str, Any]:
    """The device report every instrument records: device, device type, torch / CUDA / cuDNN, commit, date."""
    cudnn = device.type == "cuda" and torch.backends.cudnn.is_available()
    return {
        "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cudnn else None,
        "commit": git_commit(), "date": now(),
    }

