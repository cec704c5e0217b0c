r"""One training run over several processes (``torchrun``): the process group, each rank's share of the batch,
collectives with gradients, and BatchNorm statistics of the whole batch.

``torchrun --nproc_per_node=N -m dkuxnet train …`` starts N processes (ranks) with the environment variables
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`setup` joins them into one
process group (NCCL on CUDA, rank r on ``cuda:LOCAL_RANK``; gloo on the CPU). Without these variables, or
with ``WORLD_SIZE=1``, nothing here is used and training is the single-process code path.

The design that makes an N-rank run compute what one process computes (up to float summation order):

* **One global stream.** Every rank seeds the same generators (host, device, global torch RNG), runs the same
  sampler and draws the same global batch of B = ``labeled_bs + unlabeled_bs`` patches and the same strong
  views, then keeps its share (:class:`Shard`): volumes ``[r·B/N, (r+1)·B/N)`` of each view (the labeled ones
  come first, so a rank may hold none). N must divide B. Drawing the whole batch on every rank costs the
  sampling and augmentation of B volumes per rank, a small part of a step.
* **Shares of the loss.** Each rank's loss is its share ℓ_r of the whole-batch loss L, Σ_r ℓ_r = L (per-volume
  means divide by the whole batch's count; the volume-level NT-Xent is computed from the embeddings of all
  ranks, :func:`all_gather`, and counted 1/N on each). The gradients are summed over ranks (:func:`data_parallel`:
  DDP with a summing communication hook instead of its default mean), so every rank steps with ∂L/∂θ.
* **Whole-batch BatchNorm** (``train.sync_batchnorm``, default on): :func:`sync_batchnorm` gives every
  BatchNorm the statistics of all ranks' entries, forward and backward (:class:`SyncBatchNorm3d` …,
  :class:`SyncScalarBatchNorm`). Off, each rank normalises with its own share, as the authors' ``DataParallel``
  training did, and DDP hands rank 0's running statistics to every rank before each forward (DataParallel
  keeps those of its first GPU).
* **Dropout** (V-Net): :func:`shard_dropout` draws the whole batch's channel mask on every rank and keeps its
  rows, so the masks are those of one process.

Other batch-level operations of the models need nothing: instance norm and LayerNorm are per volume, the
k-means assignment and update are per volume.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from dkuxnet.models.kmax import AssignmentHead, ConvBN, ScalarBatchNorm
from dkuxnet.precision import upcast

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


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


class _AllGather(torch.autograd.Function):
    """y = cat_r(x_r) on dim 0; backward: dx_r = rows r of Σ_r' dy_r' (the gradient of Σ_r' ℓ_r')."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        return torch.cat(parts)  # W·n×…

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> Tensor:
        total = dy.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total.narrow(0, ctx.rank * ctx.rows, ctx.rows)


class _AllSum(torch.autograd.Function):
    """y = Σ_r x_r on every rank; backward: dx_r = Σ_r' dy_r'."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        total = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> Tensor:
        total = dy.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total


def all_gather(x: Tensor) -> Tensor:
    r"""The tensors of all ranks concatenated on dim 0 (rank order), with gradient; ``x`` itself in one process.

    Every rank's ``x`` must have the same shape. Backward sums the incoming gradients over ranks and hands
    each rank its rows: the gradient of :math:`\sum_r \ell_r` when rank r's loss ℓ_r uses the result.
    """
    return _AllGather.apply(x) if _world() > 1 else x


def all_sum(x: Tensor) -> Tensor:
    r""":math:`\sum_r x_r` on every rank, with gradient (backward: the incoming gradients summed over ranks); ``x`` in one process."""
    return _AllSum.apply(x) if _world() > 1 else x


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


class _SyncBatchNormFn(torch.autograd.Function):
    r"""y = γ·(x − μ)·r + β with the whole batch's per-channel μ and r = 1/√(σ² + ε), given.

    Backward with the sums over all ranks' entries (n in all): dx = γ·r·(dy − Σdy/n − x̂·Σ(dy·x̂)/n),
    x̂ = (x − μ)·r; the parameter gradients are this rank's sums dγ = Σ_local dy·x̂, dβ = Σ_local dy
    (DDP sums them over ranks).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, rstd: Tensor, count: int,
                dims: tuple[int, ...], shape: tuple[int, ...]) -> Tensor:
        scale = weight * rstd  # C
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.count, ctx.dims, ctx.shape = count, dims, shape
        return torch.addcmul((bias - mean * scale).view(shape), x, scale.view(shape)).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, rstd = ctx.saved_tensors
        shape, dims, n = ctx.shape, ctx.dims, ctx.count
        xhat = torch.addcmul((-mean * rstd).view(shape), x, rstd.view(shape))  # (x − μ)·r, compute dtype
        local = torch.stack([dy.sum(dims, dtype=xhat.dtype), (dy * xhat).sum(dims)])  # 2×C: Σdy, Σdy·x̂
        total = local.clone()
        if _world() > 1:
            dist.all_reduce(total)
        scale = (weight * rstd).view(shape)
        dx = xhat.mul_((-total[1] / n).view(shape)).add_(dy).sub_((total[0] / n).view(shape)).mul_(scale)
        dw, db = (v.reshape(weight.shape).to(weight.dtype) for v in (local[1], local[0]))
        return dx.to(x.dtype), dw, db, None, None, None, None, None


def whole_batch_moments(x: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    r"""Mean and biased variance over ``dims`` of the entries of all ranks (every rank holds as many).

    Each rank's mean m_r and variance v_r (one pass, in the compute dtype) are gathered and combined in
    float64: :math:`\mu = \frac1N\sum_r m_r`, :math:`\sigma^2 = \frac1N\sum_r \big(v_r + (m_r - \mu)^2\big)`.
    Returns μ, σ² in the compute dtype (fp32 for half inputs), without gradient.
    """
    with torch.no_grad():
        var, mean = torch.var_mean(upcast(x), dim=dims, correction=0)
        if _world() == 1:
            return mean, var
        parts = [torch.empty(2, *mean.shape, dtype=torch.float64, device=x.device) for _ in range(_world())]
        dist.all_gather(parts, torch.stack([mean, var]).double())
        means, variances = torch.stack(parts).unbind(1)  # N×C each
        mu = means.mean(0)
        return mu.to(mean.dtype), (variances + (means - mu) ** 2).mean(0).to(var.dtype)


class _Synced:
    """``forward`` of a BatchNorm whose training statistics are the whole batch's (all ranks'); eval: its own."""

    def _stat_dims(self, x: Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Reduced dims and the broadcast shape of a per-channel vector: channels on dim 1."""
        return (0, *range(2, x.dim())), (1, x.shape[1]) + (1,) * (x.dim() - 2)

    def forward(self, x: Tensor) -> Tensor:
        bn: Any = self
        if not bn.training and bn.running_mean is not None:
            return super().forward(x)  # type: ignore[misc]
        bn._check_input_dim(x)
        dims, shape = self._stat_dims(x)
        mean, var = whole_batch_moments(x, dims)
        count = x.numel() // mean.numel() * _world()
        if bn.training and bn.track_running_stats:
            with torch.no_grad():
                bn.num_batches_tracked.add_(1)
                m = 1.0 / bn.num_batches_tracked.to(mean.dtype) if bn.momentum is None else bn.momentum
                bn.running_mean.mul_(1 - m).add_(m * mean)
                bn.running_var.mul_(1 - m).add_(m * var * (count / max(count - 1, 1)))
        rstd = torch.rsqrt(var + bn.eps)
        return _SyncBatchNormFn.apply(x, bn.weight, bn.bias, mean, rstd, count, dims, shape)


class SyncBatchNorm1d(_Synced, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with whole-batch statistics in training (same parameters, buffers and state_dict keys)."""


class SyncBatchNorm2d(_Synced, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with whole-batch statistics in training (same parameters, buffers and state_dict keys)."""


class SyncBatchNorm3d(_Synced, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` with whole-batch statistics in training (same parameters, buffers and state_dict keys)."""


class SyncScalarBatchNorm(_Synced, ScalarBatchNorm):
    """:class:`~dkuxnet.models.kmax.ScalarBatchNorm` (one channel over every entry) with whole-batch statistics."""

    def _stat_dims(self, x: Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return tuple(range(x.dim())), (1,) * x.dim()


SYNCED = {nn.BatchNorm1d: SyncBatchNorm1d, nn.BatchNorm2d: SyncBatchNorm2d, nn.BatchNorm3d: SyncBatchNorm3d,
          ScalarBatchNorm: SyncScalarBatchNorm}


class SyncConvBN(ConvBN):
    """:class:`~dkuxnet.models.kmax.ConvBN` that calls its norm as a module, so a synced norm's ``forward`` runs.

    ``ConvBN`` fuses BatchNorm and GELU by reading the norm's parameters directly (``ops.batch_norm_gelu``),
    which would bypass a synced norm; this computes GELU(norm(conv(x))), the same function.
    """

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm(self.conv(x))
        return F.gelu(y) if self.act else y


class SyncAssignmentHead(AssignmentHead):
    """:class:`~dkuxnet.models.kmax.AssignmentHead` whose pixel path calls its ConvBN modules (synced norms).

    The head's memory-saving pixel path (``pixel_mlp``, in slabs) reads the hidden BatchNorm's parameters
    directly; this computes the same Kp = pixel_out(pixel_conv(pixel_dw(x))) through the modules, whole.
    """

    def pixel_keys(self, pixels: Tensor, slab_voxels: int | None = None) -> Tensor:
        return self.pixel_out(self.pixel_conv(self.pixel_dw(pixels)))


FUSED = {ConvBN: SyncConvBN, AssignmentHead: SyncAssignmentHead}  # modules that bypass their norms' forward


def sync_batchnorm(model: nn.Module) -> int:
    """Give every BatchNorm of ``model`` whole-batch statistics, in place; returns how many were converted.

    Each layer keeps its identity, parameters, buffers and ``state_dict`` keys (only its class changes, to the
    :data:`SYNCED` form; the modules of :data:`FUSED`, which compute their norms without calling them, become
    forms that call them), so checkpoints load into a synced or a plain model alike. Unlike
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` it keeps :class:`ScalarBatchNorm`'s one statistic over all
    entries, and it runs on gloo (CPU) as well as NCCL.

    Raises:
        ValueError: a BatchNorm type without a synced form here, or one without affine parameters.
    """
    converted = 0
    for name, m in model.named_modules():
        if type(m) in FUSED:
            m.__class__ = FUSED[type(m)]
        if type(m) in SYNCED.values() or not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        if type(m) not in SYNCED or m.weight is None:
            raise ValueError(f"model: BatchNorm {name!r} ({type(m).__name__}) has no synced form (affine "
                             f"{', '.join(t.__name__ for t in SYNCED)} only)")
        m.__class__ = SYNCED[type(m)]
        converted += 1
    return converted


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


def sum_over_ranks(values: Tensor, replicated: list[bool]) -> Tensor:
    """Σ_r of each entry of ``values`` (one all-reduce), except the ``replicated`` ones, which are rank 0's."""
    if _world() == 1:
        return values
    keep = torch.tensor(replicated, device=values.device) & (dist.get_rank() != 0)
    total = torch.where(keep, torch.zeros_like(values), values)
    dist.all_reduce(total)
    return total


def first_bad_over_ranks(first_bad: Tensor) -> Tensor:
    """The smallest non-negative ``first_bad`` (iteration of a non-finite loss) over ranks, or -1 when none has one."""
    if _world() == 1:
        return first_bad
    big = torch.iinfo(first_bad.dtype).max
    lowest = torch.where(first_bad < 0, torch.full_like(first_bad, big), first_bad)
    dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
    return torch.where(lowest == big, torch.full_like(first_bad, -1), lowest)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on some rank (one all-reduce and one host sync)."""
    if _world() == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
