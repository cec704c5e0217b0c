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


def test_slice_figure_draws_both_contours():
    gt = sphere()
    image = gt.astype(np.float32)
    fig = viz.slice_figure(image, gt, np.roll(gt, 2, axis=1))
    assert isinstance(fig, matplotlib.figure.Figure)
    assert len(fig.axes[0].collections) >= 2  # two contours
    plt.close(fig)


def test_overlay_codes_are_categories_of_truth_and_prediction():
    label = np.array([0, 1, 0, 1], bool).reshape(1, 1, 4)
    pred = np.array([0, 0, 1, 1], bool).reshape(1, 1, 4)
    codes, names = viz.overlay_codes(label, pred)
    assert codes.dtype == np.uint8 and codes.ravel().tolist() == [0, 1, 2, 3]
    assert names == {1: "truth only (missed)", 2: "prediction only (leaked)", 3: "truth and prediction"}
    assert viz.overlay_codes(label, None)[1] == {1: "ground truth"}
    assert viz.overlay_codes(None, pred)[1] == {2: "prediction"}
    with pytest.raises(ValueError, match="label or a prediction"):
        viz.overlay_codes(None, None)
    with pytest.raises(ValueError, match="shape"):
        viz.overlay_codes(label, pred[..., :2])


def _visible(fig: go.Figure) -> list[bool]:
    """Which traces a figure shows as it opens (plotly's default, None, means visible)."""
    return [t.visible in (None, True) for t in fig.data]


def test_slice_browser_steps_toggle_one_slice_each():
    gt = sphere((24, 24, 60), (12, 12, 31), 6.0)  # largest axial slice: z = 31
    image = np.random.default_rng(0).normal(size=gt.shape).astype(np.float32)
    fig = viz.slice_browser(image, gt, np.roll(gt, 2, axis=0), max_steps=24)
    slider = fig.layout.sliders[0]
    labels = [int(step.label) for step in slider.steps]
    assert len(labels) <= 24 and 31 in labels and np.all(np.diff(labels) == 3)  # every 3rd slice of 60
    assert labels[slider.active] == 31
    heatmaps = [t for t in fig.data if isinstance(t, go.Heatmap)]
    assert len(heatmaps) == 2 * len(labels)  # image + overlay per slice
    legend = [t for t in fig.data if isinstance(t, go.Scatter)]
    assert [t.name for t in legend] == ["truth only (missed)", "prediction only (leaked)", "truth and prediction"]
    for k, step in enumerate(slider.steps):
        mask = step.args[0]["visible"]
        assert len(mask) == len(fig.data)
        assert [i for i, v in enumerate(mask[: len(heatmaps)]) if v] == [2 * k, 2 * k + 1]
        assert all(mask[len(heatmaps):])  # legend entries stay
    assert _visible(fig) == list(slider.steps[slider.active].args[0]["visible"])
    overlay = fig.data[2 * slider.active + 1]
    assert np.array_equal(np.asarray(overlay.z), viz.overlay_codes(gt, np.roll(gt, 2, axis=0))[0][..., 31].T)
    grey = np.asarray(fig.data[2 * slider.active].z)
    assert grey.dtype == np.uint8 and grey.shape == (24, 24)


def test_slice_browser_overlay_colours_are_discrete():
    gt = sphere()
    fig = viz.slice_browser(gt.astype(np.float32), gt, gt)
    overlay = fig.data[1]
    assert overlay.showscale is False and (overlay.zmin, overlay.zmax) == (-0.5, 3.5)
    scale = [(float(pos), colour) for pos, colour in overlay.colorscale]
    assert len(scale) == 8  # two stops per code: flat bands, no gradient
    for code in range(4):
        (lo, c0), (hi, c1) = scale[2 * code], scale[2 * code + 1]
        assert (lo, hi) == (code / 4, (code + 1) / 4) and c0 == c1
    assert scale[0][1] == "rgba(0, 0, 0, 0)"  # background transparent
    assert len({c for _, c in scale}) == 4
    legend_colours = [t.marker.color for t in fig.data if isinstance(t, go.Scatter)]
    assert legend_colours == [scale[2 * code][1] for code in (1, 2, 3)]


def test_slice_browser_downsamples_and_checks_inputs():
    image = np.zeros((300, 90, 10), np.float32)
    fig = viz.slice_browser(image, axis=2, max_size=128)
    assert len(fig.data) == 10 and not any(isinstance(t, go.Scatter) for t in fig.data)  # image only
    assert np.asarray(fig.data[0].z).shape == (30, 100)  # stride 3: Y×X after transposing
    assert list(fig.data[0].x[:2]) == [0, 3]
    assert fig.layout.sliders[0].steps[fig.layout.sliders[0].active].label == "5"  # middle without a label
    with pytest.raises(ValueError, match="label shape"):
        viz.slice_browser(image, np.zeros((2, 2, 2), bool))
    with pytest.raises(ValueError, match="max_steps"):
        viz.slice_browser(image, max_steps=0)
    with pytest.raises(ValueError, match="3D"):
        viz.slice_browser(image[0])


def test_case_picker_buttons_select_exactly_their_case():
    gt = sphere()
    figures = {"a": viz.comparison_figure(gt, gt, title="case a"),
               "b": viz.comparison_figure(np.zeros_like(gt), gt, title="case b"),  # truth only: 1 trace
               "c": viz.comparison_figure(np.roll(gt, 2, axis=0), gt, title="case c")}
    fig = viz.case_picker_figure(figures)
    assert len(fig.data) == 5
    menu = fig.layout.updatemenus[0]
    assert [b.label for b in menu.buttons] == ["a", "b", "c"] and menu.active == 0
    owners = ["a", "a", "b", "c", "c"]
    for button in menu.buttons:
        visible, layout = button.args
        assert visible["visible"] == [o == button.label for o in owners]
        assert layout["title"]["text"] == f"case {button.label}"
    assert _visible(fig) == [True, True, False, False, False]
    assert fig.layout.scene.aspectmode == "data"  # the first figure's layout
    assert np.array_equal(np.asarray(fig.data[3].x), np.asarray(figures["c"].data[0].x))
    assert figures["b"].data[0].visible is None  # the inputs are not modified
    with pytest.raises(ValueError, match="at least one"):
        viz.case_picker_figure({})
    with pytest.raises(ValueError, match="'x'"):
        viz.case_picker_figure({"x": go.Figure()})


def test_loss_curves_reads_jsonl(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"iteration": i, "loss": 1.0 / (i + 1), "seg": 0.5, "ramp": 0.1 * i} for i in range(3)]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    fig = viz.loss_curves(path)
    names = [t.name for t in fig.data]
    assert names == ["seg", "ramp", "total"]  # the total drawn last: no component hides it
    assert list(fig.data[2].y) == [1.0, 0.5, 1.0 / 3] and fig.data[2].line.width > fig.data[0].line.width
    assert fig.data[1].yaxis == "y2" and list(fig.layout.yaxis2.tickvals) == [0, 0.25, 0.5, 0.75, 1]
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
    fig = viz.grouped_bars(["seg", "all"], {"seed 1": [1.0, 2.0], "seed 2": [3.0, 4.0]}, title="t")
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
    group_panel = fig.axes[2].images[0]
    assert group_panel.get_array()[0, 0] == 2 and group_panel.get_array()[0, 3] == 0  # transposed: [y, x]
    assert group_panel.cmap.N == 3 and group_panel.norm(np.arange(3)).tolist() == [0, 1, 2]  # one colour per group
    assert fig.axes[1].images[0].cmap.N == 5
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


# --- architecture diagram: rows walked from the model object, shapes from one fake-tensor forward pass ---

import functools  # noqa: E402

import torch  # noqa: E402

from dkuxnet.config import get_preset  # noqa: E402
from dkuxnet.models import create_model, model_info  # noqa: E402

PATCH = (112, 112, 80)


@pytest.fixture(scope="module")
def fake_tensors_imported():
    """Pay once, in setup, the one-time import of ``torch._dynamo`` that ``FakeTensorMode()`` triggers (≈ 2-3 s)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    FakeTensorMode()


def meta_model(preset: str, **overrides):
    """A preset's config (with dotted overrides) and its model built on the meta device."""
    cfg = get_preset(preset).override(**overrides) if overrides else get_preset(preset)
    with torch.device("meta"):
        return cfg, create_model(cfg)


@functools.lru_cache(maxsize=None)
def arch(preset: str):
    """(config, architecture rows at 1×1×112×112×80) of a preset, computed once per process."""
    cfg, model = meta_model(preset)
    return cfg, viz.architecture_rows(model, (1, 1, *PATCH))


@pytest.mark.usefixtures("fake_tensors_imported")
@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_architecture_rows_have_every_block_of_the_config(preset):
    cfg, rows = arch(preset)
    m, by_name = cfg.model, {r["name"]: r for r in rows}
    stages = len(m.widths)
    names = {kind: [r["name"] for r in rows if r["kind"] == kind] for kind in viz.ARCHITECTURE_KINDS}
    assert names["ux-stage"] == [f"stage{i}" for i in range(1, stages + 1)]
    assert names["resblock"] == [f"enc{i}" for i in range(1, stages + 2)]  # the last is the bottleneck
    assert names["upblock"] == [f"dec{i}" for i in range(stages - 1, -1, -1)]
    # kmax_scales × kmax_layers_per_scale layers, coarse to fine, each on the decoder scale it reads
    expected = [(f"kmax.dec{stages - 1 - s}.{j}", 2 ** (stages - 1 - s))
                for s in range(m.kmax_scales) for j in range(m.kmax_layers_per_scale)]
    assert [(r["name"], r["stride"]) for r in rows if r["kind"] == "kmax"] == expected
    assert [r["stride"] for r in rows if r["kind"] == "kmax"] == [8, 8, 4, 4, 2, 2]  # both: 3 scales × 2 layers
    previous = "cluster_centers"  # the centres flow through every kMaX layer to the query heads
    for name, _ in expected:
        assert by_name[name]["inputs"] == [name.split(".")[1], previous]
        assert by_name[name]["shape"] == (m.query_dim, m.num_queries)
        previous = name
    assert by_name["mask_embedding"]["inputs"] == by_name["mlp"]["inputs"] == [previous]
    assert names["head"] == ["mask_embedding", "predictor", "mlp"]  # no conv head in these presets
    assert names["output"] == ["S", "Y", "O"] and names["centres"] == ["cluster_centers"]


@pytest.mark.usefixtures("fake_tensors_imported")
@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_architecture_rows_shapes_follow_the_strides(preset):
    cfg, rows = arch(preset)
    m, by_name = cfg.model, {r["name"]: r for r in rows}
    stages, w = len(m.widths), m.widths

    def grid(stride):
        return tuple(s // stride for s in PATCH)

    for i in range(1, stages + 1):  # stem at stride 2, then one k2 s2 downsampling per stage
        assert (by_name[f"stage{i}"]["shape"], by_name[f"stage{i}"]["stride"]) == ((w[i - 1], *grid(2**i)), 2**i)
    assert by_name["enc1"]["shape"] == (w[0], *PATCH) and by_name["enc1"]["inputs"] == ["input"]
    for j in range(2, stages + 2):  # enc_j reads stage_{j-1}; the last one is the bottleneck
        channels = m.hidden if j == stages + 1 else w[j - 1]
        assert by_name[f"enc{j}"]["shape"] == (channels, *grid(2 ** (j - 1)))
        assert by_name[f"enc{j}"]["inputs"] == [f"stage{j - 1}"]
    bottleneck = by_name[f"enc{stages + 1}"]
    assert bottleneck["stride"] == 2**stages == 16  # 4 stages: stride 16 (stem 2 × three downsamplings)
    if preset == "paper":
        assert bottleneck["shape"] == (768, 7, 7, 5)
    for k in range(stages):  # dec_k at stride 2^k reads the coarser path and the skip enc_{k+1}
        coarser = f"enc{stages + 1}" if k == stages - 1 else f"dec{k + 1}"
        assert (by_name[f"dec{k}"]["shape"], by_name[f"dec{k}"]["stride"]) == ((w[k], *grid(2**k)), 2**k)
        assert by_name[f"dec{k}"]["inputs"] == [coarser, f"enc{k + 1}"]
    assert by_name["dec0"]["shape"] == (w[0], *PATCH)
    n, k, g = m.num_queries, m.num_classes, len(m.query_groups)
    assert by_name["predictor"]["shape"] == (n, *PATCH)
    assert by_name["predictor"]["inputs"] == ["dec0", "mask_embedding"]
    assert by_name["mlp"]["shape"] == (n * k,) and by_name["mask_embedding"]["shape"] == (m.query_dim, n)
    assert [by_name[o]["shape"] for o in ("S", "Y", "O")] == [(n, *PATCH), (k, *PATCH), (g, *PATCH)]
    assert all(r["channels"] == r["shape"][0] for r in rows)


@pytest.mark.usefixtures("fake_tensors_imported")
@pytest.mark.parametrize("preset", ["tiny", "paper", "official"])
def test_architecture_rows_partition_the_parameters(preset):
    cfg, model = meta_model(preset)
    rows = viz.architecture_rows(model, (1, 1, 32, 32, 32))
    info = model_info(preset)
    params = {r["name"]: r["parameters"] for r in rows}
    assert sum(params.values()) == info["parameters"]  # every parameter of the model, each in one row
    assert sum(v for name, v in params.items() if name.startswith("stage")) == info["parts"]["encoder"]
    assert all(params[name] == count for name, count in info["parts"].items() if name != "encoder")
    conv_head = [r for r in rows if r["name"] == "conv_head"]
    assert len(conv_head) == (cfg.model.seg_head == "conv")
    if conv_head:
        assert conv_head[0]["inputs"] == ["dec0"] and conv_head[0]["shape"] == (cfg.model.num_classes, 32, 32, 32)


@pytest.mark.usefixtures("fake_tensors_imported")
def test_architecture_rows_follow_the_config():
    _, rows = arch("paper")
    _, model = meta_model("paper", **{"model.kmax_scales": 2})
    changed = viz.architecture_rows(model, (1, 1, *PATCH))
    assert [r["stride"] for r in changed if r["kind"] == "kmax"] == [8, 8, 4, 4]
    assert {r["name"] for r in rows} - {r["name"] for r in changed} == {"kmax.dec1.0", "kmax.dec1.1"}
    assert next(r for r in changed if r["name"] == "mlp")["inputs"] == ["kmax.dec2.1"]
    # paper with 2 kMaX scales is the authors' DKUNET class
    assert sum(r["parameters"] for r in changed) == model_info("authors-script")["parameters"]


@pytest.mark.usefixtures("fake_tensors_imported")
@pytest.mark.parametrize("overrides", [{}, {"model.kmax_scales": 2}, {"model.kmax_layers_per_scale": 3},
                                       {"model.seg_head": "conv"}])
def test_architecture_figure_has_one_box_per_row(overrides):
    cfg, model = meta_model("tiny", **overrides)
    shape = (1, 1, 32, 32, 32)
    rows = viz.architecture_rows(model, shape)
    fig = viz.architecture_figure(model, shape, preset="tiny")
    ax = fig.axes[0]
    assert len(ax.patches) == len(rows)  # arrows are annotations and legend entries proxies, not patches
    assert sum(r["kind"] == "kmax" for r in rows) == cfg.model.kmax_scales * cfg.model.kmax_layers_per_scale
    assert any(r["name"] == "conv_head" for r in rows) == (cfg.model.seg_head == "conv")
    plt.close(fig)


@pytest.mark.usefixtures("fake_tensors_imported")
def test_architecture_figure_colours_and_title_cpu():
    cfg, model = meta_model("cpu")
    shape = (1, 1, *cfg.data.patch_size)
    rows = viz.architecture_rows(model, shape)
    fig = viz.architecture_figure(model, shape, preset="cpu")
    ax = fig.axes[0]
    colours: dict[str, set] = {}
    for row, patch in zip(rows, ax.patches):
        colours.setdefault(row["kind"], set()).add(patch.get_facecolor())
    assert all(len(c) == 1 for c in colours.values())  # one colour per kind of block ...
    assert len(set.union(*colours.values())) == len(colours) == len(viz.ARCHITECTURE_KINDS)  # ... all distinct
    assert "cpu" in ax.get_title() and f"{model_info('cpu')['parameters']:,} parameters" in ax.get_title()
    fig.canvas.draw()  # renders (Agg) without error
    plt.close(fig)


@pytest.mark.usefixtures("fake_tensors_imported")
def test_architecture_rows_of_a_real_model_match_and_leave_it_unchanged():
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    model = create_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shape = (1, 1, 32, 32, 32)
    assert viz.architecture_rows(model, shape) == viz.architecture_rows(meta_model("tiny")[1], shape)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_architecture_rows_check_arguments():
    _, model = meta_model("tiny")
    with pytest.raises(TypeError, match="DKUXNet"):
        viz.architecture_rows(meta_model("vnet")[1])
    with pytest.raises(ValueError, match="5 positive integers"):
        viz.architecture_rows(model, (1, 1, 32, 32))
    with pytest.raises(ValueError, match="channels"):
        viz.architecture_rows(model, (1, 2, 32, 32, 32))
    with pytest.raises(ValueError, match="divisible by 16"):
        viz.architecture_rows(model, (1, 1, 40, 32, 32))


def test_wrap_title_keeps_every_word_and_sizes_the_margin():
    note = "synthetic phantom, tiny preset (32³ patches, batch 1 + 1, lr 0.01), cpu, shortened schedule — not comparable"
    text, top = viz.wrap_title(f"Dice by loss variant<br><sub>{note}</sub>", width=40)
    lines = text.split("<br>")
    assert lines[0] == "Dice by loss variant" and len(lines) == 4
    assert all(line.startswith("<sub>") and line.endswith("</sub>") and len(line) <= 40 + 11 for line in lines[1:])
    assert " ".join(line[5:-6] for line in lines[1:]) == note
    assert top == 40 + 22 * 4 and viz.wrap_title("short")[1] == 62
    fig = viz.grouped_bars(["seg"], {"this build": [1.0]}, title=f"t<br><sub>{note}</sub>")
    assert fig.layout.margin.t >= 40 + 22 * 2 and "<br><sub>" in fig.layout.title.text
    with pytest.raises(ValueError, match="width"):
        viz.wrap_title("t", width=3)


def test_3d_titles_wrap():
    gt = np.zeros((8, 8, 8), bool)
    gt[2:6, 2:6, 2:6] = True
    long = "UPT6DX9IQY9JAZ7HJKA7: Dice 69.5 % — real LA, trained at ½ resolution on 2 CPU cores, 900 iterations"
    fig = viz.comparison_figure(gt, gt, title=long)
    assert "<br>" in fig.layout.title.text and fig.layout.margin.t > 62
    assert fig.layout.title.text.replace("<br>", " ") == long
