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
# # Evaluating a run with the LA protocol
#
# ## Overview
#
# The LA protocol scores a network on the cases of `test.list` (20 scans of LA; the smoke profile's
# phantom has 4) with the same sliding window and the same four metrics. The paper reports the network
# of the **final** iteration, and so does this companion: `last.pt`, never a checkpoint chosen on the test
# cases. This notebook
#
# 1. evaluates the training notebook's `last.pt` with that protocol,
# 2. lists the per-case metrics,
# 3. summarises them (with and without largest-connected-component post-processing),
# 4. shows the result and the paper's Table 2 apart — each labelled, never merged.
#
# ## Prerequisites
#
# | Concepts | Importance | Notes |
# | --- | --- | --- |
# | [Training](03_train) | Necessary | produces `run_dir/last.pt` |
# | Dice, Jaccard, Hausdorff distance | Necessary | medpy definitions, distances in voxels |
# | Sliding-window inference | Helpful | UA-MT grid: stride 18 / 18 / 4 |
#
# - **Time to learn**: 10 minutes
# - **Hardware and time to run**: 2 CPU cores: about 15 s in the `smoke` profile (measured in the book's build); the
#   `cpu` profile's protocol evaluation took about 8 s per test scan (2.6 min for the 20 scans). On a GPU: not yet
#   measured.

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
mode: str = "protocol"  # protocol (UA-MT grid, the numbers to report) or fast (MONAI, overlap 0.5)

# %% [markdown]
# ## Imports

# %%
import pandas as pd

from dkuxnet.data import read_list
from dkuxnet.evaluate import evaluate_checkpoint
from dkuxnet.reproduce import prepare_data, resolve_profile
from dkuxnet.results import build_result, ours_table, paper_table

# %%
settings = resolve_profile(profile, data_dir, preset, label_ratio, max_iterations, seed, device, run_dir, ablation)
root = prepare_data(settings)
checkpoint = settings.run_dir / "last.pt"
if not checkpoint.is_file():
    raise FileNotFoundError(f"{checkpoint} not found: run 03_train with the same parameters first")
print(settings.note)

# %% [markdown]
# ## 1. Protocol evaluation
#
# For each test case: the whole volume is covered by windows of the run's patch size (112 × 112 × 80
# for the paper preset, 32³ in the smoke profile) on the UA-MT grid; the
# softmax probabilities of overlapping windows are averaged; a voxel is foreground when its
# foreground probability wins. An empty prediction is a **failed case**: Dice 0 and no distances
# (the LA repositories would score its distances as 0, the best value; that legacy number is kept
# in separate columns). The masks are saved to `eval/predictions/` for the visualisation notebook.

# %%
test_ids = read_list(root / "test.list")
summary = evaluate_checkpoint(
    checkpoint, data_dir=root, out_dir=settings.run_dir / "eval", mode=mode, device=settings.device,
    lcc=True, progress=True, save_predictions=len(test_ids),
)

# %% [markdown]
# ## 2. Per case

# %%
per_case = pd.read_csv(settings.run_dir / "eval" / "per_case.csv")
per_case[["case", "dice", "jaccard", "hd95", "asd", "failed", "dice_lcc", "hd95_lcc", "seconds"]].round(3)

# %% [markdown]
# ## 3. Summary
#
# Mean ± standard deviation over the test cases; Dice and Jaccard in %, distances in voxels
# (× 0.625 for mm). `LCC` keeps the largest connected component, as DTC and SS-Net do; UA-MT, MC-Net+
# and CAML do not, and neither does our headline number (the book's data page, protocol caveats).

# %%
def metric_row(s: dict, scale: dict) -> dict:
    """Format one summary's means ± stds (Dice / Jaccard in %)."""
    return {m: f"{scale[m] * s['metrics'][m]['mean']:.2f} ± {scale[m] * s['metrics'][m]['std']:.2f}" for m in scale}


scale = {"dice": 100, "jaccard": 100, "hd95": 1, "asd": 1, "hd95_legacy": 1}
pd.DataFrame({"raw": metric_row(summary, scale) | {"failed": summary["n_failed"]},
              "LCC": metric_row(summary["lcc"], scale) | {"failed": summary["lcc"]["n_failed"]}}).T

# %%
print(f"{summary['n_cases']} cases, {summary['seconds_per_volume']:.2f} s per volume on {summary['device']}, "
      f"checkpoint iteration {summary['iteration']} — {settings.note}")

# %% [markdown]
# ## 4. This run, and the paper's Table 2 apart
#
# Two tables, never one: this run, titled with its kind (in the book: the synthetic phantom, the tiny
# model, a few iterations, a CPU — its number says the pipeline runs, nothing about the paper), then the
# paper's rows at the same label ratio, **reported by the paper** (`dkuxnet/paper_results.json`).

# %%
ours = build_result(summary, name=settings.run_dir.name, notes=settings.result_note)
ours_table([ours]).round(2).style.format(precision=2).set_caption(f"this run — {settings.note}").hide(axis="index")

# %%
paper = paper_table("main").query("label_ratio == @settings.label_ratio")
paper.round(2).style.format(precision=2).set_caption(
    f"reported by the paper — Table 2, {settings.label_ratio:.0%} labeled").hide(axis="index")

# %% [markdown]
# ## Summary
#
# - `eval/per_case.csv` and `eval/summary.json` in the run folder hold every number above, with the
#   checkpoint, config and software versions that produced them.
# - The headline metric is the raw (no LCC) result of the final iteration's checkpoint; failed cases are
#   counted, not scored as distance 0.
#
# ## What's next
#
# [The ablation](05_ablation) trains and evaluates the four loss variants of the paper's Table 1.
