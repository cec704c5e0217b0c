"""Checkpoints: atomic writes, ``weights_only`` reads, readable errors.

A checkpoint is one ``torch.save`` file holding a plain dict (format ``dkuxnet-checkpoint-v1``)::

    format      "dkuxnet-checkpoint-v1"
    config      Config.to_dict()            (rebuilds the model: Config.from_dict → create_model)
    model       model.state_dict()
    iteration   int, completed training iterations
    optimizer   optional, optimizer.state_dict()
    rng         optional, random-generator states (tensors / plain Python values)
    sampler     optional, sampler.state_dict()
    provenance  optional, dict of plain values (git commit, device, wall time, ...)
    bn_recomputed  optional, {"buffers": {name: tensor}, "record": {...}}: the BatchNorm running statistics
                recomputed with the final weights (dkuxnet.precise_bn) under their state_dict names (every
                running_mean / running_var / num_batches_tracked), and how (batches, seed,
                volumes_per_batch, cases). ``model`` keeps the training EMA statistics, so a resumed run
                continues exactly; :func:`model_from_state` loads the recomputed ones by default.

A run spread over several processes (``torchrun``, :mod:`dkuxnet.distributed`) is checkpointed by rank 0; every
rank holds the same state, so the file names no rank and resumes with any number of processes (with
``train.sync_batchnorm=False`` the BatchNorm running statistics are rank 0's). ``provenance`` records
``world_size``.

Only tensors and plain Python values are allowed, so the file loads with
``torch.load(weights_only=True)`` (no arbitrary code runs when a checkpoint is opened). Writes go to
a temporary file in the destination folder, are flushed and fsync'ed, then renamed over the target
with :func:`os.replace`, so a crash never leaves a half-written ``last.pt`` behind.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dkuxnet.config import Config
from dkuxnet.errors import CheckpointError
from dkuxnet.fileio import atomic_path

FORMAT = "dkuxnet-checkpoint-v1"
REQUIRED_KEYS = ("format", "config", "model", "iteration")
OPTIONAL_KEYS = ("optimizer", "rng", "sampler", "provenance", "bn_recomputed")
BN_STATS = ("auto", "ema", "recomputed")  # which BatchNorm statistics model_from_state loads

_LEAVES = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device)  # exact types, not subclasses
_CONTAINERS = (dict, OrderedDict, list, tuple, set, torch.Size)


def checkpoint_state(
    model: nn.Module,
    cfg: Config,
    iteration: int,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    rng: dict[str, Any] | None = None,
    sampler: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the checkpoint dict of a model (and optionally the rest of a training state).

    Args:
        model: the network; its ``state_dict`` is stored.
        cfg: the run's configuration (stored as ``cfg.to_dict()``).
        iteration: completed training iterations.
        optimizer: optional optimizer whose ``state_dict`` is stored.
        rng: optional generator states (tensors or plain values).
        sampler: optional sampler ``state_dict``.
        provenance: optional plain dict (git commit, device, wall time, ...).

    Returns:
        A dict ready for :func:`save_checkpoint`.
    """
    state: dict[str, Any] = {
        "format": FORMAT, "config": cfg.to_dict(), "model": model.state_dict(), "iteration": int(iteration),
    }
    extras = {
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": rng, "sampler": sampler, "provenance": provenance,
    }
    state.update({k: v for k, v in extras.items() if v is not None})
    return state


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder + fsync + rename).

    ``format`` is filled in when absent. Creates the parent folder when needed.

    Args:
        path: destination file (conventionally ``*.pt``).
        state: checkpoint dict with at least ``config``, ``model`` and ``iteration``.

    Raises:
        ValueError: a required key is missing, ``format`` is foreign, an unknown key is present, or a
            value is not a tensor / plain Python value (it would not load with ``weights_only=True``).
            String subclasses such as ``torch.__version__`` are stored as plain ``str``.
    """
    path = Path(path)
    state = {"format": FORMAT, **state}
    if state["format"] != FORMAT:
        raise ValueError(f"state['format'] must be {FORMAT!r}, got {state['format']!r}")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"state is missing checkpoint key(s) {missing}")
    unknown = sorted(set(state) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise ValueError(f"state has unknown checkpoint key(s) {unknown}; allowed extras: {OPTIONAL_KEYS}")
    state = _normalize(state, "state")
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)`` and check its layout.

    Args:
        path: checkpoint file.
        map_location: where tensors are put (default CPU).

    Returns:
        The checkpoint dict (see the module docstring).

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, holds Python objects other than
            tensors and plain values, or is not a dkuxnet checkpoint (no / unknown ``format``,
            missing keys).
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise CheckpointError(f"checkpoint {path} {what}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"checkpoint {path} could not be read safely (weights_only): not a dkuxnet checkpoint, "
            f"or corrupt ({_first_line(exc)})"
        ) from exc
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}: {_first_line(exc)})"
        ) from exc
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(f"{path} is not a dkuxnet checkpoint (no 'format' key)")
    if state["format"] != FORMAT:
        raise CheckpointError(f"{path} has unknown checkpoint format {state['format']!r}; expected {FORMAT!r}")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is missing key(s) {missing}")
    return state


def bn_stats_used(state: dict[str, Any], bn_stats: str = "auto", name: str = "checkpoint") -> str:
    """Which BatchNorm statistics :func:`model_from_state` loads: ``"recomputed"`` or ``"ema"``.

    ``"auto"``: the recomputed ones when the checkpoint holds ``bn_recomputed``, else the training EMA;
    ``"ema"``: the training EMA; ``"recomputed"``: the recomputed ones, which must be present.

    Raises:
        ValueError: ``bn_stats`` is not one of :data:`BN_STATS`.
        CheckpointError: ``"recomputed"`` is asked for and the checkpoint has none.
    """
    if bn_stats not in BN_STATS:
        raise ValueError(f"bn_stats must be one of {BN_STATS}, got {bn_stats!r}")
    has = "bn_recomputed" in state
    if bn_stats == "recomputed" and not has:
        raise CheckpointError(
            f"{name} holds no recomputed BatchNorm statistics (no 'bn_recomputed'; train with "
            f"train.bn_recompute_batches > 0, or use bn_stats='ema')"
        )
    return "recomputed" if bn_stats == "recomputed" or (bn_stats == "auto" and has) else "ema"


def model_from_state(state: dict[str, Any], device: str | torch.device = "cpu", name: str = "checkpoint",
                     bn_stats: str = "auto") -> tuple[nn.Module, Config]:
    """Rebuild the model of a loaded checkpoint dict, in eval mode on ``device``.

    Args:
        state: dict returned by :func:`load_checkpoint`.
        device: target device.
        name: how to name the checkpoint in error messages (usually its path).
        bn_stats: BatchNorm running statistics to load (see :func:`bn_stats_used`): ``"auto"`` (the
            recomputed ones when present, else the training EMA), ``"ema"`` or ``"recomputed"``.

    Returns:
        ``(model, config)``.

    Raises:
        ValueError: ``bn_stats`` is unknown.
        CheckpointError: the stored config is invalid or cannot build a model, the weights or the recomputed
            BatchNorm statistics do not fit it, or ``bn_stats="recomputed"`` and the checkpoint has none.
    """
    from dkuxnet.models import create_model

    used = bn_stats_used(state, bn_stats, name)
    try:
        cfg = Config.from_dict(state["config"])
    except (ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{name}: stored config is invalid ({exc})") from exc
    try:
        model = create_model(cfg)
    except (ValueError, TypeError, KeyError, RuntimeError, AssertionError) as exc:
        raise CheckpointError(f"{name}: stored config cannot build a model ({type(exc).__name__}: {exc})") from exc
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{name}: weights do not match the stored config ({_first_line(exc)})") from exc
    if used == "recomputed":
        _load_recomputed(model, state["bn_recomputed"], name)
    return model.to(device).eval(), cfg


def _load_recomputed(model: nn.Module, entry: Any, name: str) -> None:
    from dkuxnet.precise_bn import load_bn_buffers

    buffers = entry.get("buffers") if isinstance(entry, dict) else None
    if not isinstance(buffers, dict) or not isinstance(entry.get("record"), dict):
        raise CheckpointError(f"{name}: 'bn_recomputed' must be a dict with 'buffers' and 'record' dicts")
    try:
        load_bn_buffers(model, buffers)
    except (ValueError, RuntimeError, AttributeError) as exc:
        raise CheckpointError(f"{name}: recomputed BatchNorm statistics do not fit the model ({exc})") from exc


def load_model(path: Path, device: str | torch.device | None = None, bn_stats: str = "auto"
               ) -> tuple[nn.Module, Config]:
    """Load a checkpoint and rebuild its model with :func:`dkuxnet.models.create_model`.

    Args:
        path: checkpoint file.
        device: target device; ``None`` = CUDA when available, else CPU.
        bn_stats: ``"auto"``, ``"ema"`` or ``"recomputed"`` BatchNorm statistics (:func:`model_from_state`).

    Returns:
        ``(model in eval mode on device, config)``.

    Raises:
        CheckpointError: see :func:`load_checkpoint` and :func:`model_from_state`.
    """
    from dkuxnet.inference import resolve_device

    return model_from_state(load_checkpoint(path), resolve_device(device), name=str(path), bn_stats=bn_stats)


def _normalize(x: Any, where: str) -> Any:
    """``x`` with str subclasses (e.g. ``torch.__version__``) made plain ``str``; other types must be allowed."""
    if isinstance(x, torch.Tensor) or type(x) in _LEAVES:
        return x
    if isinstance(x, str):
        return str(x)
    if type(x) not in _CONTAINERS:
        raise ValueError(
            f"{where} is a {type(x).__module__}.{type(x).__qualname__}; checkpoints hold only tensors and plain "
            "Python values (convert numpy arrays with torch.from_numpy)"
        )
    if isinstance(x, dict):
        items = {k: _normalize(v, f"{where}[{k!r}]") for k, v in x.items()}
        if all(items[k] is x[k] for k in x):
            return x
        out = type(x)(items)
        if hasattr(x, "_metadata"):  # state_dict version info used by load_state_dict
            out._metadata = x._metadata
        return out
    seq = [_normalize(v, f"{where}[{i}]") for i, v in enumerate(x)]
    return x if all(a is b for a, b in zip(seq, x)) else type(x)(seq)


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    detail = [ln for ln in lines if ln.startswith("WeightsUnpickler error:")]
    return (detail or lines or [type(exc).__name__])[0]
