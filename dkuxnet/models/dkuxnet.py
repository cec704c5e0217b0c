"""DKUXNet: 3D UX-Net encoder, UNETR-style conv decoder, kMaX decoder, query-based segmentation head.

Wu, Li, Zhang, "Semi-supervised Medical Image Segmentation via Query Distribution Consistency",
ISBI 2024 (arXiv 2311.12364); official code ``Rows21/DK-UXNet`` (``networks/DKUNet/network_backbone.py:
DKUNET``). Architecture as reconstructed on the book's method page ("The network"); shapes and parameter
counts per part in the model notebook (``notebooks/02_model``) and ``python -m dkuxnet model-info``.

Presets (``dkuxnet.config.get_preset``):

* ``paper``: kMaX on dec3, dec2, dec1 (strides 8/4/2) × 2 layers; the per-layer assignment heads are
  trained by deep supervision of ``ModelOutput.aux`` in the loss. 65,217,790 parameters.
* ``official``: the authors' ``UXNET`` variant that their ``main_train.py`` trains: the ``paper``
  architecture plus the conv head on dec0 (``seg_head="conv"``, 124,514 parameters), which is the
  supervised output; Y stays unsupervised. 65,342,304 parameters.
* ``authors-script``: the authors' ``DKUNET`` class: kMaX on dec3 and dec2 only; the per-layer
  assignment heads exist (they produce the hard assignments) but receive no gradient, since nothing
  supervises them. 61,937,114 parameters. The authors' class has 65,503,397: it also holds parts that
  never influence its outputs, which we do not build (:func:`authors_dead_parts`):

  ====================================================  ==========
  authors' ``DKUNET`` (K = 2, N = 128)                  65,503,397
  − GRN layers of the 8 UX blocks (switched off)           −11,520
  − conv head (``decoder1`` ResBlock 48→48 + ``out``)     −124,514
  − the 2 kMaX layers built for dec1 but never called   −3,297,124
  − 32-way class heads of the 4 running kMaX layers        −32,896
  − class-embedding projection (feeds a class head)        −66,048
  − final 133-way class head                               −34,181
  = ``authors-script`` preset                           61,937,114
  ====================================================  ==========

  (``paper`` = ``authors-script`` + 2 dec1 layers without class heads, 2 × 1,640,338.)

Precision and memory: the model is bf16-autocast friendly; the affinities, assignments, k-means updates,
query attention, ``softmax_N`` and the segmentation/cluster sums run in fp32 islands, so every
``ModelOutput`` tensor is fp32. ``checkpoint_activations`` (on by default, off in ``tiny``) recomputes in
backward the blocks on the two finest grids: enc1, enc2, dec1, dec0, the kMaX layers of the finest kMaX
scale, and the final predictor (pixel path and fp32 affinity, one segment) with its 256-channel
full-resolution hidden layer in slabs (:mod:`~dkuxnet.models.pixel_mlp`); GELU after a BatchNorm saves
only the BatchNorm's input (:func:`~dkuxnet.ops.batch_norm_gelu`). The predictor alone is not enough:
recomputed first in backward, while everything else is still held, it would only move the peak.
Measured with ``tools/memprobe.py`` before the slabs (CPU proxy, bf16 autocast,
``results/perf/memprobe_cpu.json``), the ``paper`` step at 2 views × 4 volumes of 112×112×80 kept
≈ 9.4 kB per voxel without and ≈ 3.1 kB with it. ``tools/traffic.py --peak`` (fp32-sized, meta device)
estimates the step's peak at 39.4 GiB (55.7 before the slabs), 28.1 GiB of it alive after forward + loss;
the peak is now in the loss's backward (the volume-level NT-Xent's 2B×(C·V) product). Under checkpointing the kMaX layers reuse
the forward's hard assignment (:func:`~dkuxnet.models.blocks.replayed`), so gradients and BatchNorm
statistics are identical to the un-checkpointed step (tests). There are no host syncs in ``forward`` (no
``.item()``, no branching on tensor values).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import nn

from dkuxnet.config import ModelConfig
from dkuxnet.models.blocks import ResBlock3d, UpBlock3d, maybe_checkpoint
from dkuxnet.models.depthwise import DEPTHWISE_CONVS
from dkuxnet.models.kmax import AssignmentHead, ConvBN, KMaXLayer, trunc_normal_
from dkuxnet.models.uxnet import UXNetEncoder
from dkuxnet.precision import fp32_island, upcast

AUTHORS_LAYER_CLASSES = 32  # per-layer class heads of DK-UXNet's kMaX layers (num_classes=32, + bias)
AUTHORS_FINAL_CLASSES = 133  # final class head of DK-UXNet (132 + 1 void; a COCO leftover)
SEG_HEADS = ("query", "conv")


@dataclass
class ModelOutput:
    """What every model returns (dkuxnet models contract).

    Attributes:
        seg_logits: B×K×X×Y×Z segmentation logits (softmax over K gives class probabilities): what the
            loss supervises and inference reads. The query-based Y = Σ_n Φ[n]·S[n] by default; the conv
            head's logits when ``seg_head="conv"``.
        query_seg_logits: Y when ``seg_head="conv"`` (then unsupervised, as in the official script), else None.
        cluster_probs: B×G×X×Y×Z, O[g] = Σ_{n∈g} S[n]; sums to 1 over groups. None for V-Net.
        query_probs: B×N×X×Y×Z, S = softmax_N(L), fp32. None for V-Net.
        query_logits: B×N×X×Y×Z, L, fp32. None for V-Net.
        aux: per kMaX layer (coarse to fine) its affinity logits M, B×N×x×y×z at that layer's grid, fp32.
    """

    seg_logits: torch.Tensor
    query_seg_logits: torch.Tensor | None = None
    cluster_probs: torch.Tensor | None = None
    query_probs: torch.Tensor | None = None
    query_logits: torch.Tensor | None = None
    aux: list[torch.Tensor] = field(default_factory=list)


def _check_config(cfg: ModelConfig) -> None:
    if cfg.arch != "dkuxnet":
        raise ValueError(f"arch must be 'dkuxnet' for DKUXNet, got {cfg.arch!r}")
    if len(cfg.widths) != len(cfg.depths) or len(cfg.widths) < 2:
        raise ValueError(f"widths and depths must have the same length >= 2, got {cfg.widths} and {cfg.depths}")
    sizes = {
        "in_channels": cfg.in_channels, "num_classes": cfg.num_classes, "hidden": cfg.hidden,
        "num_queries": cfg.num_queries, "query_dim": cfg.query_dim, "embed_dim": cfg.embed_dim,
        "num_heads": cfg.num_heads, "ffn_dim": cfg.ffn_dim, "kmax_layers_per_scale": cfg.kmax_layers_per_scale,
        "mlp_hidden": cfg.mlp_hidden, "widths": min(cfg.widths), "depths": min(cfg.depths),
    }
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} must be positive, got {getattr(cfg, name)}")
    for name in ("embed_dim", "query_dim"):
        if getattr(cfg, name) % cfg.num_heads:
            raise ValueError(f"num_heads ({cfg.num_heads}) must divide {name} ({getattr(cfg, name)})")
    if not 1 <= cfg.kmax_scales <= len(cfg.widths) - 1:
        raise ValueError(
            f"kmax_scales must be in [1, {len(cfg.widths) - 1}] for {len(cfg.widths)} stages, got {cfg.kmax_scales}"
        )
    if cfg.depthwise_conv not in DEPTHWISE_CONVS:
        raise ValueError(f"model.depthwise_conv must be one of {DEPTHWISE_CONVS}, got {cfg.depthwise_conv!r}")
    if cfg.seg_head not in SEG_HEADS:
        raise ValueError(f"seg_head must be one of {SEG_HEADS}, got {cfg.seg_head!r}")
    if not cfg.query_groups or min(cfg.query_groups) < 1 or sum(cfg.query_groups) != cfg.num_queries:
        raise ValueError(
            f"query_groups must be positive sizes summing to num_queries={cfg.num_queries}, got {cfg.query_groups}"
        )


class DKUXNet(nn.Module):
    """The DKUXNet network; ``forward(x: B×C_in×X×Y×Z) -> ModelOutput``, X, Y, Z divisible by 2^len(widths).

    Args:
        cfg: architecture (``dkuxnet.config.ModelConfig`` with ``arch="dkuxnet"``).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        _check_config(cfg)
        w, c = tuple(cfg.widths), cfg.query_dim
        self.group_sizes: tuple[int, ...] = tuple(cfg.query_groups)
        self.num_classes, self.num_queries = cfg.num_classes, cfg.num_queries
        self.layers_per_scale = cfg.kmax_layers_per_scale
        self.checkpoint_activations = cfg.checkpoint_activations
        self.encoder = UXNetEncoder(cfg.in_channels, w, cfg.depths, cfg.depthwise_conv)
        # enc1 (raw input, full resolution), enc2…enc_L (stage outputs), last = bottleneck (hidden)
        self.encoders = nn.ModuleList(
            ResBlock3d(c_in, c_out) for c_in, c_out in zip((cfg.in_channels, *w), (*w, cfg.hidden))
        )
        # coarse to fine: dec_{L-1} (stride 2^(L-1)) … dec0 (full resolution)
        self.decoders = nn.ModuleList(UpBlock3d(c_in, c_out) for c_in, c_out in zip((cfg.hidden, *w[:0:-1]), w[::-1]))
        self.kmax = nn.ModuleList(
            KMaXLayer(w[-1 - s], c, cfg.embed_dim, cfg.num_heads, cfg.ffn_dim, cfg.depthwise_conv)
            for s in range(cfg.kmax_scales)
            for _ in range(cfg.kmax_layers_per_scale)
        )
        indicator = torch.zeros(cfg.num_queries, len(self.group_sizes))  # N×G, 1 where query n is in group g
        for g, (start, size) in enumerate(zip(itertools.accumulate((0, *self.group_sizes)), self.group_sizes)):
            indicator[start : start + size, g] = 1.0
        self.register_buffer("group_indicator", indicator, persistent=False)
        self.cluster_centers = nn.Parameter(torch.empty(c, cfg.num_queries))  # C×N
        trunc_normal_(self.cluster_centers, 1.0)
        self.mask_embed = ConvBN(c, c, 1, act=True)
        self.predictor = AssignmentHead(w[0], c, cfg.embed_dim, cfg.depthwise_conv)
        # the authors' conv head (``decoder1`` ResBlock + 1³ ``out`` conv on dec0), built for seg_head="conv"
        self.conv_head = (
            nn.Sequential(ResBlock3d(w[0], w[0]), nn.Conv3d(w[0], cfg.num_classes, 1)) if cfg.seg_head == "conv" else None
        )
        self.mlp = nn.Sequential(  # over all flattened centres (C·N, channel-major) → N·K
            nn.Linear(cfg.num_queries * c, cfg.mlp_hidden),
            nn.ReLU(),
            nn.Linear(cfg.mlp_hidden, cfg.num_queries * cfg.num_classes),
        )

    def forward(self, x: torch.Tensor) -> ModelOutput:
        factor = 2 ** len(self.decoders)
        if x.dim() != 5 or any(s % factor for s in x.shape[2:]):
            raise ValueError(f"input must be B×C×X×Y×Z with X, Y, Z divisible by {factor}, got {tuple(x.shape)}")
        b, ckpt = x.shape[0], self.checkpoint_activations
        feats = self.encoder(x)  # strides 2 … 2^L
        # enc1 (B×w0×X×Y×Z) and enc2 (stride 2) are recomputed in backward under checkpoint_activations
        skips = [maybe_checkpoint(self.encoders[0], x, enabled=ckpt)]
        skips += [maybe_checkpoint(enc, f, enabled=ckpt and i == 0) for i, (enc, f) in enumerate(zip(self.encoders[1:-1], feats[:-1]))]
        h = self.encoders[-1](feats[-1])  # bottleneck: B×hidden×(X/2^L)×…
        decoded = []
        for i, dec in enumerate(self.decoders):  # dec1 and dec0 recomputed
            h = maybe_checkpoint(dec, h, skips[-1 - i], enabled=ckpt and i >= len(self.decoders) - 2)
            decoded.append(h)  # dec_{L-1}, …, dec0
        z = self.cluster_centers.unsqueeze(0).expand(b, -1, -1)  # B×C×N
        aux = []
        finest = (len(self.kmax) - 1) // self.layers_per_scale
        for i, layer in enumerate(self.kmax):  # the finest kMaX scale's layers recomputed
            scale = i // self.layers_per_scale
            z, m = maybe_checkpoint(layer, decoded[scale], z, enabled=ckpt and scale == finest)
            aux.append(m)  # m: B×N×x×y×z
        logits = self.predictor(decoded[-1], self.mask_embed(z), checkpoint=ckpt)  # B×N×X×Y×Z
        phi = self.mlp(z.flatten(1)).view(b, self.num_queries, self.num_classes)  # B×N×K
        with fp32_island(x.device):
            probs = upcast(logits).softmax(dim=1)  # B×N×X×Y×Z
            # Y = Σ_n Φ[n]·S[n] and O[g] = Σ_{n∈g} S[n] in one product: S is read once, its gradient written once
            weights = torch.cat((upcast(phi), self.group_indicator.to(phi.dtype).expand(b, -1, -1)), dim=2)  # B×N×(K+G)
            merged = torch.bmm(weights.transpose(1, 2), probs.flatten(2)).view(b, -1, *x.shape[2:])  # B×(K+G)×X×Y×Z
            seg, clusters = merged[:, : self.num_classes], merged[:, self.num_classes :]  # B×K×…, B×G×…
        out = ModelOutput(seg_logits=seg, cluster_probs=clusters, query_probs=probs, query_logits=logits, aux=aux)
        if self.conv_head is not None:
            out.query_seg_logits = seg
            out.seg_logits = self.conv_head(decoded[-1])  # B×K×X×Y×Z
        return out


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def authors_dead_parts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters the authors' ``DKUNET`` class would hold for ``cfg`` that our DKUXNet does not build.

    ``DKUNET`` always builds ``kmax_layers_per_scale`` kMaX layers for every decoder scale but the finest
    (each with a 32-way class head), a class-embedding projection, a 133-way final class head, a GRN per
    UX block and a conv head (ResBlock w0→w0 + 1³ conv w0→K); none of them influences its outputs.
    Our count plus the sum of the values is the authors' class: 65,503,397 for ``paper``, ``official`` and
    ``authors-script`` (with ``seg_head="conv"`` the conv head is built and supervised, so it is not counted here).
    """
    c = cfg.query_dim
    with torch.device("meta"):
        unused = [
            KMaXLayer(cfg.widths[-1 - s], c, cfg.embed_dim, cfg.num_heads, cfg.ffn_dim)
            for s in range(cfg.kmax_scales, len(cfg.widths) - 1)
            for _ in range(cfg.kmax_layers_per_scale)
        ]
        conv_head = _count(ResBlock3d(cfg.widths[0], cfg.widths[0])) + cfg.widths[0] * cfg.num_classes + cfg.num_classes
    class_head = (c + 1) * AUTHORS_LAYER_CLASSES
    built = cfg.kmax_scales * cfg.kmax_layers_per_scale
    return {
        "grn": sum(2 * 4 * w * d for w, d in zip(cfg.widths, cfg.depths)),
        "conv_head": 0 if cfg.seg_head == "conv" else conv_head,
        "unused_kmax_layers": sum(_count(m) for m in unused) + len(unused) * class_head,
        "kmax_class_heads": built * class_head,
        "class_embedding": c * c + 2 * c,
        "final_class_head": (c + 1) * AUTHORS_FINAL_CLASSES,
    }


def named_parts(model: DKUXNet) -> dict[str, nn.Module]:
    """The model's components by name (encoder, enc1…, dec3…dec0, kmax.dec3.0…, heads; book: method page)."""
    n_dec = len(model.decoders)
    out: dict[str, nn.Module] = {"encoder": model.encoder}
    out |= {f"enc{i + 1}": m for i, m in enumerate(model.encoders)}
    out |= {f"dec{n_dec - 1 - i}": m for i, m in enumerate(model.decoders)}
    for i, layer in enumerate(model.kmax):
        out[f"kmax.dec{n_dec - 1 - i // model.layers_per_scale}.{i % model.layers_per_scale}"] = layer
    if model.conv_head is not None:
        out["conv_head"] = model.conv_head
    return out | {"mask_embedding": model.mask_embed, "predictor": model.predictor, "mlp": model.mlp}


def parts(model: DKUXNet) -> dict[str, int]:
    """Parameter count per component (sums to the total), named as in :func:`named_parts`."""
    counts = {name: _count(module) for name, module in named_parts(model).items()}
    return counts | {"cluster_centers": model.cluster_centers.numel()}
