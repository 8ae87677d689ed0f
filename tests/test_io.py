"""tinybert_fast._io: the one atomic-write policy."""
import os
import stat

import pytest

from tinybert_fast import _io


def test_atomic_write_replaces_with_usual_mode_and_leaves_no_temp(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    _io.atomic_write(str(path), '{"new": 1}')
    assert path.read_text() == '{"new": 1}'
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~_io.umask()
    assert os.listdir(tmp_path) == ["out.json"]


def test_atomic_open_failure_keeps_old_file_and_removes_temp(tmp_path):
    path = tmp_path / "out.tsv"
    path.write_text("old\n")
    with pytest.raises(RuntimeError, match="boom"):
        with _io.atomic_open(str(path), "w", newline="") as f:
            f.write("half a new file")
            raise RuntimeError("boom")
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["out.tsv"]


def test_atomic_open_binary_and_bad_mode(tmp_path):
    path = tmp_path / "blob.bin"
    with _io.atomic_open(str(path), "wb", fsync=False) as f:
        f.write(b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    with pytest.raises(ValueError, match="mode"):
        with _io.atomic_open(str(path), "a"):
            pass


def test_atomic_write_into_missing_folder_names_the_path(tmp_path):
    with pytest.raises(OSError, match="missing"):
        _io.atomic_write(str(tmp_path / "missing" / "x.json"), b"{}")
