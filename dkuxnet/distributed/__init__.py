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
  :class:`SyncScalarBatchNorm`); the fused paths that compute a norm without calling it take the same
  statistics through :mod:`dkuxnet.batch_stats`. Off, each rank normalises with its own share, as the authors' ``DataParallel``
  training did, and DDP hands rank 0's running statistics to every rank before each forward (DataParallel
  keeps those of its first GPU).
* **Dropout** (V-Net): :func:`shard_dropout` draws the whole batch's channel mask on every rank and keeps its
  rows, so the masks are those of one process.

Other batch-level operations of the models need nothing: instance norm and LayerNorm are per volume, the
k-means assignment and update are per volume.

The parts: :mod:`~dkuxnet.distributed.launch` (the process group), :mod:`~dkuxnet.distributed.collectives`,
:mod:`~dkuxnet.distributed.batchnorm` (synced norms), :mod:`~dkuxnet.distributed.ddp` (shares, dropout, DDP).
"""

from dkuxnet.distributed.batchnorm import (
    SYNCED, SyncBatchNorm1d, SyncBatchNorm2d, SyncBatchNorm3d, SyncScalarBatchNorm, sync_batchnorm,
)
from dkuxnet.distributed.collectives import all_gather, all_sum, any_rank, first_bad_over_ranks, sum_over_ranks
from dkuxnet.distributed.ddp import Shard, ShardedDropout3d, data_parallel, shard_dropout
from dkuxnet.distributed.launch import ENV_VARS, Launch, is_main, launch_from_env, setup, teardown, world

__all__ = [
    "ENV_VARS", "SYNCED", "Launch", "Shard", "ShardedDropout3d", "SyncBatchNorm1d", "SyncBatchNorm2d",
    "SyncBatchNorm3d", "SyncScalarBatchNorm", "all_gather", "all_sum", "any_rank", "data_parallel",
    "first_bad_over_ranks", "is_main", "launch_from_env", "setup", "shard_dropout", "sum_over_ranks",
    "sync_batchnorm", "teardown", "world",
]
