"""Many files in one run: folders, glob patterns and list files become (input, output) pairs, several are swapped
at once, outputs that exist are skipped, and every file gets an entry in a JSON summary. One bad file is recorded
and the rest go on.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .client import Client
from .errors import CancelledError, FaceTwinError, MediaFileError, UnavailableError
from .files import swap_image_file, swap_video_file
from .images import FacesArg
from .media import IMAGE_OUTPUTS, IMAGE_SUFFIXES, VIDEO_SUFFIXES, PartialFile, probe
from .video import VideoOptions

__all__ = ["BatchItem", "BatchInterrupted", "PlanError", "plan_batch", "expected_frames", "run_batch",
           "write_summary"]

_GLOB_MAGIC = frozenset("*?[")
_VIDEO_OUTPUT_SUFFIX = ".mp4"
_PHOTO_FALLBACK_SUFFIX = ".png"  # photos in formats the server does not encode (WebP, BMP, TIFF) come back as PNG
# Python runs a signal's handler on the main thread, and only once that thread wakes: a signal the kernel hands to
# another thread (it may pick any that does not block it) wakes no untimed wait, so Ctrl-C would wait for the file
# in flight to end. The main thread waits in slices this long instead.
_SIGNAL_POLL_S = 0.1


class PlanError(ValueError):
    """The command line names something that cannot be planned (a missing folder, a pattern matching nothing,
    two inputs that would write the same output, an output that is an input)."""


class BatchInterrupted(KeyboardInterrupt):
    """Ctrl-C during run_batch, raised once every file in flight has stopped and removed its partial output;
    `entries` holds the summary so far (files not finished are "cancelled")."""

    def __init__(self, entries: list[dict[str, Any]]) -> None:
        super().__init__("interrupted")
        self.entries = entries


@dataclasses.dataclass(frozen=True)
class BatchItem:
    """One input file and where its result goes."""

    source: Path
    output: Path | None  # None when the input could not be recognised (see error)
    kind: str  # "image", "video", or "" when unknown
    frames: int | None = None  # 1 for a photo; videos are counted by expected_frames when a total is wanted
    error: str | None = None  # why this file cannot be swapped, found while planning


def _is_glob(text: str) -> bool:
    return any(char in _GLOB_MAGIC for char in text)


def _glob_root(pattern: str) -> Path:
    """The folder part of a pattern before its first wildcard: outputs keep the paths below it."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if _is_glob(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _scan(folder: Path, out_dir: Path) -> list[Path]:
    """Media files below `folder` by suffix, sorted; hidden entries and the output folder are left out."""
    found = []
    out_dir = out_dir.resolve()
    for root, dirs, files in os.walk(folder):
        root_path = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (root_path / d).resolve() != out_dir)
        found += [root_path / name for name in sorted(files) if not name.startswith(".")
                  and Path(name).suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES]
    return found


def read_list_file(path: Path) -> list[str]:
    """Paths one per line; blank lines and lines starting with # are skipped; relative paths are taken from the
    list file's folder."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise PlanError(f"cannot read the list file {path}: {exc.strerror or exc}") from None
    entries = [line.strip() for line in lines]
    return [str(path.parent / entry) for entry in entries if entry and not entry.startswith("#")]


def _expand(inputs: Sequence[str], list_entries: Sequence[str],
            out_dir: Path) -> list[tuple[Path, Path, bool]]:
    """(file, its path below the output folder, named explicitly) for every input; folders and patterns expand."""
    pairs: list[tuple[Path, Path, bool]] = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            pairs += [(file, file.relative_to(path), False) for file in _scan(path, out_dir)]
        elif _is_glob(text) and not path.exists():
            # Never the run's own outputs: a pattern like 'photos/**/*.jpg' would otherwise find them next time.
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True)
                             if Path(m).is_file() and out_dir.resolve() not in Path(m).resolve().parents)
            if not matches:
                raise PlanError(f"{text} matches no file")
            root = _glob_root(text)
            pairs += [(match, match.relative_to(root), False) for match in matches]
        elif path.exists():
            pairs.append((path, Path(path.name), True))
        else:
            raise PlanError(f"{text}: no such file or folder")
    pairs += [(Path(entry), Path(Path(entry).name), True) for entry in list_entries]  # missing ones fail per file
    return pairs


def _kind(path: Path) -> str:
    """"image" or "video": by suffix for the usual ones, else by opening the file (MediaFileError if it is neither)."""
    suffix = path.suffix.lower()
    if path.is_file() and suffix in IMAGE_SUFFIXES:
        return "image"
    if path.is_file() and suffix in VIDEO_SUFFIXES:
        return "video"
    return probe(path).kind


def plan_batch(inputs: Sequence[str], out_dir: Path, *, list_file: Path | None = None,
               only: str | None = None) -> list[BatchItem]:
    """Every input with its output below `out_dir`. only="video" or "image" keeps one kind: folders and patterns
    leave the other out, a file named explicitly gets an error. Raises PlanError for command-line mistakes.

    Files are recognised by suffix (opened only when the suffix says nothing), so a broken file is found when it
    is swapped and recorded there; photos keep .png/.jpg/.jpeg (others become .png), videos become .mp4."""
    list_entries = read_list_file(list_file) if list_file is not None else []
    items: list[BatchItem] = []
    seen: dict[Path, Path] = {}
    expanded = _expand(inputs, list_entries, out_dir)
    sources = {source.resolve(): source for source, _, _ in expanded}
    for source, relative, explicit in expanded:
        try:
            kind = _kind(source)
        except MediaFileError as exc:
            items.append(BatchItem(source, None, "", error=exc.details))
            continue
        if only is not None and kind != only:
            if explicit:
                items.append(BatchItem(source, None, kind, error=f"{source}: is a {kind}, not a {only}"))
            continue
        if kind == "video":
            suffix = _VIDEO_OUTPUT_SUFFIX
        else:
            suffix = source.suffix if source.suffix.lower() in IMAGE_OUTPUTS else _PHOTO_FALLBACK_SUFFIX
        output = out_dir / relative.with_suffix(suffix)
        if output.resolve() in sources:
            raise PlanError(f"{source} would be written over the input {sources[output.resolve()]}: give an OUT "
                            "folder that holds no inputs")
        if output in seen:
            raise PlanError(f"{seen[output]} and {source} would both be written to {output}; swap them in separate "
                            "runs or rename one")
        seen[output] = source
        items.append(BatchItem(source, output, kind, 1 if kind == "image" else None))
    return items


def expected_frames(item: BatchItem) -> int | None:
    """Frames the item will take (for a progress total): 1 for a photo, the container's count for a video."""
    if item.kind != "video":
        return 1
    try:
        return probe(item.source).frames
    except MediaFileError:
        return None  # it fails, and is reported, when it is swapped


def _entry(item: BatchItem, status: str, **fields: Any) -> dict[str, Any]:
    return {"input": str(item.source), "output": str(item.output) if item.output else None, "kind": item.kind,
            "status": status, **fields}


def run_batch(
    client: Client, items: Iterable[BatchItem], model: str, target: str, *, faces: FacesArg = "largest",
    keep_shape: float | None = None, quality: int | None = None, options: VideoOptions | None = None,
    jobs: int = 2, overwrite: bool = False, max_in_flight: int = 8,
    progress: Callable[[int], None] | None = None, on_entry: Callable[[dict[str, Any]], None] | None = None,
    cancel: threading.Event | None = None, describe: Callable[[FaceTwinError], str] = str,
) -> list[dict[str, Any]]:
    """Swaps every item, `jobs` files at a time; returns one summary entry per item, in the items' order.

    status: "done" (with the FileReport's numbers), "skipped" (the output exists and overwrite is False), "failed"
    (with error: the file, then describe(the SDK error)), "cancelled" (cancel was set, or the server became
    unreachable, before it finished). on_entry(entry) is called as each file ends, from a worker thread.
    Ctrl-C (KeyboardInterrupt) closes `client`, so that calls in flight and streams waiting for their server to
    come back end at once; BatchInterrupted then carries the entries.
    """
    cancel = cancel or threading.Event()
    interrupted = threading.Event()
    items = list(items)
    entries: list[dict[str, Any] | None] = [None] * len(items)
    stop_reason: list[str] = []

    def error_text(item: BatchItem, exc: FaceTwinError) -> str:
        text = describe(exc)
        return text if isinstance(exc, MediaFileError) else f"{item.source}: {text}"  # a media error names it

    def run_one(index: int, item: BatchItem) -> None:
        started = time.perf_counter()
        if cancel.is_set():
            entry = _entry(item, "cancelled", error=stop_reason[0] if stop_reason else None)
        else:
            try:
                if item.kind == "video":
                    report = swap_video_file(client, item.source, item.output, model, target, faces=faces,
                                             keep_shape=keep_shape, options=options, max_in_flight=max_in_flight,
                                             progress=progress, cancel=cancel)
                else:
                    report = swap_image_file(client, item.source, item.output, model, target, faces=faces,
                                             keep_shape=keep_shape, quality=quality)
                    if progress is not None:
                        progress(1)
                entry = _entry(item, "done", **{k: v for k, v in report.to_dict().items()
                                                if k not in ("input", "output", "kind")})
            except CancelledError:
                entry = _entry(item, "cancelled", error=stop_reason[0] if stop_reason else None)
            except FaceTwinError as exc:
                if interrupted.is_set():  # the client was closed under it: the call's error is the interruption's
                    entry = _entry(item, "cancelled", error="interrupted")
                elif isinstance(exc, UnavailableError):
                    # Not this file's fault: the server is gone, so the files not started yet are not tried.
                    stop_reason.append(f"not started: the server became unavailable ({exc.details})")
                    cancel.set()
                    entry = _entry(item, "failed", error=error_text(item, exc), seconds=time.perf_counter() - started)
                else:
                    entry = _entry(item, "failed", error=error_text(item, exc), seconds=time.perf_counter() - started)
            except (ImportError, OSError) as exc:
                entry = _entry(item, "failed", error=str(exc), seconds=time.perf_counter() - started)
            except Exception as exc:  # an unforeseen failure of one file must not end the run
                entry = _entry(item, "failed", error=f"{type(exc).__name__}: {exc}",
                               seconds=time.perf_counter() - started)
        entries[index] = entry
        if on_entry is not None:
            on_entry(entry)

    with concurrent.futures.ThreadPoolExecutor(max(1, jobs), thread_name_prefix="facetwin-batch") as pool:
        futures = []
        for index, item in enumerate(items):
            if item.error is not None:
                entries[index] = _entry(item, "failed", error=item.error)
            elif item.output.exists() and not overwrite:
                entries[index] = _entry(item, "skipped")
            else:
                futures.append(pool.submit(run_one, index, item))
                continue
            if on_entry is not None:
                on_entry(entries[index])
        try:
            pending = set(futures)
            while pending:
                _, pending = concurrent.futures.wait(pending, timeout=_SIGNAL_POLL_S)
            for future in futures:
                future.result()
        except KeyboardInterrupt:
            interrupted.set()
            cancel.set()  # the workers stop at their next frame and remove their partial outputs
            stop_reason.append("interrupted")
            client.close()  # calls in flight end now, and so does a stream's wait for its server to come back
            concurrent.futures.wait(futures)
    done = [entry if entry is not None else _entry(item, "cancelled", error="interrupted")
            for entry, item in zip(entries, items)]
    if interrupted.is_set():
        raise BatchInterrupted(done)
    return done


def write_summary(path: Path, entries: list[dict[str, Any]], **header: Any) -> dict[str, int]:
    """Writes the run's JSON summary (whole or not at all); returns the count of files per status."""
    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry["status"]] = counts.get(entry["status"], 0) + 1
    partial = PartialFile(path)
    try:
        partial.write(json.dumps({**header, "counts": counts, "files": entries}, indent=2).encode())
        partial.commit()
    except BaseException:
        partial.discard()
        raise
    return counts
