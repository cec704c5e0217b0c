r"""Where a BatchNorm's batch statistics come from, for every path that computes a BatchNorm without calling it.

Three paths compute BatchNorm themselves to save memory: :func:`~dkuxnet.ops.batch_norm_gelu` (a ConvBN with
GELU), :func:`~dkuxnet.models.pixel_mlp.pixel_mlp` (the predictor's hidden layer in slabs) and
:class:`~dkuxnet.models.kmax.ScalarBatchNorm`. In training each needs, per channel, the batch moments in forward
and two gradient sums in backward,

.. math::
    \mu = \tfrac1n\textstyle\sum x,\quad \sigma^2 = \tfrac1n\sum (x - \mu)^2,\qquad
    \partial x = \gamma r\big(\partial y - \tfrac1n\sum\partial y - \hat x\,\tfrac1n\sum \partial y\,\hat x\big),
    \quad \hat x = (x - \mu)\,r,\ r = (\sigma^2 + \varepsilon)^{-1/2},

where the sums run over the whole batch. A plain norm's whole batch is the input at hand. A norm that is a
:class:`WholeBatchNorm` (the synced norms of :mod:`dkuxnet.distributed`, whose batch is spread over ranks)
extends both to the whole batch: the paths take their moments through :func:`batch_moments` and their
gradient sums through :func:`batch_sums`, so one rule serves them all and no module is swapped.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dkuxnet.precision import upcast


class WholeBatchNorm:
    """Mixin of a BatchNorm whose batch holds more entries than its input (e.g. the shares of other processes).

    Subclasses combine the statistics of the entries at hand with those of the rest of the batch.
    """

    def combine_moments(self, mean: Tensor, var: Tensor, count: int) -> tuple[Tensor, Tensor, int]:
        """The whole batch's per-channel (μ, σ², n) from those of this input's ``count`` entries per channel."""
        raise NotImplementedError(f"{type(self).__name__} must define combine_moments")

    def combine_sums(self, sums: Tensor) -> Tensor:
        """Per-channel sums (any shape) of this input's entries → the same sums over the whole batch."""
        raise NotImplementedError(f"{type(self).__name__} must define combine_sums")


def spans_batch(norm: nn.Module) -> bool:
    """True when ``norm``'s batch holds more than its input (a :class:`WholeBatchNorm`)."""
    return isinstance(norm, WholeBatchNorm)


def batch_moments(norm: nn.Module, mean: Tensor, var: Tensor, count: int) -> tuple[Tensor, Tensor, int]:
    """Per-channel mean, biased variance and count of ``norm``'s whole batch from those of the input at hand."""
    return norm.combine_moments(mean, var, count) if isinstance(norm, WholeBatchNorm) else (mean, var, count)


def batch_sums(norm: nn.Module, sums: Tensor) -> Tensor:
    """Per-channel gradient sums (Σ∂y, Σ∂y·x̂ stacked) over ``norm``'s whole batch from those of the input at hand."""
    return norm.combine_sums(sums) if isinstance(norm, WholeBatchNorm) else sums


def input_moments(norm: nn.Module, x: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor, int]:
    """:func:`batch_moments` of ``x`` reduced over ``dims`` (one ``var_mean`` in the compute dtype, no gradient).

    Returns μ, σ² in the compute dtype (fp32 for half inputs) and the count n of the whole batch per channel.
    """
    with torch.no_grad():
        var, mean = torch.var_mean(upcast(x), dim=dims, correction=0)
        return batch_moments(norm, mean, var, x.numel() // max(mean.numel(), 1))


def update_running(norm: nn.modules.batchnorm._BatchNorm, mean: Tensor, var: Tensor, count: int,
                   factor: float | Tensor) -> None:
    r"""running_mean ← (1 − m)·running_mean + m·μ, running_var ← (1 − m)·running_var + m·σ²·n/(n − 1), m = ``factor``.

    ``factor``: ``norm.momentum``, or 1/num_batches_tracked for the cumulative average (the caller counts the batch).
    """
    with torch.no_grad():
        norm.running_mean.mul_(1 - factor).add_(factor * mean)
        norm.running_var.mul_(1 - factor).add_(factor * var * (count / max(count - 1, 1)))


def whole_batch_input_grad(dx: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor, sums: Tensor,
                           count: int) -> Tensor:
    r"""A training BatchNorm's ∂x from its eval-mode ∂x = γr·∂y, in place (channels on dim 1):

    .. math:: \partial x = \gamma r\,\partial y + k_1 x + k_0,\qquad
        k_1 = -\gamma r^2\,\tfrac1n\textstyle\sum \partial y\,\hat x,\quad
        k_0 = -\gamma r\,\tfrac1n\textstyle\sum \partial y - \mu k_1

    (the formula above, expanded), with ``sums`` = (Σ∂y, Σ∂y·x̂), 2×C, over the whole batch of ``count`` = n
    entries per channel. No full-size temporary beyond ``dx``.
    """
    shape = (1, -1) + (1,) * (x.dim() - 2)
    scale = weight * rstd  # C
    k1 = -sums[1] / count * scale * rstd
    k0 = -sums[0] / count * scale - mean * k1
    return dx.addcmul_(x, k1.view(shape)).add_(k0.view(shape))
