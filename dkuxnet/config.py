"""One explicit configuration tree (nanoGPT's ``GPTConfig``, grown up).

Every run is described by a frozen :class:`Config` made of four parts. The defaults are the
``paper`` preset: the reading of the DKUXNet paper written down on the book's method page; every field that
the paper leaves open and we chose is marked ``[decision]`` in its comment. Presets:

* ``paper``          — 3 kMaX scales x 2 layers, deep-supervised assignment heads (65,217,790 parameters).
* ``official``       — what the authors' ``main_train.py`` (``Rows21/DK-UXNet``) trains, moved to LA: the
  ``UXNET`` variant (3 kMaX scales and a conv head), Dice-CE on the conv head, QD summed over voxels
  x 0.1, no deep supervision, one view, no consistency term: supervised training on the split's labeled
  cases, no unlabeled case loaded (the script's CT data are all labeled) (65,342,304 parameters).
* ``authors-script`` — what an LA training script in another repository of the authors' account
  (``Rows21/k-Means_Mask_Mamba``, ``main_train.py``; provenance unknown) trains: the ``DKUNET`` class
  (2 kMaX scales, no conv head), Dice-CE on Y and QD (mean x 0.1 / 3) on both views, no consistency term,
  supervised with all 80 labels; its skip rule leaves 400 optimiser steps of its 2,000 loop steps (book:
  decisions page; the count is reproduced in ``tests/test_presets.py``) (61,937,114 parameters).
* ``tiny``           — the ``paper`` architecture, narrow and small, for tests, CPU and Binder.
* ``cpu``            — the real LA data at ½ resolution (``data.resample=2``) on 2 CPU cores in under an hour:
  the ``tiny`` architecture on 64×64×32 patches (about the paper's field of view), all three losses,
  a ramp scaled to its schedule, BatchNorm statistics recomputed after training. Not the paper's setting.
* ``vnet``           — UA-MT's V-Net (batch norm), the supervised baseline of every LA paper.

A config round-trips through plain dicts (:meth:`Config.to_dict`, :meth:`Config.from_dict`) so it can
be stored in checkpoints (``weights_only=True``), JSON results and papermill parameters, and be
changed with dotted overrides (:meth:`Config.override`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

PRESETS = ("paper", "official", "authors-script", "tiny", "cpu", "vnet")
ABLATIONS = ("seg", "qdc", "segc", "all")  # paper Table 1 rows: L_seg; +L_qdc; +L_segc; all three


@dataclass(frozen=True)
class ModelConfig:
    """Architecture. Shapes in comments use B batch, K classes, N queries, V voxels."""

    arch: str = "dkuxnet"  # "dkuxnet" or "vnet"
    in_channels: int = 1
    num_classes: int = 2  # K; LA: background, left atrium
    widths: tuple[int, ...] = (48, 96, 192, 384)  # UX-Net stage widths (3D UX-Net, arXiv:2209.15076)
    depths: tuple[int, ...] = (2, 2, 2, 2)  # UX blocks per stage
    hidden: int = 768  # bottleneck width of enc5
    num_queries: int = 128  # N cluster centres
    query_dim: int = 256  # C, width of cluster centres and pixel values
    embed_dim: int = 128  # width of pixel keys / query kernels in the affinity
    num_heads: int = 8  # query self-attention heads
    ffn_dim: int = 2048  # query FFN hidden width
    kmax_scales: int = 3  # [decision] dec3, dec2, dec1 (paper text; UXNET); the DKUNET class runs 2
    kmax_layers_per_scale: int = 2
    query_groups: tuple[int, ...] = (16, 4, 108)  # background / organ / "tumor" (MaxQuery; book: method page)
    mlp_hidden: int = 64  # cluster-classification MLP over all flattened centres
    seg_head: str = "query"  # [decision] "query": Y = Σ Φ·S is the segmentation; "conv": a conv head on dec0 (official script)
    two_networks: bool = False  # [decision] False: one shared-weight network for both views; True: one per view
    checkpoint_activations: bool = True  # recompute the large-grid blocks in backward (same math, ~1/2 the memory)
    depthwise_conv: str = "auto"  # depthwise convs: "auto" (fft on CPU, native elsewhere), "native", "channels_last", "fft"
    vnet_filters: int = 16  # base width of the V-Net (arch="vnet")
    vnet_dropout: bool = True  # Dropout3d(0.5) in training, as UA-MT's has_dropout=True


@dataclass(frozen=True)
class LossConfig:
    """Training objective L = L_seg + ramp(t) (lambda_qdc L_qdc + lambda_segc L_segc) (book: method page)."""

    seg_loss: str = "dice_ce"  # "dice_ce" (MONAI semantics) or "uamt" (0.5 (CE + fg Dice), V-Net repos)
    lambda_qd: float = 1.0  # [decision] query-distribution loss weight (official: 0.1)
    qd_reduction: str = "mean"  # [decision] mean over voxels (official: "sum")
    lambda_ds: float = 1.0  # [decision] deep supervision of per-layer assignments; 0 = official
    lambda_qdc: float = 0.1  # [decision] query distribution consistency weight
    lambda_segc: float = 0.1  # [decision] segmentation contrast weight
    tau: float = 0.3  # [decision] NT-Xent temperature
    qdc_on: str = "query_probs"  # [decision] L_qdc on S (N queries); "cluster_probs": on O (G groups; two_networks)
    qdc_granularity: str = "volume"  # [decision] "volume" or "voxel"
    segc_granularity: str = "volume"  # [decision] "volume" or "voxel" (same-class negatives excluded)
    voxel_samples: int = 4096  # voxels per volume for granularity="voxel"
    rampup_length: float = 40.0  # sigmoid ramp T_r, in units of rampup_every iterations
    rampup_every: int = 150  # t = iteration // rampup_every (LA convention: full weight at 6000)
    ablation: str = "all"  # "seg" (L_seg alone, on the labeled cases; none unlabeled loaded), "qdc", "segc", "all"


@dataclass(frozen=True)
class DataConfig:
    """Sampling, views and augmentation (book: data and decisions pages)."""

    patch_size: tuple[int, int, int] = (112, 112, 80)
    resample: int = 1  # integer downsampling factor at load time (image: mean pooling, label: majority vote)
    label_ratio: float | None = 0.1  # of the 80 train cases; 0.05 / 0.1 / 0.2 / 1.0 -> 4 / 8 / 16 / 80
    labeled_num: int | None = None  # overrides label_ratio when set
    labeled_bs: int = 2
    unlabeled_bs: int = 2
    views: int = 2  # [decision] weak + strong view of the same crop; 1 = weak only
    noise_std: float = 0.1  # strong view: Gaussian noise sigma, clipped to +-noise_clip
    noise_clip: float = 0.2
    contrast_range: tuple[float, float] = (0.9, 1.1)  # strong view: x * c + s with p = contrast_p
    shift_range: float = 0.1
    contrast_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.5, 1.0)  # strong view: Gaussian blur with p = blur_p
    blur_p: float = 0.2


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, precision and bookkeeping (book: decisions page, "Optimisation")."""

    max_iterations: int = 15000  # [decision] the paper gives none; MC-Net/CAML-style 15k
    optimizer: str = "adamw"  # "adamw" (official code) or "sgd" (V-Net repos)
    lr: float = 1e-4
    weight_decay: float = 0.01
    momentum: float = 0.9  # sgd only
    lr_step: int = 0  # multiply lr by 0.1 every lr_step iterations; 0 = constant
    seed: int = 1337  # LA convention
    precision: str = "bf16"  # "bf16" autocast on CUDA (fp32 islands inside) or "fp32"; CPU is fp32
    compile: bool = False  # torch.compile the model
    channels_last: bool = False  # channels_last_3d memory layout
    deterministic: bool = False  # cudnn.deterministic; off for speed
    log_every: int = 20  # JSONL metrics line every N iterations (one host sync per N)
    checkpoint_every: int = 500  # atomic checkpoint every N iterations (and at the end)
    bn_recompute_batches: int = 0  # [ours] after training, recompute BN running stats over N weak-view batches; 0 = off
    sync_batchnorm: bool = True  # under torchrun: BatchNorm statistics of the whole batch (all ranks); False: per rank


@dataclass(frozen=True)
class Config:
    """A complete, serialisable description of one run."""

    preset: str = "paper"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of str / int / float / bool / None / list (JSON and weights_only safe)."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        d = _migrate(d)
        parts = {}
        for name, sub in (("model", ModelConfig), ("loss", LossConfig), ("data", DataConfig), ("train", TrainConfig)):
            parts[name] = _build(sub, d.get(name, {}), name)
        extra = set(d) - {"preset", *parts}
        if extra:
            raise ValueError(f"unknown config section(s): {sorted(extra)}")
        return cls(preset=d.get("preset", "paper"), **parts)

    def override(self, **dotted: Any) -> Config:
        """Return a copy with ``section__field=value`` or ``{"section.field": value}`` changes.

        Example: ``cfg.override(**{"train.max_iterations": 100, "data.label_ratio": 0.2})``.
        """
        d = self.to_dict()
        for key, value in dotted.items():
            section, _, name = key.replace("__", ".").partition(".")
            if section not in d or not isinstance(d[section], dict) or name not in d[section]:
                raise ValueError(f"unknown config field {key!r}")
            d[section][name] = _plain(value)
        return Config.from_dict(d)


# fields renamed since configs were first stored (checkpoints, results): old dotted name -> new one
RENAMED_FIELDS = {"model.depthwise_layout": "model.depthwise_conv"}


def _migrate(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` with renamed fields (:data:`RENAMED_FIELDS`) under their new names; values are kept."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    for old, new in RENAMED_FIELDS.items():
        (s_old, f_old), (s_new, f_new) = old.split("."), new.split(".")
        if isinstance(out.get(s_old), dict) and f_old in out[s_old]:
            out.setdefault(s_new, {}).setdefault(f_new, out[s_old].pop(f_old))
    return out


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _build(cls: type, d: dict[str, Any], section: str) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(names)
    if unknown:
        raise ValueError(f"unknown field(s) in config section {section!r}: {sorted(unknown)}")
    kwargs = {}
    for k, v in d.items():
        default = getattr(cls(), k)
        kwargs[k] = tuple(v) if isinstance(default, tuple) and isinstance(v, list) else v
    return cls(**kwargs)


_TINY_MODEL = ModelConfig(
    widths=(4, 8, 16, 32), hidden=32, num_queries=12, query_dim=16, embed_dim=8,
    num_heads=2, ffn_dim=32, query_groups=(4, 4, 4), mlp_hidden=8, checkpoint_activations=False,
)
# the cpu preset's full schedule: ≤ 45 min on 2 idle cores at the 2.94 s a step that `dkuxnet bench --cpu-track`
# measured (results/perf/bench_cpu_2cores.json)
CPU_ITERATIONS = 900


def get_preset(name: str) -> Config:
    """Build one of :data:`PRESETS`. Raises ``ValueError`` for an unknown name."""
    if name == "paper":
        return Config()
    if name == "official":  # Rows21/DK-UXNet main_train.py: supervised, UXNET, loss on the conv head
        return Config(
            preset="official",
            model=ModelConfig(seg_head="conv"),
            loss=LossConfig(lambda_qd=0.1, qd_reduction="sum", lambda_ds=0.0, ablation="seg"),
            data=DataConfig(unlabeled_bs=0, views=1),
        )
    if name == "authors-script":  # Rows21/k-Means_Mask_Mamba main_train.py on LA (book: decisions)
        return Config(
            preset="authors-script",
            model=ModelConfig(kmax_scales=2),
            # its QD is -mean over B·3·V of onehot·log O, i.e. the voxel mean / 3; consistency terms off
            loss=LossConfig(lambda_qd=0.1 / 3, lambda_ds=0.0, tau=0.5, ablation="seg"),
            # every volume it draws is supervised (all 80 labels: the skip is by step index, not by case);
            # strong view: noise of variance U(0, 5), here its mean power (σ² = 2.5), no clip, nothing else
            data=DataConfig(
                label_ratio=1.0, unlabeled_bs=0, noise_std=2.5**0.5, noise_clip=100.0, contrast_p=0.0, blur_p=0.0
            ),
            # its optimiser steps with seed 0: 400 of 2,000 loop steps (the rest are skipped by step index)
            train=TrainConfig(max_iterations=400, seed=0),
        )
    if name == "tiny":
        return Config(
            preset="tiny",
            model=_TINY_MODEL,
            data=DataConfig(patch_size=(32, 32, 32)),
            train=TrainConfig(max_iterations=40, lr=1e-3, log_every=5, checkpoint_every=20, bn_recompute_batches=25),
        )
    if name == "cpu":
        return Config(
            preset="cpu",
            model=_TINY_MODEL,
            # the paper's ramp reaches full weight at 40 % of its schedule (6,000 of 15,000): here at 360 of 900
            loss=LossConfig(rampup_every=9),
            data=DataConfig(patch_size=(64, 64, 32), resample=2),
            train=TrainConfig(
                max_iterations=CPU_ITERATIONS, lr=1e-3, channels_last=True, log_every=10, checkpoint_every=100,
                bn_recompute_batches=25,
            ),
        )
    if name == "vnet":
        return Config(
            preset="vnet",
            model=ModelConfig(arch="vnet"),
            loss=LossConfig(seg_loss="uamt", lambda_qd=0.0, lambda_ds=0.0, ablation="seg"),
            data=DataConfig(labeled_bs=4, unlabeled_bs=0, views=1),
            train=TrainConfig(
                max_iterations=6000, optimizer="sgd", lr=0.01, weight_decay=1e-4, lr_step=2500
            ),
        )
    raise ValueError(f"unknown preset {name!r}; choose one of {PRESETS}")
