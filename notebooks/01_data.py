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
# # The LA data set and the phantom
#
# ## Overview
#
# The benchmark is the left-atrium (LA) MRI set of the 2018 Atrial Segmentation Challenge, in the
# preprocessed form that UA-MT published: 100 volumes, 80 for training and 20 for testing, with the
# first 4 / 8 / 16 training scans labeled in the 5 / 10 / 20 % settings. This notebook
#
# 1. gets the data (or writes the synthetic phantom) and checks it,
# 2. shows the fixed splits,
# 3. browses one case slice by slice and in 3D,
# 4. compares intensities inside and outside the atrium,
# 5. demonstrates the lossless cache the training loop reads from.
#
# ## Prerequisites
#
# | Concepts | Importance | Notes |
# | --- | --- | --- |
# | NumPy arrays | Necessary | volumes are `(X, Y, Z)` arrays |
# | HDF5 | Helpful | each case is one `mri_norm2.h5` with `image` and `label` |
# | Semi-supervised segmentation | Helpful | what "labeled" and "unlabeled" cases are for |
#
# - **Time to learn**: 15 minutes
# - **Hardware and time to run**: any computer with 2 CPU cores, no GPU. About 10 s in the `smoke` profile (2 cores,
#   measured in the book's build). With the real data, the download is about 233 MB.
#
# With the default `smoke` profile everything below runs on a **synthetic phantom**: LA-shaped
# folders and lists, blob-shaped "atria" in noise. It shows the code working, not the real anatomy;
# run with `-p profile paper` (or set `data_dir`) to see the real scans.

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

# %% [markdown]
# ## Imports

# %%
# %matplotlib inline
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from IPython.display import display

from dkuxnet import viz
from dkuxnet.data import VolumeBank, check_dataset, make_split, read_case
from dkuxnet.data.cache import MAX_CODES, dequantize, quantize
from dkuxnet.reproduce import prepare_data, resolve_profile

# %%
settings = resolve_profile(profile, data_dir, preset, label_ratio, max_iterations, seed, device, run_dir)
root = prepare_data(settings)
print(f"data: {root}")
print(settings.note)

# %% [markdown]
# ## 1. Getting the data
#
# The real data are the 100 h5 files of `yulequan/UA-MT` (233 MB). The downloader pins the commit,
# verifies every file against a SHA-256 manifest and can resume:
#
# ```bash
# python -m dkuxnet data download --dest data/LA
# python -m dkuxnet data check --data-dir data/LA
# ```
#
# The smoke profile instead writes a deterministic phantom with the same layout, from the generator
# behind `python -m dkuxnet data phantom` (seed 0, 20 cases: 16 train, 4 test), smaller than that
# command's default so that a CPU handles it in seconds: nominal 64 × 64 × 48 voxels
# (`dkuxnet.reproduce.SMOKE_PHANTOM_SHAPE`), i.e. 48 slices per case and an X and Y that vary per case
# between 59 and 69, as the real crops vary. (`python -m dkuxnet data phantom` itself writes nominal
# 96 × 96 × 64: 64 slices, X and Y between 88 and 104.)
# `check_dataset` reads every case and both lists and collects every problem it finds:

# %%
report = check_dataset(root, progress=False)
print(report.summary())

# %% [markdown]
# ## 2. The fixed splits
#
# `train.list` and `test.list` are used verbatim; the labeled cases of a setting are the **first**
# n lines of `train.list`, n = round(ratio × len(train.list)), the rest of the list is unlabeled.

# %%
splits = {ratio: make_split(root, label_ratio=ratio) for ratio in (0.05, 0.1, 0.2)}
pd.DataFrame(
    [{"ratio": r, "labeled": len(s.labeled), "unlabeled": len(s.unlabeled), "test": len(s.test),
      "labeled IDs": ", ".join(s.labeled)} for r, s in splits.items()]
).set_index("ratio")

# %% [markdown]
# On the real LA lists the same rule gives 4 / 8 / 16 labeled scans out of 80. When the LA folder is
# present (`data_dir`, or the paper profile's `../data/LA`), its labeled IDs are:

# %%
la_root = resolve_profile("paper", data_dir, device="cpu").data_dir
if (la_root / "train.list").is_file():
    la_splits = {ratio: make_split(la_root, label_ratio=ratio) for ratio in (0.05, 0.1, 0.2)}
    display(pd.DataFrame([{"ratio": r, "labeled": len(s.labeled), "labeled IDs (LA)": ", ".join(s.labeled)}
                          for r, s in la_splits.items()]).set_index("ratio"))
else:
    print(f"no LA lists at {la_root}: `python -m dkuxnet data download --dest {la_root}` fetches them")

# %% [markdown]
# ## 3. One case, slice by slice and in 3D
#
# Images are float32, labels uint8 {0, 1}. On LA, UA-MT normalised each **whole** scan to zero mean
# and unit variance and then cropped it around the label with random margins, so a crop's mean is
# not 0 and every crop (test cases included) is a label-informed region of interest; voxels are
# 0.625 mm isotropic.

# %%
case_id = splits[0.1].labeled[0]
image, label = read_case(root, case_id)
pd.Series({"case": case_id, "shape": image.shape, "image dtype": image.dtype, "label dtype": label.dtype,
           "label values": np.unique(label).tolist(), "foreground voxels": int(label.sum())}).to_frame("value")

# %% [markdown]
# The slider browses axial slices (green: label), starting at the label's largest cross-section. All
# its slices are stored in the figure (at most 24, evenly spaced), so it works in the static book as
# well as in Jupyter, Binder or Colab.

# %%
viz.slice_browser(image, label, title=f"{case_id}: axial slices").show()

# %% [markdown]
# The label's surface (marching cubes at level 0.5) with the axial slice through its largest
# cross-section; drag to rotate:

# %%
viz.isosurface_figure(image, label, step=2, title=f"{case_id}: label surface and axial slice").show()

# %% [markdown]
# ## 4. Intensities inside and outside the atrium

# %%
cases = {cid: read_case(root, cid) for cid in splits[0.2].labeled + splits[0.2].test[:1]}
pd.DataFrame({cid: viz.intensity_stats(img, lab) for cid, (img, lab) in cases.items()}).T.round(3)

# %%
viz.intensity_histogram(dict(list(cases.items())[:3])).show()

# %% [markdown]
# ## 5. The lossless cache
#
# Reading h5 files every step would dominate a GPU step, so `VolumeBank` keeps all cases in memory
# and on disk in a cache. An image with at most 256 distinct values is stored as uint8 **codes** plus a
# float32 **table**; `dequantize` gives back the very same floats. Real LA scans are 8-bit MRI, z-scored,
# so each has at most 256 distinct values and is coded. A volume with more distinct values (the phantom's
# continuous noise) is stored as raw float32 — the cache never rounds. The table shows both paths: the
# case above as it is, and the same case turned into an 8-bit scan as the LA files are made
# (rescaled to 0…255, rounded, z-scored).

# %%
def cache_storage(volume: np.ndarray) -> dict:
    """How the cache stores ``volume``, and whether its round trip is exact."""
    row = {"distinct values": np.unique(volume).size, "bytes as float32": volume.nbytes}
    if row["distinct values"] > MAX_CODES:
        return row | {"stored as": "raw float32", "bytes cached": volume.nbytes, "exact round trip": "by construction"}
    codes, table = quantize(volume)
    return row | {"stored as": f"{codes.dtype} codes + {table.size}-entry table", "bytes cached": codes.nbytes + table.nbytes,
                  "exact round trip": bool(np.array_equal(dequantize(codes, table), volume))}


scan8 = np.round(255 * (image - image.min()) / (image.max() - image.min()))  # 8-bit intensities 0…255
scan8 = ((scan8 - scan8.mean()) / scan8.std()).astype(np.float32)  # z-scored, as the LA h5 files
pd.DataFrame({f"{case_id} as it is": cache_storage(image), f"{case_id} as an 8-bit scan": cache_storage(scan8)})

# %%
with tempfile.TemporaryDirectory() as cache:
    timings = {}
    for run in ("cold (writes the cache)", "warm (reads the cache)"):
        t0 = time.perf_counter()
        bank = VolumeBank.load(root, splits[0.2].labeled, cache_dir=Path(cache), progress=False)
        timings[run] = f"{1000 * (time.perf_counter() - t0):.0f} ms"
pd.Series(timings | {"cases": len(bank), "image tensor": tuple(bank.images[0].shape)}).to_frame("value")

# %% [markdown]
# ## Summary
#
# - The split is fixed by two text files; "5 / 10 / 20 %" means the first 4 / 8 / 16 lines of
#   `train.list`.
# - Each case is one normalised image and a binary label. On the real crops the atrium is a small
#   part of the volume and brighter on average than its surroundings, but the two intensity ranges
#   overlap — a threshold does not segment it.
# - The cache is exact: training sees the same floats as the h5 files.
#
# ## What's next
#
# [The model](02_model) builds DKUXNet and shows how its k-means queries cluster the voxels of a
# volume like the one above.
