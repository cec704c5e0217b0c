"""Tests of dkuxnet.models: shapes, probabilities, k-means maths, gradients, counts, precision, checkpointing."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetResBlock, UnetrUpBlock

from dkuxnet.perf.memprobe import saved_tensor_bytes
from dkuxnet.config import ModelConfig, get_preset
from dkuxnet.models import DKUXNet, ModelOutput, TwoNetworks, VNet, create_model, hard_assignment, kmeans_update, model_info
from dkuxnet.models.dkuxnet import authors_dead_parts, named_parts, parts
from dkuxnet.models.blocks import LayerNorm3d, ResBlock3d, UpBlock3d

SHAPE = (32, 16, 16)  # small patch the 4-stage tiny model accepts (bottleneck grid 2×1×1)


def _tiny(**changes) -> ModelConfig:
    return dataclasses.replace(get_preset("tiny").model, **changes)


def _model(seed: int = 0, **changes) -> DKUXNet:
    torch.manual_seed(seed)
    return create_model(_tiny(**changes))


def _input(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 1, *SHAPE, generator=torch.Generator().manual_seed(seed))


def _label(batch: int = 2, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, 2, (batch, *SHAPE), generator=torch.Generator().manual_seed(seed))


def _group_nll(logits: torch.Tensor, groups: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """Local QD-like loss: −mean log Σ_{n∈g(v)} softmax_N(logits)[n, v]."""
    lse = torch.logsumexp(logits, dim=1, keepdim=True)
    merged = torch.cat([torch.logsumexp(p, dim=1, keepdim=True) for p in logits.split(sizes, dim=1)], 1) - lse
    return F.nll_loss(merged, groups)


def _loss(out: ModelOutput, label: torch.Tensor, sizes: tuple[int, ...], deep_supervision: bool) -> torch.Tensor:
    groups = label.clamp(max=len(sizes) - 1)
    loss = F.cross_entropy(out.seg_logits, label) + _group_nll(out.query_logits, groups, sizes)
    if deep_supervision:
        for m in out.aux:
            small = F.interpolate(groups[:, None].float(), size=m.shape[2:], mode="nearest")[:, 0].long()
            loss = loss + _group_nll(m, small, sizes) / len(out.aux)
    return loss


def test_output_shapes_tiny():
    """Smoke test of the tiny preset's output shapes; the values are checked in test_model_reference.py."""
    cfg = _tiny()
    model = create_model(cfg)
    out = model(_input())
    n, b = cfg.num_queries, 2
    assert out.seg_logits.shape == (b, cfg.num_classes, *SHAPE)
    assert out.cluster_probs.shape == (b, len(cfg.query_groups), *SHAPE)
    assert out.query_probs.shape == out.query_logits.shape == (b, n, *SHAPE)
    assert model.group_sizes == cfg.query_groups
    grids = [tuple(s // stride for s in SHAPE) for stride in (8, 8, 4, 4, 2, 2)]
    assert [tuple(m.shape) for m in out.aux] == [(b, n, *g) for g in grids]


def test_vnet_shapes_and_dropout():
    torch.manual_seed(0)
    model = create_model(get_preset("vnet"))
    x = _input(batch=1)
    out = model(x)
    assert isinstance(model, VNet) and model.group_sizes == ()
    assert out.seg_logits.shape == (1, 2, *SHAPE)
    assert out.cluster_probs is None and out.query_probs is None and out.query_logits is None and out.aux == []
    assert not torch.equal(out.seg_logits, model(x).seg_logits)  # Dropout3d active while training
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x).seg_logits, model(x).seg_logits)


def test_probabilities_and_segmentation_formula():
    model = _model()
    centres = {}
    model.mask_embed.register_forward_hook(lambda mod, args, out: centres.setdefault("z", args[0]))
    out = model(_input())
    s = out.query_probs
    torch.testing.assert_close(s.sum(1), torch.ones_like(s[:, 0]))
    torch.testing.assert_close(out.cluster_probs.sum(1), torch.ones_like(s[:, 0]))
    torch.testing.assert_close(s, out.query_logits.softmax(1))
    a, b = model.group_sizes[0], model.group_sizes[0] + model.group_sizes[1]
    torch.testing.assert_close(out.cluster_probs[:, 1], s[:, a:b].sum(1))
    phi = model.mlp(centres["z"].flatten(1)).view(2, model.num_queries, model.num_classes)  # B×N×K
    expected = (phi[:, :, :, None, None, None] * s[:, :, None]).sum(1)  # Σ_n Φ[n, k] S[n, v]
    torch.testing.assert_close(out.seg_logits, expected, rtol=1e-5, atol=1e-5)


def test_hard_assignment_is_one_hot_without_gradient():
    m = torch.randn(2, 5, 3, 4, 2, requires_grad=True)
    index = hard_assignment(m * 2.0)
    assert index.shape == (2, 3, 4, 2) and index.dtype == torch.int64 and not index.requires_grad
    one_hot = F.one_hot(index, 5).movedim(-1, 1)  # B×N×…
    assert torch.equal(one_hot.sum(1), torch.ones_like(index))
    assert torch.equal(one_hot.bool(), m == m.amax(dim=1, keepdim=True))


def test_kmeans_update_equals_dense_formula_and_empty_query_is_zero():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(3, 6, 50, generator=gen, dtype=torch.float64).requires_grad_()
    index = torch.randint(0, 7, (3, 50), generator=gen)
    index[index == 4] = 5  # query 4 gets no voxel
    r = kmeans_update(values, index, 7)  # B×C×N
    one_hot = F.one_hot(index, 7).double()  # B×V×N
    dense = torch.einsum("bvn,bcv->bcn", one_hot, values)
    assert r.dtype == torch.float64 and r.shape == (3, 6, 7)  # never below the input's precision
    torch.testing.assert_close(r, dense)
    assert torch.equal(r[:, :, 4], torch.zeros(3, 6, dtype=torch.float64))
    assert kmeans_update(values.detach().bfloat16(), index, 7).dtype == torch.float32  # bf16 is upcast
    weights = torch.randn(3, 6, 7, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad((r * weights).sum(), values)
    (grad_dense,) = torch.autograd.grad((dense * weights).sum(), values)
    torch.testing.assert_close(grad, grad_dense)
    with pytest.raises(ValueError, match="index"):
        kmeans_update(values, index[:, :10], 7)


def test_paper_every_parameter_gets_gradient_with_deep_supervision():
    model = _model(kmax_scales=3)
    _loss(model(_input()), _label(), model.group_sizes, deep_supervision=True).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert missing == []
    for layer in model.kmax:
        assert all(p.grad.abs().sum() > 0 for p in layer.head.query_out.parameters())


def test_dkunet_assignment_heads_get_no_gradient():
    model = _model(kmax_scales=2)
    assert len(model.kmax) == 4
    _loss(model(_input()), _label(), model.group_sizes, deep_supervision=False).backward()
    heads = {f"kmax.{i}.head.{n}" for i, layer in enumerate(model.kmax) for n, _ in layer.head.named_parameters()}
    no_grad = {name for name, p in model.named_parameters() if p.grad is None}
    assert no_grad == heads


def test_parameter_counts():
    paper, official, dkunet, vnet = (model_info(p) for p in ("paper", "official", "authors-script", "vnet"))
    assert paper["parameters"] == 65_217_790  # notebooks/02_model, `dkuxnet model-info`
    assert vnet["parameters"] == 9_448_866  # UA-MT's V-Net / MC-Net issue #14
    assert official["parameters"] == 65_342_304  # paper + the conv head (124,514)
    assert dkunet["parameters"] == 61_937_114  # the DKUNET class: 2 kMaX scales
    for info in (paper, official, dkunet):
        assert info["authors_dkunet"]["parameters"] == 65_503_397  # the authors' DKUNET class (book: decisions)
        assert sum(info["parts"].values()) == info["parameters"]
    assert dkunet["authors_dkunet"]["dead_parts_not_built"]["unused_kmax_layers"] == 3_297_124
    assert paper["assignment_heads_trained"] and not official["assignment_heads_trained"]
    assert not dkunet["assignment_heads_trained"]
    assert sum(vnet["parts"].values()) == vnet["parameters"]


def test_bf16_autocast_forward_has_fp32_islands_and_stays_close_to_fp32():
    """Under bf16 autocast every output is fp32, S = softmax_N(L) and O = group sums of S exactly (fp32 islands),
    and each output is within bf16 rounding of the fp32 forward: ‖bf16 − fp32‖ / ‖fp32‖ < 1 % (probabilities,
    segmentation) or < 10 % (logits, whose hard assignments may flip at a few near-ties)."""
    model = _model()
    with torch.no_grad():
        ref = model(_input())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(_input())
    for t in (out.seg_logits, out.cluster_probs, out.query_probs, out.query_logits, *out.aux):
        assert t.dtype == torch.float32 and torch.isfinite(t).all()
    torch.testing.assert_close(out.query_probs, out.query_logits.softmax(1))
    sums = torch.stack([p.sum(1) for p in out.query_probs.split(model.group_sizes, dim=1)], 1)
    torch.testing.assert_close(out.cluster_probs, sums)
    for name, bound in (("seg_logits", 0.01), ("query_probs", 0.01), ("cluster_probs", 0.01), ("query_logits", 0.1)):
        low, high = getattr(out, name), getattr(ref, name)
        assert ((low - high).norm() / high.norm()).item() < bound, name
    for low, high in zip(out.aux, ref.aux):
        assert ((low - high).norm() / high.norm()).item() < 0.1


def test_checkpoint_activations_gives_identical_gradients_and_statistics():
    plain = _model()
    ckpt = _model(seed=5, checkpoint_activations=True)
    ckpt.load_state_dict(plain.state_dict())
    for model in (plain, ckpt):
        _loss(model(_input()), _label(), model.group_sizes, deep_supervision=True).backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
    for (name, buf), other in zip(plain.named_buffers(), ckpt.buffers()):
        assert torch.equal(buf, other), name  # running statistics updated once, not again in recomputation


def test_channels_last_input_gives_same_output():
    model = _model().eval()
    x = _input()
    with torch.no_grad():
        a = model(x)
        b = model(x.contiguous(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(a.seg_logits, b.seg_logits)
    torch.testing.assert_close(a.query_probs, b.query_probs)


def test_layernorm3d_equals_channels_first_formula():
    norm = LayerNorm3d(6)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 6, 3, 4, 5) * 3 + 1
    mean = x.mean(1, keepdim=True)
    var = (x - mean).pow(2).mean(1, keepdim=True)
    expected = norm.weight[:, None, None, None] * (x - mean) / torch.sqrt(var + 1e-6) + norm.bias[:, None, None, None]
    torch.testing.assert_close(norm(x), expected)


def test_res_blocks_equal_monai_blocks():
    torch.manual_seed(0)
    ours, theirs = ResBlock3d(3, 5), UnetResBlock(3, 3, 5, kernel_size=3, stride=1, norm_name="instance")
    theirs.load_state_dict({k.replace(".", ".conv."): v for k, v in ours.state_dict().items()})
    x = torch.randn(2, 3, 6, 6, 4)
    torch.testing.assert_close(ours(x), theirs(x))
    up, monai_up = UpBlock3d(6, 3), UnetrUpBlock(3, 6, 3, 3, 2, "instance", res_block=True)
    state = {"transp_conv.conv.weight": up.up.weight}
    state |= {f"conv_block.{k.replace('.', '.conv.')}": v for k, v in up.block.state_dict().items()}
    monai_up.load_state_dict(state)
    h, skip = torch.randn(2, 6, 3, 3, 2), torch.randn(2, 3, 6, 6, 4)
    torch.testing.assert_close(up(h, skip), monai_up(h, skip))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"query_groups": (4, 4, 15)}, "query_groups"),
        ({"depths": (2, 2, 2)}, "widths and depths"),
        ({"depths": (2, 0, 2, 2)}, "depths must be positive"),
        ({"widths": (4, 8, 0, 32)}, "widths must be positive"),
        ({"num_heads": 3}, "num_heads"),
        ({"kmax_scales": 4}, "kmax_scales"),
        ({"arch": "unet"}, "arch"),
        ({"mlp_hidden": 0}, "mlp_hidden"),
    ],
)
def test_invalid_configs_raise(changes, match):
    with pytest.raises(ValueError, match=match):
        create_model(_tiny(**changes))


def test_invalid_input_shape_raises():
    with pytest.raises(ValueError, match="divisible by 16"):
        _model()(torch.randn(1, 1, 32, 32, 24))


def test_cli_model_info_prints_json():
    done = subprocess.run(
        [sys.executable, "-m", "dkuxnet", "model-info", "--preset", "paper"],
        capture_output=True, text=True, check=True, timeout=120,
    )
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert info["preset"] == "paper" and info["parameters"] == 65_217_790


def test_checkpoint_activations_keeps_less_than_half_the_activations():
    x, label = _input(), _label()
    kept = {}
    for ckpt in (False, True):
        model = _model(checkpoint_activations=ckpt)
        kept[ckpt] = saved_tensor_bytes(
            lambda: _loss(model(x), label, model.group_sizes, deep_supervision=True), model.parameters()
        )
    assert 0 < kept[True] < 0.5 * kept[False], kept


def test_conv_seg_head_is_the_authors_conv_head_and_becomes_seg_logits():
    assert model_info("paper")["parameters"] + 124_514 == 65_342_304  # book: decisions page, conv head 124,514
    cfg = get_preset("paper").model
    with torch.device("meta"):
        conv = create_model(dataclasses.replace(cfg, seg_head="conv"))
    assert sum(p.numel() for p in conv.parameters()) == 65_342_304
    assert sum(parts(conv).values()) == 65_342_304 and parts(conv)["conv_head"] == 124_514
    assert authors_dead_parts(dataclasses.replace(cfg, seg_head="conv"))["conv_head"] == 0
    model = _model(seg_head="conv")
    out = model(_input())
    assert out.seg_logits.shape == out.query_seg_logits.shape == (2, 2, *SHAPE)
    _loss(out, _label(), model.group_sizes, deep_supervision=False).backward()
    assert all(p.grad is not None for p in model.conv_head.parameters())
    with pytest.raises(ValueError, match="seg_head"):
        _model(seg_head="transformer")


def test_two_networks_one_per_view_in_training_first_in_eval():
    torch.manual_seed(0)
    model = create_model(_tiny(two_networks=True))
    assert isinstance(model, TwoNetworks) and model.group_sizes == model.first.group_sizes
    assert not torch.equal(model.first.cluster_centers, model.second.cluster_centers)  # independent init
    x = _input(batch=4)
    out = model(x)
    first, second = model.first(x[:2]), model.second(x[2:])  # training mode: batch statistics per half
    torch.testing.assert_close(out.seg_logits, torch.cat([first.seg_logits, second.seg_logits]))
    torch.testing.assert_close(out.cluster_probs, torch.cat([first.cluster_probs, second.cluster_probs]))
    assert [m.shape[0] for m in out.aux] == [4] * len(first.aux)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x[:3]).seg_logits, model.first(x[:3]).seg_logits)
    with pytest.raises(ValueError, match="2 views"):
        model.train()(x[:3])
    with pytest.raises(ValueError, match="dkuxnet"):
        create_model(dataclasses.replace(get_preset("vnet").model, two_networks=True))


def test_float64_model_stays_float64_and_agrees_with_float32():
    model = _model().eval()
    x = _input()
    with torch.no_grad():
        low = model(x)
        high = model.double()(x.double())
    for name in ("seg_logits", "query_probs", "cluster_probs"):
        a, b = getattr(low, name), getattr(high, name)
        assert b.dtype == torch.float64, name  # the fp32 islands upcast, never downcast
        assert ((a.double() - b).norm() / b.norm()).item() < 1e-4, name


def test_part_names_follow_the_method_page():
    """named_parts / authors_dead_parts keys are the names the book and model-info use (paper: 3 kMaX scales)."""
    with torch.device("meta"):
        model = create_model(get_preset("paper").model)
    names = list(named_parts(model))
    assert names[:11] == ["encoder", "enc1", "enc2", "enc3", "enc4", "enc5", "dec3", "dec2", "dec1", "dec0", "kmax.dec3.0"]
    assert names[11:] == ["kmax.dec3.1", "kmax.dec2.0", "kmax.dec2.1", "kmax.dec1.0", "kmax.dec1.1", "mask_embedding",
                          "predictor", "mlp"]
    assert list(authors_dead_parts(get_preset("paper").model)) == [
        "grn", "conv_head", "unused_kmax_layers", "kmax_class_heads", "class_embedding", "final_class_head",
    ]
