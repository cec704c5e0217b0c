"""Tests of dkuxnet.reproduce: profile resolution, run planning, and one tiny papermill run (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dkuxnet.config import get_preset
from dkuxnet.errors import DataError
from dkuxnet.reproduce import (
    COLAB_CHANGES, CPU_CELLS, CPU_VNET_CHANGES, CPU_VNET_ITERATIONS, NOTEBOOKS, Cell, plan_cells, plan_runs,
    prepare_data, reproduce, resolve_profile, run_cell,
)

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"


def test_smoke_profile_defaults():
    s = resolve_profile("smoke", label_ratio=0.2, seed=3, device="cpu")
    assert s.smoke and s.preset == "tiny" and s.max_iterations == 40
    assert s.data_dir == Path("../_build/phantom")
    assert s.ablation == "all" and s.run_dir == Path("../_build/runs/smoke/tiny-all-r0.2-s3")
    assert "not comparable to the paper" in s.note and "CPU" in s.note


def test_paper_profile_defaults_use_the_preset_schedule():
    s = resolve_profile("paper", label_ratio=0.05, seed=1337, device="cuda")
    assert not s.smoke and s.preset == "paper" and s.data_dir == Path("../data/LA")
    assert s.max_iterations == 15000  # get_preset("paper").train.max_iterations
    assert s.run_dir == Path("../runs/paper/paper-all-r0.05-s1337")
    assert resolve_profile("paper", preset="vnet", device="cpu").max_iterations == 6000


def test_colab_profile_is_the_paper_profile_with_the_colab_changes(monkeypatch):
    import dkuxnet.reproduce

    monkeypatch.setattr(dkuxnet.reproduce, "_card", lambda: ("NVIDIA L4", True))  # a card it is meant for
    s = resolve_profile("colab", label_ratio=0.2, seed=7, device="cuda")
    assert not s.smoke and s.colab and s.preset == "paper" and s.data_dir == Path("../data/LA")
    assert s.max_iterations == 15000 and s.run_dir == Path("../runs/colab/paper-all-r0.2-s7")
    cfg, paper = s.config(), resolve_profile("paper", label_ratio=0.2, seed=7, device="cuda").config()
    assert (cfg.data.labeled_bs, cfg.data.unlabeled_bs, cfg.data.views) == (1, 1, 2)
    assert cfg.override(**{k: getattr(getattr(paper, k.split(".")[0]), k.split(".")[1]) for k, _ in COLAB_CHANGES}) == paper
    assert "colab profile" in s.note and "2 + 2" in s.note and s.result_note == s.note
    assert resolve_profile("paper", device="cuda").result_note is None
    for preset in ("vnet", "official"):  # other presets run as they are
        other = resolve_profile("colab", preset=preset, device="cuda")
        assert not other.colab and other.config().data == get_preset(preset).data and other.result_note is None
    assert plan_runs("colab", [0.1], [1])[0].parameters["profile"] == "colab"


def test_explicit_parameters_win():
    s = resolve_profile("smoke", data_dir="/d", preset="vnet", max_iterations=7, run_dir="/r", device="cpu")
    assert (s.data_dir, s.preset, s.max_iterations, s.run_dir) == (Path("/d"), "vnet", 7, Path("/r"))


def test_settings_config_overrides_the_preset():
    cfg = resolve_profile("smoke", label_ratio=0.05, seed=9, max_iterations=3, device="cpu").config(
        **{"loss.ablation": "seg"}
    )
    assert cfg.preset == "tiny" and cfg.data.label_ratio == 0.05
    assert cfg.train.max_iterations == 3 and cfg.train.seed == 9 and cfg.loss.ablation == "seg"
    assert cfg.data.patch_size == (32, 32, 32) and (cfg.data.labeled_bs, cfg.data.unlabeled_bs) == (1, 1)
    assert cfg.train.lr == 0.01
    paper_tiny = resolve_profile("paper", preset="tiny", device="cpu").config()
    assert paper_tiny.data == get_preset("tiny").data  # smoke changes only in the smoke profile


@pytest.mark.parametrize(
    "kwargs, match",
    [({"profile": "gpu"}, "profile"), ({"profile": "smoke", "label_ratio": 0.0}, "label_ratio"),
     ({"profile": "smoke", "max_iterations": -1}, "max_iterations"),
     ({"profile": "smoke", "ablation": "consistency"}, "ablation")],
)
def test_bad_parameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        resolve_profile(**kwargs)


def test_paper_profile_without_data_names_the_download_command(tmp_path):
    s = resolve_profile("paper", data_dir=str(tmp_path / "LA"), device="cpu")
    with pytest.raises(DataError, match="data download"):
        prepare_data(s)


def test_smoke_profile_writes_the_phantom_once(tmp_path):
    pytest.importorskip("dkuxnet.data.phantom", exc_type=ImportError)
    s = resolve_profile("smoke", data_dir=str(tmp_path / "ph"), device="cpu")
    root = prepare_data(s, cases=5)
    lines = (root / "train.list").read_text().split()
    assert len(lines) == 4
    stamp = (root / "train.list").stat().st_mtime_ns
    prepare_data(s, cases=5)
    assert (root / "train.list").stat().st_mtime_ns == stamp


def test_plan_runs_paths_and_parameters(tmp_path):
    runs = plan_runs("smoke", [0.05, 0.1], [1, 2], data_dir=tmp_path / "d", runs_dir=tmp_path / "runs",
                     max_iterations=2, device="cpu")
    assert [r.name for r in runs] == ["tiny-all-r0.05-s1", "tiny-all-r0.05-s2", "tiny-all-r0.1-s1", "tiny-all-r0.1-s2"]
    p = runs[2].parameters
    assert runs[2].cell == Cell("tiny", "all", 0.1, 1)
    assert runs[2].run_dir == (tmp_path / "runs" / "tiny-all-r0.1-s1").resolve()
    assert p == {"profile": "smoke", "preset": "tiny", "ablation": "all", "label_ratio": 0.1, "seed": 1,
                 "run_dir": str(runs[2].run_dir), "data_dir": str((tmp_path / "d").resolve()), "max_iterations": 2,
                 "device": "cpu"}
    assert plan_runs("paper", [0.2], [1])[0].parameters["data_dir"] == ""
    assert plan_runs("paper", [0.2], [1])[0].run_dir == Path("runs/paper/paper-all-r0.2-s1").resolve()
    with pytest.raises(ValueError, match="ratios"):
        plan_runs("smoke", [], [1])


def test_cell_names_and_validation():
    assert Cell("cpu", "all", 0.1, 1337).name == "cpu-all-r0.1-s1337"
    with pytest.raises(ValueError, match="ablation"):
        Cell("cpu", "", 0.1, 1337)
    with pytest.raises(ValueError, match="preset"):
        Cell("unet", "all", 0.1, 1337)


def test_cpu_profile_plans_its_three_cells():
    runs = plan_runs("cpu")
    assert [r.cell for r in runs] == list(CPU_CELLS)
    assert [r.name for r in runs] == ["cpu-all-r0.1-s1337", "cpu-seg-r0.1-s1337", "vnet-seg-r0.1-s1337"]
    assert runs[2].run_dir == Path("runs/cpu/vnet-seg-r0.1-s1337").resolve()
    # the configs the notebooks build from these parameters
    settings = [resolve_profile(**r.parameters) for r in runs]
    configs = [s.config() for s in settings]
    assert all(s.device == "cpu" and s.data_dir == Path("../data/LA") for s in settings)
    assert all(c.data.resample == 2 and c.data.label_ratio == 0.1 and c.train.seed == 1337 for c in configs)
    dk_all, dk_seg, vnet = configs
    assert (dk_all.preset, dk_all.loss.ablation, dk_all.train.max_iterations) == ("cpu", "all", 900)
    assert (dk_seg.preset, dk_seg.loss.ablation, dk_seg.train.max_iterations) == ("cpu", "seg", 900)
    assert dk_seg.override(**{"loss.ablation": "all"}) == dk_all
    assert (vnet.preset, vnet.loss.ablation, vnet.train.max_iterations) == ("vnet", "seg", CPU_VNET_ITERATIONS)
    assert CPU_VNET_ITERATIONS == 2200 and vnet.train.lr_step == 917
    assert vnet == get_preset("vnet").override(**dict(CPU_VNET_CHANGES), **{
        "train.max_iterations": 2200, "train.seed": 1337, "data.label_ratio": 0.1,
    })


def test_plan_cells_widens_the_grid():
    cells = plan_cells("paper", ratios=[0.1], presets=["paper", "vnet"], ablations=["seg", "all"])
    assert [c.name for c in cells] == [
        "paper-seg-r0.1-s1337", "paper-all-r0.1-s1337", "vnet-seg-r0.1-s1337", "vnet-all-r0.1-s1337",
    ]
    assert [c.name for c in plan_cells("paper", seeds=[1])] == [f"paper-all-r{r}-s1" for r in (0.05, 0.1, 0.2)]
    assert [c.name for c in plan_cells("cpu", ablations=["seg"])] == ["cpu-seg-r0.1-s1337"]
    assert [c.name for c in plan_cells("smoke", [0.1], [1])] == ["tiny-all-r0.1-s1"]
    with pytest.raises(ValueError, match="ablation"):
        plan_cells("paper", ablations=["none"])
    with pytest.raises(ValueError, match="presets"):
        plan_cells("paper", presets=[])


def test_train_notebook_declares_ablation():
    papermill = pytest.importorskip("papermill")
    declared = papermill.inspect_notebook(str(NOTEBOOKS_DIR / "03_train.ipynb"))
    assert declared["ablation"]["inferred_type_name"] == "str" and declared["ablation"]["default"] == '""'


def test_run_cell_records_wall_time_resumes_and_reports_failures(tmp_path, monkeypatch):
    papermill = pytest.importorskip("papermill")
    from papermill.exceptions import PapermillExecutionError

    calls: list[tuple[str, dict]] = []

    def fake_execute(source, output, parameters, **kwargs):
        calls.append((Path(source).stem, parameters))
        if parameters["ablation"] == "qdc":
            raise PapermillExecutionError(3, 3, "train(...)", "CheckpointError", "boom", [])
        (Path(parameters["run_dir"]) / "eval").mkdir(parents=True, exist_ok=True)
        (Path(parameters["run_dir"]) / "eval" / "summary.json").write_text('{"metrics": {"dice": {"mean": 0.5}}}')

    monkeypatch.setattr(papermill, "execute_notebook", fake_execute)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    cell = Cell("cpu", "seg", 0.1, 1337)
    (tmp_path / "cpu-seg-r0.1-s1337").mkdir()
    (tmp_path / "cpu-seg-r0.1-s1337" / "last.pt").write_bytes(b"x")
    record = run_cell(cell, "cpu", tmp_path, progress=False, eval_mode="fast")
    assert [name for name, _ in calls] == list(NOTEBOOKS)
    assert calls[0][1]["resume"] is True and "resume" not in calls[1][1]  # a cpu run resumes its last.pt
    assert calls[1][1]["mode"] == "fast" and "mode" not in calls[0][1]
    assert record["cell"] == "cpu-seg-r0.1-s1337" and record["status"] == "ok" and record["seconds"] >= 0
    assert record["start"] <= record["end"] and record["metrics"]["dice"]["mean"] == 0.5
    assert record["job_id"] == "4242" and record["host"] and record["resume"] is True
    calls.clear()
    smoke_dir = tmp_path / "tiny-seg-r0.1-s1"
    run_cell(Cell("tiny", "seg", 0.1, 1), "smoke", tmp_path, progress=False)
    assert calls[0][1]["resume"] is False  # nothing to resume
    (smoke_dir / "last.pt").write_bytes(b"x")
    (smoke_dir / "eval" / "summary.json").unlink()
    calls.clear()
    run_cell(Cell("tiny", "seg", 0.1, 1), "smoke", tmp_path, progress=False)
    assert calls[0][1]["resume"] is True  # an interrupted smoke cell keeps and resumes its last.pt ...
    calls.clear()
    run_cell(Cell("tiny", "seg", 0.1, 1), "smoke", tmp_path, progress=False)
    assert calls[0][1]["resume"] is False  # ... a finished one starts over
    failed = run_cell(Cell("cpu", "qdc", 0.1, 1337), "cpu", tmp_path, progress=False)
    assert failed["status"] == "failed" and failed["error"] == "CheckpointError: boom" and "metrics" not in failed
    assert failed["log"] == str((tmp_path / "cpu-qdc-r0.1-s1337" / "03_train.ipynb").resolve())
    with pytest.raises(ValueError, match="eval_mode"):
        run_cell(cell, "cpu", tmp_path, eval_mode="slow")


def test_cli_reproduce_cpu_runs_its_three_cells_and_prints_the_table(tmp_path, monkeypatch, capsys):
    papermill = pytest.importorskip("papermill")
    import dkuxnet.grid.collect
    from dkuxnet.cli import main

    def fake_execute(source, output, parameters, **kwargs):
        (Path(parameters["run_dir"]) / "eval").mkdir(parents=True, exist_ok=True)
        (Path(parameters["run_dir"]) / "eval" / "summary.json").write_text('{"metrics": {"dice": {"mean": 0.8}}}')

    monkeypatch.setattr(papermill, "execute_notebook", fake_execute)
    monkeypatch.setattr(dkuxnet.grid.collect, "collect_cell", lambda *args: {})  # the fake summary is no result
    assert main(["reproduce", "--profile", "cpu", "--runs-dir", str(tmp_path)]) == 0
    records = json.loads((tmp_path / "summary.json").read_text())
    assert [r["cell"] for r in records] == [c.name for c in CPU_CELLS]
    assert all({"start", "end", "seconds"} <= set(r) for r in records)
    assert all(r["result"] == str(tmp_path.resolve() / "results" / "cpu" / f"{r['cell']}.json") for r in records)
    lines = capsys.readouterr().out.splitlines()[-5:]
    assert lines[0].split()[:3] == ["cell", "state", "seconds"]
    assert [line.split()[:2] for line in lines[1:4]] == [[c.name, "done"] for c in CPU_CELLS]
    assert lines[1].split()[3] == "80.00" and lines[4] == "3 cells: 3 done, 0 running, 0 failed, 0 pending"
    assert main(["reproduce", "--profile", "cpu", "--ablations", "seg", "--runs-dir", str(tmp_path / "w")]) == 0
    assert [r["cell"] for r in json.loads((tmp_path / "w" / "summary.json").read_text())] == ["cpu-seg-r0.1-s1337"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_planned_parameters_exist_in_the_notebooks(name):
    papermill = pytest.importorskip("papermill")
    path = NOTEBOOKS_DIR / f"{name}.ipynb"
    if not path.is_file():
        pytest.skip(f"{path} not generated")
    declared = papermill.inspect_notebook(str(path))
    assert set(plan_runs("smoke", [0.1], [1])[0].parameters) <= set(declared)


@pytest.mark.slow
def test_reproduce_smoke_end_to_end(tmp_path):
    pytest.importorskip("papermill")
    for module in ("dkuxnet.train", "dkuxnet.evaluate", "dkuxnet.data.phantom"):
        pytest.importorskip(module, exc_type=ImportError)
    records = reproduce("smoke", [0.1], [1], data_dir=tmp_path / "phantom", runs_dir=tmp_path / "runs",
                        max_iterations=2, device="cpu", progress=False, ablations=["seg"])
    run_dir = tmp_path / "runs" / "tiny-seg-r0.1-s1"
    assert (run_dir / "03_train.ipynb").is_file() and (run_dir / "04_evaluate.ipynb").is_file()
    assert (run_dir / "last.pt").is_file() and (run_dir / "eval" / "summary.json").is_file()
    assert json.loads((run_dir / "config.json").read_text())["loss"]["ablation"] == "seg"  # the notebook used it
    assert len(records) == 1 and records[0]["cell"] == "tiny-seg-r0.1-s1" and records[0]["label_ratio"] == 0.1
    assert records[0]["status"] == "ok" and records[0]["seconds"] > 0
    assert json.loads((tmp_path / "runs" / "summary.json").read_text()) == json.loads(json.dumps(records, default=str))


def test_fresh_run_dir_only_clears_smoke_checkpoints(tmp_path):
    from dkuxnet.reproduce import fresh_run_dir

    (tmp_path / "last.pt").write_bytes(b"x")
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    fresh_run_dir(tmp_path, smoke=False)
    fresh_run_dir(tmp_path, smoke=True, resume=True)
    assert (tmp_path / "last.pt").exists()
    fresh_run_dir(tmp_path, smoke=True)
    assert not (tmp_path / "last.pt").exists() and (tmp_path / "metrics.jsonl").exists()
    assert fresh_run_dir(tmp_path / "new", smoke=True).is_dir()


def test_colab_falls_back_where_it_cannot_train(monkeypatch):
    from dkuxnet import reproduce

    assert reproduce.colab_support("NVIDIA L4", bf16=True) == ("colab", "")
    profile, why = reproduce.colab_support("Tesla T4", bf16=False)
    assert profile == "cpu" and "Tesla T4 has no bf16" in why and "28 GiB" in why and "not measured" in why
    assert reproduce.colab_support(None, bf16=False)[0] == "cpu"
    monkeypatch.setattr(reproduce, "_card", lambda: ("Tesla T4", False))
    s = reproduce.resolve_profile("colab", data_dir="/data/LA")
    assert (s.profile, s.preset, s.device) == ("cpu", "cpu", "cuda") and "Tesla T4" in s.note
    assert s.config().data.resample == 2
    monkeypatch.setattr(reproduce, "_card", lambda: ("NVIDIA A100-SXM4-40GB", True))
    s = reproduce.resolve_profile("colab", data_dir="/data/LA")
    assert s.profile == "colab" and s.colab and s.fallback == ""


def test_smoke_note_agrees_with_the_schedule_column() -> None:
    """The smoke runs' note and their table's ``schedule`` column say the same: the tiny preset's own schedule."""
    from dkuxnet.reproduce import SMOKE_ITERATIONS, SMOKE_NOTE
    from dkuxnet.results import schedule_label

    assert schedule_label(SMOKE_ITERATIONS, "tiny") == "full"
    assert "shortened" not in SMOKE_NOTE and f"{SMOKE_ITERATIONS}-iteration" in SMOKE_NOTE
