"""kMaX decoder: k-means cross-attention layers and the cluster-assignment (mask) head, in 3D.

Port of ``bytedance/kmax-deeplab: kmax_deeplab/modeling/transformer_decoder/kmax_transformer_decoder.py``
(itself a port of ``google-research/deeplab2@7a01a71: model/layers/dual_path_transformer.py`` and
``model/kmax_deeplab.py``) as DK-UXNet's ``networks/DKUNet/transformer_decoder.py`` uses it (book: method page):

* Every "conv" is a 1×1 convolution without bias + BatchNorm (eps 1e-3, momentum 0.01 in PyTorch's sense);
  weights truncated-normal (±2σ) with σ = √(2 / C_in) unless noted.
* Deliberate deviations: no class heads (unused in DK-UXNet), plain BatchNorm everywhere (no SyncBatchNorm),
  no drop path (rate 0), and the k-means update as an ``index_add`` over the argmax index instead of an
  einsum with a dense fp32 one-hot (same sum, see :func:`kmeans_update`), and the one-channel affinity
  BatchNorm as :class:`ScalarBatchNorm` (the same function as ``nn.BatchNorm1d(1)``, without its slow
  single-channel GPU kernels).
* Precision islands: the affinity (L2 normalisation, Qᵀ·K, its scalar BatchNorm), the hard assignment,
  the k-means update and its BatchNorm, and the query self-attention (logits, their BatchNorm, softmax,
  weighted sum) run in fp32 with autocast disabled, as kmax-deeplab does for the update and softmax.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from dkuxnet.batch_stats import batch_moments, batch_sums, update_running
from dkuxnet.models.blocks import maybe_checkpoint, replayed
from dkuxnet.models.depthwise import DepthwiseConv3d
from dkuxnet.models.pixel_mlp import pixel_mlp
from dkuxnet.ops import batch_norm_gelu, l2_normalize
from dkuxnet.precision import fp32_island, upcast


def trunc_normal_(w: torch.Tensor, std: float) -> None:
    """Truncated-normal init cut at ±2σ (timm's ``trunc_normal_tf_``, as kmax-deeplab and DK-UXNet use)."""
    nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)


# voxels per slab of the predictor's hidden layer under checkpointing: 1 GiB in fp32 at 256 channels
PIXEL_SLAB_VOXELS = 2**20


def _batch_norm(dims: int, channels: int) -> nn.modules.batchnorm._BatchNorm:
    cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    return cls(channels, eps=1e-3, momentum=0.01)


class _ScalarBatchNormFn(torch.autograd.Function):
    """y = γ·(x − μ)·r + β with given scalar statistics μ, r = 1/√(σ² + ε); backward as BatchNorm's.

    With ``batch_stats`` the statistics are those of ``x`` itself and the gradient flows through them:
    dx = γ·r·(dy − mean(dy) − x̂·mean(dy·x̂)), x̂ = (x − μ)·r. Without, they are constants: dx = γ·r·dy.
    Saves only ``x``. Backward holds one full-size temporary: x̂ is rebuilt in it, multiplied by dy in
    place for Σ dy·x̂, then overwritten with dx = k₁·x + k₀ + γr·dy (k₁ = −γr²·Σ(dy·x̂)/n,
    k₀ = −μk₁ − γr·Σdy/n), the same expression expanded. The sums and n are those of ``norm``'s whole batch
    (:func:`~dkuxnet.batch_stats.batch_sums`: all ranks' for a synced norm); dγ, dβ are this input's.
    Not twice differentiable.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
                rstd: torch.Tensor, batch_stats: bool, norm: nn.Module, count: int) -> torch.Tensor:
        scale = weight * rstd  # 1
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.batch_stats, ctx.norm, ctx.count = batch_stats, norm, count
        return torch.addcmul(bias - mean * scale, x, scale)  # one pass: x·scale + shift

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, mean, rstd = ctx.saved_tensors
        tmp = torch.addcmul(-mean * rstd, x, rstd)  # x̂ = (x − μ)·r: the one full-size temporary
        db = dy.sum().reshape(1)
        dw = tmp.mul_(dy).sum().reshape(1)  # Σ dy·x̂
        scale = weight * rstd
        if not ctx.batch_stats:
            return dy * scale, dw, db, None, None, None, None, None
        n = ctx.count
        sum_db, sum_dw = batch_sums(ctx.norm, torch.stack([db, dw]))  # the whole batch's Σdy, Σdy·x̂
        k1 = -sum_dw / n * scale * rstd
        # γr(dy − mean dy − x̂·mean(dy·x̂))
        dx = torch.addcmul(-sum_db / n * scale - mean * k1, x, k1, out=tmp).addcmul_(dy, scale)
        return dx, dw, db, None, None, None, None, None


class ScalarBatchNorm(nn.BatchNorm1d):
    r"""BatchNorm with one channel over every entry of its input, as ``nn.BatchNorm1d(1)`` on ``x.view(B, 1, -1)``.

    .. math::
        y = \gamma\,\frac{x - \mu}{\sqrt{\sigma^2 + \varepsilon}} + \beta,\qquad
        \mu = \tfrac1n\textstyle\sum x,\quad \sigma^2 = \tfrac1n\textstyle\sum (x - \mu)^2 \ \text{(training)}

    running_mean ← (1 − m)·running_mean + m·μ and running_var ← (1 − m)·running_var + m·σ²·n/(n − 1)
    (m = ``momentum``, or 1/num_batches_tracked when it is None); eval mode normalises with the running
    statistics. Same parameters, buffers and ``state_dict`` keys as ``nn.BatchNorm1d(1)``, so checkpoints
    load either way. Written as one ``var_mean`` reduction and one fused multiply-add instead of cuDNN's
    single-channel kernels, which run serially over the one channel (on an H200 they took ≈ 220 ms
    forward + backward for the 128-query × 112·112·80 affinity of one volume). Accepts any shape.
    """

    def __init__(self, eps: float = 1e-3, momentum: float | None = 0.01) -> None:
        super().__init__(1, eps=eps, momentum=momentum)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.numel() < 2 and self.training:
            raise ValueError(f"ScalarBatchNorm needs more than one value in training, got shape {tuple(input.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """An fp32 island: bf16 / fp16 inputs are upcast and the output is fp32 (float64 stays float64)."""
        self._check_input_dim(x)
        with fp32_island(x.device):
            x = upcast(x)
            batch_stats = self.training or self.running_mean is None
            n = x.numel()
            if batch_stats:
                with torch.no_grad():
                    var, mean = torch.var_mean(x, correction=0)  # biased σ², μ: one reduction
                    mean, var, n = batch_moments(self, mean, var, n)  # the whole batch's (all ranks' when synced)
                    if self.training and self.track_running_stats:
                        self.num_batches_tracked.add_(1)
                        m = 1.0 / self.num_batches_tracked.to(x.dtype) if self.momentum is None else self.momentum
                        update_running(self, mean, var, n, m)
            else:
                mean, var = self.running_mean[0], self.running_var[0]
            rstd = torch.rsqrt(var.to(x.dtype) + self.eps)
            return _ScalarBatchNormFn.apply(x, self.weight, self.bias, mean.to(x.dtype), rstd, batch_stats, self, n)


class ConvBN(nn.Module):
    """Conv (1D on queries or 3D on pixels) → BatchNorm → optional GELU (kmax-deeplab's ``ConvBN``).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        dims: 1 (B×C×N queries) or 3 (B×C×X×Y×Z pixels).
        kernel_size: 1, or 5 for the depthwise pixel-head conv.
        depthwise: ``groups = in_channels`` (then ``out_channels`` must equal ``in_channels``).
        bias: conv bias (initialised to 0).
        act: apply GELU after the norm.
        std: truncated-normal weight std; ``None`` = √(2 / in_channels); ``0`` = xavier-uniform.
        gamma: initial BatchNorm weight (0 for the residual branches).
        depthwise_conv: implementation of a depthwise conv (:class:`~dkuxnet.models.depthwise.DepthwiseConv3d`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        dims: int,
        *,
        kernel_size: int = 1,
        depthwise: bool = False,
        bias: bool = False,
        act: bool = False,
        std: float | None = None,
        gamma: float = 1.0,
        depthwise_conv: str = "auto",
    ) -> None:
        super().__init__()
        if depthwise:
            if dims != 3 or out_channels != in_channels:
                raise ValueError("a depthwise ConvBN needs dims=3 and out_channels == in_channels")
            self.conv: nn.Module = DepthwiseConv3d(in_channels, kernel_size, bias=bias, impl=depthwise_conv)
        else:
            conv = nn.Conv1d if dims == 1 else nn.Conv3d
            self.conv = conv(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
        self.norm = _batch_norm(dims, out_channels)
        self.act = act
        if std == 0:
            nn.init.xavier_uniform_(self.conv.weight)
        else:
            trunc_normal_(self.conv.weight, (2.0 / in_channels) ** 0.5 if std is None else std)
        if bias:
            nn.init.zeros_(self.conv.bias)
        nn.init.constant_(self.norm.weight, gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return batch_norm_gelu(x, self.norm) if self.act else self.norm(x)  # the former saves only the conv output


@torch.no_grad()
def hard_assignment(logits: torch.Tensor) -> torch.Tensor:
    """Hard k-means assignment A = argmax_N(M): for each voxel, the index of its query.

    Computed under no-grad on the detached affinity (no straight-through, no softmax, no Gumbel): the
    update receives gradient only through the pixel values. Ties go to the lowest query index.

    Args:
        logits: affinity M, B×N×… (any trailing spatial shape).

    Returns:
        int64 index tensor B×… (the one-hot A[n, v] = [index[v] = n] is never materialised).
    """
    return logits.detach().argmax(dim=1)


def kmeans_update(values: torch.Tensor, index: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Summed k-means centre update R = Vp · Aᵀ, i.e. R[b, c, n] = Σ_{v: index[b, v] = n} Vp[b, c, v].

    A sum, not a mean: a query with no assigned voxel gets exactly 0. Computed in fp32 as one
    ``index_add`` of the B·V value rows (channels-last, contiguous 4C-byte rows) into B·N centre rows:
    equal to the dense formula ``einsum("bnv,bcv->bcn", one_hot(index), values)`` without the
    B×N×V one-hot (513 MB in fp32 for 8×128×125,440 at dec1) being built or saved for backward.
    On CUDA the summation order (atomics) is nondeterministic unless ``torch.use_deterministic_algorithms``.

    Args:
        values: pixel values Vp, B×C×V (any dtype; upcast to fp32).
        index: hard assignment, B×V int64 in [0, num_queries).
        num_queries: N.

    Returns:
        R, B×C×N in float32 (float64 for float64 values).
    """
    if values.dim() != 3 or index.shape != (values.shape[0], values.shape[2]):
        raise ValueError(f"values must be B×C×V and index B×V, got {tuple(values.shape)} and {tuple(index.shape)}")
    b, c, v = values.shape
    with fp32_island(values.device):
        dtype = torch.promote_types(values.dtype, torch.float32)
        rows = values.transpose(1, 2).to(dtype, memory_format=torch.contiguous_format)  # B×V×C, one copy
        offset = torch.arange(b, device=index.device).unsqueeze(1) * num_queries  # B×1
        target = (index + offset).reshape(b * v)  # B·V
        r = rows.new_zeros(b * num_queries, c).index_add(0, target, rows.reshape(b * v, c))  # B·N×C
    return r.view(b, num_queries, c).transpose(1, 2)  # B×C×N


class AssignmentHead(nn.Module):
    """Affinity between pixels and cluster centres (kMaX's ``kMaXPredictor`` without its class head).

    Kp = L2norm(BN(conv_{C_h→E, bias, σ=0.01}(GELU(BN(conv_{C_in→C_h}(GELU(BN(dwconv5³(x))))))))),
    Qc = BN(conv1d_{C→E}(q)), M = BN₁(Qcᵀ Kp) with BN₁ one BatchNorm over all B·N·V entries (γ₀ = 0.1).
    Used per kMaX layer (on Xp, U) and as the final predictor (on dec0, mask embeddings).

    Args:
        pixel_channels: C_in of the pixel feature.
        query_dim: C, width of the queries and of the pixel head's hidden layer (C_h).
        embed_dim: E, width of pixel keys and query kernels.
        depthwise_conv: implementation of the 5³ depthwise conv.
    """

    def __init__(self, pixel_channels: int, query_dim: int, embed_dim: int, depthwise_conv: str = "auto") -> None:
        super().__init__()
        self.pixel_dw = ConvBN(
            pixel_channels, pixel_channels, 3, kernel_size=5, depthwise=True, act=True, std=0,
            depthwise_conv=depthwise_conv,
        )
        self.pixel_conv = ConvBN(pixel_channels, query_dim, 3, act=True)
        self.pixel_out = ConvBN(query_dim, embed_dim, 3, bias=True, std=0.01)
        self.query_out = ConvBN(query_dim, embed_dim, 1)
        self.affinity_norm = ScalarBatchNorm()
        nn.init.constant_(self.affinity_norm.weight, 0.1)

    def pixel_keys(self, pixels: torch.Tensor, slab_voxels: int | None = None) -> torch.Tensor:
        """Kp before its L2 normalisation: B×C_in×X×Y×Z → B×E×X×Y×Z.

        With ``slab_voxels`` (eager only) the C_h-channel hidden layer is computed in slabs of about that many
        voxels and never held whole (:func:`~dkuxnet.models.pixel_mlp.pixel_mlp`; same function and gradients),
        when the batch has more voxels than one slab (else the slab would be the whole layer).
        """
        h = self.pixel_dw(pixels)  # B×C_in×X×Y×Z
        if slab_voxels is None or h[:, 0].numel() <= slab_voxels or torch.compiler.is_compiling():
            return self.pixel_out(self.pixel_conv(h))
        return self.pixel_out.norm(pixel_mlp(h, self.pixel_conv.conv, self.pixel_conv.norm, self.pixel_out.conv, slab_voxels))

    def affinity(self, kp: torch.Tensor, qc: torch.Tensor) -> torch.Tensor:
        """M = BN₁(Qcᵀ · L2norm(Kp)) in fp32: Kp B×E×X×Y×Z, Qc B×E×N → B×N×X×Y×Z."""
        b, n, spatial = qc.shape[0], qc.shape[2], kp.shape[2:]
        with fp32_island(kp.device):
            kp = l2_normalize(upcast(kp).flatten(2), dim=1)  # B×E×V
            m = torch.bmm(upcast(qc).transpose(1, 2), kp)  # B×N×V
            m = self.affinity_norm(m)  # B×N×V: one BN channel over every entry
        return m.view(b, n, *spatial)

    def forward(self, pixels: torch.Tensor, queries: torch.Tensor, checkpoint: bool = False) -> torch.Tensor:
        """Affinity M (B×N×X×Y×Z, fp32) of ``pixels`` (B×C_in×X×Y×Z) to ``queries`` (B×C×N).

        ``checkpoint``: the pixel path, its C_h-channel hidden layer in slabs of :data:`PIXEL_SLAB_VOXELS`
        voxels, and the fp32 affinity as one segment recomputed in backward: between forward and backward
        only ``pixels`` and the queries are kept (Kp was kept too while the hidden layer was held whole).
        """
        qc = self.query_out(queries)  # B×E×N
        if not checkpoint:
            return self.affinity(self.pixel_keys(pixels), qc)
        return maybe_checkpoint(self._affinity_in_slabs, pixels, qc, enabled=True, module=self)

    def _affinity_in_slabs(self, pixels: torch.Tensor, qc: torch.Tensor) -> torch.Tensor:
        return self.affinity(self.pixel_keys(pixels, slab_voxels=PIXEL_SLAB_VOXELS), qc)


class QueryAttention(nn.Module):
    """Multi-head self-attention among the N queries (deeplab2's ``AttentionOperation`` + projections).

    qkv = BN(conv1d_{C→2E+C}(u)) (σ = C^-½); per head logits qᵀk **without** 1/√d, BatchNorm2d over
    heads, softmax over keys; out = BN(conv1d_{C→C}(GELU(BN(values · attnᵀ)))) with the last γ₀ = 0.
    """

    def __init__(self, query_dim: int, key_dim: int, num_heads: int) -> None:
        super().__init__()
        self.key_dim, self.num_heads = key_dim, num_heads
        self.qkv = ConvBN(query_dim, 2 * key_dim + query_dim, 1, std=query_dim**-0.5)
        self.logit_norm = _batch_norm(2, num_heads)
        self.value_norm = _batch_norm(1, query_dim)
        self.proj = ConvBN(query_dim, query_dim, 1, gamma=0.0)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        b, c, n = u.shape
        h = self.num_heads
        q, k, v = self.qkv(u).split([self.key_dim, self.key_dim, c], dim=1)
        with fp32_island(u.device):
            q = upcast(q).reshape(b, h, self.key_dim // h, n)  # B×h×d×N
            k = upcast(k).reshape(b, h, self.key_dim // h, n)  # B×h×d×N
            v = upcast(v).reshape(b, h, c // h, n)  # B×h×dv×N
            logits = self.logit_norm(torch.einsum("bhdl,bhdm->bhlm", q, k))  # B×h×N×N
            attn = logits.softmax(dim=-1)  # B×h×N×N, over keys
            out = torch.einsum("bhlm,bhdm->bhdl", attn, v).reshape(b, c, n)  # B×C×N
            out = F.gelu(self.value_norm(out))
        return self.proj(out)


class KMaXLayer(nn.Module):
    """One k-means cross-attention layer (deeplab2's ``kMaXTransformerLayer``; book: method page, "kMaX decoder").

    Args:
        pixel_channels: channels of the decoder feature it reads.
        query_dim: C, cluster-centre width.
        embed_dim: E, affinity width (also the total q/k width of the self-attention).
        num_heads: self-attention heads.
        ffn_dim: hidden width of the query FFN.
        depthwise_conv: implementation of the assignment head's depthwise conv.
    """

    def __init__(
        self, pixel_channels: int, query_dim: int, embed_dim: int, num_heads: int, ffn_dim: int,
        depthwise_conv: str = "auto",
    ) -> None:
        super().__init__()
        self.pixel_conv = ConvBN(pixel_channels, query_dim, 3, act=True)
        self.pixel_value = ConvBN(query_dim, query_dim, 3, std=query_dim**-0.5)
        self.query_conv = ConvBN(query_dim, query_dim, 1, act=True)
        self.head = AssignmentHead(query_dim, query_dim, embed_dim, depthwise_conv)
        self.kmeans_norm = _batch_norm(1, query_dim)
        self.kmeans_proj = ConvBN(query_dim, query_dim, 1, gamma=0.0)
        self.attention = QueryAttention(query_dim, embed_dim, num_heads)
        self.ffn1 = ConvBN(query_dim, ffn_dim, 1, act=True)
        self.ffn2 = ConvBN(ffn_dim, query_dim, 1, gamma=0.0)

    def forward(self, pixels: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Update centres ``z`` (B×C×N) from ``pixels`` (B×C_in×x×y×z); returns (z, affinity M B×N×x×y×z)."""
        xp = self.pixel_conv(F.gelu(pixels))  # B×C×x×y×z
        vp = self.pixel_value(xp)  # B×C×x×y×z
        u = self.query_conv(z)  # B×C×N
        m = self.head(xp, u)  # B×N×x×y×z, fp32
        index = replayed(self, lambda: hard_assignment(m)).flatten(1)  # B×V, the forward's under checkpointing
        with fp32_island(z.device):
            r = self.kmeans_norm(kmeans_update(vp.flatten(2), index, z.shape[2]))  # B×C×N
        z = z + self.kmeans_proj(r)
        z = F.gelu(z + self.attention(u))
        return F.gelu(z + self.ffn2(self.ffn1(z))), m
