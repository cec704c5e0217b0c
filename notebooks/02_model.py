# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The model: 3D UX-Net encoder, kMaX decoder, query clusters
#
# ## Overview
#
# DKUXNet segments a volume by clustering its voxels around N learned **queries** (cluster
# centres) and letting each query vote for a class. This notebook
#
# 1. counts the parameters of every preset, part by part,
# 2. draws the architecture from the model object itself,
# 3. runs the tiny model on a crop and prints every output's shape,
# 4. writes down the k-means cross-attention update with the code that implements it,
# 5. pictures which query each voxel of a real scan belongs to, in a model trained on real LA data.
#
# ## Prerequisites
#
# | Concepts | Importance | Notes |
# | --- | --- | --- |
# | 3D convolutional encoder–decoders (U-Net) | Necessary | the pixel decoder is one |
# | Attention, queries as in DETR / MaskFormer | Helpful | kMaX replaces cross-attention's softmax by k-means |
# | [The data](01_data) | Helpful | the crop below comes from it |
#
# - **Time to learn**: 20 minutes
# - **Hardware and time to run**: 2 CPU cores, no GPU: about 15 s in the `smoke` profile (measured in the book's
#   build); the `paper` model's figures are drawn from shapes alone, without allocating its weights. On a GPU: not yet
#   measured.

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
import inspect
from dataclasses import fields

import numpy as np
import pandas as pd
import torch
from IPython.display import Code

from dkuxnet import viz
from dkuxnet.checkpoint import load_model
from dkuxnet.config import PRESETS, get_preset
from dkuxnet.data import make_split, read_case
from dkuxnet.models import create_model, kmax, model_info
from dkuxnet.publish import SHOWCASE_RUN, load_case
from dkuxnet.reproduce import prepare_data, resolve_profile
from dkuxnet.results import default_results_dir

# %%
settings = resolve_profile(profile, data_dir, preset, label_ratio, max_iterations, seed, device, run_dir)
root = prepare_data(settings)
print(settings.note)

# %% [markdown]
# ## 1. Parameters per part
#
# `model_info` builds each preset on PyTorch's `meta` device (no memory, instant) and counts the
# parameters of each part (grouped below; `model_info(preset)["parts"]` has every part). `paper`
# (3 kMaX scales, deep-supervised assignment heads) should count
# 65,217,790 — the count the test suite checks; `official` is what the
# authors' training script trains (the same plus a convolutional head); `authors-script` is the
# authors' `DKUNET` class (2 kMaX scales); `vnet` is the supervised baseline of the LA
# literature; `tiny` is the same architecture as `paper`, narrow, for CPUs.

# %%
infos = [model_info(p) for p in PRESETS]
table = pd.DataFrame({i["preset"]: viz.group_parts(i["parts"]) for i in infos}).fillna(0).astype(int)
table.loc["total"] = [i["parameters"] for i in infos]
table.style.format("{:,}")

# %%
viz.params_bar(infos).show()

# %% [markdown]
# ## 2. The architecture, drawn from the model
#
# `viz.architecture_figure` walks the model object and records every block's output shape in one
# forward pass of shape-only tensors (no weights, no memory): the UX-Net stages going down on the left, the
# residual `enc` blocks beside them, the decoder going up on the right with its skip connections, and
# the kMaX layers beside the decoder scales they read, moving the N cluster centres up to the predictor,
# which gives the soft assignment $S$, the segmentation $Y$ and the group outputs $O$. First the `cpu`
# preset (the model trained on real data on two CPU cores, used in section 5), then `paper`.

# %%
for name in ("cpu", "paper"):
    arch_cfg = get_preset(name)
    with torch.device("meta"):  # structure only: no memory, no weights
        viz.architecture_figure(create_model(arch_cfg), (1, 1, *arch_cfg.data.patch_size), preset=name)

# %% [markdown]
# ## 3. A forward pass of the tiny model
#
# Every model takes `B×1×X×Y×Z` and returns a `ModelOutput`: segmentation logits (`B×K×…`), the
# 3 query-group probabilities, the soft assignment of voxels to the N queries (`query_probs`,
# softmax over N), its logits, and one affinity map per kMaX layer (`aux`, at that layer's stride).

# %%
torch.manual_seed(settings.seed)
cfg = get_preset("tiny")
model = create_model(cfg).eval()
case_id = make_split(root, label_ratio=0.1).labeled[0]
image, label = read_case(root, case_id)
crop, crop_label = viz.crop_around_label(image, label, cfg.data.patch_size)
with torch.no_grad():
    out = model(torch.from_numpy(crop)[None, None])  # 1×1×X×Y×Z
def shape(v: torch.Tensor | list | None) -> str:
    """Shape of a tensor, or of each tensor of a list; "—" for an output this configuration does not produce."""
    if v is None:
        return "—"
    return " × ".join(map(str, v.shape)) if torch.is_tensor(v) else ";  ".join(shape(a) for a in v)


pd.Series({f.name: shape(getattr(out, f.name)) for f in fields(out)}, name="shape").to_frame()

# %% [markdown]
# ## 4. k-means cross-attention
#
# Standard cross-attention updates the cluster centres $Z \in \mathbb{R}^{C\times N}$ with a softmax
# over the **voxels**. kMaX-DeepLab replaces that softmax by a k-means step: each voxel is assigned to
# exactly one query (a softmax over the **queries**, taken to its hard limit), and each centre moves
# by the sum of the values of its voxels. With pixel keys $K^p$, query kernels $Q^c$ and pixel values
# $V^p$ of one kMaX layer (the book's method page, kMaX decoder):
#
# $$
# M = \mathrm{BN}_1\!\left(Q^{c\top} K^p\right) \in \mathbb{R}^{N \times V},\qquad
# A_{nv} = \begin{cases} 1 & n = \arg\max_{n'} M_{n'v} \\ 0 & \text{otherwise}\end{cases}
# $$
#
# $$
# R = V^p A^\top \in \mathbb{R}^{C \times N},\qquad Z \leftarrow Z + \mathrm{BN}\big(W\,\mathrm{BN}(R)\big),
# $$
#
# the paper's $C = C + \arg\max_N(Q^c K^{p\top})\,V^p$. $A$ is computed without gradient (no
# straight-through estimator): the update learns only through $V^p$. $R$ is a **sum**, not a mean,
# and a query that owns no voxel gets $R_{:,n} = 0$. After the last layer, on the full-resolution
# pixel embedding $P$ and the final query kernels $Q$:
#
# $$
# L = \mathrm{BN}_1(Q^\top P),\quad S = \mathrm{softmax}_N(L),\quad
# Y_{kv} = \sum_n \Phi_{nk} S_{nv},\quad O_{gv} = \sum_{n \in g} S_{nv},
# $$
#
# where $\Phi \in \mathbb{R}^{N\times K}$ comes from an MLP over all centres, $Y$ are the
# segmentation logits and $O$ the probabilities of the query groups ("background", "organ",
# "tumor" = 16 / 4 / 108 of the 128 queries of the authors' code; LA has no tumour, so the third group
# must learn to stay empty). The two pure functions behind $A$ and $R$:

# %%
Code(inspect.getsource(kmax.hard_assignment) + "\n\n" + inspect.getsource(kmax.kmeans_update), language="python")

# %% [markdown]
# The sum-not-mean rule on 3 voxels with values 1, 2, 3 and 3 queries: voxels 0 and 2 belong to
# query 2, voxel 1 to query 0, nobody to query 1 — so $R = (2,\ 0,\ 1 + 3)$.

# %%
values = torch.tensor([[[1.0, 2.0, 3.0]]])  # B×C×V = 1×1×3
kmax.kmeans_update(values, torch.tensor([[2, 0, 2]]), num_queries=3)

# %% [markdown]
# ## 5. Which query owns which voxel, in a trained model
#
# The committed DKUXNet of the CPU track (`results/runs/cpu-all-r0.1-s1337`: the `cpu` preset, trained on
# the real LA data at ½ resolution with 8 labeled scans for 900 iterations on 2 CPU cores) on a
# 64×64×32 window of a test scan it never saw, centred on the atrium. The panels show, on the window's
# middle axial slice, the image, the query with the largest soft assignment $S_{nv}$ at each voxel, and
# the group of that query. Of the 12 queries, 4 are "background", 4 "organ" and 4 the third group, which
# on LA has nothing to find.

# %%
showcase = default_results_dir() / "runs" / SHOWCASE_RUN
trained, _ = load_model(showcase / "model.pt", device="cpu")
case_file = sorted((showcase / "cases").glob("*.npz"))[0]
window = load_case(case_file)["image_crop"].astype(np.float32)  # X×Y×Z, ½ resolution
with torch.no_grad():
    probs = trained(torch.from_numpy(window)[None, None]).query_probs[0].numpy()  # N×X×Y×Z
fig = viz.assignment_figure(probs, trained.group_sizes, window, index=window.shape[2] // 2,
                            title=f"trained DKUXNet (cpu preset), test scan {case_file.stem}, real LA at ½ resolution")

# %% [markdown]
# ## Summary
#
# - The `paper` preset has about 65 M parameters, most of them in the convolutional skip blocks
#   (`enc1`–`enc5`) and the pixel decoder, not in the kMaX layers.
# - Each kMaX layer assigns every voxel to one query (argmax over queries) and moves each centre by
#   the summed values of its voxels.
# - The final soft assignment $S$ (N per voxel) is what the query-distribution losses act on.
#
# ## What's next
#
# [Training](03_train) fits the model with the semi-supervised objective and plots every loss term.
