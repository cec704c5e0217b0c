"""Figures for the book: surfaces, slices, widgets and curves (plotly, matplotlib, ipywidgets).

Every function takes plain arrays / paths and returns a figure or widget; nothing is shown here, so
the caller (a notebook) decides where it goes. No renderer is chosen in this module: the book build
selects plotly's renderer with the ``PLOTLY_RENDERER`` environment variable and Colab picks its own.
Arrays are volumes indexed ``(X, Y, Z)`` as in the LA h5 files; meshes are in voxel units times
``spacing``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

LOSS_KEYS = ("loss", "seg", "qd", "ds", "qdc", "segc", "ramp")


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
    fig.update_layout(
        title=title, scene={"aspectmode": "data"}, margin={"l": 0, "r": 0, "t": 40, "b": 0}, height=500,
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


def slice_widget(
    image: np.ndarray, label: np.ndarray | None = None, pred: np.ndarray | None = None, axis: int = 2
) -> Any:
    """``IntSlider`` + ``Output`` browsing slices; the output at the start value is saved with the notebook."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt
    from IPython.display import display

    start = largest_slice(label, axis) if label is not None else image.shape[axis] // 2
    slider = widgets.IntSlider(value=start, min=0, max=image.shape[axis] - 1, description="slice")
    out = widgets.Output()

    def draw(change: Mapping[str, Any] | None = None) -> None:
        with out:
            out.clear_output(wait=True)
            fig = slice_figure(image, label, pred, axis=axis, index=slider.value)
            display(fig)
            plt.close(fig)

    slider.observe(draw, names="value")
    draw()
    return widgets.VBox([slider, out])


def orthogonal_slices(image: np.ndarray, label: np.ndarray | None = None, pred: np.ndarray | None = None,
                      title: str = "") -> Any:
    """Three matplotlib panels (sagittal, coronal, axial) through the label's largest slices."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.5))
    for axis, ax in enumerate(axes):
        slice_figure(image, label, pred, axis=axis, ax=ax)
    fig.suptitle(title or "green: ground truth, red: prediction")
    return fig


def picker_widget(options: Sequence[str], render: Callable[[str], None], description: str = "case") -> Any:
    """``Dropdown`` + ``Output``: ``render(option)`` is called inside the output on every change.

    The output of the first option is drawn at once, so a saved notebook shows it statically.
    """
    import ipywidgets as widgets

    if not options:
        raise ValueError("options must name at least one choice")
    dropdown = widgets.Dropdown(options=list(options), value=options[0], description=description)
    out = widgets.Output()

    def draw(change: Mapping[str, Any] | None = None) -> None:
        with out:
            out.clear_output(wait=True)
            render(dropdown.value)

    dropdown.observe(draw, names="value")
    draw()
    return widgets.VBox([dropdown, out])


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` file (one JSON object per line, blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_curves(path: Path, keys: Sequence[str] = LOSS_KEYS, x: str = "iteration", title: str = "") -> Any:
    """Plotly line chart of the loss components logged in ``metrics.jsonl`` (``ramp`` on a 2nd axis)."""
    import plotly.graph_objects as go

    records = [r for r in read_metrics(path) if x in r]
    if not records:
        raise ValueError(f"{path} has no records with the x key {x!r}")
    fig = go.Figure()
    for key in keys:
        pts = [(r[x], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if pts:
            xs, ys = zip(*pts)
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=key, yaxis="y2" if key == "ramp" else "y"))
    fig.update_layout(
        title=title or "training losses", xaxis_title=x, yaxis_title="loss", height=420,
        yaxis2={"title": {"text": "ramp"}, "overlaying": "y", "side": "right", "range": [0, 1.05]},
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
    """Grouped bar chart: one group per row label, one bar per series (e.g. "ours" vs "paper")."""
    import plotly.graph_objects as go

    for name, values in series.items():
        if len(values) != len(rows):
            raise ValueError(f"series {name!r} has {len(values)} values for {len(rows)} rows")
    fig = go.Figure([go.Bar(name=name, x=list(rows), y=list(values)) for name, values in series.items()])
    fig.update_layout(barmode="group", title=title, yaxis_title=yaxis, height=420)
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

    Args:
        query_probs: soft assignment S of one volume, N×X×Y×Z (softmax over N).
        group_sizes: queries per group, summing to N (groups are consecutive query ranges).
        image: the input volume X×Y×Z.
        index: axial slice to draw.
        title: figure title.
    """
    import matplotlib.pyplot as plt

    if sum(group_sizes) != query_probs.shape[0]:
        raise ValueError(f"group_sizes {tuple(group_sizes)} do not sum to N = {query_probs.shape[0]}")
    query = query_probs[..., index].argmax(axis=0)  # X×Y
    group_of_query = np.repeat(np.arange(len(group_sizes)), group_sizes)  # N
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    panels = ((image[..., index], "gray", "image"), (query, "tab20", "argmax query"),
              (group_of_query[query], "viridis", "argmax query group"))
    for ax, (data, cmap, name) in zip(axes, panels):
        im = ax.imshow(data.T, cmap=cmap, origin="lower", interpolation="nearest")
        ax.set_title(name)
        ax.set_axis_off()
        if name != "image":
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title)
    return fig
