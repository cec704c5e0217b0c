"""Slurm options of a grid: the job's time limit, partition, GPUs and any further ``sbatch`` option."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def slurm_minutes(text: str) -> int:
    """A Slurm time limit in whole minutes (seconds rounded up), from any of ``sbatch --time``'s forms.

    ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``: e.g. ``"90"`` → 90, ``"4:00:00"`` → 240,
    ``"1-00:00:00"`` → 1440, ``"1-2"`` → 1560, ``"30:30"`` → 31.

    Raises:
        ValueError: not one of these forms, or zero.
    """
    m = _TIME.match(text.strip())
    if not m:
        raise ValueError(f"time must be a Slurm time limit (M, M:S, H:M:S, D-H, D-H:M or D-H:M:S), got {text!r}")
    days, a, b, c = (int(g) if g else None for g in m.groups())
    if days is None:  # M, M:S, H:M:S
        hours, minutes, seconds = (a, b, c) if c is not None else (0, a, b or 0)
    else:  # D-H, D-H:M, D-H:M:S
        hours, minutes, seconds = a, b or 0, c or 0
    total_s = (((days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds
    if total_s <= 0:
        raise ValueError(f"time must be longer than zero, got {text!r}")
    return -(-total_s // 60)


def parse_options(items: list[str]) -> dict[str, str | bool]:
    """``["account=lab", "exclusive"]`` → ``{"account": "lab", "exclusive": True}`` (``sbatch`` option names,
    without the leading dashes; ``_`` and ``-`` alike).

    Raises:
        ValueError: an item with an empty name.
    """
    out: dict[str, str | bool] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip().lstrip("-").replace("_", "-")
        if not name:
            raise ValueError(f"slurm option must be NAME=VALUE or NAME, got {item!r}")
        out[name] = value if sep else True
    return out


@dataclass(frozen=True)
class SlurmOptions:
    """One Slurm job per cell: ``time_min`` (the job's time limit, minutes), ``partition`` (None: the
    cluster's default), ``gpus_per_node`` (0: none requested) and further ``sbatch`` options ``{name: value}``
    (``True``: a flag without value), e.g. ``{"account": "lab", "qos": "high", "cpus-per-task": "8"}``."""

    time_min: int
    partition: str | None = None
    gpus_per_node: int = 1
    options: dict[str, str | bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.time_min < 1:
            raise ValueError(f"time_min must be >= 1 minute, got {self.time_min}")
        if self.gpus_per_node < 0:
            raise ValueError(f"gpus_per_node must be >= 0, got {self.gpus_per_node}")

    def parameters(self) -> dict[str, Any]:
        """The keywords of submitit's ``SlurmExecutor.update_parameters``."""
        params: dict[str, Any] = {"job_name": "dkuxnet-grid", "time": self.time_min, "ntasks_per_node": 1,
                                  "additional_parameters": dict(self.options)}
        if self.partition:
            params["partition"] = self.partition
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        return params
