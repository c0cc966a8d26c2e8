"""core.files: writes that readers never see half done, and that never replace what is not a regular file."""

from __future__ import annotations

import os
import stat

import pytest

from facetwin.core.files import atomic_write, atomic_write_bytes


def test_a_write_replaces_the_file_whole_or_not_at_all(tmp_path):
    path = tmp_path / "report.json"
    atomic_write_bytes(path, b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as fh:
            fh.write(b"half")
            raise RuntimeError("the writer failed")
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"


def test_a_link_is_followed_and_kept(tmp_path):
    target, link = tmp_path / "real.md", tmp_path / "link.md"
    target.write_text("old")
    link.symlink_to(target)
    atomic_write_bytes(link, b"new")
    assert link.is_symlink() and target.read_bytes() == b"new"


def test_what_is_not_a_regular_file_is_refused_not_replaced(tmp_path):
    fifo = tmp_path / "fifo.md"
    os.mkfifo(fifo)
    with pytest.raises(FileExistsError, match="is not a regular file"):
        atomic_write_bytes(fifo, b"report")
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        atomic_write_bytes(tmp_path, b"report")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo.md"]
