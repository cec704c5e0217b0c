"""Command line: ``python -m dkuxnet …`` (also installed as ``dkuxnet``).

Each sub-command is a thin wrapper around one library function, imported lazily so that
``dkuxnet --help`` and the data commands start without importing torch. Library errors that are
the user's fault (``ValueError``, ``FileNotFoundError``, ``dkuxnet.data.la.DataError``) are printed
as one line ``error: …`` with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from dkuxnet.config import ABLATIONS, PRESETS
from dkuxnet.reproduce import PROFILES


def _parse_set(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects section.field=value, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _cmd_data_download(a: argparse.Namespace) -> int:
    from dkuxnet.data.download import DEFAULT_BASE_URL, download_la

    download_la(Path(a.dest), base_url=a.base_url or DEFAULT_BASE_URL, progress=not a.quiet)
    return 0


def _cmd_data_check(a: argparse.Namespace) -> int:
    from dkuxnet.data.la import check_dataset

    report = check_dataset(Path(a.data_dir), progress=not a.quiet)
    print(report.summary())
    return 0 if report.ok else 1


def _cmd_data_phantom(a: argparse.Namespace) -> int:
    from dkuxnet.data.phantom import make_phantom

    make_phantom(Path(a.dest), cases=a.cases, seed=a.seed)
    print(f"wrote a {a.cases}-case synthetic phantom data set to {a.dest}")
    return 0


def _cmd_model_info(a: argparse.Namespace) -> int:
    from dkuxnet.models import model_info

    print(json.dumps(model_info(a.preset)))
    return 0


def _train_config(a: argparse.Namespace):
    from dkuxnet.config import get_preset

    changes: dict[str, Any] = {}
    if a.label_ratio is not None:
        changes["data.label_ratio"] = a.label_ratio
    if a.labeled_num is not None:
        changes["data.labeled_num"] = a.labeled_num
    if a.max_iterations is not None:
        changes["train.max_iterations"] = a.max_iterations
    if a.seed is not None:
        changes["train.seed"] = a.seed
    if a.ablation is not None:
        changes["loss.ablation"] = a.ablation
    changes.update(_parse_set(a.set))
    return get_preset(a.preset).override(**changes)


def _cmd_train(a: argparse.Namespace) -> int:
    from dkuxnet.distributed import is_main, teardown
    from dkuxnet.train import train

    cfg = _train_config(a)
    if a.no_sync_batchnorm:
        cfg = cfg.override(**{"train.sync_batchnorm": False})
    try:
        summary = train(cfg, data_dir=Path(a.data_dir), out_dir=Path(a.out), device=a.device, resume=a.resume,
                        progress=not a.quiet)
        if is_main():  # under torchrun: rank 0 prints
            print(json.dumps(summary))
    finally:
        teardown()
    return 0


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from dkuxnet.evaluate import evaluate_checkpoint

    summary = evaluate_checkpoint(
        Path(a.checkpoint), data_dir=Path(a.data_dir), out_dir=Path(a.out), mode=a.mode,
        device=a.device, lcc=a.lcc, progress=not a.quiet, bn_stats=a.bn_stats,
    )
    print(json.dumps(summary))
    return 0


def _cmd_bench(a: argparse.Namespace) -> int:
    from dkuxnet.perf.bench import CUDNN_BENCHMARK_LIMIT, default_out, run_bench
    from dkuxnet.perf.report import format_summary

    out = Path(a.out) if a.out else default_out(a.device)
    limit = CUDNN_BENCHMARK_LIMIT if a.cudnn_benchmark_limit is None else a.cudnn_benchmark_limit
    result = run_bench(
        presets=a.preset, device=a.device, out=out, data_dir=Path(a.data_dir) if a.data_dir else None,
        steps=a.steps, warmup=a.warmup, overrides=_parse_set(a.set) or None, variants=a.variants,
        profile=a.profile, row_seconds=a.row_seconds, cudnn_benchmark_limit=limit,
        log=lambda line: print(line, flush=True), cpu_track=a.cpu_track,
    )
    print(f"\n{format_summary(result)}\n\nwrote {out}")
    return 0


def _cmd_publish(a: argparse.Namespace) -> int:
    from dkuxnet.publish import publish_run

    result = publish_run(Path(a.run_dir), Path(a.data_dir), Path(a.results), a.kind, name=a.name, model=a.model,
                         cases=a.cases, notes=a.notes, progress=not a.quiet)
    dice = result["metrics"]["dice"]["mean"]
    print(f"published {result['name']}: Dice {100 * dice:.2f} % ({result.get('bn_stats', 'ema')} BatchNorm statistics) "
          f"-> {Path(a.results) / a.kind / (result['name'] + '.json')}")
    return 0


def _cmd_perf_report(a: argparse.Namespace) -> int:
    from dkuxnet.perf.report import perf_report
    from dkuxnet.errors import UserError
    from dkuxnet.fileio import write_text_atomic

    folder = Path(a.results)
    if not folder.is_dir():
        raise UserError(f"--results: {folder} is not a folder")
    text = perf_report(folder)
    if a.out:
        write_text_atomic(Path(a.out), text)
    else:
        print(text)
    return 0


def _cmd_reproduce(a: argparse.Namespace) -> int:
    from dkuxnet.grid.launch import grid_states
    from dkuxnet.grid.slurm import SlurmOptions, parse_options, slurm_minutes
    from dkuxnet.grid.state import status_table
    from dkuxnet.reproduce import grid_spec, plan_cells, reproduce

    data_dir, runs_dir = Path(a.data_dir) if a.data_dir else None, Path(a.runs_dir) if a.runs_dir else None
    results_dir = Path(a.results_dir) if a.results_dir else None
    spec = grid_spec(a.profile, data_dir, runs_dir, results_dir, a.max_iterations, a.device, a.eval_mode)
    cells = plan_cells(a.profile, a.ratios, a.seeds, a.presets, a.ablations)
    if a.status:
        print(status_table(grid_states(cells, spec)))
        return 0
    slurm = None
    if a.launcher != "slurm" and (a.partition or a.time or a.slurm_opt):
        raise ValueError("--partition, --time and --slurm-opt are for --launcher slurm")
    if a.launcher == "slurm":
        if not a.time:
            raise ValueError("--launcher slurm needs --time, the time limit of one cell's job (e.g. 8:00:00)")
        slurm = SlurmOptions(slurm_minutes(a.time), a.partition, a.gpus_per_node, parse_options(a.slurm_opt))
    records = reproduce(
        profile=a.profile, ratios=a.ratios, seeds=a.seeds, data_dir=data_dir, runs_dir=runs_dir,
        max_iterations=a.max_iterations, device=a.device, presets=a.presets, ablations=a.ablations,
        eval_mode=a.eval_mode, results_dir=results_dir, launcher=a.launcher, gpus=a.gpus, jobs=a.jobs, slurm=slurm,
    )
    print(status_table(grid_states(cells, spec)))
    failed = [r for r in records if r["status"] in ("failed", "locked")]
    for r in failed:
        print(f"error: {r['cell']}: {r['error']} (log: {r.get('log') or r.get('job_log') or r['run_dir']})",
              file=sys.stderr)
    if a.launcher == "slurm":
        print(f"results: {spec.results_dir}; progress: the same command with --status")
    return 1 if failed else 0


def _cmd_check_gpu(a: argparse.Namespace) -> int:
    from dkuxnet.perf.gpucheck import run_check_gpu

    report = run_check_gpu(
        Path(a.out), work_dir=Path(a.work_dir) if a.work_dir else None,
        data_dir=Path(a.data_dir) if a.data_dir else None, device=a.device, preset=a.preset, profile=a.profile,
        iterations=a.iterations, label_ratio=a.label_ratio, bench_steps=a.bench_steps, loop_cases=a.loop_cases,
        rehearsal=a.rehearsal, progress=not a.quiet,
    )
    return 0 if report["ok"] else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dkuxnet", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="download, check or synthesise LA-layout data").add_subparsers(
        dest="data_command", required=True
    )
    d = data.add_parser("download", help="fetch the 100 LA h5 files and both lists, verified by SHA-256")
    d.add_argument("--dest", required=True, help="folder to create or complete")
    d.add_argument("--base-url", default=None, help="mirror of UA-MT's data/ folder (default: pinned GitHub raw URL)")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=_cmd_data_download)
    d = data.add_parser("check", help="validate every case and both lists of a data folder")
    d.add_argument("--data-dir", required=True)
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=_cmd_data_check)
    d = data.add_parser("phantom", help="write the synthetic LA-like phantom data set")
    d.add_argument("--dest", required=True)
    d.add_argument("--cases", type=int, default=20)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_cmd_data_phantom)

    m = sub.add_parser("model-info", help="parameter counts of a preset (meta device, instant)")
    m.add_argument("--preset", choices=PRESETS, default="paper")
    m.set_defaults(func=_cmd_model_info)

    t = sub.add_parser(
        "train", help="train one run (resumable)",
        description="Train one run. Across N GPUs of one machine: torchrun --nproc_per_node=N -m dkuxnet train … "
        "(each rank trains its share of every batch; rank 0 writes the run folder).",
    )
    t.add_argument("--preset", choices=PRESETS, default="paper")
    t.add_argument("--label-ratio", type=float, default=None)
    t.add_argument("--labeled-num", type=int, default=None)
    t.add_argument("--data-dir", required=True)
    t.add_argument("--out", required=True, help="run folder (checkpoints, metrics.jsonl, config.json)")
    t.add_argument("--max-iterations", type=int, default=None)
    t.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1 … (default: cuda if available; under torchrun each rank takes cuda:LOCAL_RANK)")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    t.add_argument("--ablation", choices=ABLATIONS, default=None)
    t.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="any config field, value parsed as JSON when possible")
    t.add_argument("--no-sync-batchnorm", action="store_true",
                   help="under torchrun: per-rank BatchNorm statistics, as DataParallel training (train.sync_batchnorm=false)")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("evaluate", help="evaluate a checkpoint on test.list")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--data-dir", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--mode", choices=("protocol", "fast"), default="protocol")
    e.add_argument("--device", default=None)
    e.add_argument("--lcc", action="store_true", help="also report largest-connected-component results")
    e.add_argument("--quiet", action="store_true")
    e.add_argument("--bn-stats", choices=("auto", "ema", "recomputed"), default="auto",
                   help="BatchNorm statistics: recomputed after training when present (auto), or the training EMA")
    e.set_defaults(func=_cmd_evaluate)

    b = sub.add_parser("bench", help="time the training step, forward+backward and protocol inference")
    b.add_argument("--preset", nargs="+", default=None,
                   help="instead of the default rows (paper on CUDA, tiny on the CPU): one row per preset, "
                        "its training step and protocol inference")
    b.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                   help="opt-in rows (dkuxnet.perf.bench.VARIANTS): channels-last, depthwise-channels-last, batch-1+1, "
                        "compile, fp32, official")
    b.add_argument("--cpu-track", action="store_true",
                   help="the cpu preset at its own patch: fast vs native depthwise conv, layout, V-Net, inference")
    b.add_argument("--profile", nargs="?", const=True, default=False, metavar="ROW",
                   help="also profile one step (torch.profiler): of the first training-step row, or of ROW")
    b.add_argument("--device", default=None)
    b.add_argument("--out", default=None, help="JSON file to write (default: bench_<device>.json here)")
    b.add_argument("--data-dir", default=None, help="LA folder: its cases instead of synthetic volumes")
    b.add_argument("--steps", type=int, default=None, help="most timed steps per row (default 5 on CUDA, 1 on CPU)")
    b.add_argument("--warmup", type=int, default=None, help="untimed steps per row (default 2 on CUDA, 1 on CPU)")
    b.add_argument("--row-seconds", type=float, default=None,
                   help="seconds of timed steps per row before it stops early (default 5 on CUDA, 1 on CPU)")
    b.add_argument("--cudnn-benchmark-limit", type=int, default=None,
                   help="torch.backends.cudnn.benchmark_limit during the bench (default 1; torch's is 10, 0 = all)")
    b.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="config change for every row, value parsed as JSON when possible")
    b.set_defaults(func=_cmd_bench)

    pr = sub.add_parser("perf-report", help="markdown tables of results/perf (benchmarks, memory estimate)")
    pr.add_argument("--results", default="results/perf", help="folder with bench_*.json and memprobe*.json")
    pr.add_argument("--out", default=None, help="markdown file to write (default: print)")
    pr.set_defaults(func=_cmd_perf_report)

    pub = sub.add_parser("publish", help="evaluate a finished run and write its result and files into results/")
    pub.add_argument("run_dir", help="run folder with last.pt, metrics.jsonl and summary.json")
    pub.add_argument("--data-dir", required=True, help="the LA folder the run was trained on")
    pub.add_argument("--results", default="results", help="the results folder (default: ./results)")
    pub.add_argument("--kind", required=True, help="sub-folder of the result file, e.g. cpu")
    pub.add_argument("--name", default=None, help="run name (default: the run folder's name)")
    pub.add_argument("--model", action="store_true", help="also commit the model (no optimiser state)")
    pub.add_argument("--cases", type=int, default=0, help="export the first N test cases for the book (needs --model)")
    pub.add_argument("--notes", default=None)
    pub.add_argument("--quiet", action="store_true")
    pub.set_defaults(func=_cmd_publish)

    r = sub.add_parser(
        "reproduce", help="run the notebooks with papermill for each cell (preset, ablation, label ratio, seed)",
        description="Execute 03_train and 04_evaluate with papermill for every cell of the grid presets x "
        "ablations x ratios x seeds, each into RUNS_DIR/<cell>/ (<cell>: preset-ablation-"
        "r<ratio>-s<seed>, e.g. cpu-all-r0.1-s1337): in this process one after the other (--launcher inline), "
        "on this machine several at once (--launcher local), or as Slurm jobs (--launcher slurm). Cells that "
        "finished with the same configuration are skipped, interrupted ones resume their last.pt; each finished "
        "cell's result goes to RESULTS_DIR/<profile>/<cell>.json. Write the records "
        "(with each cell's wall time) to RUNS_DIR/summary.json and print the grid's state. With --profile cpu and "
        "none of --presets, --ablations, --ratios, --seeds: the cpu profile's three runs (cpu preset with all "
        "losses, its supervised ablation seg, the V-Net), label ratio 0.1, seed 1337. Exit status 1 when a cell "
        "failed.",
    )
    r.add_argument("--profile", choices=PROFILES, default="smoke")
    r.add_argument("--presets", choices=PRESETS, nargs="+", default=None, metavar="PRESET",
                   help=f"presets among {', '.join(PRESETS)} (default: the profile's preset)")
    r.add_argument("--ablations", choices=ABLATIONS, nargs="+", default=None, metavar="ABLATION",
                   help=f"loss ablations among {', '.join(ABLATIONS)} (default: each preset's own)")
    r.add_argument("--ratios", type=float, nargs="+", default=None, help="default: 0.05 0.1 0.2 (cpu: 0.1)")
    r.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 1337")
    r.add_argument("--data-dir", default=None)
    r.add_argument("--runs-dir", default=None, help="folder of the run folders and summary.json (default: runs/PROFILE)")
    r.add_argument("--max-iterations", type=int, default=None)
    r.add_argument("--device", default=None)
    r.add_argument("--eval-mode", choices=("protocol", "fast"), default="protocol",
                   help="04_evaluate's mode: protocol (the numbers to report, default) or fast (diagnostic)")
    r.add_argument("--results-dir", default=None,
                   help="where finished cells' results go: RESULTS_DIR/<profile>/<cell>.json "
                   "(default: RUNS_DIR/results)")
    r.add_argument("--status", action="store_true",
                   help="print the grid's state (done / running / failed / pending, Dice when done) and run nothing")
    r.add_argument("--launcher", choices=("inline", "local", "slurm"), default="inline",
                   help="inline: here, one cell after the other (default); local: submitit on this machine; "
                   "slurm: one Slurm job per cell (needs submitit: pip install 'dkuxnet[cluster]')")
    r.add_argument("--gpus", type=int, default=0, metavar="N",
                   help="local: N cells at once, one GPU each (CUDA_VISIBLE_DEVICES per job)")
    r.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="local without --gpus: N CPU cells at once, the cores split between them (default 1: "
                   "one cell has the whole machine)")
    r.add_argument("--partition", default=None, help="slurm: the partition (default: the cluster's)")
    r.add_argument("--time", default=None, metavar="LIMIT",
                   help="slurm: time limit of one cell's job, as sbatch takes it (e.g. 8:00:00 or 1-00:00:00)")
    r.add_argument("--gpus-per-node", type=int, default=1, metavar="N", help="slurm: GPUs per job (default 1; 0: none)")
    r.add_argument("--slurm-opt", action="append", default=[], metavar="NAME=VALUE",
                   help="slurm: any further sbatch option, repeatable (e.g. --slurm-opt account=lab --slurm-opt "
                   "cpus-per-task=8)")
    r.set_defaults(func=_cmd_reproduce)

    g = sub.add_parser(
        "check-gpu", help="check this machine's GPU: versions, correctness, speed, a short run (a few minutes)",
        description="Check that DKUXNet runs correctly and how fast on this machine's GPU (a Colab runtime, a "
        "workstation, a cluster node): environment; the tiny preset's train-mode step in fp32 against CPU float64 "
        "(replayed kMaX assignments); activation checkpointing with the replay; bf16 autocast; the optimiser; "
        "host syncs in the training step; what the card trains (the preset or profile, else the smaller "
        "profiles) and how fast; with --data-dir a short training run, the protocol evaluation with recomputed "
        "BatchNorm statistics and the batched-vs-loop prediction check. Writes one JSON report and prints a "
        "table and a verdict; exit status 1 when a stage failed. Takes a few minutes on a GPU.",
    )
    g.add_argument("--data-dir", default=None, metavar="DIR",
                   help="LA folder: adds the training, evaluation and loop-check stages")
    g.add_argument("--out", default="check-gpu.json", metavar="FILE",
                   help="JSON report to write (default: %(default)s)")
    g.add_argument("--device", default=None, help="cuda, cuda:1 … (default: cuda; cpu only with --rehearsal)")
    g.add_argument("--preset", choices=PRESETS, default=None,
                   help="preset to benchmark and train (default: paper; tiny with --rehearsal)")
    g.add_argument("--profile", choices=PROFILES, default=None,
                   help="instead of --preset: a run profile's training step (colab: paper at batch 1+1 per view); "
                   "when it does not fit, the smaller profiles are tried")
    g.add_argument("--iterations", type=int, default=None, metavar="N",
                   help="training iterations (default: 100; 2 with --rehearsal)")
    g.add_argument("--label-ratio", type=float, default=0.1, metavar="R",
                   help="labeled fraction of train.list (default: 0.1)")
    g.add_argument("--bench-steps", type=int, default=None, metavar="N",
                   help="timed benchmark steps (default: the bench's)")
    g.add_argument("--loop-cases", type=int, default=None, metavar="N",
                   help="test volumes for the loop check (default: 1)")
    g.add_argument("--work-dir", default=None, metavar="DIR",
                   help="empty folder that keeps the run and evaluation (default: a temporary folder, removed)")
    g.add_argument("--rehearsal", action="store_true",
                   help="tiny preset, small inputs, synthetic data without --data-dir: checks the command in "
                   "under a minute, also on a CPU")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.set_defaults(func=_cmd_check_gpu)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    from dkuxnet.errors import UserError

    try:
        return func(args)
    except (UserError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
