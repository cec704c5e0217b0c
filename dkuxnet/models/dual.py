"""Two independently initialised DKUXNets, one per view: the ``model.two_networks`` ablation (book: decisions page).

The paper's Fig. 1 draws a StrongAug and a WeakAug branch, each an "Encoder-Decoder", joined by the
consistency losses; whether the two share weights is not written, and the official code builds one model.
The default reading ([decision]) is one shared-weight network applied to both views: only then do the
query indices of the two views correspond, which L_qdc on the N-dimensional assignment S needs. This is the
other reading: the weak view goes through ``first``, the strong view through ``second``; L_qdc then compares
the 3-group cluster outputs O (``loss.qdc_on="cluster_probs"``), and inference uses ``first``.
"""

from __future__ import annotations

import torch
from torch import nn

from dkuxnet.config import ModelConfig
from dkuxnet.models.dkuxnet import DKUXNet, ModelOutput


def _cat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return None if a is None or b is None else torch.cat([a, b])


class TwoNetworks(nn.Module):
    """``forward(x)``: in training, x = [weak view (B items); strong view (B items)] (2B×C×X×Y×Z) and the
    output is view-major like a shared network's; in eval mode, ``first(x)``.

    Args:
        cfg: the architecture of each network (built one after the other from the global RNG, so their
            initial weights differ).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.first = DKUXNet(cfg)
        self.second = DKUXNet(cfg)
        self.group_sizes = self.first.group_sizes

    def forward(self, x: torch.Tensor) -> ModelOutput:
        if not self.training:
            return self.first(x)
        if x.shape[0] % 2:
            raise ValueError(f"two_networks: training input must hold 2 views × B items, got batch {x.shape[0]}")
        half = x.shape[0] // 2
        a, b = self.first(x[:half]), self.second(x[half:])
        return ModelOutput(
            seg_logits=torch.cat([a.seg_logits, b.seg_logits]),
            query_seg_logits=_cat(a.query_seg_logits, b.query_seg_logits),
            cluster_probs=_cat(a.cluster_probs, b.cluster_probs),
            query_probs=_cat(a.query_probs, b.query_probs),
            query_logits=_cat(a.query_logits, b.query_logits),
            aux=[torch.cat([m, n]) for m, n in zip(a.aux, b.aux)],
        )
