"""Tests of dkuxnet.viz: figure types, meshes and distance colouring on synthetic masks."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("plotly")
pytest.importorskip("matplotlib")

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import plotly.graph_objects as go  # noqa: E402

from dkuxnet import viz  # noqa: E402


def sphere(shape=(24, 24, 20), centre=(12, 12, 10), radius=6.0) -> np.ndarray:
    grid = np.indices(shape).astype(np.float32)
    dist2 = sum((g - c) ** 2 for g, c in zip(grid, centre))
    return dist2 <= radius**2


def test_mesh_from_sphere_has_vertices_on_the_sphere():
    mask = sphere()
    mesh = viz.mesh_from_mask(mask, spacing=0.5)
    assert isinstance(mesh, go.Mesh3d)
    verts = np.stack([mesh.x, mesh.y, mesh.z], axis=1)
    assert len(verts) > 100 and len(mesh.i) > 100
    radii = np.linalg.norm(verts - 0.5 * np.array([12, 12, 10]), axis=1)
    assert np.all(np.abs(radii - 0.5 * 6.0) < 0.5 * 1.0)  # within one voxel of the true radius


def test_mesh_of_mask_touching_the_border_is_in_the_volume_frame():
    mask = np.zeros((8, 8, 8), bool)
    mask[:3, :3, :3] = True
    verts, faces = viz.mask_surface(mask)
    assert verts.min() >= -0.5 and verts.max() <= 2.5
    assert faces.max() < len(verts)


def test_empty_mask_raises():
    with pytest.raises(ValueError, match="empty"):
        viz.mask_surface(np.zeros((5, 5, 5), bool))


def test_distance_colouring_is_zero_when_pred_equals_gt_and_positive_when_shifted():
    gt = sphere()
    assert np.all(viz.surface_distances(gt, gt.copy()) == 0.0)
    shifted = np.roll(gt, 3, axis=0)
    d = viz.surface_distances(shifted, gt, spacing=0.625)
    assert d.max() > 0.625 * 2 and d.min() >= 0.0
    mesh = viz.surface_distance_mesh(shifted, gt)
    assert len(mesh.intensity) == len(mesh.x)


def test_comparison_figure_skips_empty_prediction():
    gt = sphere()
    assert len(viz.comparison_figure(gt, gt).data) == 2
    assert len(viz.comparison_figure(np.zeros_like(gt), gt).data) == 1


def test_isosurface_figure_slice_at_largest_label_slice():
    gt = sphere()
    image = np.random.default_rng(0).normal(size=gt.shape).astype(np.float32)
    fig = viz.isosurface_figure(image, gt)
    assert isinstance(fig, go.Figure)
    surface = next(t for t in fig.data if isinstance(t, go.Surface))
    assert np.all(np.asarray(surface.z) == 10.0)


def test_take_slice_and_largest_slice():
    vol = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    assert np.array_equal(viz.take_slice(vol, axis=1, index=2), vol[:, 2, :])
    assert viz.take_slice(vol).shape == (2, 3)
    mask = np.zeros((4, 4, 6), bool)
    mask[:, :, 4] = True
    mask[0, 0, 1] = True
    assert viz.largest_slice(mask) == 4
    with pytest.raises(ValueError, match="axis"):
        viz.take_slice(vol, axis=3)
    with pytest.raises(ValueError, match="index"):
        viz.take_slice(vol, axis=2, index=4)


def test_slice_figure_and_widget():
    gt = sphere()
    image = gt.astype(np.float32)
    fig = viz.slice_figure(image, gt, np.roll(gt, 2, axis=1))
    assert isinstance(fig, matplotlib.figure.Figure)
    assert len(fig.axes[0].collections) >= 2  # two contours
    plt.close(fig)
    ipywidgets = pytest.importorskip("ipywidgets")
    w = viz.slice_widget(image, gt)
    slider = w.children[0]
    assert isinstance(slider, ipywidgets.IntSlider) and slider.value == 10 and slider.max == 19


def test_loss_curves_reads_jsonl(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"iteration": i, "loss": 1.0 / (i + 1), "seg": 0.5, "ramp": 0.1 * i} for i in range(3)]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    fig = viz.loss_curves(path)
    names = [t.name for t in fig.data]
    assert names == ["loss", "seg", "ramp"]
    assert list(fig.data[0].y) == [1.0, 0.5, 1.0 / 3]
    assert fig.data[2].yaxis == "y2"
    with pytest.raises(FileNotFoundError):
        viz.loss_curves(tmp_path / "missing.jsonl")


def test_group_parts_by_prefix():
    parts = {"encoder": 5, "enc1": 1, "enc5": 2, "dec0": 3, "kmax.dec3.0": 4, "mlp": 6, "predictor": 1,
             "block_one": 7, "out_conv": 1}
    assert viz.group_parts(parts) == {"UX-Net encoder": 5, "skip blocks enc1-enc5": 3, "pixel decoder dec3-dec0": 3,
                                      "kMaX layers": 4, "heads": 7, "V-Net blocks": 8}


def test_params_bar_stacks_groups():
    infos = [{"preset": "a", "parts": {"enc1": 10, "dec0": 5}}, {"preset": "b", "parts": {"enc2": 3, "mlp": 1}}]
    fig = viz.params_bar(infos)
    assert [t.name for t in fig.data] == ["skip blocks enc1-enc5", "pixel decoder dec3-dec0", "heads"]
    assert list(fig.data[1].y) == [5, 0]
    assert fig.layout.barmode == "stack"


def test_grouped_bars_checks_lengths():
    fig = viz.grouped_bars(["seg", "all"], {"ours": [1.0, 2.0], "paper": [3.0, 4.0]}, title="t")
    assert len(fig.data) == 2 and fig.layout.barmode == "group"
    with pytest.raises(ValueError, match="ours"):
        viz.grouped_bars(["seg"], {"ours": [1.0, 2.0]}, title="t")


def test_intensity_stats_by_hand():
    image = np.array([1.0, 1.0, 3.0, 5.0], np.float32).reshape(1, 1, 4)
    label = np.array([0, 0, 1, 1], np.uint8).reshape(1, 1, 4)
    s = viz.intensity_stats(image, label)
    assert s["mean inside"] == 4.0 and s["std inside"] == 1.0
    assert s["mean outside"] == 1.0 and s["std outside"] == 0.0
    assert s["foreground %"] == 50.0 and s["mean"] == 2.5
    fig = viz.intensity_histogram({"c": (image, label)}, bins=4)
    assert [t.name for t in fig.data] == ["c inside", "c outside"]


def test_assignment_figure_groups():
    probs = np.zeros((5, 4, 4, 2), np.float32)
    probs[4, :2] = 1.0
    probs[0, 2:] = 1.0
    fig = viz.assignment_figure(probs, (1, 1, 3), np.zeros((4, 4, 2)), index=0)
    group_panel = fig.axes[2].images[0].get_array()
    assert group_panel[0, 0] == 2 and group_panel[0, 3] == 0  # transposed: [y, x]
    plt.close(fig)
    with pytest.raises(ValueError, match="group_sizes"):
        viz.assignment_figure(probs, (1, 1), np.zeros((4, 4, 2)), index=0)


def test_crop_around_label_stays_inside_and_centres():
    label = np.zeros((20, 20, 10), np.uint8)
    label[18, 2, 5] = 1
    image = np.arange(label.size, dtype=np.float32).reshape(label.shape)
    crop, crop_label = viz.crop_around_label(image, label, (8, 8, 4))
    assert crop.shape == (8, 8, 4) and crop_label.sum() == 1
    assert crop[0, 0, 0] == image[12, 0, 3]  # x clipped to the end, y to the start, z centred
    with pytest.raises(ValueError, match="size"):
        viz.crop_around_label(image, label, (30, 8, 4))


def test_orthogonal_slices_has_three_panels():
    gt = sphere()
    fig = viz.orthogonal_slices(gt.astype(np.float32), gt, gt)
    assert len(fig.axes) == 3
    plt.close(fig)


def test_picker_widget_renders_first_option_then_each_change():
    pytest.importorskip("ipywidgets")
    seen = []
    w = viz.picker_widget(["a", "b"], seen.append)
    assert seen == ["a"]
    w.children[0].value = "b"
    assert seen == ["a", "b"]
    with pytest.raises(ValueError, match="options"):
        viz.picker_widget([], seen.append)
