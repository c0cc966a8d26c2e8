"""File helpers shared by training and the server: hashing, and writes that readers never see half done."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create 0600/0700 whatever the umask; files we publish get the modes open()/mkdir() would
# give, so a server running as another user (the container's) can read bundles written by training.
FILE_MODE = 0o666 & ~_umask()
DIR_MODE = 0o777 & ~_umask()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yields a binary file to fill; when the block succeeds it is flushed to disk and renamed over `path`, so
    readers (and a process killed mid-write) see either the old file or the whole new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Deletes what atomic_write(path) left behind when its process was killed mid-write (SIGKILL, power loss:
    no cleanup runs); call it before writing `path` again, from the only process that writes it."""
    path = Path(path)
    stale = sorted(path.parent.glob(f".{path.name}.*.tmp"))
    for leftover in stale:
        leftover.unlink(missing_ok=True)
    return stale


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes data to path through atomic_write."""
    with atomic_write(path) as fh:
        fh.write(data)
    return Path(path)


@contextlib.contextmanager
def replace_folder(dest: Path) -> Iterator[Path]:
    """Yields an empty staging folder beside dest (0700, as mkdtemp makes it) to fill. If the block succeeds, an old
    dest is deleted and the staging folder renamed to dest, so dest is never seen half-written; if it raises, the
    staging folder is deleted and dest is left as it was."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    try:
        yield staging
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
