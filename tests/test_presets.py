"""Presets: ``official`` and ``authors-script`` field by field, their parameter counts, and a short training run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dkuxnet.config import PRESETS, get_preset
from dkuxnet.models import model_info
from dkuxnet.train import config_diff, train


def _changes(name: str) -> dict[str, object]:
    """Every field where preset ``name`` differs from ``paper``, with its value."""
    paper, cfg = get_preset("paper").to_dict(), get_preset(name).to_dict()
    out = {}
    for dotted in config_diff(paper, cfg):
        section, _, field = dotted.partition(".")
        out[dotted] = cfg[section][field] if field else cfg[section]
    return out


def test_official_is_the_authors_supervised_training_script():
    # Rows21/DK-UXNet main_train.py: the UXNET variant (3 kMaX scales + conv head), Dice-CE on the conv
    # head (Y unsupervised), QD summed over voxels x 0.1, no deep supervision, labeled data only, one view
    assert _changes("official") == {
        "preset": "official",
        "model.seg_head": "conv",
        "loss.lambda_qd": 0.1, "loss.qd_reduction": "sum", "loss.lambda_ds": 0.0, "loss.ablation": "seg",
        "data.unlabeled_bs": 0, "data.views": 1,
    }
    assert get_preset("official").model.kmax_scales == 3


def test_authors_script_is_the_la_script_as_far_as_the_config_reaches():
    # Rows21/k-Means_Mask_Mamba main_train.py: DKUNET (2 scales, Dice-CE on Y), QD -mean(onehot log O) over
    # B·3·V (= voxel mean / 3) x 0.1, both views of labeled volumes, consistency off, tau 0.5, 2000 loop steps
    assert _changes("authors-script") == {
        "preset": "authors-script",
        "model.kmax_scales": 2,
        "loss.lambda_qd": pytest.approx(0.1 / 3), "loss.lambda_ds": 0.0, "loss.tau": 0.5, "loss.ablation": "seg",
        "data.label_ratio": 0.2, "data.unlabeled_bs": 0, "data.noise_std": pytest.approx(2.5**0.5),
        "data.noise_clip": 100.0, "data.contrast_p": 0.0, "data.blur_p": 0.0,
        "train.max_iterations": 440, "train.seed": 0,
    }
    cfg = get_preset("authors-script")
    assert (cfg.model.seg_head, cfg.loss.qd_reduction, cfg.data.views) == ("query", "mean", 2)


def test_preset_parameter_counts():
    counts = {name: model_info(name)["parameters"] for name in ("paper", "official", "authors-script")}
    assert counts == {"paper": 65_217_790, "official": 65_342_304, "authors-script": 61_937_114}
    # official = paper + the conv head (ResBlock 48->48 + 1^3 conv 48->2); authors-script = the DKUNET class
    assert model_info("official")["parts"]["conv_head"] == 124_514
    for name in ("official", "authors-script"):
        assert model_info(name)["authors_dkunet"]["parameters"] == 65_503_397
    assert len(PRESETS) == len(set(PRESETS)) == 6


def test_cpu_preset_is_tiny_on_half_resolution_with_its_ramp_at_40_percent():
    from dkuxnet.losses import sigmoid_rampup

    cpu, tiny = get_preset("cpu"), get_preset("tiny")
    assert cpu.model == tiny.model and cpu.loss.ablation == "all" and cpu.data.views == 2
    assert (cpu.data.resample, cpu.data.patch_size, cpu.train.bn_recompute_batches) == (2, (64, 64, 32), 25)
    n = cpu.train.max_iterations
    # the paper's convention: full weight at 6,000 of 15,000 iterations, i.e. at 40 % of the schedule
    paper = get_preset("paper").loss
    assert paper.rampup_every * paper.rampup_length == 0.4 * get_preset("paper").train.max_iterations
    assert cpu.loss.rampup_every * cpu.loss.rampup_length == 0.4 * n
    full = int(0.4 * n)
    assert sigmoid_rampup(full, cpu.loss.rampup_length, cpu.loss.rampup_every) == 1.0
    assert sigmoid_rampup(full - 1, cpu.loss.rampup_length, cpu.loss.rampup_every) < 1.0


# the presets' loss, views, data and schedule on the tiny width (a full-size step takes minutes on a CPU)
SMALL = {
    "model.widths": [4, 8, 8, 16], "model.depths": [1, 1, 1, 1], "model.hidden": 16, "model.num_queries": 6,
    "model.query_groups": [2, 2, 2], "model.query_dim": 8, "model.embed_dim": 8, "model.num_heads": 1,
    "model.ffn_dim": 16, "model.mlp_hidden": 8, "model.kmax_layers_per_scale": 1, "model.checkpoint_activations": False,
    "data.patch_size": [32, 32, 16], "data.labeled_bs": 1, "data.label_ratio": None, "data.labeled_num": 2,
    "train.max_iterations": 2, "train.log_every": 1, "train.checkpoint_every": 2,
}


@pytest.mark.parametrize("name", ["authors-script", "official"])
def test_preset_trains_two_iterations_on_the_phantom(name: str, phantom_root: Path, tmp_path: Path):
    cfg = get_preset(name).override(**SMALL)
    summary = train(cfg, phantom_root, tmp_path, device="cpu", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert summary["iterations"] == 2 and [r["iteration"] for r in rows] == [1, 2]
    for r in rows:
        assert r["seg"] > 0 and r["qd"] > 0 and r["ds"] == 0 and r["qdc"] == 0 and r["segc"] == 0
