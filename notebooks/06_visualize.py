# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Predictions in 3D
#
# ## Overview
#
# Mean Dice hides where a segmentation goes wrong. This notebook looks at predictions case by case:
#
# 1. a model trained on the real LA data (the committed CPU-track model) on two real test scans: the
#    ground-truth surface and the predicted surface, coloured by how far each point of the prediction
#    lies from the truth, with a dropdown over the scans,
# 2. the same view for this build's run (with this page's parameters),
# 3. its per-case metrics,
# 4. slice overlays of its truth and prediction.
#
# ## Prerequisites
#
# | Concepts | Importance | Notes |
# | --- | --- | --- |
# | [Evaluation](04_evaluate) | Necessary | writes the masks to `run_dir/eval/predictions/` |
# | Surface distances (95HD, ASD) | Helpful | the colour is the distance to the truth surface |
#
# - **Time to learn**: 10 minutes
# - **Hardware and time to run**: 2 CPU cores, no GPU: about 10 s (measured in the book's build); it reads the
#   committed model's arrays and needs no training.

# %% tags=["remove-input"]
import sys

if "google.colab" in sys.modules:
    # %pip install -q "dkuxnet @ git+https://github.com/dkuxnet/dkuxnet" monai==1.6.1 medpy==0.5.2

# %% tags=["parameters", "hide-input"]
profile: str = "smoke"  # smoke (CPU, phantom, tiny preset) or paper (GPU, real LA)
data_dir: str = ""  # empty means the profile default
preset: str = ""  # empty means tiny for smoke and paper for paper
label_ratio: float = 0.1  # labeled fraction of train.list
max_iterations: int = 0  # 0 means the profile default
seed: int = 1337  # training seed
device: str = ""  # empty means cuda if available
run_dir: str = ""  # empty means the profile default run folder
step: int = 2  # marching-cubes step in voxels; 1 is finest and heaviest (every case's surfaces go in the page)

# %% [markdown]
# ## Imports

# %%
# %matplotlib inline
import numpy as np
import pandas as pd
import plotly.graph_objects as go

from dkuxnet import viz
from dkuxnet.data import read_case
from dkuxnet.metrics import SPACING_MM
from dkuxnet.publish import SHOWCASE_RUN, load_case
from dkuxnet.reproduce import prepare_data, resolve_profile
from dkuxnet.results import default_results_dir

# %%
settings = resolve_profile(profile, data_dir, preset, label_ratio, max_iterations, seed, device, run_dir)
root = prepare_data(settings)
predictions = settings.run_dir / "eval" / "predictions"
if not predictions.is_dir():
    raise FileNotFoundError(f"{predictions} not found: run 03_train and 04_evaluate with the same parameters first")
per_case = pd.read_csv(settings.run_dir / "eval" / "per_case.csv").set_index("case")
cases = [c for c in per_case.index if (predictions / f"{c}.npz").is_file()]
print(f"{len(cases)} predicted test cases, {int(per_case['failed'].sum())} of them empty (failed) — {settings.note}")


# %%
def load(case_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image, ground truth and predicted mask of one test case."""
    image, label = read_case(root, case_id)
    return image, label.astype(bool), np.load(predictions / f"{case_id}.npz")["pred"].astype(bool)


def title(case_id: str) -> str:
    """Case name with its Dice and 95HD from the evaluation."""
    row = per_case.loc[case_id]
    return f"{case_id}: Dice {100 * row['dice']:.1f} %, 95HD {row['hd95']:.1f} vox"


def surfaces(case_id: str) -> go.Figure:
    """Truth vs prediction surfaces of one case."""
    _, truth, predicted = load(case_id)
    return viz.comparison_figure(predicted, truth, spacing=SPACING_MM, step=step, title=title(case_id), unit="mm")


# %% [markdown]
# ## 1. A trained model on real test scans
#
# The committed DKUXNet of the CPU track (`results/runs/cpu-all-r0.1-s1337`: the `cpu` preset trained on
# the real LA data at ½ resolution with 8 labeled scans, 900 iterations on 2 CPU cores; its numbers are on
# the results page) on the first two test scans, which it never saw in training. Its prediction was
# scored at full resolution against the original labels, and the surfaces are those of the
# full-resolution masks (0.625 mm voxels). Grey, translucent: the ground truth; coloured: the prediction,
# each vertex coloured by its distance (mm) to the truth surface — yellow where the prediction leaks or
# misses. The dropdown (top right) switches between the two scans; both are stored in the page.

# %%
showcase = default_results_dir() / "runs" / SHOWCASE_RUN
real = {path.stem: load_case(path) for path in sorted((showcase / "cases").glob("*.npz"))}
viz.case_picker_figure({
    case_id: viz.comparison_figure(
        c["pred"], c["truth"], spacing=SPACING_MM, step=step, unit="mm",
        title=f"{case_id}: Dice {100 * float(c['dice']):.1f} % — real LA, trained at ½ resolution on 2 CPU cores")
    for case_id, c in real.items()
}).show()

# %% [markdown]
# ## 2. This build's run: truth and prediction in 3D
#
# The rest of the page shows the run made by the notebooks before this one, with this page's parameters
# (in the book: the synthetic phantom, the tiny model, a few iterations — it shows the mechanics, not a
# result). Grey, translucent: the ground-truth surface. Coloured: the predicted surface, each vertex coloured
# by its distance (mm, 0.625 mm voxels) to the nearest point of the truth surface — yellow regions are
# where the prediction leaks or misses. An empty prediction (a failed case) shows the truth alone.
#
# The dropdown (top right) switches between the test cases. Every case's surfaces are computed here
# and stored in the figure, so the dropdown works in the static book as well as in a live notebook.

# %%
viz.case_picker_figure({case_id: surfaces(case_id) for case_id in cases}).show()

# %% [markdown]
# ## 3. The numbers per case

# %%
per_case.loc[cases, ["dice", "jaccard", "hd95", "asd", "failed"]].round(3)

# %% [markdown]
# ## 4. Slice overlays
#
# Green: ground truth, red: prediction, through the slices where the truth is largest along each axis.

# %%
image, gt, pred = load(cases[0])
fig = viz.orthogonal_slices(image, gt, pred, title=title(cases[0]))

# %% [markdown]
# Browse the axial slices of the same case with the slider. Green: truth only (missed), red:
# prediction only (leaked), yellow: both.

# %%
viz.slice_browser(image, gt, pred, title=f"{title(cases[0])}, axial slices").show()

# %% [markdown]
# ## Summary
#
# - Surface-distance colouring shows *where* a prediction is wrong, which the case's 95HD and ASD
#   only summarise.
# - Section 1 shows a model trained on real data (the committed CPU-track run); everything after it
#   comes from this build's run — in the smoke profile a phantom and a barely trained tiny model.
#
# ## What's next
#
# [Results](07_results) collects the committed runs (so far the CPU track on real LA data) and this
# build's runs, each in a table of its own, apart from the paper's numbers.
