"""The training step and the run state it mutates (used by :mod:`dkuxnet.train` and :mod:`dkuxnet.perf.bench`).

A :class:`Run` holds everything one optimisation step touches: the model, the optimiser, the data
resident on the device (a :class:`~dkuxnet.data.VolumeBank`), the two-stream sampler and the random
generators. :func:`train_step` performs one iteration of the objective on the book's method page without a
single host sync (no ``.item()``, ``float(tensor)`` or ``.cpu()``): the loss parts are summed into device
tensors, and a non-finite loss is recorded in a device-side counter. :func:`read_window` is the one
sync a caller makes every ``log_every`` iterations.

Random streams (all explicit, all saved in checkpoints so a resumed run is bit-identical on CPU):

* ``host`` — a CPU ``torch.Generator`` for the sampler and the spatial augmentation
  (rot90 / flip / crop offsets are drawn on the host, so no device sync);
* ``device`` — a generator on the run's device for the strong view's noise and the voxel sampling
  of the contrastive losses;
* the global torch RNG (CPU, and CUDA when used) for model initialisation and V-Net dropout.

Under ``torchrun`` (:func:`build_run` with a ``launch``) every rank holds the same generators, sampler and
bank, so all ranks draw the same global batch; each keeps its share of the volumes (``Run.shard``), forwards
it under DDP and minimises its share of the whole-batch loss (:mod:`dkuxnet.distributed`). The run state is
then the same on every rank, so a checkpoint written by rank 0 resumes with any number of ranks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from dkuxnet.config import Config, TrainConfig
from dkuxnet.data import TwoStreamSampler, VolumeBank, sample_patches, strong_view
from dkuxnet.distributed import (
    Launch, Shard, data_parallel, first_bad_over_ranks, shard_dropout, sum_over_ranks, sync_batchnorm,
)
from dkuxnet.losses import REPLICATED_PARTS, semi_supervised_loss
from dkuxnet.inference import resolve_device
from dkuxnet.models import create_model
from dkuxnet.results import device_name, git_commit, write_json

CHECKPOINT_FORMAT = "dkuxnet-checkpoint-v1"


@dataclass
class Run:
    """Mutable state of one training run; see :func:`build_run`."""

    cfg: Config
    device: torch.device
    model: nn.Module  # the eager module (its state_dict is what checkpoints hold)
    forward: Callable[[Tensor], Any]  # ``model`` or ``torch.compile(model)``
    optimizer: torch.optim.Optimizer
    bank: VolumeBank  # labeled cases first, then unlabeled ones
    n_labeled: int
    sampler: TwoStreamSampler
    host_gen: torch.Generator
    device_gen: torch.Generator
    iteration: int = 0  # completed optimisation steps
    step_count: Tensor | None = None  # the same count on the device (for first_bad)
    first_bad: Tensor | None = None  # first iteration (1-based) with a non-finite loss; -1 = none
    sums: dict[str, Tensor] = field(default_factory=dict)  # loss parts summed over the log window
    window: int = 0  # steps in the current log window
    shard: Shard | None = None  # this rank's volumes of each batch under torchrun; None: the whole batch


def configure_backends(cfg: TrainConfig, device: torch.device) -> None:
    """cuDNN autotuning on CUDA unless ``deterministic`` (then deterministic cuDNN kernels)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic
        torch.backends.cudnn.deterministic = cfg.deterministic


def effective_unlabeled_bs(cfg: Config) -> int:
    """Unlabeled volumes per step: 0 for the ``seg`` ablation (labeled data only), else the config's."""
    return 0 if cfg.loss.ablation == "seg" else cfg.data.unlabeled_bs


def lr_at(cfg: TrainConfig, iteration: int) -> float:
    """Learning rate of the step that follows ``iteration`` completed steps.

    ``lr · 0.1^⌊iteration / lr_step⌋`` (the V-Net repositories' step decay, e.g. UA-MT's training scripts), or
    the constant ``lr`` when ``lr_step == 0``.
    """
    return cfg.lr * 0.1 ** (iteration // cfg.lr_step) if cfg.lr_step > 0 else cfg.lr


def _make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(
            model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda"
        )
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"train.optimizer must be 'adamw' or 'sgd', got {cfg.optimizer!r}")


def build_run(
    cfg: Config, bank: VolumeBank, n_labeled: int, device: str | torch.device | None = None,
    launch: Launch | None = None,
) -> Run:
    """Create model, optimiser, sampler and generators for ``cfg`` on data already in ``bank``.

    Args:
        cfg: the run's configuration.
        bank: volumes resident on ``device``: the ``n_labeled`` labeled cases first, then the unlabeled.
        n_labeled: number of labeled cases at the start of ``bank``.
        device: where to train (default: cuda if available).
        launch: this process's rank in a torchrun job whose process group is up
            (:func:`dkuxnet.distributed.setup`): the run trains the rank's share of every batch (``Run.shard``)
            under DDP, with whole-batch BatchNorm statistics when ``train.sync_batchnorm``. None: one process.
    """
    device = resolve_device(device)
    if cfg.train.precision not in ("bf16", "fp32"):
        raise ValueError(f"train.precision must be 'bf16' or 'fp32', got {cfg.train.precision!r}")
    if cfg.data.views not in (1, 2):
        raise ValueError(f"data.views must be 1 or 2, got {cfg.data.views}")
    if cfg.model.two_networks:
        if cfg.data.views != 2:
            raise ValueError("model.two_networks needs data.views=2 (one network per view)")
        if cfg.loss.qdc_on != "cluster_probs":
            raise ValueError(
                "model.two_networks needs loss.qdc_on='cluster_probs': the query indices of two independently "
                "initialised networks do not correspond, so L_qdc compares the group outputs O (book: decisions page)"
            )
    n_unlabeled = len(bank) - n_labeled
    if not 0 < n_labeled <= len(bank):
        raise ValueError(f"n_labeled must be in 1..{len(bank)}, got {n_labeled}")
    u_bs = effective_unlabeled_bs(cfg)
    if u_bs > 0 and n_unlabeled == 0:
        raise ValueError("data.unlabeled_bs > 0 but the split has no unlabeled cases; set data.unlabeled_bs=0")
    volumes = cfg.data.labeled_bs + u_bs
    shard = None if launch is None else Shard(launch.rank, launch.world, volumes, cfg.data.labeled_bs)
    seed = cfg.train.seed
    torch.manual_seed(seed)  # model init (and dropout) use the global RNG
    model = create_model(cfg).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    model.train()
    forward: nn.Module = model
    if shard is not None:
        if cfg.train.sync_batchnorm:
            sync_batchnorm(model)
        shard_dropout(model, shard.rank, shard.world)
        forward = data_parallel(model, device, cfg.train.sync_batchnorm)
    host_gen = torch.Generator().manual_seed(seed)
    device_gen = torch.Generator(device=device).manual_seed(seed + 1)
    sampler = TwoStreamSampler(n_labeled, n_unlabeled, cfg.data.labeled_bs, u_bs, host_gen)
    return Run(
        cfg=cfg, device=device, model=model,
        forward=torch.compile(forward) if cfg.train.compile else forward,
        optimizer=_make_optimizer(model, cfg.train, device), bank=bank, n_labeled=n_labeled,
        sampler=sampler, host_gen=host_gen, device_gen=device_gen,
        step_count=torch.zeros((), dtype=torch.int64, device=device),
        first_bad=torch.full((), -1, dtype=torch.int64, device=device), shard=shard,
    )


def _autocast(run: Run) -> contextlib.AbstractContextManager:
    if run.device.type == "cuda" and run.cfg.train.precision == "bf16":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()  # CPU always trains in fp32


def train_step(run: Run) -> dict[str, Tensor]:
    """One iteration: sample, augment, forward both views in one pass, loss, optimiser step.

    No host sync. Returns the detached loss parts (``loss`` = total, plus the parts of
    :func:`dkuxnet.losses.semi_supervised_loss`) as device tensors; they are also added to
    ``run.sums`` for the current log window. Under torchrun (``run.shard``) every rank draws the global batch,
    keeps its volumes, and the parts are its shares (:func:`read_window` sums them over ranks).
    """
    cfg = run.cfg
    lab_idx, unl_idx = next(run.sampler)
    n_lab = len(lab_idx)
    idx = list(lab_idx) + [run.n_labeled + i for i in unl_idx]
    x, y = sample_patches(run.bank, idx, cfg.data.patch_size, run.host_gen)  # B×1×X×Y×Z, B×X×Y×Z
    if cfg.data.views == 2:
        x = torch.cat([x, strong_view(x, cfg.data, run.device_gen)])  # 2B×1×X×Y×Z, view-major
    labels = y[:n_lab]
    if run.shard is not None:  # this rank's volumes: views·B/N×1×X×Y×Z, its labeled ones
        x, labels, n_lab = run.shard.items(x, cfg.data.views), run.shard.labels(labels), run.shard.local_labeled
    if cfg.train.channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    lr = lr_at(cfg.train, run.iteration)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    with _autocast(run):
        out = run.forward(x)
    loss, parts = semi_supervised_loss(
        out, labels.long(), n_lab, cfg.data.views, cfg.loss, run.iteration,
        run.model.group_sizes, generator=run.device_gen, shard=run.shard,
    )
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    run.iteration += 1
    run.step_count += 1
    bad = ~torch.isfinite(loss.detach())
    run.first_bad = torch.where(bad & (run.first_bad < 0), run.step_count, run.first_bad)
    parts = {"loss": loss.detach(), **{k: v for k, v in parts.items() if k != "total"}}
    for name, value in parts.items():
        value = value.detach().float()
        run.sums[name] = run.sums[name] + value if name in run.sums else value.clone()
    run.window += 1
    return parts


def read_window(run: Run) -> tuple[dict[str, float], int]:
    """The one host sync: mean of each loss part over the window, and ``first_bad`` (-1 if none).

    Resets the window. Under torchrun the window sums of all ranks' shares and their earliest ``first_bad``
    (two all-reduces, on every rank).
    """
    names = list(run.sums)
    values = torch.stack([run.sums[n].double() for n in names] + [run.first_bad.double()])
    if run.shard is not None:
        shares = sum_over_ranks(values[:-1], [n in REPLICATED_PARTS for n in names])
        values = torch.cat([shares, first_bad_over_ranks(run.first_bad).double().reshape(1)])
    values = values.tolist()
    means = {n: v / max(run.window, 1) for n, v in zip(names, values)}
    run.sums, run.window = {}, 0
    return means, int(values[-1])


def first_bad_iteration(run: Run) -> int:
    """First 1-based iteration whose loss was non-finite, or -1 (one host sync; under torchrun over all ranks)."""
    return int((run.first_bad if run.shard is None else first_bad_over_ranks(run.first_bad)).item())


def run_state(run: Run) -> dict[str, Any]:
    """Checkpoint dict (``checkpoint.py`` format) of everything needed to continue exactly.

    The lr schedule needs no state of its own: it is :func:`lr_at` of the config and the iteration. Under
    torchrun every rank holds the same state (same generators, sampler, weights, optimiser), so it is not
    tied to a rank or a number of ranks; only with ``train.sync_batchnorm=False`` are the BatchNorm running
    statistics rank 0's (each rank's differ, as DataParallel's replicas' do).
    """
    rng = {"host": run.host_gen.get_state(), "device": run.device_gen.get_state(), "torch": torch.get_rng_state()}
    if run.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(run.device)
    return {
        "format": CHECKPOINT_FORMAT,
        "config": run.cfg.to_dict(),
        "model": run.model.state_dict(),
        "iteration": run.iteration,
        "optimizer": run.optimizer.state_dict(),
        "rng": rng,
        "sampler": run.sampler.state_dict(),
    }


def schedule_state(cfg: TrainConfig, iteration: int) -> dict[str, Any]:
    """The lr schedule at ``iteration`` (a pure function of config and iteration; stored for readers)."""
    return {"kind": "step" if cfg.lr_step > 0 else "constant", "base_lr": cfg.lr, "lr_step": cfg.lr_step,
            "gamma": 0.1, "lr": lr_at(cfg, iteration)}


def load_run_state(run: Run, ckpt: dict[str, Any]) -> None:
    """Inverse of :func:`run_state`: restore weights, optimiser, sampler, generators, iteration."""
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.sampler.load_state_dict(ckpt["sampler"])
    rng = ckpt["rng"]
    run.host_gen.set_state(rng["host"])
    run.device_gen.set_state(rng["device"])
    torch.set_rng_state(rng["torch"])
    if run.device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], run.device)
    run.iteration = int(ckpt["iteration"])
    run.step_count = torch.full((), run.iteration, dtype=torch.int64, device=run.device)
    run.first_bad = torch.full((), -1, dtype=torch.int64, device=run.device)
    run.sums, run.window = {}, 0
