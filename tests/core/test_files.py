"""core.files: writes that readers never see half done, and that never replace what is not a regular file."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from facetwin.core.files import atomic_write, atomic_write_bytes, replace_folder


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


def test_a_folder_is_replaced_in_one_step_and_a_failed_fill_leaves_it_as_it_was(tmp_path):
    dest = tmp_path / "bundle"
    with replace_folder(dest) as staging:
        (staging / "a.txt").write_text("one")
    with pytest.raises(RuntimeError):
        with replace_folder(dest) as staging:
            (staging / "a.txt").write_text("half")
            raise RuntimeError("stopped mid-way")
    assert (dest / "a.txt").read_text() == "one"
    with replace_folder(dest) as staging:
        (staging / "b.txt").write_text("two")
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"] and [p.name for p in dest.iterdir()] == ["b.txt"]


def test_staging_folders_of_killed_writers_are_cleared_and_a_live_writers_kept(tmp_path):
    """SIGKILL runs no cleanup: the next writer of the same folder deletes what is left, but never the staging folder
    of a writer still at work (it holds a lock on it)."""
    import signal
    import subprocess
    import sys

    dest = tmp_path / "bundle"
    script = ("import sys, time; from pathlib import Path; from facetwin.core.files import replace_folder\n"
              "with replace_folder(Path(sys.argv[1])) as staging:\n"
              "    (staging / 'w.bin').write_bytes(b'x' * 1000); print(staging.name, flush=True); time.sleep(60)\n")
    writers = [subprocess.Popen([sys.executable, "-c", script, str(dest)], stdout=subprocess.PIPE, text=True)
               for _ in range(2)]
    try:
        names = [writer.stdout.readline().strip() for writer in writers]
        writers[0].send_signal(signal.SIGKILL)
        writers[0].wait(30)
        other = tmp_path / ".bundles-abcdefgh"  # another folder's name that merely starts alike
        other.mkdir()
        with replace_folder(dest) as staging:
            (staging / "a.txt").write_text("mine")
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == sorted([".bundles-abcdefgh", "bundle", names[1]]), (left, names)
        assert (dest / "a.txt").read_text() == "mine"
    finally:
        for writer in writers:
            writer.kill()
            writer.wait(30)


def test_a_failed_write_names_the_file_not_its_hidden_temporary(tmp_path):
    """A write the OS refuses (here: past a file size limit, as on a full disk) is reported against the file asked
    for, and leaves nothing behind."""
    target = tmp_path / "config.json"
    code = (
        "import resource, signal\n"
        "from facetwin.core.files import atomic_write_bytes\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))\n"
        "try:\n"
        f"    atomic_write_bytes({str(target)!r}, bytes(100_000))\n"
        "except OSError as exc:\n"
        "    print(type(exc).__name__, exc.errno, exc.filename)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.stdout.split() == ["OSError", "27", str(target)], run.stdout + run.stderr
    assert list(tmp_path.iterdir()) == []
