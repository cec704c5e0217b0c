"""The shared atomic-write mechanism: complete file or previous file, never a partial one."""

import pytest

from dkuxnet.fileio import atomic_path, write_text_atomic


def test_write_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    write_text_atomic(target, "one")
    write_text_atomic(target, "two")
    assert target.read_text() == "two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.txt"]


def test_error_while_writing_keeps_the_previous_file(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("good")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
