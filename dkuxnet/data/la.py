"""The LA benchmark folder: case files, split lists, validation and labeled/unlabeled splits.

Layout (the book's data page), shared by the real data and the synthetic phantom::

    <root>/2018LA_Seg_Training Set/<ID>/mri_norm2.h5   # "image" float32 (X,Y,Z), "label" uint8 {0,1}
    <root>/train.list                                 # 80 IDs, one per line, read verbatim (order matters)
    <root>/test.list                                  # 20 IDs, evaluation only

Every problem is raised as one :class:`~dkuxnet.errors.DataError` whose message starts with the
file it concerns; :func:`check_dataset` collects all of them instead of stopping at the first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from tqdm.auto import tqdm

from dkuxnet.errors import DataError

LIST_FILES = ("train.list", "test.list")
CASES_DIR = "2018LA_Seg_Training Set"
CASE_FILE = "mri_norm2.h5"


def read_list(path: Path) -> list[str]:
    """Read a split list verbatim: one ID per line, file order kept, blank lines ignored.

    Raises:
        DataError: the file is missing or unreadable, has no IDs, or repeats an ID.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: list file is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read list file ({exc})") from None
    ids = [line.strip() for line in text.splitlines() if line.strip()]
    if not ids:
        raise DataError(f"{path}: list file is empty")
    seen: set[str] = set()
    for lineno, case_id in enumerate(ids, start=1):
        if case_id in seen:
            raise DataError(f"{path}: duplicate case ID {case_id!r} (entry {lineno})")
        seen.add(case_id)
    return ids


def case_path(root: Path, case_id: str) -> Path:
    """Path of one case file: ``<root>/2018LA_Seg_Training Set/<case_id>/mri_norm2.h5``."""
    return Path(root) / CASES_DIR / case_id / CASE_FILE


def validate_case(image: np.ndarray, label: np.ndarray) -> str | None:
    """Return what is wrong with an (image, label) pair, or ``None`` when it is a valid LA case.

    Valid: both 3-D with equal shapes, every image value finite, every label value 0 or 1.
    """
    if image.ndim != 3:
        return f"'image' must be 3-D, got shape {image.shape}"
    if label.ndim != 3:
        return f"'label' must be 3-D, got shape {label.shape}"
    if image.shape != label.shape:
        return f"'image' shape {image.shape} differs from 'label' shape {label.shape}"
    if not np.issubdtype(image.dtype, np.floating) and not np.issubdtype(image.dtype, np.integer):
        return f"'image' has non-numeric dtype {image.dtype}"
    finite = np.isfinite(image)
    if not finite.all():
        n_bad, n_nan = int(finite.size - finite.sum()), int(np.isnan(image).sum())
        return f"'image' has {n_bad} non-finite values ({n_nan} NaN, {n_bad - n_nan} ±inf)"
    bad = (label != 0) & (label != 1)
    if bad.any():
        values = np.unique(label[bad])[:5].tolist()
        return f"'label' must contain only 0 and 1, found {values}"
    return None


def read_case(root: Path, case_id: str, validate: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Read one case.

    Args:
        root: LA-layout data folder.
        case_id: folder name under ``2018LA_Seg_Training Set``.
        validate: run :func:`validate_case` (cheap next to the gzip decode).

    Returns:
        image float32 (X,Y,Z) and label uint8 (X,Y,Z).

    Raises:
        DataError: naming the file, when it is missing, not a readable HDF5 file (e.g. truncated),
            lacks ``image`` or ``label``, or fails validation.
    """
    path = case_path(root, case_id)
    if not path.is_file():
        raise DataError(f"{path}: case {case_id!r} is missing")
    try:
        with h5py.File(path, "r") as f:
            missing = [key for key in ("image", "label") if key not in f]
            if missing:
                raise DataError(f"{path}: case {case_id!r} has no dataset {missing[0]!r}")
            image = np.asarray(f["image"][()])
            label = np.asarray(f["label"][()])
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: case {case_id!r} is not a readable HDF5 file ({exc})") from None
    if validate:
        problem = validate_case(image, label)
        if problem:
            raise DataError(f"{path}: case {case_id!r}: {problem}")
    return image.astype(np.float32, copy=False), label.astype(np.uint8, copy=False)


@dataclass
class DatasetReport:
    """Outcome of :func:`check_dataset`: counts and one message per problem found."""

    root: Path
    n_cases: int = 0
    n_valid: int = 0
    errors: list[str] = field(default_factory=list)
    n_train: int = 0
    n_test: int = 0

    @property
    def ok(self) -> bool:
        """True when no problem was found and there is at least one case."""
        return not self.errors and self.n_cases > 0

    def summary(self) -> str:
        """Human-readable multi-line summary (first line: verdict and counts)."""
        head = (
            f"{'OK' if self.ok else 'FAILED'}: {self.n_valid}/{self.n_cases} cases valid "
            f"({self.n_train} in train.list, {self.n_test} in test.list) in {self.root}"
        )
        if not self.errors:
            return head
        return "\n".join([head, f"{len(self.errors)} problem(s):", *(f"  - {e}" for e in self.errors)])


def check_dataset(root: Path, progress: bool = True) -> DatasetReport:
    """Validate both lists and every case of an LA-layout folder, collecting all problems.

    Checks: both lists present, non-empty, without duplicates; no ID in both lists; every listed
    case present and valid (:func:`read_case`); unlisted case folders are validated too.
    """
    root = Path(root)
    report = DatasetReport(root=root)
    if not root.is_dir():
        report.errors.append(f"{root}: data folder is missing")
        return report
    lists: dict[str, list[str]] = {}
    for name in LIST_FILES:
        try:
            lists[name] = read_list(root / name)
        except DataError as exc:
            report.errors.append(str(exc))
    train, test = lists.get("train.list", []), lists.get("test.list", [])
    report.n_train, report.n_test = len(train), len(test)
    for case_id in sorted(set(train) & set(test)):
        report.errors.append(f"{root / 'test.list'}: case {case_id!r} is also in train.list")
    cases = list(dict.fromkeys(train + test))
    cases_dir = root / CASES_DIR
    if cases_dir.is_dir():
        listed = set(cases)
        cases += sorted(p.name for p in cases_dir.iterdir() if p.is_dir() and p.name not in listed)
    else:
        report.errors.append(f"{cases_dir}: case folder is missing")
    report.n_cases = len(cases)
    for case_id in tqdm(cases, desc="checking", unit="case", disable=not progress):
        try:
            read_case(root, case_id)
        except DataError as exc:
            report.errors.append(str(exc))
        else:
            report.n_valid += 1
    return report


@dataclass(frozen=True)
class Split:
    """Case IDs of one semi-supervised setting (the first 4 / 8 / 16 lines of ``train.list``; book: data page)."""

    labeled: list[str]
    unlabeled: list[str]
    test: list[str]


def split_ids(
    train: list[str], test: list[str], label_ratio: float | None = None, labeled_num: int | None = None
) -> Split:
    """Labeled = first n IDs of ``train`` (in list order), unlabeled = the rest, test as given.

    n = ``labeled_num`` when it is given (it wins over ``label_ratio``, so a config can keep its
    default ratio and override the count), else ``round(label_ratio * len(train))``; on LA
    0.05 / 0.1 / 0.2 / 1.0 give 4 / 8 / 16 / 80.

    Raises:
        ValueError: naming the parameter when neither is given or n is 0 or more than ``len(train)``.
    """
    if labeled_num is not None:
        if isinstance(labeled_num, bool) or not isinstance(labeled_num, (int, np.integer)):
            raise ValueError(f"labeled_num must be an integer, got {labeled_num!r}")
        n, name = int(labeled_num), f"labeled_num={labeled_num}"
    elif label_ratio is not None:
        if not 0 < label_ratio <= 1:
            raise ValueError(f"label_ratio must be in (0, 1], got {label_ratio}")
        n, name = round(label_ratio * len(train)), f"label_ratio={label_ratio}"
    else:
        raise ValueError("give label_ratio or labeled_num (both are None)")
    if not 1 <= n <= len(train):
        raise ValueError(f"{name} gives {n} labeled cases; need 1..{len(train)} (len(train.list))")
    return Split(labeled=list(train[:n]), unlabeled=list(train[n:]), test=list(test))


def make_split(root: Path, label_ratio: float | None = None, labeled_num: int | None = None) -> Split:
    """Read ``train.list`` / ``test.list`` of ``root`` and split them (see :func:`split_ids`).

    Raises:
        DataError: a list is missing, empty, has duplicates, or an ID is in both lists.
        ValueError: bad ``label_ratio`` / ``labeled_num``.
    """
    root = Path(root)
    train, test = read_list(root / "train.list"), read_list(root / "test.list")
    both = sorted(set(train) & set(test))
    if both:
        raise DataError(f"{root / 'test.list'}: case {both[0]!r} is also in train.list")
    return split_ids(train, test, label_ratio=label_ratio, labeled_num=labeled_num)
