"""Semi-supervised training: two views in one pass, resumable runs.

:func:`train` runs the objective of the book's method page for ``cfg.train.max_iterations`` steps: each step draws
``labeled_bs`` labeled + ``unlabeled_bs`` unlabeled cases (UA-MT's two-stream sampler),
augments them spatially once, forms a weak view (the crop) and a strong view (intensity-only
perturbation of the same crop; book: decisions page), forwards both in one batch and minimises
:func:`dkuxnet.losses.semi_supervised_loss`. The V-Net supervised baseline (preset ``vnet``: one
view, labeled only) and the ``seg`` ablation run through the same loop. The step itself lives in
:mod:`dkuxnet.engine` (``build_run`` / ``train_step``) so notebooks and the benchmark call the same
code.

Schedule **[decision]** (book: decisions page, "Optimisation"): AdamW, lr 1e-4, weight decay 0.01, constant learning
rate, 15,000 iterations, consistency weights ramped to full strength at iteration 6,000
(t = iteration // 150, T_r = 40). Why: AdamW at 1e-4 with torch's default decay and no schedule is
what the authors' official code uses; the paper states no iteration count, and 15k iterations with
the 6k ramp is the budget of the 15k-iteration LA baselines (MC-Net, SS-Net, CAML), so the
semi-supervised terms act at full weight for the last 60% of the run. ``vnet`` keeps its own
protocol recipe (SGD 0.01, ×0.1 every 2,500 iterations, 6,000 iterations; UA-MT's LA training scripts).

Run folder (``out_dir``):

* ``config.json`` — ``Config.to_dict()`` (written atomically at start);
* ``metrics.jsonl`` — one line every ``log_every`` iterations and at the end: iteration, lr, the
  window mean of each loss part, it/s, elapsed seconds, peak GiB (CUDA);
* ``last.pt`` — atomic checkpoint every ``checkpoint_every`` iterations and at the end (weights,
  optimiser, schedule, iteration, every RNG state, sampler state, config, provenance);
* ``summary.json`` — written at the end, also returned.

Precise BatchNorm statistics: with ``train.bn_recompute_batches = N > 0``, once the run reaches
``max_iterations`` (not after an interrupt) the BatchNorm running statistics are recomputed with the final
weights as the average over N weak-view training batches (:mod:`dkuxnet.precise_bn`, seed ``train.seed``)
and ``last.pt`` is saved again holding both sets: ``model`` with the training EMA statistics (a resume
continues exactly) and ``bn_recomputed`` with the recomputed ones and their record, which
``summary.json`` repeats under ``bn_stats``. This happens once per final iteration: training a finished run
again to the same ``max_iterations`` keeps the stored statistics; resuming it to a larger one drops them
and recomputes at the new end.

One run across several GPUs: ``torchrun --nproc_per_node=N -m dkuxnet train …`` (:mod:`dkuxnet.distributed`).
Every rank trains its share of each batch and computes what one process computes; rank 0 alone writes the
run folder (``config.json``, ``metrics.jsonl``, ``last.pt``, ``summary.json``) and shows progress, the others
take part in every log and checkpoint (they agree on the non-finite guard). A Ctrl-C is honoured at the next
log iteration, where the ranks agree on it. ``last.pt`` holds no rank-specific state: resume with any N.

Host syncs happen only at log and checkpoint iterations. A non-finite loss trips a device-side
flag; the next sync raises :class:`~dkuxnet.errors.NonFiniteLossError` and no checkpoint is ever
written after a non-finite step, so ``last.pt`` stays the last good one. The first Ctrl-C finishes
the current step, saves ``last.pt`` at that iteration and re-raises ``KeyboardInterrupt``; a second
Ctrl-C stops at once (the last periodic checkpoint is kept).
"""

from __future__ import annotations

import datetime
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dkuxnet.checkpoint import load_checkpoint, save_checkpoint
from dkuxnet.config import Config, get_preset
from dkuxnet.data import VolumeBank, make_split
from dkuxnet.distributed import any_rank, is_main, setup
from dkuxnet.engine import (
    Run, build_run, configure_backends, device_name, effective_unlabeled_bs, first_bad_iteration, git_commit,
    load_run_state, lr_at, read_window, resolve_device, run_state, schedule_state, train_step,
    write_json,
)
from dkuxnet.errors import CheckpointError, NonFiniteLossError
from dkuxnet.fileio import write_text_atomic
from dkuxnet.grid.identity import host, job_id
from dkuxnet.precise_bn import recomputed_bn_state

RESUMABLE_CHANGES = frozenset({"train.max_iterations"})  # the only field a resume may change


def load_training_data(
    cfg: Config, data_dir: Path, device: torch.device, progress: bool = True
) -> tuple[VolumeBank, int]:
    """Labeled (first) and unlabeled cases of ``make_split(data_dir, …)`` resident on ``device``.

    Unlabeled cases are not loaded when the run uses none (``seg`` ablation, ``unlabeled_bs == 0``); with
    ``data.resample`` > 1 the bank holds the downsampled volumes only.
    Returns the bank and the number of labeled cases at its start.
    """
    split = make_split(Path(data_dir), label_ratio=cfg.data.label_ratio, labeled_num=cfg.data.labeled_num)
    ids = split.labeled + (split.unlabeled if effective_unlabeled_bs(cfg) > 0 else [])
    bank = VolumeBank.load(Path(data_dir), ids, progress=progress, resample=cfg.data.resample)
    return bank.to(device), len(split.labeled)


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields whose values differ between two ``Config.to_dict()`` trees."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


def schedule_label(cfg: Config) -> str:
    """``"full"`` when ``max_iterations`` is the preset's default, else how it differs."""
    default = get_preset(cfg.preset).train.max_iterations
    n = cfg.train.max_iterations
    if n == default:
        return "full"
    return f"{'shortened' if n < default else 'extended'}: {n} of {default} iterations"


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _check_resumable(ckpt: dict[str, Any], cfg: Config, path: Path) -> None:
    stored = Config.from_dict(ckpt["config"]).to_dict()  # fields added since then take their defaults
    changed = [f for f in config_diff(stored, cfg.to_dict()) if f not in RESUMABLE_CHANGES]
    if changed:
        old, new = _flat(stored), _flat(cfg.to_dict())
        details = ", ".join(f"{f} (checkpoint {old.get(f)!r}, now {new.get(f)!r})" for f in changed)
        raise CheckpointError(
            f"cannot resume {path}: the config differs from the checkpoint's in {details}; only "
            f"{', '.join(sorted(RESUMABLE_CHANGES))} may change on resume"
        )
    if int(ckpt["iteration"]) > cfg.train.max_iterations:
        raise ValueError(
            f"train.max_iterations ({cfg.train.max_iterations}) is below the iteration of {path} "
            f"({ckpt['iteration']})"
        )


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_metrics(path: Path, iteration: int) -> None:
    """Drop lines logged after ``iteration`` (they belong to steps the resumed run repeats)."""
    kept = [r for r in _read_metrics(path) if r["iteration"] <= iteration]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


class _GracefulInterrupt:
    """First SIGINT: set ``requested`` (the loop checkpoints and stops); second: KeyboardInterrupt now."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _GracefulInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class _Session:
    """Bookkeeping of one ``train`` call: timing, metrics file, checkpoints, the finite guard."""

    def __init__(self, run: Run, out_dir: Path, prior_wall: float, started: str, last_saved: int | None,
                 bn_recomputed: dict[str, Any] | None = None) -> None:
        self.run, self.out_dir = run, out_dir
        self.bn_recomputed = bn_recomputed  # the checkpoint's ``bn_recomputed`` entry, valid at max_iterations
        self.ckpt_path, self.metrics_path = out_dir / "last.pt", out_dir / "metrics.jsonl"
        self.prior_wall, self.started, self.last_saved = prior_wall, started, last_saved
        self.t0 = self.t_window = time.perf_counter()
        self.start_iteration = self.window_start = run.iteration
        self.commit = git_commit()
        self.main = is_main()  # rank 0 (or the one process) writes the run folder

    def wall(self) -> float:
        return self.prior_wall + time.perf_counter() - self.t0

    def _raise_non_finite(self, first_bad: int) -> None:
        kept = (f"{self.ckpt_path} still holds the last good checkpoint (iteration {self.last_saved})"
                if self.last_saved is not None else "no checkpoint was written")
        raise NonFiniteLossError(
            f"the loss became non-finite at iteration {first_bad} (in the window of iterations "
            f"{self.window_start + 1}–{self.run.iteration}); training stopped, {kept}. Try a lower "
            f"train.lr or train.precision=fp32."
        )

    def log(self) -> dict[str, Any]:
        """One sync: append a metrics line, raise if a non-finite loss occurred."""
        run = self.run
        steps = run.window
        means, first_bad = read_window(run)  # the host sync
        now = time.perf_counter()
        row: dict[str, Any] = {"iteration": run.iteration, "lr": lr_at(run.cfg.train, run.iteration - 1)}
        row.update({k: (v if v == v and abs(v) != float("inf") else None) for k, v in means.items()})
        row["it_s"] = steps / max(now - self.t_window, 1e-9)
        row["elapsed_s"] = self.wall()
        if run.device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(run.device) / 2**30
        if self.main:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if first_bad >= 0:
            self._raise_non_finite(first_bad)
        self.t_window, self.window_start = now, run.iteration
        return row

    def save(self) -> None:
        """Atomic ``last.pt``, only if every loss so far was finite (one sync)."""
        first_bad = first_bad_iteration(self.run)
        if first_bad >= 0:
            self._raise_non_finite(first_bad)
        self.last_saved = self.run.iteration
        if not self.main:
            return
        cfg = self.run.cfg
        state = run_state(self.run)
        state["provenance"] = {
            "commit": self.commit, "device": device_name(self.run.device), "torch": torch.__version__,
            "date": _now(), "started": self.started, "wall_s": self.wall(), "seed": cfg.train.seed,
            "preset": cfg.preset, "schedule": schedule_state(cfg.train, self.run.iteration),
            "host": host(), "job_id": job_id(), "world_size": 1 if self.run.shard is None else self.run.shard.world,
        }
        if self.bn_recomputed is not None:
            state["bn_recomputed"] = self.bn_recomputed
        save_checkpoint(self.ckpt_path, state)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def train(
    cfg: Config,
    data_dir: Path,
    out_dir: Path,
    device: str | torch.device | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one run of ``cfg`` on the LA-layout folder ``data_dir``, writing into ``out_dir``.

    Args:
        cfg: the run's configuration (``train.max_iterations`` may differ from a resumed checkpoint's).
        data_dir: LA-layout data folder (``make_split`` picks labeled / unlabeled cases).
        out_dir: run folder; created if missing. Holding a ``last.pt`` requires ``resume=True``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``… (default: cuda if available). Under torchrun
            (its environment variables set, more than one rank) ``"cuda"`` means ``cuda:LOCAL_RANK``.
        resume: continue exactly from ``out_dir/last.pt`` (same data stream and random streams).
        progress: show a tqdm bar (rank 0 only).

    Returns:
        The summary also written to ``out_dir/summary.json`` (by rank 0; every rank returns it).

    Raises:
        CheckpointError: ``last.pt`` exists without ``resume``, is missing / invalid with ``resume``,
            or the config differs from the checkpoint's in a field other than ``train.max_iterations``.
        NonFiniteLossError: the loss became NaN/inf (``last.pt`` keeps the last good state).
    """
    device, launch = setup(resolve_device(device))  # joins the torchrun process group, if any
    main = is_main()
    progress = progress and main
    out_dir = Path(out_dir)
    ckpt_path = out_dir / "last.pt"
    if cfg.train.max_iterations < 1 or cfg.train.log_every < 1 or cfg.train.checkpoint_every < 1:
        raise ValueError("train.max_iterations, train.log_every and train.checkpoint_every must be >= 1")
    ckpt = None
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        _check_resumable(ckpt, cfg, ckpt_path)
    elif ckpt_path.exists():
        raise CheckpointError(
            f"{ckpt_path} already exists: pass resume=True (CLI: --resume) to continue that run, "
            f"or choose another output folder"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    if main:
        write_json(out_dir / "config.json", cfg.to_dict())
    configure_backends(cfg.train, device)
    bank, n_labeled = load_training_data(cfg, data_dir, device, progress)
    run = build_run(cfg, bank, n_labeled, device, launch)
    metrics_path = out_dir / "metrics.jsonl"
    if ckpt is not None:
        load_run_state(run, ckpt)
        if main:
            _truncate_metrics(metrics_path, run.iteration)
        prov = ckpt.get("provenance", {})
        session = _Session(run, out_dir, float(prov.get("wall_s", 0.0)), prov.get("started", _now()), run.iteration,
                           _carried_bn_stats(ckpt, cfg))
    else:
        if main:
            metrics_path.write_text("")
        session = _Session(run, out_dir, 0.0, _now(), None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _loop(session, progress)
    _recompute_bn_once(session)
    return _write_summary(session)


def _carried_bn_stats(ckpt: dict[str, Any], cfg: Config) -> dict[str, Any] | None:
    """The checkpoint's recomputed BatchNorm statistics if they belong to the end of this run, else None.

    They were computed at the checkpoint's iteration, the end of the run that wrote it; a resume to a
    larger ``max_iterations`` makes them stale.
    """
    return ckpt.get("bn_recomputed") if int(ckpt["iteration"]) == cfg.train.max_iterations else None


def _recompute_bn_once(session: _Session) -> None:
    """Recompute the BatchNorm statistics of the finished run and save ``last.pt`` with them, unless it has them."""
    run = session.run
    batches = run.cfg.train.bn_recompute_batches
    if batches > 0 and session.bn_recomputed is None:
        session.bn_recomputed = recomputed_bn_state(run, batches, run.cfg.train.seed)
        session.save()


def _loop(session: _Session, progress: bool) -> None:
    run, tcfg = session.run, session.run.cfg.train
    total = tcfg.max_iterations
    with tqdm(total=total, initial=run.iteration, disable=not progress, unit="it", dynamic_ncols=True) as bar, \
            _GracefulInterrupt() as interrupt:
        while run.iteration < total:
            train_step(run)
            bar.update(1)
            it = run.iteration
            logged = it % tcfg.log_every == 0 or it == total
            if logged:
                row = session.log()
                bar.set_postfix(loss=f"{row['loss']:.4f}", it_s=f"{row['it_s']:.2f}")
            if _interrupted(run, interrupt, logged):
                session.save()
                raise KeyboardInterrupt
            if it % tcfg.checkpoint_every == 0 or it == total:
                session.save()


def _interrupted(run: Run, interrupt: _GracefulInterrupt, logged: bool) -> bool:
    """Whether to stop after this step: at once in one process; under torchrun only at a log iteration,
    when some rank was interrupted (all ranks agree there, so they stop after the same step)."""
    if run.shard is None:
        return interrupt.requested
    return logged and any_rank(interrupt.requested, run.device)


def _write_summary(session: _Session) -> dict[str, Any]:
    run, cfg = session.run, session.run.cfg
    steps = run.iteration - session.start_iteration
    loop_s = time.perf_counter() - session.t0
    rows = _read_metrics(session.metrics_path)
    timing = ("iteration", "it_s", "elapsed_s", "peak_gib")
    final = {k: v for k, v in rows[-1].items() if k not in timing} if rows else {}
    summary = {
        "iterations": run.iteration,
        "schedule": schedule_label(cfg),
        "wall_s": session.wall(),
        "ms_per_step": 1000 * loop_s / steps if steps else None,
        "final": final,
        "device": device_name(run.device),
        "world_size": 1 if run.shard is None else run.shard.world,  # processes (torchrun ranks), one device each
        "peak_gib": torch.cuda.max_memory_allocated(run.device) / 2**30 if run.device.type == "cuda" else None,
        "torch": torch.__version__,
        "commit": session.commit,
        "date": _now(),
        "out_dir": str(session.out_dir),
        "checkpoint": str(session.ckpt_path),
        "bn_stats": {"recomputed": session.bn_recomputed["record"] if session.bn_recomputed else None},
        "config": cfg.to_dict(),
    }
    if session.main:
        write_json(session.out_dir / "summary.json", summary)
    return summary
