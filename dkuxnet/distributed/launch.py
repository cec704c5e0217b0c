"""This process's place in a ``torchrun`` job: the environment, joining and leaving the process group, rank 0."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Launch:
    """This process's place in a ``torchrun`` job: global ``rank`` of ``world`` ranks, ``local_rank`` on its node."""

    rank: int
    world: int
    local_rank: int


def launch_from_env(env: dict[str, str] | None = None) -> Launch | None:
    """The :class:`Launch` that ``torchrun``'s variables describe, or None outside torchrun or with one rank.

    Raises:
        ValueError: ``WORLD_SIZE`` > 1 but another of :data:`ENV_VARS` is missing or a number is malformed.
    """
    env = dict(os.environ) if env is None else env
    if int(env.get("WORLD_SIZE", "1")) <= 1:
        return None
    missing = [v for v in ENV_VARS if v not in env]
    if missing:
        raise ValueError(f"WORLD_SIZE={env['WORLD_SIZE']} but {', '.join(missing)} unset: start the run with torchrun")
    launch = Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]))
    if not 0 <= launch.rank < launch.world:
        raise ValueError(f"RANK={launch.rank} is not in 0..{launch.world - 1}")
    return launch


def setup(device: torch.device) -> tuple[torch.device, Launch | None]:
    """Join the ``torchrun`` process group (once per process) and return the rank's device and its :class:`Launch`.

    On CUDA rank r trains on ``cuda:LOCAL_RANK`` with NCCL; on the CPU with gloo. Outside torchrun (or with one
    rank) returns ``(device, None)`` and does nothing.

    Raises:
        ValueError: a CUDA ``device`` with an index under torchrun (each rank takes its own GPU).
    """
    launch = launch_from_env()
    if launch is None:
        return device, None
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"device: under torchrun pass 'cuda' (rank r takes cuda:LOCAL_RANK), got {device}")
        device = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=launch.rank, world_size=launch.world)
    return device, launch


def teardown() -> None:
    """Leave the process group :func:`setup` joined, if any (at the end of a torchrun process)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    """True in rank 0 of a process group, and in a single process (the one that logs and writes files)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def world() -> int:
    """Ranks in the process group; 1 in a single process."""
    return dist.get_world_size() if dist.is_initialized() else 1
