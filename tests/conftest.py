"""Shared fixtures: the real LA folder (when present) and a small synthetic phantom."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dkuxnet.data.phantom import make_phantom

# ../shared/data/LA beside the repository; DKUXNET_LA_ROOT points elsewhere (``make mutants`` runs the tests from
# a copy of the repository in mutants/).
LA_ROOT = Path(os.environ.get("DKUXNET_LA_ROOT") or Path(__file__).resolve().parents[2] / "shared" / "data" / "LA")
PHANTOM_CASES = 10
PHANTOM_SHAPE = (64, 64, 48)


@pytest.fixture(scope="session")
def la_root() -> Path:
    """The real LA data folder ``../shared/data/LA`` (read-only: never write into it); skips when absent."""
    if not (LA_ROOT / "train.list").is_file():
        pytest.skip(f"real LA data not found at {LA_ROOT}")
    return LA_ROOT


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 10-case synthetic phantom in the LA layout, built once per session (about 1 s).

    ``make_phantom(dest, cases=10, seed=0, shape=(64, 64, 48))``: IDs ``PHANTOM000`` ..
    ``PHANTOM009``; ``train.list`` = the first 8, ``test.list`` = the last 2. Per-case shape
    (X, Y, 48) with X, Y in 59..69 (±5 around 64). With ``label_ratio=0.1`` that is 1 labeled + 7
    unlabeled; ``labeled_num`` up to 8. Tests may write caches inside it (default VolumeBank cache
    ``<root>/.dkuxnet_cache``) but must not change its case files or lists.
    """
    return make_phantom(tmp_path_factory.mktemp("phantom") / "LA", cases=PHANTOM_CASES, seed=0, shape=PHANTOM_SHAPE)
