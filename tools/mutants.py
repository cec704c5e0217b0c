"""Mutation testing of the core modules on a reproducible sample (``make mutants``; not part of CI).

1. mutmut (configured in ``[tool.mutmut]`` of pyproject.toml) writes every mutant of the modules in
   ``only_mutate`` into ``mutants/``.
2. The sample: for each module, the mutant names sorted, then ``random.Random(f"{seed}:{module}").sample``
   of ``--per-module`` of them (all when fewer). The same seed and sources give the same sample.
3. ``mutmut run <sampled names>`` runs, for each mutant, the selected tests that execute the mutated function.
4. The score per module (killed / tested) and every survivor's diff go to stdout and ``mutants/report.md``.

Usage: ``python tools/mutants.py [--per-module K] [--seed S] [--max-children N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

MUTANTS = Path("mutants")


def generate() -> None:
    """Write all mutants of the configured modules into mutants/ (mutmut's own generation step)."""
    from mutmut.__main__ import copy_also_copy_files, copy_src_dir, create_mutants, setup_source_paths

    MUTANTS.mkdir(exist_ok=True)
    copy_src_dir()
    copy_also_copy_files()
    setup_source_paths()
    create_mutants(os.cpu_count() or 2)


def mutant_names() -> dict[str, list[str]]:
    """{module path: sorted mutant names} from mutmut's per-file metadata."""
    from mutmut.configuration import config

    names = {}
    for module in config().only_mutate:
        meta = MUTANTS / f"{module}.meta"
        names[module] = sorted(json.loads(meta.read_text())["exit_code_by_key"])
    return names


def sample(names: dict[str, list[str]], per_module: int, seed: int) -> dict[str, list[str]]:
    """Seeded uniform sample without replacement of ``per_module`` names of each module."""
    return {m: sorted(random.Random(f"{seed}:{m}").sample(n, min(per_module, len(n)))) for m, n in names.items()}


def statuses(module: str) -> dict[str, str]:
    """{mutant name: mutmut status} of one module after a run."""
    from mutmut.stats import status_by_exit_code

    codes = json.loads((MUTANTS / f"{module}.meta").read_text())["exit_code_by_key"]
    return {k: status_by_exit_code[v] for k, v in codes.items()}


def report(chosen: dict[str, list[str]], wall_s: float, per_module: int, seed: int) -> tuple[str, int, int]:
    """Markdown report: score per module and overall, then the diff of every mutant that was not killed."""
    lines = [
        f"# Mutation testing: {per_module} sampled mutants per module, seed {seed}, {wall_s / 60:.1f} min", "",
        "| module | killed | tested | score |", "| --- | ---: | ---: | ---: |",
    ]
    survivors, killed_all, tested_all = [], 0, 0
    for module, names in chosen.items():
        status = statuses(module)
        killed = sum(status[n] == "killed" for n in names)
        survivors += [(n, status[n]) for n in names if status[n] != "killed"]
        killed_all, tested_all = killed_all + killed, tested_all + len(names)
        lines.append(f"| {module} | {killed} | {len(names)} | {100 * killed / len(names):.0f} % |")
    lines += [f"| **all** | **{killed_all}** | **{tested_all}** | **{100 * killed_all / tested_all:.1f} %** |", ""]
    for name, state in survivors:
        diff = subprocess.run([sys.executable, "-m", "mutmut", "show", name], capture_output=True, text=True).stdout
        lines += [f"## {name}: {state}", "", "```diff", diff.strip(), "```", ""]
    return "\n".join(lines), killed_all, tested_all


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-module", type=int, default=10, help="mutants sampled per module (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2, help="parallel mutant runs")
    args = parser.parse_args()
    start = time.perf_counter()
    generate()
    chosen = sample(mutant_names(), args.per_module, args.seed)
    names = [n for group in chosen.values() for n in group]
    run = [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children)]
    subprocess.run(run + names, check=True)
    text, killed, tested = report(chosen, time.perf_counter() - start, args.per_module, args.seed)
    (MUTANTS / "report.md").write_text(text + "\n")
    print(text)
    print(f"mutants: {killed}/{tested} killed; report in {MUTANTS / 'report.md'}")


if __name__ == "__main__":
    main()
