"""Synthetic phantom (layout, determinism, realism checks, CLI) and the lossless VolumeBank cache."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import dkuxnet.data.cache as cache
from dkuxnet.data import VolumeBank, case_path, dequantize, make_phantom, quantize, read_case, read_list
from dkuxnet.data.cache import resolve_cache_dir

SMALL = (32, 32, 24)


def all_ids(root: Path) -> list[str]:
    return read_list(root / "train.list") + read_list(root / "test.list")


def test_phantom_layout_and_split(tmp_path):
    root = make_phantom(tmp_path, cases=20, seed=0, shape=SMALL)
    train, test = read_list(root / "train.list"), read_list(root / "test.list")
    assert len(train) == 16 and len(test) == 4 and test == [f"PHANTOM{i:03d}" for i in range(16, 20)]
    with h5py.File(case_path(root, train[0])) as f:
        assert set(f) == {"image", "label"}
        assert f["image"].dtype == np.float32 and f["label"].dtype == np.uint8
        assert f["image"].compression == "gzip"


def test_phantom_is_deterministic_per_seed_and_case(tmp_path):
    a = make_phantom(tmp_path / "a", cases=3, seed=4, shape=SMALL)
    b = make_phantom(tmp_path / "b", cases=5, seed=4, shape=SMALL)
    c = make_phantom(tmp_path / "c", cases=3, seed=5, shape=SMALL)
    for case_id in ("PHANTOM000", "PHANTOM002"):
        ia, la = read_case(a, case_id)
        ib, lb = read_case(b, case_id)
        assert np.array_equal(ia, ib) and np.array_equal(la, lb)
        assert not np.array_equal(ia, read_case(c, case_id)[0])


def test_phantom_looks_like_la(phantom_root):
    shapes = []
    for case_id in all_ids(phantom_root):
        image, label = read_case(phantom_root, case_id)
        shapes.append(image.shape)
        assert abs(float(image.mean())) < 1e-3 and abs(float(image.std()) - 1) < 1e-3  # whole-volume z-score
        assert 0.02 < label.mean() < 0.4
        assert image[label == 1].mean() > image[label == 0].mean() + 1.5  # bright blood pool
        assert np.unique(image).size > 256  # continuous: cached raw
    assert {s[2] for s in shapes} == {48} and len({s[:2] for s in shapes}) > 3
    assert all(59 <= s[0] <= 69 and 59 <= s[1] <= 69 for s in shapes)


def test_default_phantom_is_fast(tmp_path):
    start = time.perf_counter()
    make_phantom(tmp_path, cases=20)
    assert time.perf_counter() - start < 15  # ≈ 2.5 s on a 2-core CI machine
    image, _ = read_case(tmp_path, "PHANTOM000")
    assert 88 <= image.shape[0] <= 104 and 88 <= image.shape[1] <= 104 and image.shape[2] == 64


@pytest.mark.parametrize("kwargs, name", [({"cases": 1}, "cases"), ({"shape": (8, 8, 8)}, "shape")])
def test_phantom_rejects_bad_arguments(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_phantom(tmp_path, **kwargs)


def test_cli_phantom_then_check(tmp_path):
    dest = tmp_path / "ph"
    run = subprocess.run([sys.executable, "-m", "dkuxnet", "data", "phantom", "--dest", str(dest),
                          "--cases", "3", "--seed", "1"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    run = subprocess.run([sys.executable, "-m", "dkuxnet", "data", "check", "--data-dir", str(dest), "--quiet"],
                         capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.startswith("OK: 3/3 cases valid (2 in train.list, 1 in test.list)")


def test_quantize_is_exact_and_sorted():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.standard_normal(254), [1.0, np.nextafter(np.float32(1), np.float32(2))]])
    image = rng.choice(values.astype(np.float32), size=(20, 16, 12))  # two values share a fast bucket
    codes, table = quantize(image)
    assert codes.dtype == np.uint8 and table.dtype == np.float32 and codes.shape == image.shape
    assert np.all(np.diff(table) > 0) and table.size == np.unique(image).size
    assert np.array_equal(dequantize(codes, table), image)
    codes, table = quantize(rng.choice(values[:10].astype(np.float32), size=(9, 9, 9)))
    assert table.size == 10


def test_quantize_rejects_more_than_256_values():
    with pytest.raises(ValueError, match="256"):
        quantize(np.arange(300, dtype=np.float32).reshape(3, 10, 10))


@pytest.mark.real_data
def test_real_cases_round_trip_through_the_cache(la_root, tmp_path):
    ids = ["06SR5RBREL16DQ6M8LWS", "CMPXO4J23G58J53Q98SZ", "ZQPMJ4XEC5A4BISD45P1"]
    refs = [read_case(la_root, i) for i in ids]
    for image, _ in refs:
        assert np.array_equal(dequantize(*quantize(image)), image)
    for _ in range(2):  # cold build, then warm load
        bank = VolumeBank.load(la_root, ids, cache_dir=tmp_path, progress=False)
        for (image, label), x, y in zip(refs, bank.images, bank.labels):
            assert np.array_equal(x[0].numpy(), image) and np.array_equal(y.numpy(), label)
    index = json.loads((tmp_path / "index.json").read_text())["cases"]
    assert {index[i]["kind"] for i in ids} == {"codes"}
    stored = sum((tmp_path / f"{i}.image.npy").stat().st_size for i in ids)
    assert stored < sum(image.nbytes for image, _ in refs) / 3  # uint8 codes, not float32


@pytest.fixture
def own_phantom(phantom_root, tmp_path) -> Path:
    """A private copy of the session phantom (these tests modify case files)."""
    return Path(shutil.copytree(phantom_root, tmp_path / "LA", ignore=shutil.ignore_patterns(".dkuxnet_cache")))


def test_bank_loads_phantom_raw_and_warm_load_skips_the_h5(own_phantom, monkeypatch):
    ids = all_ids(own_phantom)[:3]
    bank = VolumeBank.load(own_phantom, ids, progress=False)
    assert (own_phantom / ".dkuxnet_cache" / "index.json").is_file()  # default: inside a writable root
    assert len(bank) == 3 and bank.ids == ids and bank.device == torch.device("cpu")
    for case_id, x, y in zip(ids, bank.images, bank.labels):
        image, label = read_case(own_phantom, case_id)
        assert x.dtype == torch.float32 and x.shape == (1, *image.shape) and y.dtype == torch.uint8
        assert np.array_equal(x[0].numpy(), image) and np.array_equal(y.numpy(), label)
    monkeypatch.setattr(cache, "read_case", lambda *a, **k: pytest.fail("warm load read an h5 file"))
    warm = VolumeBank.load(own_phantom, ids, progress=False).to("cpu")
    assert all(torch.equal(a, b) for a, b in zip(bank.images + bank.labels, warm.images + warm.labels))


def test_changed_source_or_damaged_cache_is_rebuilt(own_phantom, tmp_path):
    ids = all_ids(own_phantom)[:2]
    VolumeBank.load(own_phantom, ids, cache_dir=tmp_path / "c", progress=False)
    image, label = read_case(own_phantom, ids[0])
    with h5py.File(case_path(own_phantom, ids[0]), "w") as f:  # new content, new size and mtime
        f.create_dataset("image", data=image[:-2] * 2, compression="gzip")
        f.create_dataset("label", data=label[:-2], compression="gzip")
    (tmp_path / "c" / f"{ids[1]}.image.npy").write_bytes(b"garbage")
    bank = VolumeBank.load(own_phantom, ids, cache_dir=tmp_path / "c", progress=False)
    assert np.array_equal(bank.images[0][0].numpy(), image[:-2] * 2)
    assert np.array_equal(bank.images[1][0].numpy(), read_case(own_phantom, ids[1])[0])


def test_read_only_root_falls_back_to_the_user_cache(own_phantom, tmp_path, monkeypatch):
    (own_phantom / ".dkuxnet_cache").write_text("not a folder")  # the local cache cannot be created
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: tmp_path / "home"))
    folder = resolve_cache_dir(own_phantom)
    assert folder.parent == tmp_path / "home" / ".cache" / "dkuxnet" and len(folder.name) == 16
    VolumeBank.load(own_phantom, all_ids(own_phantom)[:1], progress=False)
    assert (folder / "index.json").is_file()
    assert resolve_cache_dir(own_phantom, tmp_path / "mine") == tmp_path / "mine"
