"""Figures for the book: surfaces, slices, slice and case browsers, curves (plotly, matplotlib).

Every function takes plain arrays / paths and returns a figure; nothing is shown here, so the caller
(a notebook) decides where it goes. No renderer is chosen in this module: the book build's kernels run
:mod:`dkuxnet.plotting_setup` at start-up (figures as plain divs drawn by the book's own plotly.js), and
Jupyter, Binder and Colab keep their own renderers.
The interactive figures (:func:`slice_browser`, :func:`case_picker_figure`) use plotly's own sliders
and dropdowns over pre-computed traces, so they work in the static HTML book without a kernel.
Arrays are volumes indexed ``(X, Y, Z)`` as in the LA h5 files; meshes are in voxel units times
``spacing``. The architecture diagram (:func:`architecture_figure`) takes a model instead.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from dkuxnet.models import DKUXNet

LOSS_KEYS = ("loss", "seg", "qd", "ds", "qdc", "segc", "ramp")
AXIS_NAMES = ("x", "y", "z")
# Categorical overlay of a slice: code = 1 * truth + 2 * prediction; 0 (neither) stays transparent.
OVERLAY_COLOURS = {1: "rgba(50, 205, 50, 0.6)", 2: "rgba(220, 20, 60, 0.6)", 3: "rgba(255, 200, 0, 0.7)"}


def _check_axis(axis: int) -> None:
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")


def take_slice(volume: np.ndarray, axis: int = 2, index: int | None = None) -> np.ndarray:
    """2D slice of a 3D volume along ``axis`` (default: the middle slice)."""
    _check_axis(axis)
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3D, got shape {volume.shape}")
    n = volume.shape[axis]
    index = n // 2 if index is None else index
    if not 0 <= index < n:
        raise ValueError(f"index must be in [0, {n}), got {index}")
    return np.take(volume, index, axis=axis)


def largest_slice(mask: np.ndarray, axis: int = 2) -> int:
    """Index of the slice along ``axis`` with the most foreground voxels (middle if empty)."""
    _check_axis(axis)
    counts = np.asarray(mask, bool).sum(axis=tuple(a for a in range(3) if a != axis))
    return int(counts.argmax()) if counts.any() else mask.shape[axis] // 2


def crop_around_label(
    image: np.ndarray, label: np.ndarray, size: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Crop of ``size`` centred on the label's largest slices, shifted to stay inside the volume.

    Raises:
        ValueError: when ``size`` is larger than the volume along some axis.
    """
    if any(p > s for p, s in zip(size, image.shape)):
        raise ValueError(f"size {tuple(size)} exceeds the volume shape {image.shape}")
    starts = [min(max(0, largest_slice(label, a) - p // 2), s - p) for a, (p, s) in enumerate(zip(size, image.shape))]
    window = tuple(slice(b, b + p) for b, p in zip(starts, size))
    return image[window], label[window]


def mesh_from_mask(
    mask: np.ndarray, spacing: float = 1.0, step: int = 1, name: str = "mask",
    color: str = "lightgreen", opacity: float = 1.0, intensity: np.ndarray | None = None, unit: str = "",
) -> Any:
    """Closed iso-surface (level 0.5) of a binary volume as a ``plotly.graph_objects.Mesh3d``.

    The mask is zero padded by one voxel so surfaces touching the border are closed; vertices are
    shifted back so they stay in the volume's voxel frame, then scaled by ``spacing``.
    ``intensity`` (one value per vertex, in ``unit``) switches from a flat colour to a colour scale.
    """
    import plotly.graph_objects as go

    verts, faces = mask_surface(mask, spacing=spacing, step=step)
    colour: dict[str, Any] = {"color": color}
    if intensity is not None:
        colour = {"intensity": intensity, "colorscale": "Viridis", "colorbar": {"title": {"text": unit}}}
    return go.Mesh3d(
        x=verts[:, 0], y=verts[:, 1], z=verts[:, 2], i=faces[:, 0], j=faces[:, 1], k=faces[:, 2],
        name=name, opacity=opacity, showlegend=True, **colour,
    )


def mask_surface(mask: np.ndarray, spacing: float = 1.0, step: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Marching-cubes vertices (V×3, in ``spacing`` units) and triangles (F×3) of a binary volume."""
    from skimage.measure import marching_cubes

    mask = np.asarray(mask, bool)
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3D, got shape {mask.shape}")
    if not mask.any():
        raise ValueError("mask is empty: no surface to draw")
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    padded = np.pad(mask, 1).astype(np.float32)
    verts, faces, _, _ = marching_cubes(padded, level=0.5, step_size=step)
    return (verts - 1.0) * spacing, faces


def surface_distances(pred: np.ndarray, gt: np.ndarray, spacing: float = 1.0, step: int = 1) -> np.ndarray:
    """Distance from each vertex of the prediction's surface to the nearest ground-truth surface vertex.

    Both surfaces come from :func:`mask_surface` with the same ``step``, so identical masks give
    exactly zero everywhere. Units: ``spacing`` units (mm with ``spacing=0.625`` on LA).
    """
    from scipy.spatial import cKDTree

    pred_verts, _ = mask_surface(pred, spacing=spacing, step=step)
    gt_verts, _ = mask_surface(gt, spacing=spacing, step=step)
    distances, _ = cKDTree(gt_verts).query(pred_verts)  # V_pred
    return distances


def surface_distance_mesh(pred: np.ndarray, gt: np.ndarray, spacing: float = 1.0, step: int = 1,
                          unit: str = "voxels") -> Any:
    """Prediction surface coloured by its distance (in ``spacing`` units, named ``unit``) to the truth."""
    return mesh_from_mask(
        pred, spacing=spacing, step=step, name="prediction (colour: distance to truth)",
        intensity=surface_distances(pred, gt, spacing=spacing, step=step), unit=unit,
    )


def comparison_figure(pred: np.ndarray, gt: np.ndarray, spacing: float = 1.0, step: int = 1, title: str = "",
                      unit: str = "voxels") -> Any:
    """3D figure: translucent ground truth plus the prediction coloured by surface distance (``unit``)."""
    import plotly.graph_objects as go

    traces = [mesh_from_mask(gt, spacing=spacing, step=step, name="ground truth", color="lightgrey", opacity=0.35)]
    if np.asarray(pred, bool).any():
        traces.append(surface_distance_mesh(pred, gt, spacing=spacing, step=step, unit=unit))
    return _scene(go.Figure(traces), title or "ground truth vs prediction")


def isosurface_figure(
    image: np.ndarray, label: np.ndarray, index: int | None = None, step: int = 1, title: str = ""
) -> Any:
    """3D label surface together with one axial image slice (a ``Surface`` at z = ``index``)."""
    import plotly.graph_objects as go

    index = largest_slice(label) if index is None else index
    plane = take_slice(image, axis=2, index=index)  # X×Y
    xs, ys = np.meshgrid(np.arange(plane.shape[0]), np.arange(plane.shape[1]), indexing="ij")
    surface = go.Surface(
        x=xs, y=ys, z=np.full(plane.shape, float(index)), surfacecolor=plane, colorscale="Gray",
        showscale=False, name=f"image slice z={index}", opacity=0.9,
    )
    mesh = mesh_from_mask(label, step=step, name="label surface", color="crimson", opacity=0.6)
    return _scene(go.Figure([surface, mesh]), title or f"label surface and axial slice z={index}")


def _scene(fig: Any, title: str) -> Any:
    text, top = wrap_title(title, width=70)  # 70: the title stays clear of a case picker's dropdown
    fig.update_layout(
        title=text, scene={"aspectmode": "data"}, margin={"l": 0, "r": 0, "t": top, "b": 0}, height=460 + top,
        legend={"x": 0.0, "y": 1.0, "bgcolor": "rgba(255, 255, 255, 0.6)"},  # clear of the colour bar
    )
    return fig


def slice_figure(
    image: np.ndarray, label: np.ndarray | None = None, pred: np.ndarray | None = None,
    axis: int = 2, index: int | None = None, title: str = "", ax: Any = None,
) -> Any:
    """Matplotlib grey-scale slice with the label contour (green) and prediction contour (red)."""
    import matplotlib.pyplot as plt

    if index is None:
        index = largest_slice(label, axis) if label is not None else image.shape[axis] // 2
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.imshow(take_slice(image, axis, index).T, cmap="gray", origin="lower")
    for mask, colour in ((label, "lime"), (pred, "red")):
        if mask is not None and take_slice(np.asarray(mask, bool), axis, index).any():
            plane = take_slice(np.asarray(mask, np.float32), axis, index)
            ax.contour(plane.T, levels=[0.5], colors=colour, linewidths=1.2)
    ax.set_title(title or f"axis {axis}, slice {index}")
    ax.set_axis_off()
    return fig if fig is not None else ax.figure


def overlay_codes(label: np.ndarray | None, pred: np.ndarray | None) -> tuple[np.ndarray, dict[int, str]]:
    """Categorical map ``1 * label + 2 * pred`` (uint8) and the name of each code that can occur.

    Code 0 (neither) is the background. With both masks the codes are 1 (truth only: missed),
    2 (prediction only: leaked) and 3 (both); with one mask only its own code is named.

    Raises:
        ValueError: when neither mask is given or their shapes differ.
    """
    masks = [np.asarray(m, bool) for m in (label, pred) if m is not None]
    if not masks:
        raise ValueError("need a label or a prediction to overlay")
    if len(masks) == 2 and masks[0].shape != masks[1].shape:
        raise ValueError(f"label shape {masks[0].shape} differs from prediction shape {masks[1].shape}")
    codes = np.zeros(masks[0].shape, np.uint8)
    names: dict[int, str] = {}
    if label is not None:
        codes += np.asarray(label, bool).astype(np.uint8)
        names[1] = "ground truth" if pred is None else "truth only (missed)"
    if pred is not None:
        codes += 2 * np.asarray(pred, bool).astype(np.uint8)
        names[2] = "prediction" if label is None else "prediction only (leaked)"
    if len(names) == 2:
        names[3] = "truth and prediction"
    return codes, names


def _categorical_scale(colours: Mapping[int, str], n_codes: int) -> list[list[Any]]:
    """Stepped colour scale for integer codes ``0 .. n_codes-1`` with ``zmin=-0.5, zmax=n_codes-0.5``."""
    scale: list[list[Any]] = []
    for code in range(n_codes):
        colour = colours.get(code, "rgba(0, 0, 0, 0)")
        scale += [[code / n_codes, colour], [(code + 1) / n_codes, colour]]
    return scale


def slice_browser(
    image: np.ndarray, label: np.ndarray | None = None, pred: np.ndarray | None = None, axis: int = 2,
    max_steps: int = 24, max_size: int = 128, title: str = "",
) -> Any:
    """Plotly figure with a slider over slices of ``image`` along ``axis``, label / prediction overlaid.

    Every slice the slider reaches is pre-computed as two heatmaps (the image as uint8 grey levels and
    the categorical :func:`overlay_codes` map, code 0 transparent) and the slider only toggles their
    visibility, so it works in a static page. To keep the page light at most ``max_steps`` slices are
    kept (every k-th one, always including the start slice: the label's largest, else the middle) and
    each slice is subsampled by the smallest integer stride that brings both sides to ``max_size`` or
    less. Axes are in voxel indices. The legend names the overlay's discrete colours.

    Raises:
        ValueError: for a non-3D image, masks of another shape, or ``max_steps`` / ``max_size`` < 1.
    """
    import plotly.graph_objects as go

    _check_axis(axis)
    if image.ndim != 3:
        raise ValueError(f"image must be 3D, got shape {image.shape}")
    for name, mask in (("label", label), ("pred", pred)):
        if mask is not None and mask.shape != image.shape:
            raise ValueError(f"{name} shape {mask.shape} differs from image shape {image.shape}")
    if max_steps < 1 or max_size < 1:
        raise ValueError(f"max_steps and max_size must be >= 1, got {max_steps} and {max_size}")
    n = image.shape[axis]
    start = largest_slice(label, axis) if label is not None else n // 2
    every = -(-n // max_steps)  # ceil
    indices = np.arange(start % every, n, every)
    plane_axes = [a for a in range(3) if a != axis]
    stride = -(-max(image.shape[a] for a in plane_axes) // max_size)
    window = tuple(slice(None) if a == axis else slice(None, None, stride) for a in range(3))
    lo, hi = float(image.min()), float(image.max())
    grey = np.round(255 * (image[window] - lo) / (hi - lo if hi > lo else 1.0)).astype(np.uint8)
    codes, names = (None, {}) if label is None and pred is None else overlay_codes(label, pred)
    xs, ys = (np.arange(0, image.shape[a], stride) for a in plane_axes)
    traces: list[Any] = []
    for index in indices:
        shown = bool(index == start)
        traces.append(go.Heatmap(
            x=xs, y=ys, z=take_slice(grey, axis, int(index)).T, zmin=0, zmax=255, colorscale="Gray",
            showscale=False, visible=shown, name=f"slice {index}",
            hovertemplate=f"{AXIS_NAMES[plane_axes[0]]} %{{x}}, {AXIS_NAMES[plane_axes[1]]} %{{y}}<extra></extra>",
        ))
        if codes is not None:
            traces.append(go.Heatmap(
                x=xs, y=ys, z=take_slice(codes[window], axis, int(index)).T, zmin=-0.5, zmax=3.5,
                colorscale=_categorical_scale(OVERLAY_COLOURS, 4), showscale=False, visible=shown,
                hoverinfo="skip", name=f"overlay {index}",
            ))
    per_slice = len(traces) // len(indices)
    legend = [go.Scatter(x=[None], y=[None], mode="markers", name=name, showlegend=True,
                         marker={"symbol": "square", "size": 12, "color": OVERLAY_COLOURS[code]})
              for code, name in names.items()]
    steps = [
        {"method": "restyle", "label": str(index),
         "args": [{"visible": [i // per_slice == k for i in range(len(traces))] + [True] * len(legend)}]}
        for k, index in enumerate(indices)
    ]
    fig = go.Figure(traces + legend)
    fig.update_layout(
        title=title or f"slices along {AXIS_NAMES[axis]}", height=560, margin={"l": 40, "r": 20, "t": 80, "b": 20},
        sliders=[{"active": int(np.flatnonzero(indices == start)[0]), "steps": steps, "pad": {"t": 40},
                  "currentvalue": {"prefix": f"{AXIS_NAMES[axis]} = "}}],
        xaxis={"title": {"text": AXIS_NAMES[plane_axes[0]]}, "constrain": "domain", "showgrid": False},
        yaxis={"title": {"text": AXIS_NAMES[plane_axes[1]]}, "scaleanchor": "x", "showgrid": False},
        legend={"orientation": "h", "x": 0.0, "y": 1.02, "yanchor": "bottom", "itemclick": False,
                "itemdoubleclick": False},
        plot_bgcolor="white",
    )
    return fig


def orthogonal_slices(image: np.ndarray, label: np.ndarray | None = None, pred: np.ndarray | None = None,
                      title: str = "") -> Any:
    """Three matplotlib panels (sagittal, coronal, axial) through the label's largest slices."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.5))
    for axis, ax in enumerate(axes):
        slice_figure(image, label, pred, axis=axis, ax=ax)
    fig.suptitle(title or "green: ground truth, red: prediction")
    return fig


def case_picker_figure(figures: Mapping[str, Any]) -> Any:
    """One plotly figure with a dropdown over cases, built from one figure per case.

    All traces of all figures are copied into the result (so every case is pre-computed and the
    dropdown needs no kernel); each dropdown button shows exactly its case's traces and that case's
    figure title. The layout (scene, size, legend) is the first figure's; the first case is shown.
    Keep the per-case figures small (e.g. a marching-cubes ``step`` of 2-3): all of them end up in
    the page.

    Raises:
        ValueError: when ``figures`` is empty or a figure has no traces.
    """
    import plotly.graph_objects as go

    if not figures:
        raise ValueError("figures must hold at least one case")
    first = next(iter(figures))
    owner: list[str] = []
    traces: list[dict[str, Any]] = []
    for case, figure in figures.items():
        if not figure.data:
            raise ValueError(f"the figure of case {case!r} has no traces")
        owner += [case] * len(figure.data)
        traces += [trace.to_plotly_json() | {"visible": case == first} for trace in figure.data]
    buttons = [
        {"label": case, "method": "update",
         "args": [{"visible": [o == case for o in owner]}, {"title": {"text": figure.layout.title.text or case}}]}
        for case, figure in figures.items()
    ]
    fig = go.Figure(traces, layout=figures[first].layout)
    top = (fig.layout.margin.t or 40) + 40
    fig.update_layout(
        margin={"t": top},
        updatemenus=[{"buttons": buttons, "active": 0, "direction": "down", "showactive": True,
                      "x": 1.0, "xanchor": "right", "y": 1.0, "yanchor": "bottom", "pad": {"b": 4}}],
    )
    return fig


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` file (one JSON object per line, blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wrap_title(title: str, width: int = 90) -> tuple[str, int]:
    """``title`` with each ``<br>``-separated line (and the text inside a ``<sub>…</sub>`` line) wrapped at
    ``width`` characters, and the top margin in pixels that shows all its lines: a long title is never clipped."""
    if width < 10:
        raise ValueError(f"width: expected >= 10 characters, got {width}")
    lines = []
    for line in title.split("<br>"):
        sub = line.startswith("<sub>") and line.endswith("</sub>")
        text = line[5:-6] if sub else line
        parts = textwrap.wrap(text, width) or [""]
        lines += [f"<sub>{t}</sub>" for t in parts] if sub else parts
    return "<br>".join(lines), 40 + 22 * len(lines)


def loss_curves(path: Path, keys: Sequence[str] = LOSS_KEYS, x: str = "iteration", title: str = "") -> Any:
    """Plotly line chart of the loss components logged in ``metrics.jsonl`` (``ramp`` on a 2nd axis)."""
    import plotly.graph_objects as go

    records = [r for r in read_metrics(path) if x in r]
    if not records:
        raise ValueError(f"{path} has no records with the x key {x!r}")
    fig = go.Figure()
    styles = {"loss": {"width": 3, "color": "black"}, "ramp": {"width": 1.5, "color": "grey", "dash": "dot"}}
    for key in sorted(keys, key=lambda k: k == "loss"):  # the total last, so no part hides it
        pts = [(r[x], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if pts:
            xs, ys = zip(*pts)
            fig.add_trace(go.Scatter(
                x=xs, y=ys, mode="lines", name="total" if key == "loss" else key, line=styles.get(key, {"width": 1.5}),
                yaxis="y2" if key == "ramp" else "y",
            ))
    text, top = wrap_title(title or "training losses")
    fig.update_layout(
        title=text, margin={"t": top}, xaxis_title=x, yaxis_title="loss", height=400 + top,
        yaxis2={"title": {"text": "ramp weight"}, "overlaying": "y", "side": "right", "range": [0, 1.05],
                "tickvals": [0, 0.25, 0.5, 0.75, 1], "showgrid": False},
        legend={"orientation": "h", "y": -0.2},
    )
    return fig


PART_GROUPS = (
    ("encoder", "UX-Net encoder"), ("enc", "skip blocks enc1-enc5"), ("dec", "pixel decoder dec3-dec0"),
    ("kmax", "kMaX layers"), ("block_", "V-Net blocks"), ("out_conv", "V-Net blocks"),
)


def group_parts(parts: Mapping[str, int]) -> dict[str, int]:
    """Sum parameter counts by :data:`PART_GROUPS` prefix (first match wins); the rest is "heads"."""
    groups: dict[str, int] = {}
    for name, count in parts.items():
        group = next((g for prefix, g in PART_GROUPS if name.startswith(prefix)), "heads")
        groups[group] = groups.get(group, 0) + count
    return groups


def params_bar(infos: Sequence[Mapping[str, Any]]) -> Any:
    """Stacked bar chart of parameter counts per part group, one bar per preset (``model_info`` dicts)."""
    import plotly.graph_objects as go

    grouped = [group_parts(info["parts"]) for info in infos]
    names = list(dict.fromkeys(g for groups in grouped for g in groups))
    presets = [info["preset"] for info in infos]
    fig = go.Figure([go.Bar(name=n, x=presets, y=[groups.get(n, 0) for groups in grouped]) for n in names])
    fig.update_layout(barmode="stack", title="parameters per part", yaxis_title="parameters", height=420)
    return fig


def grouped_bars(rows: Sequence[str], series: Mapping[str, Sequence[float]], title: str, yaxis: str = "Dice %") -> Any:
    """Grouped bar chart: one group per row label, one bar per series (e.g. two seeds of one kind of run; the
    book never puts the paper's numbers and ours in one chart). A long ``title`` wraps (:func:`wrap_title`)."""
    import plotly.graph_objects as go

    for name, values in series.items():
        if len(values) != len(rows):
            raise ValueError(f"series {name!r} has {len(values)} values for {len(rows)} rows")
    fig = go.Figure([go.Bar(name=name, x=list(rows), y=list(values)) for name, values in series.items()])
    text, top = wrap_title(title)
    fig.update_layout(barmode="group", title=text, margin={"t": top}, yaxis_title=yaxis, height=380 + top)
    return fig


def intensity_stats(image: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """Mean / std of the image inside and outside the label, and the label's volume fraction."""
    inside = np.asarray(label, bool)
    if inside.shape != image.shape:
        raise ValueError(f"label shape {inside.shape} differs from image shape {image.shape}")
    stats = {"mean": float(image.mean()), "std": float(image.std()), "foreground %": 100.0 * float(inside.mean())}
    for name, region in (("inside", inside), ("outside", ~inside)):
        values = image[region]
        stats[f"mean {name}"] = float(values.mean()) if values.size else float("nan")
        stats[f"std {name}"] = float(values.std()) if values.size else float("nan")
    return stats


def intensity_histogram(cases: Mapping[str, tuple[np.ndarray, np.ndarray]], bins: int = 60) -> Any:
    """Overlaid intensity histograms, one pair (inside / outside the label) per case."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for case_id, (image, label) in cases.items():
        inside = np.asarray(label, bool)
        for name, region, dash in (("inside", inside, "solid"), ("outside", ~inside, "dot")):
            counts, edges = np.histogram(image[region], bins=bins, density=True)
            fig.add_trace(go.Scatter(
                x=0.5 * (edges[1:] + edges[:-1]), y=counts, mode="lines", line={"dash": dash},
                name=f"{case_id} {name}",
            ))
    fig.update_layout(title="intensity density inside (solid) and outside (dotted) the label",
                      xaxis_title="intensity", yaxis_title="density", height=420)
    return fig


def assignment_figure(
    query_probs: np.ndarray, group_sizes: Sequence[int], image: np.ndarray, index: int, title: str = ""
) -> Any:
    """Matplotlib panels on one axial slice: image, argmax query id, and argmax query group.

    Query ids and group ids are categories: each gets its own discrete colour, not a colour ramp.

    Args:
        query_probs: soft assignment S of one volume, N×X×Y×Z (softmax over N).
        group_sizes: queries per group, summing to N (groups are consecutive query ranges).
        image: the input volume X×Y×Z.
        index: axial slice to draw.
        title: figure title.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap

    if sum(group_sizes) != query_probs.shape[0]:
        raise ValueError(f"group_sizes {tuple(group_sizes)} do not sum to N = {query_probs.shape[0]}")
    query = query_probs[..., index].argmax(axis=0)  # X×Y
    group_of_query = np.repeat(np.arange(len(group_sizes)), group_sizes)  # N
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    axes[0].imshow(image[..., index].T, cmap="gray", origin="lower", interpolation="nearest")
    axes[0].set_title("image")
    panels = ((query, query_probs.shape[0], "argmax query"),
              (group_of_query[query], len(group_sizes), "argmax query group"))
    for ax, (data, n, name) in zip(axes[1:], panels):
        # one discrete colour per id (tab20, cycled past 20 ids) and a stepped colour bar with integer ticks
        cmap = ListedColormap([plt.get_cmap("tab20")(i % 20) for i in range(n)])
        im = ax.imshow(data.T, cmap=cmap, norm=BoundaryNorm(np.arange(n + 1) - 0.5, n), origin="lower",
                       interpolation="nearest")
        ax.set_title(name)
        fig.colorbar(im, ax=ax, fraction=0.046, ticks=np.arange(0, n, max(1, n // 10)))
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(title)
    return fig


# Kinds of blocks in the architecture diagram (one categorical colour each), with their legend labels.
ARCHITECTURE_KINDS = {
    "input": "input volume",
    "ux-stage": "UX-Net stage (downsampling + UX blocks)",
    "resblock": "ResBlock (skip path, bottleneck)",
    "upblock": "UpBlock (pixel decoder)",
    "centres": "cluster centres Z",
    "kmax": "kMaX layer (k-means cross-attention)",
    "head": "head",
    "output": "output",
}
# Box title and symbolic shape of the rows that are not feature maps of the U-Net (V = X·Y·Z voxels).
_ROW_TITLES = {
    "cluster_centers": ("centres Z", "C × N"),
    "mask_embedding": ("mask embedding", "C × N"),
    "predictor": ("predictor → logits L", "N × V"),
    "mlp": ("mlp → classes Φ", "N·K"),
    "conv_head": ("conv head → logits", "K × V"),
    "S": ("S = softmax$_N$(L)", "N × V"),
    "Y": ("Y = ΦᵀS", "K × V"),
    "O": ("O = group sums of S", "G × V"),
}


def _tensors(value: Any) -> list[Any]:
    """The tensors of a module's inputs or output: a tensor, or the tensors in a tuple / list."""
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    return [v for v in value if isinstance(v, torch.Tensor)] if isinstance(value, (tuple, list)) else []


def architecture_rows(model: DKUXNet, input_shape: Sequence[int] = (1, 1, 112, 112, 80)) -> list[dict[str, Any]]:
    """The blocks of a DKUXNet in forward order, with the output shapes of one forward pass (no memory).

    The rows come from the model object: the UX-Net stages of ``model.encoder``, the parts of
    :func:`dkuxnet.models.named_parts` (``enc*`` ResBlocks, ``dec*`` UpBlocks, ``kmax.dec*.*`` layers,
    ``conv_head`` when built, ``mask_embedding``, ``predictor``, ``mlp``), the learnt ``cluster_centers``,
    the ``input`` and the outputs ``S`` (``query_probs``), ``Y`` (the query segmentation ΦᵀS) and ``O``
    (``cluster_probs``). Forward hooks record each block's output shape; forward pre-hooks record which row
    produced each of its inputs (by tensor identity, following views to their base), which gives the skip
    connections, the decoder scale each kMaX layer reads and the path of the centres. Only the inputs of
    ``S``, ``Y`` and ``O`` are set from their definitions (computed in ``forward`` outside any block).

    The pass runs on fake tensors (``torch._subclasses.fake_tensor.FakeTensorMode``): every parameter and
    buffer is swapped (``torch.func.functional_call``) for a CPU-labelled tensor without data (meta storage),
    so nothing is allocated or computed (about 1 s for ``paper`` at 112×112×80) and ``model`` may be on any
    device, meta included; its weights are neither read nor changed. A pass on the ``meta`` device itself
    fails: the fp32 islands (:func:`dkuxnet.precision.fp32_island`) open ``torch.autocast`` on the tensors'
    device type, and PyTorch has no autocast for ``meta``.

    Args:
        model: the network (for ``TwoNetworks`` pass one of its two, e.g. ``model.first``).
        input_shape: B, C, X, Y, Z of the input; X, Y, Z divisible by 2^(number of stages).

    Returns:
        One dict per row: ``name``; ``kind`` (a key of :data:`ARCHITECTURE_KINDS`); ``shape`` (the output
        without the batch axis: C×X×Y×Z for feature maps, C×N for the centres and a kMaX layer's updated
        centres, N·K for the mlp); ``channels`` (``shape[0]``); ``stride`` (input size / output grid size;
        for a kMaX layer the grid of the decoder feature it reads and of its affinity; None for the query
        space); ``parameters`` (the parameters the row owns: the rows partition ``model.parameters()``, so
        they sum to ``model_info(preset)["parameters"]``); ``inputs`` (names of the rows it reads).

    Raises:
        TypeError: when ``model`` is not a DKUXNet.
        ValueError: for an input shape of the wrong rank, channel count or grid size.
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.func import functional_call

    from dkuxnet.models import DKUXNet, named_parts
    from dkuxnet.models.blocks import ResBlock3d, UpBlock3d
    from dkuxnet.models.kmax import KMaXLayer

    if not isinstance(model, DKUXNet):
        raise TypeError(f"model must be a DKUXNet (of TwoNetworks pass one: model.first), got {type(model).__name__}")
    shape = tuple(input_shape)
    if len(shape) != 5 or not all(isinstance(s, (int, np.integer)) and s >= 1 for s in shape):
        raise ValueError(f"input_shape must be 5 positive integers B, C, X, Y, Z, got {shape}")
    shape = tuple(int(s) for s in shape)
    in_channels = model.encoders[0].conv1.in_channels
    if shape[1] != in_channels:
        raise ValueError(f"input_shape has {shape[1]} channels, the model takes {in_channels}")
    factor = 2 ** len(model.decoders)
    if any(s % factor for s in shape[2:]):
        raise ValueError(f"X, Y, Z of input_shape must be divisible by {factor} (2^stages), got {shape[2:]}")

    encoder = model.encoder
    blocks = [  # (row name, kind, modules): parameters of all modules, inputs of the first, shape of the last
        (f"stage{i + 1}", "ux-stage", [down, stage, norm])
        for i, (down, stage, norm) in enumerate(zip(encoder.downsample, encoder.stages, encoder.norms))
    ]
    kinds = ((ResBlock3d, "resblock"), (UpBlock3d, "upblock"), (KMaXLayer, "kmax"))
    for name, module in named_parts(model).items():
        if module is not encoder:
            blocks.append((name, next((k for cls, k in kinds if isinstance(module, cls)), "head"), [module]))

    producer: dict[int, str] = {}
    alive: list[torch.Tensor] = []  # every registered tensor stays alive during the pass: no id is reused
    inputs: dict[str, list[str]] = {}
    outputs: dict[str, list[torch.Tensor]] = {}

    def register(name: str, tensors: list[torch.Tensor]) -> None:
        producer.update((id(t), name) for t in tensors)
        alive.extend(tensors)

    def source(t: torch.Tensor | None) -> str | None:
        while t is not None and id(t) not in producer:
            t = t._base  # a view (expand, flatten, slice) reads the tensor it views
        return None if t is None else producer[id(t)]

    def read_hook(name: str) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            inputs[name] = list(dict.fromkeys(s for s in map(source, _tensors(args)) if s is not None))
        return hook

    def write_hook(name: str, last: bool) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            register(name, _tensors(output))
            if last:
                outputs[name] = _tensors(output)
        return hook

    handles = []
    for name, _, modules in blocks:
        handles.append(modules[0].register_forward_pre_hook(read_hook(name)))
        handles += [m.register_forward_hook(write_hook(name, m is modules[-1])) for m in modules]
    dtype = model.cluster_centers.dtype
    try:  # CPU-labelled fakes, also when called under ``torch.device("meta")``
        with torch.device("cpu"), FakeTensorMode(), torch.no_grad():
            state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
            fake = {key: torch.empty(t.shape, dtype=t.dtype) for key, t in state.items()}
            x = torch.empty(shape, dtype=dtype)
            register("input", [x])
            register("cluster_centers", [fake["cluster_centers"]])
            out = functional_call(model, fake, (x,))
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name, _, _ in blocks if name not in outputs]
    if missing:
        raise RuntimeError(f"blocks {missing} did not run in the forward pass")

    def row(name: str, kind: str, tensor: torch.Tensor, stride: int | None, parameters: int,
            reads: list[str]) -> dict[str, Any]:
        out_shape = tuple(int(s) for s in tensor.shape)
        return {"name": name, "kind": kind, "channels": out_shape[0], "shape": out_shape, "stride": stride,
                "parameters": parameters, "inputs": reads}

    def stride(tensors: list[torch.Tensor]) -> int | None:
        grids = [t for t in tensors if t.dim() == 5]  # B×C×x×y×z
        return shape[2] // int(grids[0].shape[2]) if grids else None

    rows = [row("input", "input", x[0], 1, 0, []),
            row("cluster_centers", "centres", model.cluster_centers, None, model.cluster_centers.numel(), [])]
    for name, kind, modules in blocks:
        parameters = sum(p.numel() for m in modules for p in m.parameters())
        rows.append(row(name, kind, outputs[name][0][0], stride(outputs[name]), parameters, inputs[name]))
    y = out.seg_logits if out.query_seg_logits is None else out.query_seg_logits
    for name, tensor, reads in (("S", out.query_probs, ["predictor"]), ("Y", y, ["predictor", "mlp"]),
                                ("O", out.cluster_probs, ["predictor"])):
        rows.append(row(name, "output", tensor[0], stride([tensor]), 0, reads))
    return rows


def _architecture_grid(rows: Sequence[Mapping[str, Any]]) -> dict[str, tuple[int, int]]:
    """(column, level) of every row: level = log2(stride), -1 for the outputs; a U-Net with kMaX beside it.

    Columns: 0 input and UX-Net stages (down), 1 ResBlocks (skip path, bottleneck at the bottom),
    2 UpBlocks (up), 3… the kMaX layers of each decoder scale side by side, centres below the coarsest;
    the query heads in the next column, the predictor beside dec0, the conv head and the outputs on top.
    """
    level = {r["name"]: r["stride"].bit_length() - 1 for r in rows if r["stride"] is not None}
    kmax_levels = [level[r["name"]] for r in rows if r["kind"] == "kmax"]
    heads = 3 + max(kmax_levels.count(lv) for lv in kmax_levels)
    finest = min(kmax_levels)
    fixed = {"cluster_centers": (3, max(level.values())), "predictor": (3, 0), "conv_head": (2, -1),
             "mask_embedding": (heads, finest), "mlp": (heads, finest - 1)}
    columns = {"input": 0, "ux-stage": 0, "resblock": 1, "upblock": 2}
    grid: dict[str, tuple[int, int]] = {}
    placed: dict[int, int] = {}  # kMaX layers placed per level, then outputs placed (level -1)
    for r in rows:
        name, kind = r["name"], r["kind"]
        if kind in columns:
            grid[name] = (columns[kind], level[name])
        elif kind in ("kmax", "output"):
            lv = level[name] if kind == "kmax" else -1
            grid[name] = (3 + placed.get(lv, 0), lv)
            placed[lv] = placed.get(lv, 0) + 1
        else:
            grid[name] = fixed[name]
    return grid


def _count_text(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 10**6 else f"{n / 1e3:.1f} k" if n >= 10**3 else str(n)


def _architecture_label(row: Mapping[str, Any], by_name: Mapping[str, Mapping[str, Any]],
                        bottleneck: str) -> tuple[str, str]:
    """Title and detail lines of one row's box: shape (symbolic where useful) and parameter count."""
    shape = row["shape"]
    numbers = f"{shape[0]} × {'×'.join(map(str, shape[1:]))}" if len(shape) > 1 else str(shape[0])
    name, kind = row["name"], row["kind"]
    if kind == "kmax":
        pixels = next(by_name[s] for s in row["inputs"] if by_name[s]["stride"] is not None)
        title = f"kMaX {name.removeprefix('kmax.')}"
        details = f"N = {shape[1]}, C = {shape[0]}\nreads {pixels['name']}: {'×'.join(map(str, pixels['shape'][1:]))}"
    elif name in _ROW_TITLES:
        title, symbol = _ROW_TITLES[name]
        details = f"{symbol}\n{numbers}"
    else:
        title = f"UX-Net {name}" if kind == "ux-stage" else f"{name} (bottleneck)" if name == bottleneck else name
        details = numbers
    if kind not in ("input", "output"):
        details += f"\n{_count_text(row['parameters'])} params"
    return title, details


def architecture_figure(model: DKUXNet, input_shape: Sequence[int] = (1, 1, 112, 112, 80), preset: str = "") -> Any:
    """Matplotlib block diagram of a DKUXNet drawn from :func:`architecture_rows` (one box per row).

    A U: the input and the UX-Net stages go down on the left, the ResBlocks of the skip path (``enc*``) lie
    beside them with the bottleneck at the bottom, the UpBlocks (``dec*``) go up on the right; the kMaX
    layers sit beside the decoder scale they read (N queries of width C), the cluster centres Z enter below
    the coarsest one and flow through them to the mask embedding (→ predictor) and the mlp (→ Φ); the
    outputs S, Y = ΦᵀS and O are on top. Rows are placed by stride (labelled on the left), one colour per
    kind of block (:data:`ARCHITECTURE_KINDS`); arrows are the data flow the forward pass recorded
    (dashed: skip connections; coloured: the centres). Each box gives the output shape per volume
    (channels × X×Y×Z, V = X·Y·Z) and the block's parameters.

    Args:
        model: the network, e.g. built on the meta device (see :func:`architecture_rows`).
        input_shape: B, C, X, Y, Z of the input the shapes are computed for.
        preset: name of the preset the model was built from, for the title.

    Returns:
        The figure; ``fig.axes[0].patches`` holds exactly one box per row, in row order.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyBboxPatch, Patch

    rows = architecture_rows(model, input_shape)
    by_name = {r["name"]: r for r in rows}
    grid = _architecture_grid(rows)
    bottleneck = max((r for r in rows if r["kind"] == "resblock"), key=lambda r: r["stride"])["name"]
    colours = {kind: plt.get_cmap("tab10")(i) for i, kind in enumerate(ARCHITECTURE_KINDS)}
    columns = max(c for c, _ in grid.values()) + 1
    levels = sorted({lv for _, lv in grid.values()})
    dx, dy, width, height = 2.75, 1.45, 2.2, 1.05  # grid steps and box size, in data units
    xlim = (-dx, (columns - 0.4) * dx)
    ylim = (-(levels[-1] + 0.6) * dy, -(levels[0] - 0.55) * dy)
    inch, top, bottom = 0.65, 0.4, 0.75  # inches per data unit (about 12 inches wide for paper); title, legend
    size = (inch * (xlim[1] - xlim[0]), inch * (ylim[1] - ylim[0]) + top + bottom)
    fig = plt.figure(figsize=size)
    ax = fig.add_axes((0.0, bottom / size[1], 1.0, 1.0 - (top + bottom) / size[1]))  # data units stay square
    boxes = {}
    for r in rows:
        col, lv = grid[r["name"]]
        x, y = col * dx, -lv * dy
        colour = colours[r["kind"]]
        box = FancyBboxPatch((x - width / 2, y - height / 2), width, height, boxstyle="round,pad=0,rounding_size=0.12",
                             facecolor=to_rgba(colour, 0.25), edgecolor=colour, linewidth=1.3, zorder=2)
        boxes[r["name"]] = ax.add_patch(box)
        title, details = _architecture_label(r, by_name, bottleneck)
        ax.text(x, y + 0.3 * height, title, ha="center", va="center", fontsize=7.5, fontweight="bold", zorder=3)
        ax.text(x, y - 0.13 * height, details, ha="center", va="center", fontsize=6.5, linespacing=1.25, zorder=3)
    for r in rows:
        for src in r["inputs"]:
            (c0, l0), (c1, l1) = grid[src], grid[r["name"]]
            skip = by_name[src]["kind"] == "resblock" and r["kind"] == "upblock" and l0 == l1
            centres = by_name[src]["kind"] in ("centres", "kmax")
            jump = (l0 == l1 and abs(c1 - c0) > 1) or (c0 == c1 and abs(l1 - l0) > 1)  # would cross a box
            ax.annotate("", xy=(c1 * dx, -l1 * dy), xytext=(c0 * dx, -l0 * dy), zorder=1, arrowprops={
                "arrowstyle": "-|>", "mutation_scale": 9, "shrinkA": 1, "shrinkB": 1,
                "color": colours["centres"] if centres else "dimgrey", "linewidth": 1.4 if centres else 1.0,
                "linestyle": (0, (2.5, 1.5)) if skip else "-", "connectionstyle": f"arc3,rad={-0.3 if jump else 0.0}",
                "patchA": boxes[src], "patchB": boxes[r["name"]],
            })
    for lv in levels:
        ax.text(-0.62 * dx, -lv * dy, "outputs" if lv < 0 else f"stride {2**lv}", ha="right", va="center",
                fontsize=7.5, color="dimgrey")
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_axis_off()
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    handles = [Patch(facecolor=to_rgba(colours[k], 0.25), edgecolor=colours[k], label=ARCHITECTURE_KINDS[k])
               for k in kinds]
    handles += [Line2D([], [], color="dimgrey", linestyle=(0, (2.5, 1.5)), label="skip connection"),
                Line2D([], [], color=colours["centres"], linewidth=1.4, label="centres Z, coarse to fine")]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=4, fontsize=7, frameon=False)
    total = sum(r["parameters"] for r in rows)
    name = f"DKUXNet ({preset})" if preset else "DKUXNet"
    ax.set_title(f"{name}: {total:,} parameters; shapes per volume for an input of "
                 f"{'×'.join(map(str, input_shape[2:]))}", fontsize=10)
    return fig
