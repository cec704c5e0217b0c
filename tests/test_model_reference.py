"""Every block of ``dkuxnet.models`` against an independent float64 re-statement of its formula.

The references read the weights through ``state_dict()`` only and compute each block from its
definition (``dkuxnet.models`` module docstrings): BatchNorm from batch statistics (biased variance) in
training and from running statistics in eval, channel LayerNorm from mean and variance, attention with
einsum and an explicit per-head loop, the k-means update with a dense one-hot, the encoder as a
straight-line stage order. Weights are random (BatchNorm γ included), so no branch is hidden by a
zero-initialised scale. Convolutions with a spatial kernel use ``F.conv3d`` on the given weights.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dkuxnet.config import ModelConfig
from dkuxnet.models import DKUXNet
from dkuxnet.models.kmax import AssignmentHead, KMaXLayer, QueryAttention, hard_assignment, kmeans_update
from dkuxnet.models.uxnet import UXBlock, UXNetEncoder

BN_EPS, BN_MOMENTUM, LN_EPS = 1e-3, 0.01, 1e-6  # kMaX BatchNorm (PyTorch momentum), UX-Net LayerNorm
RTOL, ATOL = 1e-10, 1e-12
CFG = ModelConfig(
    widths=(4, 8, 16, 32), hidden=32, num_queries=12, query_dim=16, embed_dim=8, num_heads=2, ffn_dim=32,
    query_groups=(3, 4, 5), mlp_hidden=8, kmax_scales=3, checkpoint_activations=False,
)
SHAPE = (32, 16, 16)

State = dict[str, torch.Tensor]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    """float64; every parameter N(0, 1 / fan-in), BatchNorm running means N(0, 1) and variances U(0.5, 2)."""
    module.double()
    gen = _gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / math.sqrt(fan_in))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen, dtype=b.dtype))
            elif name.endswith("running_var"):
                b.copy_(0.5 + 1.5 * torch.rand(b.shape, generator=gen, dtype=b.dtype))
    return module


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == torch.float64
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)


def _sub(state: State, prefix: str) -> State:
    return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU(x) = x · Φ(x) = ½ x (1 + erf(x / √2))."""
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """exp(x_i − max x) / Σ_j exp(x_j − max x) along ``dim``."""
    e = (x - x.amax(dim, keepdim=True)).exp()
    return e / e.sum(dim, keepdim=True)


def batch_norm(x: torch.Tensor, s: State, training: bool) -> torch.Tensor:
    """γ (x − μ) / √(σ² + ε) + β per channel (axis 1); μ, σ² biased batch moments in training, running in eval."""
    view = (1, -1) + (1,) * (x.dim() - 2)
    if training:
        dims = [d for d in range(x.dim()) if d != 1]
        mean = x.mean(dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dims, keepdim=True)
    else:
        mean, var = s["running_mean"].view(view), s["running_var"].view(view)
    return s["weight"].view(view) * (x - mean) / torch.sqrt(var + BN_EPS) + s["bias"].view(view)


def layer_norm_channels(x: torch.Tensor, s: State) -> torch.Tensor:
    """γ (x − μ_C) / √(σ²_C + ε) + β with μ_C, σ²_C the biased moments over the channel axis 1."""
    mean = x.mean(1, keepdim=True)
    var = ((x - mean) ** 2).mean(1, keepdim=True)
    view = (1, -1, 1, 1, 1)
    return s["weight"].view(view) * (x - mean) / torch.sqrt(var + LN_EPS) + s["bias"].view(view)


def pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dense 1×1 conv Σ_i W[o, i] x[b, i, …] + b[o] on B×C×… (1-D queries or 3-D pixels)."""
    out = torch.einsum("oi,bi...->bo...", weight.reshape(weight.shape[0], -1), x)
    return out if bias is None else out + bias.view((1, -1) + (1,) * (x.dim() - 2))


def conv_bn(x: torch.Tensor, s: State, training: bool, act: bool, depthwise5: bool = False) -> torch.Tensor:
    """kMaX ConvBN: [GELU](BN(conv(x))), conv 1×1 (dense) or depthwise 5³ with padding 2."""
    if depthwise5:
        y = F.conv3d(x, s["conv.weight"], s.get("conv.bias"), padding=2, groups=x.shape[1])
    else:
        y = pointwise(x, s["conv.weight"], s.get("conv.bias"))
    y = batch_norm(y, _sub(s, "norm"), training)
    return gelu(y) if act else y


def affinity_raw(pixels: torch.Tensor, queries: torch.Tensor, s: State, training: bool) -> torch.Tensor:
    """Qcᵀ · Kp / ‖Kp‖ (B×N×X×Y×Z): Kp = pixel_out(GELU pixel_conv(GELU dw5³(pixels))), Qc = query_out(queries)."""
    kp = conv_bn(pixels, _sub(s, "pixel_dw"), training, act=True, depthwise5=True)
    kp = conv_bn(kp, _sub(s, "pixel_conv"), training, act=True)
    kp = conv_bn(kp, _sub(s, "pixel_out"), training, act=False)
    kp = kp / kp.norm(dim=1, keepdim=True).clamp_min(1e-12)  # unit vector per voxel
    qc = conv_bn(queries, _sub(s, "query_out"), training, act=False)  # B×E×N
    return torch.einsum("ben,bexyz->bnxyz", qc, kp)


def assignment_ref(pixels: torch.Tensor, queries: torch.Tensor, s: State, training: bool) -> torch.Tensor:
    """M = BN₁(Qcᵀ · L2norm(Kp)) with one BN channel over all B·N·V entries."""
    m = affinity_raw(pixels, queries, s, training)
    return batch_norm(m.reshape(m.shape[0], 1, -1), _sub(s, "affinity_norm"), training).reshape(m.shape)


def attention_ref(u: torch.Tensor, s: State, heads: int, key_dim: int, training: bool) -> torch.Tensor:
    """Per head h: A_h = softmax_keys(BN2d(q_hᵀ k_h)) (no 1/√d), o_h = v_h A_hᵀ; out = proj(GELU(BN(concat o_h)))."""
    b, c, n = u.shape
    qkv = conv_bn(u, _sub(s, "qkv"), training, act=False)
    q, k, v = qkv[:, :key_dim], qkv[:, key_dim:2 * key_dim], qkv[:, 2 * key_dim:]
    dk, dv = key_dim // heads, c // heads
    logits = torch.stack(
        [torch.einsum("bdl,bdm->blm", q[:, h * dk:(h + 1) * dk], k[:, h * dk:(h + 1) * dk]) for h in range(heads)], 1
    )  # B×h×N(queries l)×N(keys m)
    logits = batch_norm(logits, _sub(s, "logit_norm"), training)
    weights = softmax(logits, dim=3)  # Σ over keys m is 1
    out = torch.cat(
        [torch.einsum("blm,bdm->bdl", weights[:, h], v[:, h * dv:(h + 1) * dv]) for h in range(heads)], 1
    )  # B×C×N
    out = gelu(batch_norm(out, _sub(s, "value_norm"), training))
    return conv_bn(out, _sub(s, "proj"), training, act=False)


def kmeans_ref(values: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """R = Vp · Aᵀ with A the dense one-hot of argmax_N M: R[b, c, n] = Σ_v [argmax_n' M[b, n', v] = n] Vp[b, c, v]."""
    b, n = m.shape[:2]
    flat = m.reshape(b, n, -1)
    one_hot = (flat == flat.amax(dim=1, keepdim=True)).double()  # B×N×V (no ties for random weights)
    assert torch.equal(one_hot.sum(1), torch.ones_like(one_hot[:, 0]))
    return torch.einsum("bnv,bcv->bcn", one_hot, values.reshape(b, values.shape[1], -1))


def kmax_layer_ref(
    pixels: torch.Tensor, z: torch.Tensor, s: State, cfg: ModelConfig, training: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Xp, Vp, U; M; R = BN(k-means update); z += proj(R); z = GELU(z + attn(U)); z = GELU(z + FFN(z)); (z, M)."""
    xp = conv_bn(gelu(pixels), _sub(s, "pixel_conv"), training, act=True)
    vp = conv_bn(xp, _sub(s, "pixel_value"), training, act=False)
    u = conv_bn(z, _sub(s, "query_conv"), training, act=True)
    m = assignment_ref(xp, u, _sub(s, "head"), training)
    r = batch_norm(kmeans_ref(vp, m), _sub(s, "kmeans_norm"), training)
    z = z + conv_bn(r, _sub(s, "kmeans_proj"), training, act=False)
    z = gelu(z + attention_ref(u, _sub(s, "attention"), cfg.num_heads, cfg.embed_dim, training))
    ffn = conv_bn(conv_bn(z, _sub(s, "ffn1"), training, act=True), _sub(s, "ffn2"), training, act=False)
    return gelu(z + ffn), m


def ux_block_ref(x: torch.Tensor, s: State) -> torch.Tensor:
    """x + γ ⊙ pw2(GELU(pw1(LN(dw7³(x))))) with pw1 (C→4C) and pw2 (4C→C) grouped per channel."""
    c = x.shape[1]
    y = F.conv3d(x, s["dwconv.weight"], s["dwconv.bias"], padding=3, groups=c)
    y = layer_norm_channels(y, _sub(s, "norm"))
    w1 = s["pwconv1.weight"].reshape(c, 4)  # hidden channel 4i + j reads input channel i only
    y = torch.einsum("ij,bixyz->bijxyz", w1, y).reshape(y.shape[0], 4 * c, *y.shape[2:])
    y = gelu(y + s["pwconv1.bias"].view(1, -1, 1, 1, 1))
    w2 = s["pwconv2.weight"].reshape(c, 4)  # output channel i reads hidden channels 4i … 4i+3
    y = torch.einsum("ij,bijxyz->bixyz", w2, y.reshape(y.shape[0], c, 4, *y.shape[2:]))
    y = y + s["pwconv2.bias"].view(1, -1, 1, 1, 1)
    return x + s["gamma"].view(1, -1, 1, 1, 1) * y


def encoder_ref(x: torch.Tensor, s: State, depths: tuple[int, ...]) -> list[torch.Tensor]:
    """Stem conv k7 s2 p3 → LN; stage i ≥ 1 starts with LN → conv k2 s2 on the **un-normalised** stage i−1 features."""
    h = F.conv3d(x, s["downsample.0.0.weight"], s["downsample.0.0.bias"], stride=2, padding=3)
    h = layer_norm_channels(h, _sub(s, "downsample.0.1"))
    outs = []
    for i, depth in enumerate(depths):
        if i:
            h = layer_norm_channels(h, _sub(s, f"downsample.{i}.0"))
            h = F.conv3d(h, s[f"downsample.{i}.1.weight"], s[f"downsample.{i}.1.bias"], stride=2)
        for j in range(depth):
            h = ux_block_ref(h, _sub(s, f"stages.{i}.{j}"))
        outs.append(layer_norm_channels(h, _sub(s, f"norms.{i}")))
    return outs


def heads_ref(
    dec0: torch.Tensor, z: torch.Tensor, s: State, cfg: ModelConfig, training: bool
) -> dict[str, torch.Tensor]:
    """L = predictor(dec0, mask_embed(z)); S = softmax_N(L); Φ = MLP(flatten z) (B×N×K); Y = Σ_n Φ[n]·S[n];
    O[g] = Σ_{n∈g} S[n]."""
    b, n, k = z.shape[0], cfg.num_queries, cfg.num_classes
    logits = assignment_ref(dec0, conv_bn(z, _sub(s, "mask_embed"), training, act=True), _sub(s, "predictor"), training)
    probs = softmax(logits, dim=1)
    hidden = torch.relu(z.reshape(b, -1) @ s["mlp.0.weight"].T + s["mlp.0.bias"])  # z flattened channel-major
    phi = (hidden @ s["mlp.2.weight"].T + s["mlp.2.bias"]).reshape(b, n, k)
    seg = torch.zeros(b, k, *probs.shape[2:], dtype=probs.dtype)
    for q in range(n):
        seg += phi[:, q, :, None, None, None] * probs[:, q, None]
    bounds = [0]
    for size in cfg.query_groups:
        bounds.append(bounds[-1] + size)
    clusters = torch.stack([probs[:, lo:hi].sum(1) for lo, hi in zip(bounds[:-1], bounds[1:])], 1)
    return {"query_logits": logits, "query_probs": probs, "seg_logits": seg, "cluster_probs": clusters}


def _x(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=_gen(seed), dtype=torch.float64)


def test_ux_block_equals_formula():
    """UXBlock: x + γ ⊙ pw2(GELU(pw1(LN(dw7³(x))))), pointwise convs grouped per channel (no channel mixing)."""
    block = _randomise(UXBlock(3), seed=0)
    x = _x((2, 3, 6, 5, 4), seed=1)
    _close(block(x), ux_block_ref(x, block.state_dict()))


def test_uxnet_encoder_equals_straight_line_stage_order():
    """UXNetEncoder: stage i+1 continues from the un-normalised stage-i features; only the returned maps are normed."""
    widths, depths = (4, 8, 16), (1, 2, 1)
    encoder = _randomise(UXNetEncoder(1, widths, depths), seed=2)
    x = _x((2, 1, 16, 16, 8), seed=3)
    outs = encoder(x)
    expected = encoder_ref(x, encoder.state_dict(), depths)
    assert len(outs) == len(expected) == 3
    for out, ref in zip(outs, expected):
        _close(out, ref)


@pytest.mark.parametrize("training", [True, False])
def test_query_attention_equals_per_head_einsum(training):
    """QueryAttention: per-head qᵀk logits (no 1/√d), BN over heads, softmax over keys, v·attnᵀ, BN, GELU, proj."""
    attention = _randomise(QueryAttention(16, 8, 2), seed=4).train(training)
    state = {k: v.clone() for k, v in attention.state_dict().items()}
    u = _x((3, 16, 7), seed=5)
    _close(attention(u), attention_ref(u, state, heads=2, key_dim=8, training=training))


@pytest.mark.parametrize("training", [True, False])
def test_assignment_head_equals_formula(training):
    """AssignmentHead (per-layer head and final predictor): M = BN₁(Qcᵀ · L2norm(Kp)), one BN channel over B·N·V."""
    head = _randomise(AssignmentHead(4, 16, 8), seed=6).train(training)
    state = {k: v.clone() for k, v in head.state_dict().items()}
    pixels, queries = _x((2, 4, 6, 5, 4), seed=7), _x((2, 16, 12), seed=8)
    _close(head(pixels, queries), assignment_ref(pixels, queries, state, training))


def test_affinity_norm_running_statistics_follow_the_momentum_rule():
    """Affinity BN in training: running ← (1 − 0.01)·running + 0.01·batch over all B·N·V entries, variance unbiased."""
    head = _randomise(AssignmentHead(4, 16, 8), seed=9).train()
    before = {k: v.clone() for k, v in head.state_dict().items()}
    pixels, queries = _x((2, 4, 6, 5, 4), seed=10), _x((2, 16, 12), seed=11)
    head(pixels, queries)
    raw = affinity_raw(pixels, queries, before, training=True)
    after = head.state_dict()
    expected_mean = (1 - BN_MOMENTUM) * before["affinity_norm.running_mean"] + BN_MOMENTUM * raw.mean()
    expected_var = (1 - BN_MOMENTUM) * before["affinity_norm.running_var"] + BN_MOMENTUM * raw.var(correction=1)
    _close(after["affinity_norm.running_mean"], expected_mean)
    _close(after["affinity_norm.running_var"], expected_var)
    assert after["affinity_norm.num_batches_tracked"].item() == before["affinity_norm.num_batches_tracked"].item() + 1


def test_kmeans_update_and_hard_assignment_equal_explicit_loops():
    """A[v] = argmax_n M[n, v] (lowest n on ties); R[b, c, n] = Σ_{v: A[b, v] = n} Vp[b, c, v], 0 for an empty query."""
    m = _x((2, 5, 3, 4, 2), seed=20)
    m[0, 3, 0, 0, 0] = m[0, 1, 0, 0, 0] = m[0, :, 0, 0, 0].max() + 1  # a tie: query 1 wins
    m[:, 4] = -10.0  # query 4 never wins
    values = _x((2, 3, 24), seed=21)
    index = hard_assignment(m).flatten(1)
    r = kmeans_update(values, index, 5)
    expected = torch.zeros(2, 3, 5, dtype=torch.float64)
    for b in range(2):
        flat = m[b].reshape(5, -1)
        for v in range(24):
            best = max(range(5), key=lambda n: (flat[n, v].item(), -n))
            assert index[b, v].item() == best
            expected[b, :, best] += values[b, :, v]
    assert index[0, 0].item() == 1
    _close(r, expected)
    assert torch.equal(r[:, :, 4], torch.zeros(2, 3, dtype=torch.float64))


@pytest.mark.parametrize("training", [True, False])
def test_kmax_layer_equals_formula(training):
    """KMaXLayer: hard k-means update (dense one-hot) + self-attention + FFN, and its affinity M."""
    layer = _randomise(KMaXLayer(8, CFG.query_dim, CFG.embed_dim, CFG.num_heads, CFG.ffn_dim), seed=12).train(training)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    pixels, z = _x((2, 8, 6, 5, 4), seed=13), _x((2, CFG.query_dim, CFG.num_queries), seed=14)
    z_new, m = layer(pixels, z)
    z_ref, m_ref = kmax_layer_ref(pixels, z, state, CFG, training)
    _close(m, m_ref)
    _close(z_new, z_ref)


@pytest.mark.parametrize(("training", "checkpoint"), [(True, False), (False, False), (True, True)])
def test_dkuxnet_forward_equals_reference_chain(training, checkpoint):
    """DKUXNet: encoder, conv decoders (blocks checked against MONAI elsewhere), kMaX layers coarse to fine from the
    learned centres, then the predictor, Y = Σ_n Φ[n]·S[n] and the group merge O[g] = Σ_{n∈g} S[n]; the same with
    activation checkpointing."""
    torch.manual_seed(0)
    model = _randomise(DKUXNet(replace(CFG, checkpoint_activations=checkpoint)), seed=15).train(training)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = {k: v for k, v in model.named_children() if k in ("encoders", "decoders")}
    x = _x((2, 1, *SHAPE), seed=16)
    out = model(x)
    with torch.no_grad():  # the residual conv blocks run again (instance norm: no running state to disturb)
        feats = encoder_ref(x, _sub(state, "encoder"), CFG.depths)
        skips = [blocks["encoders"][0](x)] + [enc(f) for enc, f in zip(blocks["encoders"][1:-1], feats[:-1])]
        h = blocks["encoders"][-1](feats[-1])
        decoded = []
        for i, dec in enumerate(blocks["decoders"]):
            h = dec(h, skips[-1 - i])
            decoded.append(h)
    z = state["cluster_centers"].unsqueeze(0).expand(2, -1, -1)
    aux = []
    for i in range(len(model.kmax)):
        z, m = kmax_layer_ref(decoded[i // CFG.kmax_layers_per_scale], z, _sub(state, f"kmax.{i}"), CFG, training)
        aux.append(m)
    assert len(out.aux) == len(aux) == 6
    for got, ref in zip(out.aux, aux):
        _close(got, ref)
    for name, ref in heads_ref(decoded[-1], z, state, CFG, training).items():
        _close(getattr(out, name), ref)


TRUNC_STD = 0.8796  # standard deviation of N(0, 1) truncated at ±2


def _assert_trunc_normal(w: torch.Tensor, sigma: float, name: str) -> None:
    assert w.abs().max() <= 2 * sigma + 1e-7 and w.abs().max() > 1.5 * sigma, name
    assert abs(w.std().item() / (TRUNC_STD * sigma) - 1) < 0.1, name


def test_initialisation_follows_the_kmax_and_uxnet_recipes():
    """Init (kmax.py / uxnet.py docstrings): 1×1 convs truncated normal (±2σ), σ = √(2 / C_in) unless noted
    (qkv and pixel values C^-½, pixel keys 0.01 with zero bias), depthwise 5³ xavier-uniform; BatchNorm eps 1e-3,
    momentum 0.01, γ = 1 except 0 on the residual branches and 0.1 on the affinity; centres N(0, 1) cut at ±2;
    UX-block layer scale 1e-6."""
    torch.manual_seed(0)
    model = DKUXNet(ModelConfig(
        widths=(4, 8, 16, 48), hidden=16, num_queries=32, query_dim=64, embed_dim=32, num_heads=2, ffn_dim=128,
        query_groups=(8, 8, 16), mlp_hidden=8, kmax_scales=1, kmax_layers_per_scale=1, checkpoint_activations=False,
    ))
    state = model.state_dict()
    sigmas = {
        "kmax.0.pixel_conv": (2 / 48) ** 0.5, "kmax.0.pixel_value": 64**-0.5, "kmax.0.query_conv": (2 / 64) ** 0.5,
        "kmax.0.head.pixel_conv": (2 / 64) ** 0.5, "kmax.0.head.pixel_out": 0.01,
        "kmax.0.head.query_out": (2 / 64) ** 0.5, "kmax.0.kmeans_proj": (2 / 64) ** 0.5,
        "kmax.0.attention.qkv": 64**-0.5, "kmax.0.attention.proj": (2 / 64) ** 0.5,
        "kmax.0.ffn1": (2 / 64) ** 0.5, "kmax.0.ffn2": (2 / 128) ** 0.5, "mask_embed": (2 / 64) ** 0.5,
        "predictor.pixel_conv": (2 / 4) ** 0.5, "predictor.pixel_out": 0.01, "predictor.query_out": (2 / 64) ** 0.5,
    }
    for prefix, sigma in sigmas.items():
        _assert_trunc_normal(state[f"{prefix}.conv.weight"], sigma, prefix)
    assert torch.equal(state["kmax.0.head.pixel_out.conv.bias"], torch.zeros(32))
    dw = state["kmax.0.head.pixel_dw.conv.weight"]  # 64×1×5×5×5: fan_in 125, fan_out 64·125
    bound = (6 / (125 + 64 * 125)) ** 0.5
    assert dw.abs().max() <= bound and abs(dw.std().item() / (bound / 3**0.5) - 1) < 0.05
    _assert_trunc_normal(state["cluster_centers"], 1.0, "cluster_centers")
    zero_gamma = ("kmax.0.kmeans_proj.norm", "kmax.0.attention.proj.norm", "kmax.0.ffn2.norm")
    norms = {name: m for name, m in model.named_modules() if hasattr(m, "running_var")}
    assert len(norms) == len(sigmas) + 2 + 5  # + 2 depthwise ConvBNs; 2 affinity, k-means, logit and value norms
    for name, norm in norms.items():
        assert (norm.eps, norm.momentum) == (BN_EPS, BN_MOMENTUM), name
        gamma = 0.0 if name in zero_gamma else 0.1 if name.endswith("affinity_norm") else 1.0
        assert torch.equal(state[f"{name}.weight"], torch.full_like(state[f"{name}.weight"], gamma)), name
        assert torch.equal(state[f"{name}.bias"], torch.zeros_like(state[f"{name}.bias"])), name
    scales = [v for k, v in state.items() if k.startswith("encoder.stages.") and k.endswith(".gamma")]
    assert len(scales) == 8 and all(torch.equal(g, torch.full_like(g, 1e-6)) for g in scales)
