"""Protocol sliding window == UA-MT's test_single_case loop; fast MONAI mode; argument checks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dkuxnet.inference import predict_fast, predict_protocol, protocol_padding, protocol_windows


@dataclass
class _Out:
    seg_logits: torch.Tensor


class _StandIn(nn.Module):
    """Position-dependent (padding='zeros' convs) 2-class net, with dropout and batch norm to check eval mode."""

    def __init__(self, k: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm3d(4)
        self.drop = nn.Dropout3d(0.5)
        self.conv2 = nn.Conv3d(4, k, 3, padding=1)

    def forward(self, x: torch.Tensor) -> _Out:
        return _Out(self.conv2(self.drop(torch.relu(self.bn(self.conv1(x))))) * 3.0)


def _model(k: int = 2) -> _StandIn:
    torch.manual_seed(0)
    m = _StandIn(k)
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.2, 0.2)
        m.bn.running_var.uniform_(0.5, 1.5)
    return m


def _reference(net, image, stride_xy, stride_z, patch_size, num_classes):
    """UA-MT code/test_util.py test_single_case (numpy, batch 1, one window at a time), CPU, score map only."""
    w, h, d = image.shape
    w_pad = patch_size[0] - w if w < patch_size[0] else 0
    h_pad = patch_size[1] - h if h < patch_size[1] else 0
    d_pad = patch_size[2] - d if d < patch_size[2] else 0
    add_pad = w_pad > 0 or h_pad > 0 or d_pad > 0
    wl_pad, wr_pad = w_pad // 2, w_pad - w_pad // 2
    hl_pad, hr_pad = h_pad // 2, h_pad - h_pad // 2
    dl_pad, dr_pad = d_pad // 2, d_pad - d_pad // 2
    if add_pad:
        image = np.pad(image, [(wl_pad, wr_pad), (hl_pad, hr_pad), (dl_pad, dr_pad)], mode="constant",
                       constant_values=0)
    ww, hh, dd = image.shape
    sx = math.ceil((ww - patch_size[0]) / stride_xy) + 1
    sy = math.ceil((hh - patch_size[1]) / stride_xy) + 1
    sz = math.ceil((dd - patch_size[2]) / stride_z) + 1
    score_map = np.zeros((num_classes,) + image.shape).astype(np.float32)
    cnt = np.zeros(image.shape).astype(np.float32)
    visited = []
    for x in range(0, sx):
        xs = min(stride_xy * x, ww - patch_size[0])
        for y in range(0, sy):
            ys = min(stride_xy * y, hh - patch_size[1])
            for z in range(0, sz):
                zs = min(stride_z * z, dd - patch_size[2])
                visited.append((xs, ys, zs))
                test_patch = image[xs:xs + patch_size[0], ys:ys + patch_size[1], zs:zs + patch_size[2]]
                test_patch = np.expand_dims(np.expand_dims(test_patch, axis=0), axis=0).astype(np.float32)
                with torch.no_grad():
                    y1 = net(torch.from_numpy(test_patch)).seg_logits
                y_ = torch.softmax(y1, dim=1).cpu().data.numpy()[0]
                score_map[:, xs:xs + patch_size[0], ys:ys + patch_size[1], zs:zs + patch_size[2]] += y_
                cnt[xs:xs + patch_size[0], ys:ys + patch_size[1], zs:zs + patch_size[2]] += 1
    score_map = score_map / np.expand_dims(cnt, axis=0)
    if add_pad:
        score_map = score_map[:, wl_pad:wl_pad + w, hl_pad:hl_pad + h, dl_pad:dl_pad + d]
    return score_map, visited


@pytest.mark.parametrize(
    ("shape", "batch_size"),
    [((27, 23, 15), 4), ((19, 30, 13), 3), ((13, 21, 9), 1)],  # odd sizes; x < patch (pad 3), x and z < patch
)
def test_protocol_equals_uamt_loop(shape, batch_size):
    patch, stride = (16, 12, 10), (5, 5, 2)
    rng = np.random.default_rng(1)
    image = rng.normal(size=shape).astype(np.float32)
    net = _model().eval()
    ref, visited = _reference(net, image, stride[0], stride[2], patch, 2)  # UA-MT: stride_xy, stride_z
    net.train()  # predict_protocol must switch to eval itself and restore the mode
    got = predict_protocol(net, image, patch, stride, batch_size=batch_size)
    assert net.training
    assert got.shape == (2, *shape)
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-5)
    assert protocol_windows(shape, patch, stride) == visited


def test_protocol_accepts_torch_input_and_sums_to_one():
    image = torch.randn(20, 17, 11)
    got = predict_protocol(_model(3), image, (8, 8, 8), (4, 4, 2), batch_size=5, num_classes=3)
    assert got.shape == (3, 20, 17, 11)
    torch.testing.assert_close(got.sum(0), torch.ones(20, 17, 11))


def test_window_count_on_la_shapes():
    assert len(protocol_windows((175, 132, 88))) == 45  # 5 × 3 × 3
    assert len(protocol_windows((200, 150, 88))) == 72  # 6 × 4 × 3
    assert {z for _, _, z in protocol_windows((244, 160, 88))} == {0, 4, 8}
    w = protocol_windows((175, 132, 88))
    assert max(x for x, _, _ in w) == 175 - 112 and max(y for _, y, _ in w) == 132 - 112


def test_padding_is_uamt_symmetric():
    assert protocol_padding((40, 112, 85), (48, 112, 80)) == [(4, 4), (0, 0), (0, 0)]
    assert protocol_padding((45, 30, 79), (48, 32, 80)) == [(1, 2), (1, 1), (0, 1)]


@pytest.mark.parametrize(("mode", "overlap"), [("gaussian", 0.5), ("constant", 0.6)])
def test_fast_mode_equals_monai_sliding_window_of_softmax(mode, overlap):
    """predict_fast = MONAI sliding_window_inference(eval model, softmax_K per window, patch, overlap, mode), the
    volume padded where smaller than the patch (z here); probabilities sum to 1; the model's mode is restored."""
    from monai.inferers import sliding_window_inference

    image = np.random.default_rng(0).normal(size=(30, 21, 9)).astype(np.float32)
    net = _model().train()
    got = predict_fast(net, image, (16, 16, 12), overlap=overlap, mode=mode, batch_size=2)
    assert net.training and got.shape == (2, 30, 21, 9) and got.dtype == torch.float32
    net.eval()
    with torch.no_grad():
        ref = sliding_window_inference(
            torch.from_numpy(image)[None, None], (16, 16, 12), 1, lambda b: torch.softmax(net(b).seg_logits, 1),
            overlap=overlap, mode=mode,
        )[0]
    torch.testing.assert_close(got, torch.as_tensor(ref), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.sum(0), torch.ones(30, 21, 9))


def test_fast_constant_on_full_window_equals_single_forward():
    image = torch.randn(16, 16, 12)
    net = _model().eval()
    got = predict_fast(net, image, (16, 16, 12), mode="constant")
    with torch.no_grad():
        ref = torch.softmax(net(image[None, None]).seg_logits, dim=1)[0]
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [({"patch": (8, 8)}, "patch"), ({"stride": (0, 4, 4)}, "stride"), ({"stride": (9, 4, 4)}, "stride"),
     ({"batch_size": 0}, "batch_size"), ({"num_classes": 3}, "num_classes")],
)
def test_protocol_argument_errors(kwargs, word):
    args = {"patch": (8, 8, 8), "stride": (4, 4, 4), **kwargs}
    with pytest.raises(ValueError, match=word):
        predict_protocol(_model(), np.zeros((10, 10, 10), np.float32), **args)


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [({"overlap": 1.0}, r"overlap must be in \[0, 1\)"), ({"overlap": -0.1}, r"overlap must be in \[0, 1\)"),
     ({"batch_size": 0}, "batch_size"), ({"patch": (8, 8)}, "patch")],
)
def test_fast_argument_errors(kwargs, word):
    """predict_fast itself (before MONAI) refuses overlap outside [0, 1), batch_size < 1 and a non-triplet patch."""
    args = {"patch": (8, 8, 8), **kwargs}
    with pytest.raises(ValueError, match=word):
        predict_fast(_model(), np.zeros((10, 10, 10), np.float32), **args)


def test_image_must_be_3d():
    with pytest.raises(ValueError, match="image"):
        predict_protocol(_model(), np.zeros((1, 10, 10, 10), np.float32), (8, 8, 8), (4, 4, 4))


LA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "LA"


@pytest.mark.real_data
@pytest.mark.skipif(not (LA_ROOT / "test.list").is_file(), reason="real LA data not present")
def test_la_test_set_has_1128_windows():
    import h5py

    from dkuxnet.data.la import case_path, read_list

    shapes = []
    for case_id in read_list(LA_ROOT / "test.list"):
        with h5py.File(case_path(LA_ROOT, case_id), "r") as f:
            shapes.append(f["image"].shape)
    counts = [len(protocol_windows(s)) for s in shapes]
    assert len(counts) == 20 and sum(counts) == 1128 and (min(counts), max(counts)) == (45, 84)  # UA-MT grid
