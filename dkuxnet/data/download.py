"""Download the LA benchmark (100 ``mri_norm2.h5`` files + both lists), verified by SHA-256.

Source: the preprocessed h5 files committed to https://github.com/yulequan/UA-MT (the book's data page), pinned to
commit 88ed29ad; any mirror of that ``data/`` folder works as ``base_url``. Every file is checked
against the manifest shipped in this package (``la_manifest.sha256``: the 100 lines of the LA
``SHA256SUMS`` plus the two lists). Downloads go to ``<file>.part``; an interrupted file is resumed
with an HTTP Range request (restarted when the server ignores Range), transient failures (HTTP 5xx,
408/429, connection errors, truncated bodies, checksum mismatches) are retried with exponential
backoff, and a file reaches its final name only after verification (``os.replace``). Files already
present and verified are skipped. Standard library only (``urllib``).
"""

from __future__ import annotations

import hashlib
import os
import time
import urllib.error
import urllib.request
from http.client import HTTPException
from importlib import resources
from pathlib import Path
from urllib.parse import quote

from tqdm.auto import tqdm

from dkuxnet.data.la import CASE_FILE, CASES_DIR, LIST_FILES, case_path, read_list
from dkuxnet.errors import DataError
from dkuxnet.fileio import write_text_atomic

DEFAULT_BASE_URL = (
    "https://raw.githubusercontent.com/yulequan/UA-MT/88ed29ad794f877122e542a7fa9505a76fa83515/data/"
)
MANIFEST = "la_manifest.sha256"
CHUNK = 1 << 20
GIVE_UP_AFTER = 2  # consecutive failed files before the rest is not attempted (server unreachable)


class TransientError(Exception):
    """A failure worth retrying (server error, dropped connection, short or corrupted body)."""


def read_manifest() -> list[tuple[str, str]]:
    """``(relative path, sha256 hex)`` for the 100 case files then ``train.list`` and ``test.list``."""
    text = resources.files("dkuxnet.data").joinpath(MANIFEST).read_text(encoding="utf-8")
    entries = []
    for line in text.splitlines():
        digest, _, rel = line.partition("  ")
        entries.append((rel.removeprefix("./"), digest))
    return entries


def sha256sums_text(entries: list[tuple[str, str]]) -> str:
    """``sha256sum`` text for the case files of ``entries`` (the LA ``SHA256SUMS`` file)."""
    return "".join(f"{d}  ./{rel}\n" for rel, d in entries if rel not in LIST_FILES)


def dataset_sha256(root: Path, ids: list[str] | None = None) -> str:
    """One SHA-256 for a data folder: of the ``sha256sum`` lines of ``train.list``, ``test.list`` and the case files.

    Lines ``"<sha256>  <relative path>\n"`` sorted by path, the case files those of ``ids`` (default:
    every case of both lists). The published LA folder gives the digest of the shipped manifest's lines.

    Raises:
        DataError: a list or case file is missing.
    """
    root = Path(root)
    ids = ids if ids is not None else [i for name in LIST_FILES for i in read_list(root / name)]
    rels = sorted([*LIST_FILES, *(str(case_path(Path(), i)) for i in ids)])
    lines = []
    for rel in rels:
        if not (root / rel).is_file():
            raise DataError(f"{root / rel}: file is missing (needed for the data checksum)")
        lines.append(f"{sha256_file(root / rel)}  {rel}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_url(base_url: str, rel: str) -> str:
    """URL of ``rel`` under ``base_url`` (the space of the case folder becomes ``%20``)."""
    return base_url.rstrip("/") + "/" + quote(rel)


def _fetch_once(url: str, part: Path, timeout: float, bar: tqdm) -> None:
    """One HTTP attempt appending to ``part`` (Range resume); raises TransientError on a short body."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "dkuxnet"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # part already complete (or longer than the file)
            return
        raise
    with resp:
        mode = "ab" if offset and resp.status == 206 else "wb"  # 200: server ignored Range
        expected = resp.headers.get("Content-Length")
        received = 0
        with open(part, mode) as f:
            while chunk := resp.read(CHUNK):
                f.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if expected is not None and received < int(expected):
        raise TransientError(f"truncated body: got {received} of {expected} bytes")


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code in (408, 429)
    return isinstance(exc, (TransientError, urllib.error.URLError, HTTPException, OSError))


def fetch_verified(
    url: str, path: Path, sha256: str, *, retries: int = 5, timeout: float = 60, backoff: float = 1.0,
    bar: tqdm | None = None,
) -> None:
    """Download ``url`` to ``path`` through ``path.part``, verify SHA-256, then rename atomically.

    Args:
        retries: extra attempts after the first for transient failures, ≥ 0; the waits before
            them are ``backoff``, ``2·backoff``, ``4·backoff``, … seconds (each capped at 30 s).
        bar: byte-level progress bar to update (a disabled one when ``None``).

    Raises:
        DataError: naming the URL and the last failure when all attempts fail or the failure is
            permanent (e.g. HTTP 404). ``path`` is never left holding unverified bytes.
    """
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an integer >= 0, got {retries!r}")
    bar = bar if bar is not None else tqdm(disable=True)
    part = path.with_name(path.name + ".part")
    path.parent.mkdir(parents=True, exist_ok=True)
    attempt, last = 0, ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(backoff * 2 ** (attempt - 1), 30.0))
        try:
            _fetch_once(url, part, timeout, bar)
            got = sha256_file(part)
            if got != sha256:
                part.unlink()
                raise TransientError(f"SHA-256 mismatch: expected {sha256}, got {got}")
            os.replace(part, path)
            return
        except Exception as exc:  # noqa: BLE001 - classified right below
            last = f"{type(exc).__name__}: {exc}"
            if not _is_transient(exc):
                break
    raise DataError(f"{url} -> {path}: failed after {attempt + 1} attempt(s) ({last})")


def download_la(
    dest: Path, base_url: str = DEFAULT_BASE_URL, *, retries: int = 5, progress: bool = True,
    timeout: float = 60, backoff: float = 1.0, cases: list[str] | None = None,
) -> None:
    """Create or complete an LA data folder at ``dest`` (same layout and bytes as the shared copy).

    Writes the two lists, the case files (all 100, or only ``cases``) and ``SHA256SUMS`` (so that
    ``sha256sum -c SHA256SUMS`` run inside ``dest`` checks the download).

    Args:
        dest: folder to create or complete; present, verified files are skipped.
        base_url: mirror of UA-MT's ``data/`` folder (``.../data/``).
        retries, timeout, backoff: per file, see :func:`fetch_verified`.
        progress: show file and byte progress bars.
        cases: download only these case IDs (default: all in the manifest).

    Raises:
        ValueError: a requested case is not in the manifest.
        DataError: listing every file that could not be fetched and verified.
    """
    dest = Path(dest)
    entries = read_manifest()
    if cases is not None:
        known = {rel.split("/")[1] for rel, _ in entries if rel.endswith(CASE_FILE)}
        unknown = sorted(set(cases) - known)
        if unknown:
            raise ValueError(f"cases: unknown LA case ID(s) {unknown}")
        wanted = {f"{CASES_DIR}/{c}/{CASE_FILE}" for c in cases} | set(LIST_FILES)
        entries_todo = [(rel, d) for rel, d in entries if rel in wanted]
    else:
        entries_todo = list(entries)
    entries_todo.sort(key=lambda e: e[0] not in LIST_FILES)  # the small lists first (stable otherwise)
    dest.mkdir(parents=True, exist_ok=True)
    sums = dest / "SHA256SUMS"
    write_text_atomic(sums, sha256sums_text(entries))
    failures: list[str] = []
    consecutive = 0
    files_bar = tqdm(total=len(entries_todo), desc="LA files", unit="file", disable=not progress)
    bytes_bar = tqdm(desc="downloaded", unit="B", unit_scale=True, disable=not progress, leave=False)
    with files_bar, bytes_bar:
        for done, (rel, digest) in enumerate(entries_todo):
            if consecutive == GIVE_UP_AFTER:
                failures.append(f"{len(entries_todo) - done} remaining file(s) not attempted after "
                                f"{GIVE_UP_AFTER} consecutive failures")
                break
            path = dest / rel
            if path.is_file() and sha256_file(path) == digest:
                consecutive = 0
            else:
                try:
                    fetch_verified(file_url(base_url, rel), path, digest, retries=retries,
                                   timeout=timeout, backoff=backoff, bar=bytes_bar)
                    consecutive = 0
                except DataError as exc:
                    failures.append(str(exc))
                    consecutive += 1
            files_bar.update(1)
    if failures:
        lines = "\n  ".join(failures)
        raise DataError(f"LA download into {dest} incomplete; not downloaded and verified (re-run to "
                        f"resume):\n  {lines}")
