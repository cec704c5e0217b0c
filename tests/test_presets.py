"""Presets: ``official`` and ``authors-script`` field by field, their parameter counts, and a short training run."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from dkuxnet.config import PRESETS, get_preset
from dkuxnet.models import authors_uxnet_dead_parts, model_info
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
    # head (Y unsupervised), QD summed over voxels x 0.1, no deep supervision, one view, fully supervised
    # (here: the split's labeled cases, no unlabeled case)
    assert _changes("official") == {
        "preset": "official",
        "model.seg_head": "conv",
        "loss.lambda_qd": 0.1, "loss.qd_reduction": "sum", "loss.lambda_ds": 0.0, "loss.ablation": "seg",
        "data.unlabeled_bs": 0, "data.views": 1,
    }
    assert get_preset("official").model.kmax_scales == 3


def test_authors_script_is_the_la_script_as_far_as_the_config_reaches():
    # Rows21/k-Means_Mask_Mamba main_train.py: DKUNET (2 scales, Dice-CE on Y), QD -mean(onehot log O) over
    # B·3·V (= voxel mean / 3) x 0.1, both views, all 80 labels, consistency off, tau 0.5, 400 optimiser steps
    assert _changes("authors-script") == {
        "preset": "authors-script",
        "model.kmax_scales": 2,
        "loss.lambda_qd": pytest.approx(0.1 / 3), "loss.lambda_ds": 0.0, "loss.tau": 0.5, "loss.ablation": "seg",
        "data.label_ratio": 1.0, "data.unlabeled_bs": 0, "data.noise_std": pytest.approx(2.5**0.5),
        "data.noise_clip": 100.0, "data.contrast_p": 0.0, "data.blur_p": 0.0,
        "train.max_iterations": 400, "train.seed": 0,
    }
    cfg = get_preset("authors-script")
    assert (cfg.model.seg_head, cfg.loss.qd_reduction, cfg.data.views) == ("query", "mean", 2)


def _authors_script_loop(seed: int) -> tuple[list[int], int, list[int]]:
    """The LA script's skip rule, replayed: its "labeled" indices, optimiser steps and the global steps it evaluates at.

    ``Rows21/k-Means_Mask_Mamba`` ``main_train.py`` (commit ``52bd6f0``, unchanged at ``edcf8ea``), as written:
    ``set_determinism(seed=0)`` seeds Python's ``random``, which nothing else draws from before
    ``random.shuffle(full_list)``, ``full_list = range(80 / 2)``; the first int(80 · 20 / 100 / 2) = 8 entries are
    "labeled". The loader holds the 80 ``train.list`` volumes, 2 per batch, shuffled: 40 loop steps an epoch,
    ``step`` = 1 … 40. A step with ``step % 80`` among the other 32 entries only counts ``global_step`` and
    ``continue``s; every other step supervises the 2 volumes it drew and takes an optimiser step, then evaluates
    on the test split when ``global_step % 800 == 0 != global_step`` or ``global_step == 2000 - 1``. Epochs run
    while ``global_step < 2000``.
    """
    full_list = list(range(80 // 2))
    random.Random(seed).shuffle(full_list)
    labeled, unlabeled = full_list[:8], set(full_list[8:])
    global_step, steps, evaluations = 0, 0, []
    while global_step < 2000:
        for step in range(1, 80 // 2 + 1):
            if step % 80 in unlabeled:
                global_step += 1
                continue
            steps += 1
            if (global_step % 800 == 0 and global_step != 0) or global_step == 2000 - 1:
                evaluations.append(global_step)
            global_step += 1
    return sorted(labeled), steps, evaluations


def test_authors_script_trains_400_steps_on_all_labels():
    labeled, steps, evaluations = _authors_script_loop(seed=0)
    # by hand: index 0 never occurs (step runs 1 … 40) and step 40 is never skipped (40 is not among 0 … 39),
    # so an epoch trains 7 + 1 = 8 of its 40 steps, and the 50 epochs 400 of 2,000
    assert labeled == [0, 12, 15, 21, 27, 29, 34, 38]
    assert steps == 50 * (len(set(labeled) - {0}) + 1) == 400 == get_preset("authors-script").train.max_iterations
    # the test evaluations at global steps 800 and 1,600 fall on step 1 of an epoch, always skipped; the only
    # one left comes after the last optimiser step, so its "best on test" checkpoint is the final model
    assert evaluations == [1999]
    cfg = get_preset("authors-script")
    assert (cfg.data.label_ratio, cfg.data.unlabeled_bs, cfg.loss.ablation) == (1.0, 0, "seg")


def test_preset_parameter_counts():
    counts = {name: model_info(name)["parameters"] for name in ("paper", "official", "authors-script")}
    assert counts == {"paper": 65_217_790, "official": 65_342_304, "authors-script": 61_937_114}
    # official = paper + the conv head (ResBlock 48->48 + 1^3 conv 48->2); authors-script = the DKUNET class
    assert model_info("official")["parts"]["conv_head"] == 124_514
    for name in ("official", "authors-script"):
        assert model_info(name)["authors_dkunet"]["parameters"] == 65_503_397
    # official trains UXNET: DKUNET without its GRNs (2·4·w per UX block: 8 · (48+96+192+384) · 2 = 11,520)
    # and with the MLP's hard-coded 3rd class (128 queries · (64 + 1) = 8,320)
    official = model_info("official")
    assert official["authors_uxnet"]["parameters"] == 65_500_197 == 65_503_397 - 11_520 + 8_320
    assert official["authors_uxnet"]["dead_parts_not_built"]["mlp_3_classes"] == 8_320
    assert "authors_uxnet" not in model_info("authors-script") and "authors_uxnet" not in model_info("paper")
    with pytest.raises(ValueError, match="UXNET's architecture"):
        authors_uxnet_dead_parts(get_preset("paper").model)
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
    # authors-script keeps its own label_ratio = 1.0: every case of train.list labeled, none unlabeled
    own_labels = ("data.label_ratio", "data.labeled_num") if name == "authors-script" else ()
    cfg = get_preset(name).override(**{k: v for k, v in SMALL.items() if k not in own_labels})
    summary = train(cfg, phantom_root, tmp_path, device="cpu", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert summary["iterations"] == 2 and [r["iteration"] for r in rows] == [1, 2]
    for r in rows:
        assert r["seg"] > 0 and r["qd"] > 0 and r["ds"] == 0 and r["qdc"] == 0 and r["segc"] == 0
