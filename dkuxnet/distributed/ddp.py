"""Data parallelism over ranks: each rank's share of a batch, dropout masks of the whole batch, DDP that sums."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from dkuxnet.distributed.collectives import all_gather, all_sum


@dataclass(frozen=True)
class Shard:
    """Rank ``rank``'s volumes of a global batch: ``[start, stop)`` of ``volumes`` per view, the first ``labeled`` labeled.

    Items are view-major everywhere: the global batch is [view 0: volumes 0…B−1][view 1: volumes 0…B−1]
    and the rank's is [view 0: its volumes][view 1: its volumes].
    """

    rank: int
    world: int
    volumes: int  # B = labeled_bs + unlabeled_bs
    labeled: int  # labeled_bs

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"rank: must be in 0..world-1 with world >= 1, got rank {self.rank} of {self.world}")
        if not 0 <= self.labeled <= self.volumes:
            raise ValueError(f"labeled: must be in 0..{self.volumes}, got {self.labeled}")
        if self.volumes % self.world:
            raise ValueError(
                f"the batch of {self.volumes} volumes (data.labeled_bs + data.unlabeled_bs) cannot be split evenly "
                f"over {self.world} ranks: use a number of processes that divides it"
            )

    @property
    def start(self) -> int:
        return self.rank * (self.volumes // self.world)

    @property
    def stop(self) -> int:
        return (self.rank + 1) * (self.volumes // self.world)

    @property
    def local_labeled(self) -> int:
        """Labeled volumes among this rank's (0 when all of its volumes are unlabeled)."""
        return max(0, min(self.stop, self.labeled) - self.start)

    def items(self, x: Tensor, views: int) -> Tensor:
        """This rank's items of a global view-major batch: (views·B)×… → (views·B/N)×…."""
        return x.unflatten(0, (views, self.volumes))[:, self.start:self.stop].flatten(0, 1)

    def labels(self, y: Tensor) -> Tensor:
        """This rank's rows of the labels of the global batch's ``labeled`` volumes (labeled×… → local_labeled×…)."""
        return y[min(self.start, self.labeled):min(self.stop, self.labeled)]

    def all_sum(self, x: Tensor) -> Tensor:
        """:func:`all_sum`: Σ over ranks with gradient."""
        return all_sum(x)

    def gather_items(self, x: Tensor, views: int) -> Tensor:
        """Inverse of :meth:`items` over all ranks, with gradient (:func:`all_gather`): (views·B/N)×… → (views·B)×…."""
        gathered = all_gather(x).unflatten(0, (self.world, views, -1))  # N×views×(B/N)×…
        return gathered.transpose(0, 1).flatten(0, 2)  # view-major: [view 0: rank 0, rank 1, …][view 1: …]


class ShardedDropout3d(nn.Dropout3d):
    """``nn.Dropout3d`` of one rank's rows: draws the whole batch's channel mask (``world``× this batch) and keeps rows ``rank``.

    The mask is drawn as ``F.dropout3d`` draws it (a B×C×1×1×1 Bernoulli(1 − p) tensor from the global RNG,
    scaled by 1/(1 − p)), so with identically seeded ranks the masks are those of a single process.
    """

    rank: int = 0
    world: int = 1

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        b = x.shape[0]
        noise = torch.empty((b * self.world, x.shape[1]) + (1,) * (x.dim() - 2), dtype=x.dtype, device=x.device)
        noise = noise.bernoulli_(1 - self.p).div_(1 - self.p) if self.p < 1 else noise.zero_()
        return x * noise[self.rank * b:(self.rank + 1) * b]


def shard_dropout(model: nn.Module, rank: int, world: int) -> int:
    """Make every ``nn.Dropout3d`` of ``model`` a :class:`ShardedDropout3d` of rank ``rank`` of ``world``, in place.

    Returns how many were converted. Raises ``ValueError`` for another dropout type with p > 0.
    """
    converted = 0
    for name, m in model.named_modules():
        if type(m) in (nn.Dropout3d, ShardedDropout3d):
            m.__class__ = ShardedDropout3d
            m.rank, m.world = rank, world
            converted += 1
        elif isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            raise ValueError(f"model: dropout {name!r} ({type(m).__name__}) has no sharded form")
    return converted


def _sum_hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP communication hook: the gradients summed over ranks (DDP's default divides the sum by N)."""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])


# DDP checks a hook's annotations as objects; ``from __future__ import annotations`` made them strings
_sum_hook.__annotations__.update(bucket=dist.GradBucket, state=Any, **{"return": torch.futures.Future[Tensor]})


def data_parallel(model: nn.Module, device: torch.device, synced: bool) -> DistributedDataParallel:
    """``model`` under DDP, gradients summed over ranks (each rank's loss is its share of the whole-batch loss).

    ``synced``: the BatchNorms have whole-batch statistics (:func:`sync_batchnorm`), so the running statistics
    agree on every rank and need no broadcast; otherwise rank 0's are broadcast before each forward.
    ``find_unused_parameters``: some parameters get no gradient in some presets (the per-layer assignment
    heads without deep supervision) or on some ranks (the supervised terms of a rank without labeled volumes).
    """
    # torch >= 2.13 names the per-forward buffer broadcast ``forward_sync_buffers`` (``broadcast_buffers`` warns)
    sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters \
        else "broadcast_buffers"
    ddp = DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None, find_unused_parameters=True,
        **{sync: not synced},
    )
    ddp.register_comm_hook(None, _sum_hook)
    return ddp
