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
# # Training one run
#
# ## Overview
#
# One run = one cell: a preset, a loss ablation, a label ratio and a seed. `dkuxnet reproduce` executes
# this notebook once per cell with papermill; the book runs it once, in the smoke profile. It
#
# 1. builds the run's configuration from a preset and the parameters,
# 2. trains with the semi-supervised objective (resumable, atomic checkpoints),
# 3. plots every term of the loss,
# 4. reports what the run cost.
#
# ## Prerequisites
#
# | Concepts | Importance | Notes |
# | --- | --- | --- |
# | [The model](02_model) | Necessary | what `query_probs` and `seg_logits` are |
# | Contrastive learning (SimCLR's NT-Xent) | Helpful | the two consistency terms are NT-Xent losses |
# | Mixed precision, AdamW | Helpful | the paper preset trains in bf16 autocast on a GPU |
#
# - **Time to learn**: 15 minutes (a paper-profile run takes hours on one GPU)
# - **Hardware and time to run**: 2 CPU cores: about 30 s in the `smoke` profile (measured in the book's build); one
#   run of the `cpu` profile on the real data took 17–52 min of wall time (the committed runs in `results/cpu/`, on
#   2 shared cores). The `paper` and `colab` profiles need a GPU, where their time is not yet measured.
#
# ## On Colab
#
# Choose a GPU runtime (Runtime → Change runtime type), run the first code cell (it installs the
# package), download the data in a new cell with `!python -m dkuxnet data download --dest data/LA`,
# and set `profile = "colab"` and `data_dir = "data/LA"` in the parameters cell. The `colab` profile is
# the `paper` profile with one labeled + one unlabeled volume per view instead of two + two, activation
# checkpointing (the default) and $\mathcal{L}_{qdc}$ on sampled voxels instead of whole volumes, so that
# a training step fits a 16 GB card (estimated peak about 12.6 GiB; the book's Performance appendix). It is a
# different experiment from the paper's: fewer volumes per step, a single negative volume per anchor in
# $\mathcal{L}_{segc}$ and a voxel-level $\mathcal{L}_{qdc}$ may cost Dice. We have not measured how much;
# the run's label says `colab profile`. It is meant for an **L4 or A100** runtime (bf16). A **T4** has no
# bf16, and in fp32 the colab step would need about 28 GiB (estimated): on a T4 (or without a GPU) the
# notebook says so and runs the `cpu` profile instead — the CPU track's small model at ½ resolution, on
# the card. None of this has been measured on a GPU yet.
# The full schedule takes many hours on such a card: training resumes from `last.pt` after a
# disconnection (`resume = True`).

# %% tags=["remove-input"]
import sys

if "google.colab" in sys.modules:
    # %pip install -q "dkuxnet @ git+https://github.com/dkuxnet/dkuxnet" monai==1.6.1 medpy==0.5.2

# %% tags=["parameters", "hide-input"]
profile: str = "smoke"  # smoke (CPU, phantom, tiny preset), paper (80 GB GPU, real LA) or colab (16 GB GPU)
data_dir: str = ""  # empty means the profile default
preset: str = ""  # empty means tiny for smoke and paper for paper
ablation: str = ""  # loss ablation: seg, qdc, segc or all; empty means the preset's own
label_ratio: float = 0.1  # labeled fraction of train.list
max_iterations: int = 0  # 0 means the profile default
seed: int = 1337  # training seed
device: str = ""  # empty means cuda if available
run_dir: str = ""  # empty means the profile default run folder
resume: bool = False  # continue from run_dir/last.pt after an interruption

# %% [markdown]
# ## Imports

# %%
import pandas as pd

from dkuxnet import viz
from dkuxnet.data import make_split
from dkuxnet.reproduce import fresh_run_dir, prepare_data, resolve_profile
from dkuxnet.train import schedule_label, train

# %%
settings = resolve_profile(profile, data_dir, preset, label_ratio, max_iterations, seed, device, run_dir, ablation)
root = prepare_data(settings)
out_dir = fresh_run_dir(settings.run_dir, settings.smoke, resume)
print(f"run folder: {out_dir}")
print(settings.note)

# %% [markdown]
# ## 1. The configuration
#
# The preset fixes the architecture and the recipe; the parameters set the loss ablation (which terms
# of the objective are on), the label ratio, the schedule length and the seed. The full tree is written to `config.json` and into every checkpoint.

# %%
cfg = settings.config()
split = make_split(root, label_ratio=cfg.data.label_ratio, labeled_num=cfg.data.labeled_num)
pd.Series({
    "preset": cfg.preset, "labeled / unlabeled cases": f"{len(split.labeled)} / {len(split.unlabeled)}",
    "iterations": f"{cfg.train.max_iterations} ({schedule_label(cfg)})",
    "patch": cfg.data.patch_size,
    "batch": f"({cfg.data.labeled_bs} labeled + {cfg.data.unlabeled_bs} unlabeled) x {cfg.data.views} views",
    "optimiser": f"{cfg.train.optimizer}, lr {cfg.train.lr}, weight decay {cfg.train.weight_decay}",
    "loss weights": f"qd {cfg.loss.lambda_qd}, ds {cfg.loss.lambda_ds}, qdc {cfg.loss.lambda_qdc}, "
                    f"segc {cfg.loss.lambda_segc}, tau {cfg.loss.tau}",
    "ablation": cfg.loss.ablation, "device": settings.device,
    "precision": cfg.train.precision if settings.device.startswith("cuda") else "fp32 (CPU always trains in fp32)",
}, name="value").to_frame()

# %% [markdown]
# ## 2. The objective
#
# Each step draws labeled and unlabeled crops, augments them spatially once, and makes two
# voxel-aligned views: the crop itself (weak) and an intensity-perturbed copy (strong). Both views go
# through the one network in a single batch (the book's method page, total objective):
#
# $$
# \mathcal{L} = \underbrace{\mathrm{DiceCE} + \lambda_{qd}\mathcal{L}_{qd} + \lambda_{ds}\mathcal{L}_{ds}}_{\mathcal{L}_{seg}\text{, labeled, both views}}
# + r(t)\,\big(\lambda_{qdc}\,\mathcal{L}_{qdc} + \lambda_{segc}\,\mathcal{L}_{segc}\big),
# \qquad r(t) = e^{-5\,(1 - \min(t, T_r)/T_r)^2},\ t = \lfloor \text{iteration}/150 \rfloor .
# $$
#
# $\mathcal{L}_{qd}$ asks the soft assignment of every labeled voxel to fall in its class's query
# group; $\mathcal{L}_{ds}$ does the same for each kMaX layer's hard-assignment affinity;
# $\mathcal{L}_{qdc}$ and $\mathcal{L}_{segc}$ are NT-Xent losses that pull the two views of a volume
# together (query distributions and segmentation probabilities) and push other volumes apart, on
# labeled and unlabeled volumes alike. With the `paper` and `tiny` presets' ramp (our choice, the book's
# decisions page) $r$ reaches full weight at iteration 6,000, so a shortened smoke run barely switches the
# consistency terms on; the `cpu` preset ramps within its 900 iterations.

# %% [markdown]
# ## 3. Train
#
# `train` writes `config.json`, `metrics.jsonl` (window means every `log_every` steps),
# `last.pt` (atomic, resumable) and `summary.json` into the run folder.

# %%
summary = train(cfg, data_dir=root, out_dir=out_dir, device=settings.device, resume=resume, progress=True)

# %% [markdown]
# ## 4. Loss curves
#
# Every logged term; `loss` is the total, `ramp` (right axis) the consistency weight $r(t)$.

# %%
viz.loss_curves(out_dir / "metrics.jsonl", title=f"training losses — {settings.note}").show()

# %% [markdown]
# ## 5. What the run cost

# %%
pd.Series({
    "iterations": summary["iterations"], "schedule": summary["schedule"], "device": summary["device"],
    "ms per step": round(summary["ms_per_step"], 1) if summary["ms_per_step"] else None,
    "wall time (s)": round(summary["wall_s"], 1), "peak GPU memory (GiB)": summary["peak_gib"],
    "torch": summary["torch"], "final loss": summary["final"].get("loss"), "label": settings.note,
}, name="value").to_frame()

# %% [markdown]
# ## Summary
#
# - A run is fully described by its `config.json`; the checkpoint carries the same tree plus every
#   random state, so `resume=True` continues the exact same data stream.
# - The consistency terms only act once the ramp has risen; a short run is a supervised run in all
#   but name.
#
# ## What's next
#
# [Evaluation](04_evaluate) scores `last.pt`, the checkpoint of the final iteration, on the test cases
# with the LA protocol (the 20 scans of LA's `test.list`; 4 phantom cases in the smoke profile).
