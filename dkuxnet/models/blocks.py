"""Shared building blocks: channels-first LayerNorm, UNETR-style residual blocks, checkpointing.

The residual blocks compute exactly what MONAI's ``UnetResBlock`` / ``UnetrBasicBlock`` /
``UnetrUpBlock`` compute with ``norm_name="instance"`` and ``res_block=True`` (the blocks 3D UX-Net's
``networks/UXNet_3D/network_backbone.py`` and DK-UXNet's ``networks/DKUNet/network_backbone.py`` build),
with the same parameter count (convolutions without bias, instance norm without affine parameters).
They are re-written here (about 40 lines) to keep parameter names short and to control layouts.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts


class LayerNorm3d(nn.LayerNorm):
    """LayerNorm over the channel axis of a B×C×X×Y×Z tensor (ConvNeXt's ``channels_first`` LayerNorm).

    3D UX-Net writes this as a chain of ``mean``/``var``/``sqrt``/affine ops (5–6 kernels and as many
    saved tensors). Here it is one ``F.layer_norm`` on the channels-last view: the same function
    (biased variance, ``eps`` inside the square root), one fused kernel. The output has the memory layout
    of the permuted view, i.e. ``channels_last_3d`` for a contiguous input (free for a channels-last one).
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.permute(0, 2, 3, 4, 1)  # B×X×Y×Z×C
        y = F.layer_norm(y, self.normalized_shape, self.weight, self.bias, self.eps)
        return y.permute(0, 4, 1, 2, 3)  # B×C×X×Y×Z


def _instance_norm(x: torch.Tensor) -> torch.Tensor:
    return F.instance_norm(x, eps=1e-5)


class ResBlock3d(nn.Module):
    """conv3³ → IN → LeakyReLU(0.01) → conv3³ → IN, + (1³ conv → IN when C_in ≠ C_out), → LeakyReLU.

    Same computation and parameters as MONAI ``UnetResBlock(3, c_in, c_out, 3, 1, "instance")``.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False)
        self.conv3 = nn.Conv3d(in_channels, out_channels, 1, bias=False) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(_instance_norm(self.conv1(x)), 0.01)
        out = _instance_norm(self.conv2(out))
        residual = x if self.conv3 is None else _instance_norm(self.conv3(x))
        return F.leaky_relu(out + residual, 0.01)


class UpBlock3d(nn.Module):
    """Transposed conv k2 s2 (no bias) C_in→C_out, concatenate the skip (C_out), ResBlock3d(2·C_out→C_out).

    Same computation and parameters as MONAI ``UnetrUpBlock(3, c_in, c_out, 3, 2, "instance", res_block=True)``.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(in_channels, out_channels, 2, stride=2, bias=False)
        self.block = ResBlock3d(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat((self.up(x), skip), dim=1))  # B×2C_out×X×Y×Z → B×C_out×X×Y×Z


@contextlib.contextmanager
def _frozen_running_stats(module: nn.Module) -> Iterator[None]:
    """Recompute a block without touching its BatchNorm running statistics a second time."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0) · running + 0 · batch: unchanged
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


_replay_scopes: list[tuple[bool, dict[int, list[Any]], dict[int, int]]] = []  # (recompute?, values, cursors)


class _RecomputeScope(contextlib.AbstractContextManager):
    """The context of every backward recompute of one checkpointed call: frozen statistics, replayed values.

    Re-enterable (a generator context manager is one-shot): a second backward through the same graph
    (``retain_graph=True``, or ``torch.autograd.grad`` twice) recomputes again and replays the same values.
    """

    def __init__(self, owner: nn.Module, store: dict[int, list[Any]]) -> None:
        self.owner, self.store = owner, store
        self.stack = contextlib.ExitStack()

    def __enter__(self) -> None:
        with contextlib.ExitStack() as stack:
            stack.enter_context(_frozen_running_stats(self.owner))
            stack.enter_context(_replay_scope(True, self.store))
            self.stack = stack.pop_all()

    def __exit__(self, *exc: Any) -> None:
        self.stack.close()


@contextlib.contextmanager
def _replay_scope(recompute: bool, store: dict[int, list[Any]]) -> Iterator[None]:
    _replay_scopes.append((recompute, store, {}))
    try:
        yield
    finally:
        _replay_scopes.pop()


def replayed(owner: nn.Module, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``compute()`` in a forward; in the backward recompute of a :func:`maybe_checkpoint` call, the value
    that forward computed, returned verbatim instead of computed again.

    For values that gradients depend on but that are not differentiable themselves, such as the hard
    k-means assignment: a recompute that differs in the last bits (atomics in ``index_add`` on CUDA)
    could flip a near-tie argmax, and backward would then follow another assignment than the forward.
    Values are keyed by ``owner`` and replayed in call order. Outside a checkpoint this is ``compute()``.
    """
    if not _replay_scopes:
        return compute()
    recompute, store, cursors = _replay_scopes[-1]
    key = id(owner)
    if not recompute:
        value = compute()
        store.setdefault(key, []).append(value)
        return value
    i = cursors.get(key, 0)
    cursors[key] = i + 1
    return store[key][i]


def maybe_checkpoint(
    fn: Callable[..., Any], *args: torch.Tensor, enabled: bool, module: nn.Module | None = None
) -> Any:
    """``fn(*args)``, recomputed in backward (``torch.utils.checkpoint``, non-reentrant) when ``enabled``.

    ``fn`` is a module or a callable of ``module``. Only active while ``module`` (default: ``fn``) is training
    with gradients on. BatchNorm running statistics are updated once, in the first forward, as without
    checkpointing (the eager recomputation runs with momentum 0), and values marked with :func:`replayed`
    are reused from the forward, not recomputed. A second backward through the same graph
    (``retain_graph=True``) recomputes again, with the same replayed values.

    Under ``torch.compile`` the region becomes selective checkpointing that saves the output of every
    ``aten.argmax`` and recomputes the rest, so the compiled backward reuses the forward's hard
    assignments too (tests check its backward graph has no argmax). There the replay is by operator, not by
    :func:`replayed`: a marked value computed by anything else than ``argmax`` would be recomputed.
    The compiled graph updates the running statistics once (functionalised), so nothing is frozen there.
    """
    owner = fn if module is None else module
    if not (enabled and owner.training and torch.is_grad_enabled()):
        return fn(*args)
    if torch.compiler.is_compiling():
        return checkpoint(fn, *args, use_reentrant=False, context_fn=_SAVE_ARGMAX)

    def contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        store: dict[int, list[Any]] = {}
        return _replay_scope(False, store), _RecomputeScope(owner, store)

    return checkpoint(fn, *args, use_reentrant=False, context_fn=contexts)


def _argmax_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Selective checkpointing under ``torch.compile``: keep every ``argmax`` of the forward, recompute the rest."""
    return CheckpointPolicy.MUST_SAVE if op is torch.ops.aten.argmax.default else CheckpointPolicy.PREFER_RECOMPUTE


# a module-level partial: the one kind of context_fn dynamo accepts
_SAVE_ARGMAX = functools.partial(create_selective_checkpoint_contexts, _argmax_policy)
