"""Downloader against a local HTTP server that serves ../shared/data/LA with injected faults."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from urllib.parse import unquote

import pytest

from dkuxnet.data import DEFAULT_BASE_URL, download_la
from dkuxnet.data.download import GIVE_UP_AFTER, file_url, read_manifest
from dkuxnet.errors import DataError

pytestmark = pytest.mark.real_data

CASE = "06SR5RBREL16DQ6M8LWS"
REL = f"2018LA_Seg_Training Set/{CASE}/mri_norm2.h5"
FAST = {"progress": False, "backoff": 0.001, "timeout": 10}


class FaultyHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.root``; honours ``Range: bytes=N-``; pops one fault per request from
    ``server.faults[rel]``: "500", "truncate" (half the announced body), "wrong" (first byte
    flipped), "ignore_range" (200 with the whole file). Logs ``(rel, Range header)``."""

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        rel = unquote(self.path.lstrip("/"))
        self.server.log.append((rel, self.headers.get("Range")))
        queue = self.server.faults.get(rel, [])
        fault = queue.pop(0) if queue else None
        path = self.server.root / rel
        if fault == "500":
            self.send_error(500)
            return
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        if fault == "wrong":
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start = 0
        if self.headers.get("Range") and fault != "ignore_range":
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if fault == "truncate" else body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(la_root):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FaultyHandler)
    srv.root, srv.faults, srv.log = la_root, {}, []
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/"
    yield srv
    srv.shutdown()
    srv.server_close()


def requests_for(srv, rel: str) -> list[str | None]:
    return [r for p, r in srv.log if p == rel]


def test_urls_follow_the_pinned_ua_mt_layout():
    assert file_url(DEFAULT_BASE_URL, REL) == (
        "https://raw.githubusercontent.com/yulequan/UA-MT/88ed29ad794f877122e542a7fa9505a76fa83515/"
        f"data/2018LA_Seg_Training%20Set/{CASE}/mri_norm2.h5"
    )
    assert file_url(DEFAULT_BASE_URL.rstrip("/"), "train.list") == DEFAULT_BASE_URL + "train.list"


def test_subset_download_is_byte_identical_and_skipped_when_present(server, la_root, tmp_path):
    dest = tmp_path / "new" / "LA"  # created with its parents
    download_la(dest, server.url, cases=[CASE], **FAST)
    for rel in (REL, "train.list", "test.list", "SHA256SUMS"):
        assert (dest / rel).read_bytes() == (la_root / rel).read_bytes(), rel
    assert sorted(p.name for p in dest.rglob("*") if p.is_file()) == [
        "SHA256SUMS", "mri_norm2.h5", "test.list", "train.list"]
    server.log.clear()
    download_la(dest, server.url, cases=[CASE], **FAST)
    assert server.log == []


def test_corrupted_file_at_its_final_name_is_fetched_again(server, la_root, tmp_path):
    """A file already present under its final name is trusted only when its SHA-256 matches: same size, one byte
    flipped -> fetched again (one full request), then byte-identical; the intact files are not requested."""
    download_la(tmp_path, server.url, cases=[CASE], **FAST)
    for rel in (REL, "train.list"):
        data = bytearray((tmp_path / rel).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (tmp_path / rel).write_bytes(bytes(data))
    server.log.clear()
    download_la(tmp_path, server.url, cases=[CASE], retries=0, **FAST)  # one attempt each is enough here
    assert sorted(server.log) == [(REL, None), ("train.list", None)]
    for rel in (REL, "train.list"):
        assert (tmp_path / rel).read_bytes() == (la_root / rel).read_bytes(), rel


def test_truncated_body_is_retried_and_resumed_with_range(server, la_root, tmp_path):
    server.faults[REL] = ["truncate"]
    download_la(tmp_path, server.url, cases=[CASE], **FAST)
    size = (la_root / REL).stat().st_size
    assert requests_for(server, REL) == [None, f"bytes={size // 2}-"]
    assert (tmp_path / REL).read_bytes() == (la_root / REL).read_bytes()


def test_http_500_is_retried(server, la_root, tmp_path):
    server.faults["train.list"] = ["500", "500"]
    download_la(tmp_path, server.url, cases=[CASE], **FAST)
    assert len(requests_for(server, "train.list")) == 3
    assert (tmp_path / "train.list").read_bytes() == (la_root / "train.list").read_bytes()


def test_interrupted_download_resumes_from_the_part_file(server, la_root, tmp_path):
    part = tmp_path / (REL + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes((la_root / REL).read_bytes()[:1000])
    download_la(tmp_path, server.url, cases=[CASE], **FAST)
    assert requests_for(server, REL) == ["bytes=1000-"]
    assert (tmp_path / REL).read_bytes() == (la_root / REL).read_bytes() and not part.exists()


@pytest.mark.parametrize("part_bytes, faults, expected", [
    ("head", ["ignore_range"], ["bytes=1000-"]),  # 200 instead of 206: restart from zero
    ("garbage", [], ["bytes=1000-", None]),  # stale part: checksum fails, part dropped, fresh retry
    ("complete", [], ["bytes={size}-"]),  # killed before the rename: 416, verified, renamed
])
def test_bad_resume_situations_recover(server, la_root, tmp_path, part_bytes, faults, expected):
    data = (la_root / REL).read_bytes()
    part = tmp_path / (REL + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes({"head": data[:1000], "garbage": b"x" * 1000, "complete": data}[part_bytes])
    expected = [e.format(size=len(data)) if e else e for e in expected]
    server.faults[REL] = list(faults)
    download_la(tmp_path, server.url, cases=[CASE], **FAST)
    assert requests_for(server, REL) == expected
    assert (tmp_path / REL).read_bytes() == data


def test_wrong_bytes_fail_verification_and_leave_no_file(server, tmp_path):
    server.faults[REL] = ["wrong"] * 3
    with pytest.raises(DataError, match="SHA-256 mismatch") as err:
        download_la(tmp_path, server.url, cases=[CASE], retries=2, **FAST)
    assert REL.replace(" ", "%20") in str(err.value) and "3 attempt(s)" in str(err.value)
    assert not (tmp_path / REL).exists() and not (tmp_path / (REL + ".part")).exists()
    assert (tmp_path / "train.list").is_file()  # the other files were completed


def test_missing_files_are_not_retried_and_the_run_gives_up(server, tmp_path):
    with pytest.raises(DataError) as err:
        download_la(tmp_path, server.url + "nowhere/", **FAST)
    message = str(err.value)
    assert GIVE_UP_AFTER == 2  # train.list and test.list fail, one request each, then the run stops
    assert "HTTP Error 404" in message and "100 remaining file(s) not attempted" in message
    assert [p for p, _ in server.log] == ["nowhere/train.list", "nowhere/test.list"]


def test_unreachable_server_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="URLError"):
        download_la(tmp_path, "http://127.0.0.1:9/", cases=[CASE], retries=1, **FAST)


def test_unknown_case_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="cases"):
        download_la(tmp_path, "http://127.0.0.1:9/", cases=["NOPE"], **FAST)
    with pytest.raises(ValueError, match="retries"):
        download_la(tmp_path, "http://127.0.0.1:9/", cases=[CASE], retries=-1, **FAST)


@pytest.mark.slow
def test_cli_downloads_the_whole_set_byte_for_byte(server, la_root, tmp_path):
    dest = tmp_path / "LA"
    cmd = [sys.executable, "-m", "dkuxnet", "data", "download", "--dest", str(dest), "--base-url", server.url,
           "--quiet"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert len(server.log) == len(read_manifest()) == 102
    check = subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=dest, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    for name in ("SHA256SUMS", "train.list", "test.list"):
        assert (dest / name).read_bytes() == (la_root / name).read_bytes()
    run = subprocess.run([sys.executable, "-m", "dkuxnet", "data", "check", "--data-dir", str(dest), "--quiet"],
                         capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.startswith("OK: 100/100 cases valid"), run.stdout + run.stderr


def test_dataset_sha256_of_the_real_folder_is_the_manifests(la_root):
    import hashlib

    from dkuxnet.data.download import dataset_sha256, read_manifest

    manifest = "".join(f"{digest}  {rel}\n" for rel, digest in sorted(read_manifest()))
    assert dataset_sha256(la_root) == hashlib.sha256(manifest.encode()).hexdigest()


def test_dataset_sha256_changes_with_any_file(phantom_root, tmp_path):
    import shutil

    from dkuxnet.data import case_path, read_list
    from dkuxnet.data.download import dataset_sha256

    copy = tmp_path / "copy"
    shutil.copytree(phantom_root, copy, ignore=shutil.ignore_patterns(".dkuxnet_cache"))
    before = dataset_sha256(copy)
    assert dataset_sha256(copy) == before  # deterministic
    with open(case_path(copy, read_list(copy / "test.list")[0]), "ab") as f:
        f.write(b"\0")
    assert dataset_sha256(copy) != before
    case_path(copy, read_list(copy / "train.list")[0]).unlink()
    with pytest.raises(DataError, match="data checksum"):
        dataset_sha256(copy)
