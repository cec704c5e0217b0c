"""What a card can train: presets and profiles as bench targets, the memory they need, the fit verdict.

A target is a preset, or a run profile of :mod:`dkuxnet.reproduce` as a preset plus its changes. When a
target's training step runs out of memory, :func:`need_gib` estimates what it needs: the peak of live
tensors of one step counted on the meta device (:func:`dkuxnet.perf.traffic.peak`, fp32-sized, so an
upper estimate for a bf16 run) plus 16 bytes per parameter (weights, gradients, AdamW's two moments).
Out of memory with an estimate above the card's memory is a verdict ("does not fit"); out of memory with
an estimate below it is unexplained, and a failure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from dkuxnet.config import PRESETS, get_preset
from dkuxnet.models import create_model
from dkuxnet.reproduce import COLAB_CHANGES, PROFILES, SMOKE_TINY_CHANGES, default_preset

LADDER = ("paper", "colab", "cpu", "smoke")  # profiles from the largest step to the smallest
PROFILE_CHANGES = {"colab": dict(COLAB_CHANGES), "smoke": dict(SMOKE_TINY_CHANGES)}  # as the notebooks run them
OPTIMIZER_BYTES = 16  # per parameter: fp32 weight, gradient and AdamW's two moments


@dataclass(frozen=True)
class Target:
    """A preset with dotted config changes, named as the user gave it (``preset paper``, ``profile colab``)."""

    label: str
    preset: str
    changes: dict[str, Any] = field(default_factory=dict)


def preset_target(preset: str) -> Target:
    """A preset as it is. Raises ``ValueError`` for an unknown preset."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    return Target(f"preset {preset}", preset)


def profile_target(profile: str) -> Target:
    """A run profile's training step: its preset (:func:`~dkuxnet.reproduce.default_preset`) with the changes
    the profile makes (``colab``: :data:`~dkuxnet.reproduce.COLAB_CHANGES`; ``smoke``: the tiny preset's
    :data:`~dkuxnet.reproduce.SMOKE_TINY_CHANGES`). Raises ``ValueError`` for an unknown profile."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    return Target(f"profile {profile}", default_preset(profile), PROFILE_CHANGES.get(profile, {}))


def need_gib(target: Target) -> float:
    """Estimated memory of one training step of ``target``: the meta-device peak of live tensors
    (fp32-sized) + :data:`OPTIMIZER_BYTES` per parameter, in GiB."""
    from dkuxnet.perf.traffic import peak

    with torch.device("meta"):
        params = sum(p.numel() for p in create_model(get_preset(target.preset).override(**target.changes)).parameters())
    return peak(target.preset, dict(target.changes))["peak_gib"] + OPTIMIZER_BYTES * params / 2**30


def smaller_targets(need: float) -> list[Target]:
    """The :data:`LADDER` profiles whose estimated need (:func:`need_gib`) is below ``need`` GiB, largest first."""
    return [target for target in map(profile_target, LADDER) if need_gib(target) < need]


def out_of_memory_verdict(target: Target, card_gib: float | None) -> tuple[bool, str, float]:
    """(explained, text, need) for a training step of ``target`` that ran out of memory.

    Explained when the estimated need (:func:`need_gib`) exceeds the card's memory: "does not fit: needs
    ≈ X GiB, this card has Y GiB". Otherwise (or without a card memory) it is unexplained.
    """
    need = need_gib(target)
    if card_gib is not None and need > card_gib:
        return True, f"does not fit: needs ≈ {need:.1f} GiB, this card has {card_gib:.1f} GiB", need
    have = "no card memory to compare" if card_gib is None else f"this card has {card_gib:.1f} GiB"
    return False, f"out of memory although the estimate is ≈ {need:.1f} GiB and {have}", need
