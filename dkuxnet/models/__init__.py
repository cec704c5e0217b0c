"""Models: DKUXNet (``dkuxnet.py``, built from ``uxnet.py``, ``blocks.py``, ``kmax.py``), its two-network
ablation (``dual.py``) and UA-MT's V-Net.

``create_model(cfg)`` builds the network a config describes; ``model_info(preset)`` counts its parameters
on the meta device (no memory, instant), e.g. ``python -m dkuxnet model-info --preset paper``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dkuxnet.config import Config, ModelConfig, get_preset
from dkuxnet.models.authors_uxnet import authors_uxnet_dead_parts, is_uxnet
from dkuxnet.models.dkuxnet import DKUXNet, ModelOutput, authors_dead_parts, named_parts, parts
from dkuxnet.models.dual import TwoNetworks
from dkuxnet.models.kmax import hard_assignment, kmeans_update
from dkuxnet.models.vnet import VNet

__all__ = [
    "DKUXNet", "ModelOutput", "TwoNetworks", "VNet", "authors_dead_parts", "authors_uxnet_dead_parts", "create_model",
    "hard_assignment", "kmeans_update", "model_info", "named_parts",
]


def create_model(cfg: Config | ModelConfig) -> nn.Module:
    """Build the model of ``cfg`` (``cfg.model.arch``: ``"dkuxnet"`` or ``"vnet"``) on the current default device."""
    model_cfg = cfg.model if isinstance(cfg, Config) else cfg
    if model_cfg.two_networks:
        if model_cfg.arch != "dkuxnet":
            raise ValueError(f"model.two_networks is defined for arch 'dkuxnet' only, got {model_cfg.arch!r}")
        return TwoNetworks(model_cfg)
    if model_cfg.arch == "dkuxnet":
        return DKUXNet(model_cfg)
    if model_cfg.arch == "vnet":
        return VNet(model_cfg)
    raise ValueError(f"unknown model arch {model_cfg.arch!r}; choose 'dkuxnet' or 'vnet'")


def model_info(preset: str) -> dict[str, Any]:
    """Parameter counts of a preset's model, built on the meta device.

    Returns:
        ``preset``, ``arch``, ``parameters`` (total), ``parts`` ({component: count}, summing to the total);
        for DKUXNet also ``kmax_layers``, ``assignment_heads`` (parameters of the per-layer heads),
        ``assignment_heads_trained`` (whether the preset's loss supervises them: ``loss.lambda_ds > 0``)
        and ``authors_dkunet`` (the authors' ``DKUNET`` class: its total and the dead parts we do not build);
        for a model with ``UXNET``'s architecture (``official``: conv head, 3 kMaX scales × 2 layers, the
        class the authors' ``main_train.py`` trains) also ``authors_uxnet``, the same for ``UXNET``.
    """
    cfg = get_preset(preset)
    with torch.device("meta"):
        model = create_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    info: dict[str, Any] = {"preset": preset, "arch": cfg.model.arch, "parameters": total}
    if isinstance(model, DKUXNet):
        dead = authors_dead_parts(cfg.model)
        info["parts"] = parts(model)
        info["kmax_layers"] = len(model.kmax)
        info["assignment_heads"] = sum(p.numel() for layer in model.kmax for p in layer.head.parameters())
        info["assignment_heads_trained"] = cfg.loss.lambda_ds > 0
        info["authors_dkunet"] = {"parameters": total + sum(dead.values()), "dead_parts_not_built": dead}
        if is_uxnet(cfg.model):
            dead_ux = authors_uxnet_dead_parts(cfg.model)
            info["authors_uxnet"] = {"parameters": total + sum(dead_ux.values()), "dead_parts_not_built": dead_ux}
    else:
        info["parts"] = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    return info
