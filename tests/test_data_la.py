"""LA reader, validation, check_dataset and splits: broken folders, the phantom, the real data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import dkuxnet.data.la as la
from dkuxnet.cli import main
from dkuxnet.data import CASES_DIR, case_path, check_dataset, make_split, read_case, read_list
from dkuxnet.data.download import read_manifest, sha256_file, sha256sums_text
from dkuxnet.data.la import split_ids, validate_case
from dkuxnet.errors import DataError

# The book's data page ("The fixed split"): the nested labeled subsets are the first 4 / 8 / 16 lines of train.list
LABELED_16 = [
    "06SR5RBREL16DQ6M8LWS", "0RZDK210BSMWAA6467LU", "1D7CUD1955YZPGK8XHJX", "1GU15S0GJ6PFNARO469W",
    "1MHBF3G6DCPWHSKG7XCP", "23X6SY44VT9KFHR7S7OC", "2XL5HSFSE93RMOJDRGR4", "38CWS74285MFGZZXR09Z",
    "3C2QTUNI0852XV7ZH4Q1", "3DA0T2V6JJ2NLUAV6FWM", "4498CA6DZWELOXCBRYRF", "45C45I6IXAFGNRO067W9",
    "4CHFJGF6ZUM7CMZTNFQF", "4EPVTT1HPA8U60CDUKXE", "57SGAJMLCTCH92QUA0EE", "5BHTH9RHH3PQT913I59W",
]
TEST_HEAD = ["UPT6DX9IQY9JAZ7HJKA7", "UTBUJIWZMKP64E3N73YC", "ULHWPWKKLTE921LQLH1P"]  # head of UA-MT's test.list


def write_case(root: Path, case_id: str, image=None, label=None) -> Path:
    """Write one h5 case (only the datasets that are not None)."""
    path = case_path(root, case_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        if image is not None:
            f.create_dataset("image", data=image, compression="gzip")
        if label is not None:
            f.create_dataset("label", data=label, compression="gzip")
    return path


def good_pair(seed: int = 0, shape=(12, 10, 8)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape).astype(np.float32), (rng.random(shape) > 0.7).astype(np.uint8)


@pytest.fixture
def small_root(tmp_path: Path) -> Path:
    """A valid 4-case LA layout: train C, A, B (in that order), test D."""
    for i, cid in enumerate("ABCD"):
        write_case(tmp_path, cid, *good_pair(i))
    (tmp_path / "train.list").write_text("C\nA\nB\n")
    (tmp_path / "test.list").write_text("D\n")
    return tmp_path


def test_read_list_keeps_file_order_and_ignores_blank_lines(tmp_path):
    path = tmp_path / "train.list"
    path.write_text("ZB\r\nAA\n\nMM\n")
    assert read_list(path) == ["ZB", "AA", "MM"]


@pytest.mark.parametrize("content, problem", [(None, "missing"), ("", "empty"), ("\n \n", "empty"),
                                              ("A\nB\nA\n", "duplicate case ID 'A'")])
def test_read_list_errors_name_the_file(tmp_path, content, problem):
    path = tmp_path / "train.list"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=problem) as err:
        read_list(path)
    assert str(path) in str(err.value)


def test_read_case_returns_float32_and_uint8(small_root):
    image, label = read_case(small_root, "A")
    ref_image, ref_label = good_pair(0)
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert np.array_equal(image, ref_image) and np.array_equal(label, ref_label)
    assert case_path(small_root, "A") == small_root / CASES_DIR / "A" / "mri_norm2.h5"


NON_FINITE = {"nan": np.nan, "inf": np.inf, "minus_inf": -np.inf}


def _break(root: Path, defect: str) -> None:
    image, label = good_pair(7)
    if defect == "truncated":
        path = write_case(root, "A", image, label)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif defect == "not_hdf5":
        case_path(root, "A").write_bytes(b"<html>404: Not Found</html>")
    elif defect == "missing_label":
        write_case(root, "A", image, None)
    elif defect == "shape_mismatch":
        write_case(root, "A", image, label[:-1])
    elif defect == "label_2":
        label[0, 0, 0] = 2
        write_case(root, "A", image, label)
    elif defect in NON_FINITE:
        image[3, 3, 3] = NON_FINITE[defect]
        write_case(root, "A", image, label)
    elif defect == "not_3d":
        write_case(root, "A", image[..., 0], label[..., 0])
    elif defect == "missing_file":
        case_path(root, "A").unlink()


DEFECTS = {
    "truncated": "not a readable HDF5 file", "not_hdf5": "not a readable HDF5 file",
    "missing_label": "no dataset 'label'", "shape_mismatch": "differs from 'label' shape",
    "label_2": r"only 0 and 1, found \[2\]", "nan": r"1 non-finite values \(1 NaN, 0 ±inf\)",
    "inf": r"1 non-finite values \(0 NaN, 1 ±inf\)", "minus_inf": r"1 non-finite values \(0 NaN, 1 ±inf\)",
    "not_3d": "must be 3-D",
    "missing_file": "is missing",
}


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_bad_case_raises_one_data_error_naming_the_file(small_root, defect):
    _break(small_root, defect)
    with pytest.raises(DataError, match=DEFECTS[defect]) as err:
        read_case(small_root, "A")
    assert str(case_path(small_root, "A")) in str(err.value) and "'A'" in str(err.value)
    report = check_dataset(small_root, progress=False)
    assert not report.ok and report.n_valid == 3 and report.n_cases == 4
    assert len(report.errors) == 1 and str(case_path(small_root, "A")) in report.errors[0]


def test_validate_case_counts_nan_and_inf_separately():
    """validate_case rejects an image with NaN, +inf or −inf and counts each kind; a finite image passes."""
    image, label = good_pair(3)
    assert validate_case(image, label) is None
    image.flat[[0, 5]] = np.nan
    image.flat[7], image.flat[9] = np.inf, -np.inf
    assert validate_case(image, label) == "'image' has 4 non-finite values (2 NaN, 2 ±inf)"


def test_validate_case_accepts_integer_images_and_names_bad_dtypes_and_labels():
    """Integer images are valid; a non-numeric (bool, str) image is refused; bad label values are listed, at most 5."""
    image, label = good_pair(4)
    assert validate_case((image * 100).astype(np.int16), label) is None
    assert validate_case(image > 0, label) == "'image' has non-numeric dtype bool"
    assert "non-numeric dtype <U1" in validate_case(np.full(image.shape, "a"), label)
    label = label.astype(np.int16)
    label.flat[:8] = [9, 2, 8, 3, 7, 4, 6, 5]
    assert validate_case(image, label) == "'label' must contain only 0 and 1, found [2, 3, 4, 5, 6]"


def test_check_dataset_collects_every_problem(small_root):
    _break(small_root, "label_2")
    (small_root / "train.list").write_text("C\nA\nB\nGONE\n")
    (small_root / "test.list").write_text("D\nB\n")
    report = check_dataset(small_root, progress=False)
    assert not report.ok
    assert report.n_cases == 5 and report.n_valid == 3 and (report.n_train, report.n_test) == (4, 2)
    joined = "\n".join(report.errors)
    assert len(report.errors) == 3
    assert "'B' is also in train.list" in joined and str(small_root / "test.list") in joined
    assert "'GONE' is missing" in joined and "found [2]" in joined
    summary = report.summary()
    assert summary.startswith("FAILED: 3/5 cases valid") and "3 problem(s)" in summary


@pytest.mark.parametrize("content, problem", [("", "empty"), ("D\nD\n", "duplicate")])
def test_check_dataset_reports_bad_lists(small_root, content, problem):
    (small_root / "test.list").write_text(content)
    report = check_dataset(small_root, progress=False)
    assert not report.ok and report.n_valid == 4
    assert any(problem in e and str(small_root / "test.list") in e for e in report.errors)


def test_check_dataset_on_missing_folder(tmp_path):
    report = check_dataset(tmp_path / "nowhere", progress=False)
    assert not report.ok and "data folder is missing" in report.errors[0]


def test_check_dataset_ok_on_phantom(phantom_root):
    report = check_dataset(phantom_root, progress=False)
    assert report.ok, report.summary()
    assert report.n_valid == report.n_cases == report.n_train + report.n_test
    assert report.summary() == f"OK: 10/10 cases valid (8 in train.list, 2 in test.list) in {phantom_root}"


def test_check_dataset_without_train_list_still_checks_every_case(small_root):
    """A missing train.list is one problem; the test.list case and the unlisted case folders are still validated."""
    (small_root / "train.list").unlink()
    report = check_dataset(small_root, progress=False)
    assert (report.n_train, report.n_test, report.n_cases, report.n_valid) == (0, 1, 4, 4)
    assert len(report.errors) == 1 and str(small_root / "train.list") in report.errors[0]


def test_cli_check_exits_1_on_a_broken_folder(small_root):
    _break(small_root, "nan")
    run = subprocess.run([sys.executable, "-m", "dkuxnet", "data", "check", "--data-dir", str(small_root),
                          "--quiet"], capture_output=True, text=True)
    assert run.returncode == 1, run.stderr
    assert "FAILED" in run.stdout and str(case_path(small_root, "A")) in run.stdout


IDS = [f"ID{i:02d}" for i in range(80)]


@pytest.mark.parametrize("ratio, n", [(0.05, 4), (0.1, 8), (0.2, 16), (1.0, 80)])
def test_split_sizes_follow_the_protocol(ratio, n):
    split = split_ids(IDS, ["T"], label_ratio=ratio)
    assert split.labeled == IDS[:n] and split.unlabeled == IDS[n:] and split.test == ["T"]


def test_labeled_num_wins_over_label_ratio():
    assert len(split_ids(IDS, [], label_ratio=0.1, labeled_num=3).labeled) == 3


@pytest.mark.parametrize("kwargs, name", [
    ({"label_ratio": 0.001}, "label_ratio"), ({"label_ratio": 0.0}, "label_ratio"),
    ({"label_ratio": 1.5}, "label_ratio"), ({"labeled_num": 0}, "labeled_num"),
    ({"labeled_num": 81}, "labeled_num"), ({"labeled_num": 2.0}, "labeled_num"),
    ({}, "label_ratio or labeled_num"),
])
def test_bad_split_settings_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        split_ids(IDS, [], **kwargs)


def test_make_split_reads_lists_and_rejects_overlap(small_root):
    split = make_split(small_root, labeled_num=1)
    assert (split.labeled, split.unlabeled, split.test) == (["C"], ["A", "B"], ["D"])
    (small_root / "test.list").write_text("D\nA\n")
    with pytest.raises(DataError, match="'A' is also in train.list"):
        make_split(small_root, label_ratio=0.5)


@pytest.mark.real_data
def test_real_checksums_match_the_packaged_manifest(la_root):
    entries = read_manifest()
    assert len(entries) == 102
    assert sha256sums_text(entries) == (la_root / "SHA256SUMS").read_text()
    bad = [rel for rel, digest in entries if sha256_file(la_root / rel) != digest]
    assert bad == []


@pytest.mark.real_data
@pytest.mark.parametrize("ratio, n", [(0.05, 4), (0.1, 8), (0.2, 16), (1.0, 80)])
def test_real_split_is_the_protocol_subset(la_root, ratio, n):
    split = make_split(la_root, label_ratio=ratio)
    assert len(split.labeled) == n and len(split.unlabeled) == 80 - n and len(split.test) == 20
    assert split.labeled[:16] == LABELED_16[:n]
    assert split.test[:3] == TEST_HEAD and (split.labeled + split.unlabeled)[-1] == "UZUZZT2W9IUSHL6ASOX3"
    assert not set(split.test) & set(split.labeled + split.unlabeled)


@pytest.mark.real_data
def test_real_case_matches_protocol_manifest(la_root):
    image, label = read_case(la_root, "06SR5RBREL16DQ6M8LWS")  # line 1 of train.list
    assert image.shape == (183, 140, 88) and image.dtype == np.float32
    assert int(label.sum()) == 154296


@pytest.mark.real_data
@pytest.mark.slow
def test_real_dataset_is_valid_and_the_cli_says_so(la_root, capsys, monkeypatch):
    reports = []
    real_check = la.check_dataset
    monkeypatch.setattr(la, "check_dataset", lambda *a, **k: reports.append(real_check(*a, **k)) or reports[-1])
    assert main(["data", "check", "--data-dir", str(la_root), "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("OK: 100/100 cases valid (80 in train.list, 20 in test.list)")
    (report,) = reports
    assert report.ok and report.errors == []
    assert (report.n_cases, report.n_valid, report.n_train, report.n_test) == (100, 100, 80, 20)
