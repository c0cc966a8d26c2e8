"""File helpers shared by training and the server: hashing, and writes that readers never see half done."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import re
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
    readers (and a process killed mid-write) see either the old file or the whole new one, never a torn one.
    A symbolic link is followed (its target is replaced, the link kept); anything else that is not a regular file
    (a device, a pipe) is refused rather than replaced by one."""
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    _check_regular(path, "")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:  # named after path: the temp file's random name means nothing to a reader
        raise type(exc)(exc.errno, exc.strerror, str(path)) from None
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.filename not in (None, tmp) or exc.errno is None:  # another file's error, or no OS error at all
            raise
        raise type(exc)(exc.errno, exc.strerror, str(path)) from None  # a failed write of the temp file: of path
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_regular(path: Path, prefix: str) -> None:
    """Raises unless `path` is absent or a regular file (through links): a write must never replace a folder, a
    device or a pipe."""
    if path.is_dir():
        raise IsADirectoryError(f"{prefix}{path} is a folder: name a file")
    if path.exists() and not path.resolve().is_file():
        raise FileExistsError(f"{prefix}{path} is not a regular file (a device, pipe or socket): name a file")


def check_writable(path: str | os.PathLike, what: str) -> None:
    """Raises OSError, naming `what` (the option that gave the path), unless atomic_write(path) could write there:
    checked before the work whose result it would hold."""
    path = Path(path)
    _check_regular(path, f"{what} ")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{what} {path} cannot be written: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {path} cannot be written: {parent} is not writable")


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
def replace_folder(dest: Path, mode: int | None = None) -> Iterator[Path]:
    """Yields an empty staging folder beside dest to fill (0700, as mkdtemp makes it, or `mode`). If the block
    succeeds, the staging folder takes dest's place in one step where the system can (Linux: an exchange of the two
    names), else the old dest is moved aside first; the old one is then deleted. Readers see the old folder or the
    whole new one, never a half-written one; if the block raises, the staging folder is deleted and dest is left as
    it was. Staging folders of writers killed before they could clean up (SIGKILL, power loss) are deleted first;
    a writer holds a lock on its own while it lives, so a live one's is never taken."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(dest)
    try:
        staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    except OSError as exc:  # named after dest: the staging folder's random name means nothing to a reader
        raise type(exc)(exc.errno, f"{exc.strerror} (no folder can be made beside it)", str(dest)) from None
    held = [_lock_folder(staging)]
    if mode is not None:
        staging.chmod(mode)
    retired = None
    try:
        yield staging
        if not dest.exists() and not dest.is_symlink():
            os.replace(staging, dest)
        elif _exchange(staging, dest):
            retired = staging  # now the old folder
        else:
            retired = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.old-"))
            held.append(_lock_folder(retired))
            os.replace(dest, retired / dest.name)
            os.replace(staging, dest)
    finally:
        for leftover in (staging, retired):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
        for fd in held:
            os.close(fd)


def remove_stale_staging(dest: Path) -> list[Path]:
    """Deletes the staging and retired folders replace_folder(dest) left behind in processes that died mid-way:
    those beside dest that no live writer holds locked."""
    # mkdtemp's names: the prefix, then 8 of [a-z0-9_]
    pattern = re.compile(rf"\.{re.escape(dest.name)}(-|\.old-)[a-z0-9_]{{8}}")
    stale = []
    for entry in sorted(dest.parent.iterdir()) if dest.parent.is_dir() else []:
        if not pattern.fullmatch(entry.name) or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a live writer's
            continue
        else:
            shutil.rmtree(entry, ignore_errors=True)
            stale.append(entry)
        finally:
            os.close(fd)
    return stale


def _lock_folder(folder: Path) -> int:
    """An open descriptor of folder holding an exclusive lock, released when the descriptor closes (or its process
    dies)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swaps the two names in one step (Linux renameat2 RENAME_EXCHANGE, glibc 2.28+); False where the system or the
    file system cannot, and nothing was changed."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))
