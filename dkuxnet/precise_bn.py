r"""Precise BatchNorm statistics: running mean / variance recomputed with the final weights (pycls, Detectron2).

In training every BatchNorm keeps an exponential moving average (EMA) of its batch statistics,
running ← (1 − m)·running + m·batch, with m = ``momentum`` (0.1 in the V-Net, 0.01 in the kMaX decoder).
After a short run that average lags behind the final weights: with m = 0.01 the initial values (mean 0,
variance 1) still hold 0.99^T of it after T steps (67 % after 40, 37 % after 100), the rest is spread over
the statistics of earlier weights, and eval-mode predictions, which normalise with it, collapse.

:func:`recompute_bn_stats` resets every BatchNorm's running statistics and forwards N training batches
with ``momentum=None``, torch's cumulative average: after batch k,
running ← running + (batch_k − running) / k, so after N batches, per channel,

.. math::
    \text{running\_mean} = \frac1N\sum_{k=1}^N \mu_k,\qquad
    \text{running\_var} = \frac1N\sum_{k=1}^N \frac{n_k}{n_k - 1}\,\sigma_k^2,\qquad
    \text{num\_batches\_tracked} = N,

where μ_k and σ²_k are the mean and biased variance of batch k over its n_k entries per channel (batch ×
spatial positions, or all entries for :class:`~dkuxnet.models.kmax.ScalarBatchNorm`): the plain average
of the N batch means and unbiased batch variances.

The batches are the training distribution with fixed seeds of their own (the run's generators, sampler
and the global RNG are not touched, so a resumed run stays bit-identical): ``labeled_bs`` labeled +
:func:`~dkuxnet.engine.effective_unlabeled_bs` unlabeled cases of the run's bank per batch, drawn by a
:class:`~dkuxnet.data.TwoStreamSampler` and cropped by :func:`~dkuxnet.data.sample_patches` from a CPU
generator seeded with ``seed``; the weak view only. With ``model.two_networks`` each network gets the view
it trains on: the first the weak view, the second the strong view (:func:`~dkuxnet.data.strong_view`, from a
generator on the run's device seeded with ``seed + 1``). Only the BatchNorm layers are in training mode
(dropout off); there is no gradient, so activation checkpointing is bypassed.

Under torchrun the recomputation runs on **all ranks**: every rank draws the same batches and forwards its
share of the volumes (``run.shard``), and with ``train.sync_batchnorm`` (the default) the BatchNorm layers
take the statistics of the whole batch, so every rank ends with the statistics one process computes (up to
float summation order) and rank 0 saves them; the work is split like training's. With
``train.sync_batchnorm=False`` each rank averages its own shares' statistics and rank 0's are saved.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from dkuxnet.data import TwoStreamSampler, sample_patches, strong_view
from dkuxnet.engine import Run, _autocast, effective_unlabeled_bs

BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def batchnorm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm of ``model`` (any ``_BatchNorm`` subclass) that keeps running statistics, by name."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}


def _bn_buffer_refs(model: nn.Module) -> dict[str, Tensor]:
    """The running-statistics buffers of :func:`batchnorm_layers` themselves, keyed as in ``model.state_dict()``."""
    return {f"{name}.{buf}" if name else buf: getattr(m, buf)
            for name, m in batchnorm_layers(model).items() for buf in BN_BUFFERS}


def bn_buffers(model: nn.Module) -> dict[str, Tensor]:
    """Copies of the running statistics of :func:`batchnorm_layers`, keyed as in ``model.state_dict()``."""
    return {name: value.detach().clone() for name, value in _bn_buffer_refs(model).items()}


def load_bn_buffers(model: nn.Module, buffers: dict[str, Tensor]) -> None:
    """Copy ``buffers`` (as :func:`bn_buffers` returns them) into ``model``'s BatchNorm layers, in place.

    Raises:
        ValueError: the names are not exactly those of ``model``'s BatchNorm buffers, or a shape differs.
    """
    own = _bn_buffer_refs(model)
    missing, unknown = sorted(set(own) - set(buffers)), sorted(set(buffers) - set(own))
    if missing or unknown:
        raise ValueError(f"BatchNorm buffers do not match the model: missing {missing[:3]}, unknown {unknown[:3]}")
    with torch.no_grad():
        for name, value in buffers.items():
            if own[name].shape != value.shape:
                raise ValueError(f"BatchNorm buffer {name!r} has shape {tuple(value.shape)}, "
                                 f"the model's {tuple(own[name].shape)}")
            own[name].copy_(value)


@contextlib.contextmanager
def _batchnorm_only_training(model: nn.Module) -> Iterator[None]:
    """Eval mode except the BatchNorm layers (training, ``momentum=None``, statistics reset); restored after."""
    modes = {m: m.training for m in model.modules()}
    layers = batchnorm_layers(model).values()
    momenta = {m: m.momentum for m in layers}
    model.eval()
    for m in layers:
        m.train()
        m.momentum = None
        m.reset_running_stats()
    try:
        yield
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, mode in modes.items():
            m.training = mode


def _weak_views(run: Run, batches: int, seed: int) -> Iterator[Tensor]:
    """``batches`` weak-view batches (B×1×X×Y×Z) drawn as training draws them, from a CPU generator seeded ``seed``."""
    cfg = run.cfg
    host = torch.Generator().manual_seed(seed)
    n_unlabeled = len(run.bank) - run.n_labeled
    sampler = TwoStreamSampler(run.n_labeled, n_unlabeled, cfg.data.labeled_bs, effective_unlabeled_bs(cfg), host)
    for _ in range(batches):
        lab_idx, unl_idx = next(sampler)
        idx = list(lab_idx) + [run.n_labeled + i for i in unl_idx]
        x, _ = sample_patches(run.bank, idx, cfg.data.patch_size, host)
        yield x.contiguous(memory_format=torch.channels_last_3d) if cfg.train.channels_last else x


def _own(run: Run, x: Tensor) -> Tensor:
    """This rank's volumes of a batch every rank drew (all of them in one process): B×… → B/N×…."""
    return x if run.shard is None else run.shard.items(x, 1)


def _cases_used(run: Run) -> int:
    return run.n_labeled + (len(run.bank) - run.n_labeled if effective_unlabeled_bs(run.cfg) > 0 else 0)


def recompute_bn_stats(run: Run, batches: int, seed: int) -> dict[str, Any]:
    """Replace the running statistics of every BatchNorm of ``run.model`` by their average over ``batches`` batches.

    running_mean = (1/N)·Σ_k μ_k and running_var = (1/N)·Σ_k s²_k (s²_k the unbiased variance of batch k),
    num_batches_tracked = N (see the module docstring). Runs the eager ``run.model`` without gradients, the
    BatchNorm layers in training mode and the rest in eval mode, with the training autocast (bf16 on CUDA).
    Under torchrun every rank calls it and forwards its share of each batch (module docstring).
    Afterwards every layer's momentum and the model's train / eval modes are as before; the run's generators,
    sampler and the global RNG are untouched. The model keeps the recomputed statistics.

    Args:
        run: the trained run (its bank holds exactly the cases it trains on: labeled first).
        batches: N ≥ 1, number of batches averaged.
        seed: seed of the batches' own generators (host: ``seed``; strong view of ``two_networks``: ``seed + 1``).

    Returns:
        The record ``{"batches": N, "seed": seed, "volumes_per_batch": labeled_bs + unlabeled per batch,
        "cases": distinct cases drawn from}``.
    """
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ValueError(f"batches must be an integer >= 1, got {batches!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    cfg, model = run.cfg, run.model
    strong_gen = torch.Generator(device=run.device).manual_seed(seed + 1)
    with torch.no_grad(), _batchnorm_only_training(model), _autocast(run):
        for x in _weak_views(run, batches, seed):
            if cfg.model.two_networks:
                model.first(_own(run, x))
                model.second(_own(run, strong_view(x, cfg.data, strong_gen)))
            else:
                model(_own(run, x))
    return {"batches": batches, "seed": seed, "volumes_per_batch": cfg.data.labeled_bs + effective_unlabeled_bs(cfg),
            "cases": _cases_used(run)}


def recomputed_bn_state(run: Run, batches: int, seed: int) -> dict[str, Any]:
    """The checkpoint entry ``bn_recomputed``: ``{"buffers": recomputed statistics, "record": ...}``.

    Computes :func:`recompute_bn_stats` and then puts the training EMA statistics back into ``run.model``
    (also when it fails), so training state and ``model.state_dict()`` are unchanged.
    """
    ema = bn_buffers(run.model)
    try:
        record = recompute_bn_stats(run, batches, seed)
        recomputed = bn_buffers(run.model)
    finally:
        load_bn_buffers(run.model, ema)
    return {"buffers": recomputed, "record": record}
