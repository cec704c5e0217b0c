"""git_commit: the package's own repository, else DKUXNET_COMMIT, else "unknown" (never an enclosing repo's)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from dkuxnet.results import git_commit


def _repo(root: Path) -> str:
    """A git repository at ``root`` with one commit holding ``dkuxnet/__init__.py``; returns its HEAD."""
    (root / "dkuxnet").mkdir(parents=True)
    (root / "dkuxnet" / "__init__.py").write_text("")
    run = lambda *a: subprocess.run(["git", "-C", str(root), *a], check=True, capture_output=True, text=True)  # noqa: E731
    run("init", "-q")
    run("add", ".")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    return run("rev-parse", "HEAD").stdout.strip()


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("DKUXNET_COMMIT", raising=False)


def test_own_repository(tmp_path, no_env):
    head = _repo(tmp_path / "proj")
    assert git_commit(tmp_path / "proj" / "dkuxnet") == head
    (tmp_path / "proj" / "dkuxnet" / "__init__.py").write_text("x = 1\n")
    assert git_commit(tmp_path / "proj" / "dkuxnet") == head + "+dirty"


def test_enclosing_repository_is_not_ours(tmp_path, monkeypatch, no_env):
    _repo(tmp_path / "outer")
    copy = tmp_path / "outer" / "work" / "project" / "dkuxnet"  # a copy of the tree without .git
    copy.mkdir(parents=True)
    assert git_commit(copy) == "unknown"
    monkeypatch.setenv("DKUXNET_COMMIT", "6c3e162")
    assert git_commit(copy) == "6c3e162"


def test_outside_any_repository(tmp_path, monkeypatch, no_env):
    assert git_commit(tmp_path) == "unknown"
    monkeypatch.setenv("DKUXNET_COMMIT", "abc123")
    assert git_commit(tmp_path) == "abc123"


def test_this_checkout(no_env):
    """The default is the installed package's folder: its checkout's HEAD, or "unknown" for a copy of the tree."""
    import dkuxnet

    pkg = Path(dkuxnet.__file__).resolve().parent
    git = lambda *a: subprocess.run(["git", "-C", str(pkg), *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    top = git("rev-parse", "--show-toplevel")
    if top and Path(top).resolve() == pkg.parent:
        assert git_commit().split("+")[0] == git("rev-parse", "HEAD")
    else:  # e.g. the copy of the tree that mutation testing runs in
        assert git_commit() == "unknown"


def test_default_results_dir_is_the_checkouts_or_the_working_directorys(tmp_path, monkeypatch):
    import dkuxnet.results as results

    repo = Path(results.__file__).resolve().parents[1]
    assert results.default_results_dir() == repo / "results"  # a source checkout: the committed results
    installed = tmp_path / "site-packages" / "dkuxnet"  # an installed copy: no pyproject.toml beside it
    installed.mkdir(parents=True)
    monkeypatch.setattr(results, "__file__", str(installed / "results.py"))
    monkeypatch.chdir(tmp_path)
    assert results.default_results_dir() == tmp_path / "results"
