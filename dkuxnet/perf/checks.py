"""What the checks of ``dkuxnet check-gpu`` share: a failed check, tolerances, relative errors, a fixed batch.

A check either passes, fails (:class:`CheckFailed`: its stage fails and the command exits 1) or warns.
A tolerance (:class:`Tolerance`) fails a check only on the device types where it has been measured; on
the others a value above it is a warning that carries both numbers, until a card has measured it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dkuxnet.config import Config, get_preset
from dkuxnet.losses import semi_supervised_loss
from dkuxnet.models import create_model

CHECK_PATCH = (32, 32, 16)  # the smallest patch the tiny preset's 4 downsamplings train on (16³ leaves 1 voxel)
RAMPED = 10**6  # an iteration past the consistency ramp: r(t) = 1, every loss term counts


class CheckFailed(Exception):
    """A check computed a wrong result: its stage fails."""


@dataclass(frozen=True)
class Tolerance:
    """An upper bound on an error, and the device types (``"cpu"``, ``"cuda"``) on which it was measured."""

    name: str
    limit: float
    measured_on: tuple[str, ...]

    def judge(self, value: float, device: torch.device) -> list[str]:
        """``[]`` when ``value <= limit``; above it (or NaN): :class:`CheckFailed` where measured, else a warning.

        Raises:
            CheckFailed: ``value`` exceeds the limit on a device type in ``measured_on``.
        """
        if value <= self.limit:
            return []
        message = f"{self.name} {value:.1e} > {self.limit:.0e}"
        if device.type in self.measured_on:
            raise CheckFailed(message)
        return [f"{message} (tolerance not yet measured on a {device.type} card)"]


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """‖value − reference‖₂ / ‖reference‖₂ in float64 on the CPU.

    0 when both are zero; inf when only ``reference`` is zero.
    """
    v, r = value.detach().double().cpu(), reference.detach().double().cpu()
    diff, norm = float((v - r).norm()), float(r.norm())
    return diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))


def parameter_group(name: str) -> str:
    """The group of a parameter name: its top module, with the index of a list (``kmax.3.head.x`` → ``kmax.3``)."""
    head, _, rest = name.partition(".")
    index = rest.partition(".")[0]
    return f"{head}.{index}" if index.isdigit() else head


def grouped_errors(values: dict[str, torch.Tensor], references: dict[str, torch.Tensor]) -> dict[str, float]:
    """:func:`relative_error` of the concatenated tensors of each :func:`parameter_group` (same names in both)."""
    if values.keys() != references.keys():
        raise ValueError(f"values and references must have the same names; differ in "
                         f"{sorted(values.keys() ^ references.keys())[:3]}")
    groups: dict[str, list[str]] = {}
    for name in values:
        groups.setdefault(parameter_group(name), []).append(name)
    return {group: relative_error(torch.cat([values[n].detach().double().cpu().flatten() for n in names]),
                                  torch.cat([references[n].detach().double().cpu().flatten() for n in names]))
            for group, names in groups.items()}


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the parameters' gradients by name (zeros for a parameter without one)."""
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
            for n, p in model.named_parameters()}


def check_config(device: torch.device, **changes: Any) -> Config:
    """The ``tiny`` preset at :data:`CHECK_PATCH`, 1 + 1 volumes per view, volume-level consistency losses;
    ``changes`` (dotted) come last. The depthwise convolutions take the run's own path (``auto``)."""
    base = {"data.patch_size": CHECK_PATCH, "data.labeled_bs": 1, "data.unlabeled_bs": 1,
            "loss.qdc_granularity": "volume", "loss.segc_granularity": "volume",
            "model.checkpoint_activations": False}
    return get_preset("tiny").override(**{**base, **changes})


def fixed_batch(cfg: Config, device: torch.device, dtype: torch.dtype = torch.float32,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded input of both views (views·(labeled + unlabeled)×1×X×Y×Z) and blob labels (labeled×X×Y×Z)."""
    gen = torch.Generator().manual_seed(seed)
    items = cfg.data.labeled_bs + cfg.data.unlabeled_bs
    x = torch.randn((cfg.data.views * items, 1, *cfg.data.patch_size), generator=gen, dtype=torch.float64)
    smooth = torch.nn.functional.avg_pool3d(x[: cfg.data.labeled_bs], 5, 1, 2)[:, 0]  # labeled×X×Y×Z
    y = (smooth > smooth.flatten(1).quantile(0.8, dim=1).view(-1, 1, 1, 1)).long()
    return x.to(device, dtype), y.to(device)


def forward_loss(model: nn.Module, cfg: Config, x: torch.Tensor, y: torch.Tensor,
                 autocast: torch.dtype | None = None) -> tuple[torch.Tensor, Any]:
    """Forward of both views (under ``autocast`` of that dtype on ``x``'s device when given) and the full
    :func:`~dkuxnet.losses.semi_supervised_loss` past its ramp; returns (loss, model output)."""
    ctx = torch.autocast(x.device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with ctx:
        out = model(x)
    loss, _ = semi_supervised_loss(out, y, cfg.data.labeled_bs, cfg.data.views, cfg.loss, RAMPED, model.group_sizes)
    return loss, out


def seeded_model(cfg: Config, device: torch.device, seed: int = 0) -> nn.Module:
    """The model of ``cfg``, initialised from ``seed``, in training mode on ``device``."""
    torch.manual_seed(seed)
    return create_model(cfg).to(device).train()


@contextlib.contextmanager
def restored(model: nn.Module) -> Iterator[None]:
    """Run a step and put the model's parameters and buffers back afterwards (gradients are cleared)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        yield
    finally:
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)


def worst(errors: dict[str, float]) -> tuple[str, float]:
    """The name and value of the largest error."""
    name = max(errors, key=lambda k: errors[k])
    return name, errors[name]


def fmt_groups(errors: dict[str, float], top: int = 3) -> str:
    """The ``top`` largest errors as ``name 1.2e-07, …``."""
    ranked: Iterable[tuple[str, float]] = sorted(errors.items(), key=lambda kv: -kv[1])[:top]
    return ", ".join(f"{k} {v:.1e}" for k, v in ranked)
