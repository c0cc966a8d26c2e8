"""training/split.py: held-out splits of small hand-built real-face data sets (grey crops, no detector)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from facetwin.training import extract as E
from facetwin.training import split as S
from facetwin.training.layout import FACES_SCHEMA


def _faces_set(folder: Path, faces: dict[str, list[tuple[str, int, int]]]) -> Path:
    """A real-face data set layout with grey 16 px crops: identity -> (source, frame, face slot), listed in the order
    extraction would write them (each identity's sources in turn, frames ascending)."""
    sources = {name: list(dict.fromkeys(src for src, _, _ in rows)) for name, rows in faces.items()}
    images = []
    for name, rows in faces.items():
        (folder / name).mkdir(parents=True)
        for k, (source, frame, slot) in enumerate(rows):
            cv2.imwrite(str(folder / name / f"{k:05d}.png"), np.full((16, 16, 3), k, np.uint8))
            cv2.imwrite(str(folder / name / f"{k:05d}_mask.png"), np.full((16, 16), 255, np.uint8))
            images.append({"identity": name, "file": f"{name}/{k:05d}.png", "mask": f"{name}/{k:05d}_mask.png",
                           "landmarks": None, "source": f"/videos/{source}", "frame": frame, "face": slot})
    index = {"schema": FACES_SCHEMA, "size": 16, "margin": 0.1, "seed": None, "template": "t",
             "identities": [{"name": n, "sources": [{"path": f"/videos/{s}"} for s in srcs]}
                            for n, srcs in sources.items()], "images": images}
    (folder / "index.json").write_text(json.dumps(index))
    return folder


# ada: two videos, 6 + 4 faces; ben: one video, 10 frames, two faces in frame 80 (right at the cut)
SPLIT_FACES = {"ada": [("a1.mp4", f, 0) for f in range(0, 60, 10)] + [("a2.mp4", f, 0) for f in range(0, 40, 10)],
               "ben": [("b.mp4", f, s) for f in range(0, 100, 10) for s in ((0, 1) if f == 80 else (0,))]}


def _keys(folder: Path) -> list[tuple]:
    return [(e["identity"], e["source"], e["frame"], e["face"])
            for e in json.loads((folder / "index.json").read_text())["images"]]


def test_split_holds_out_the_end_of_each_identity_in_frame_order(tmp_path):
    from facetwin.training import data as D
    from facetwin.training import quality

    faces = _faces_set(tmp_path / "faces", SPLIT_FACES)
    split = S.split_holdout(faces, tmp_path / "train", tmp_path / "holdout", fraction=0.2)
    train, held = _keys(tmp_path / "train"), _keys(tmp_path / "holdout")
    assert not set(train) & set(held) and sorted(train + held) == sorted(_keys(faces))  # a partition
    # ada: the last 2 of 10 faces, the end of her second video; ben: 2 of 11 wanted, but frame 80's two faces
    # stay together, so 3 (the nearer cut, the larger held-out part on a tie)
    assert [k[1:3] for k in held if k[0] == "ada"] == [("/videos/a2.mp4", 20), ("/videos/a2.mp4", 30)]
    assert [k[2:] for k in held if k[0] == "ben"] == [(80, 0), (80, 1), (90, 0)]
    assert split["identities"]["ada"] == {
        "train": {"faces": 8, "frames": [{"source": "a1.mp4", "first": 0, "last": 50, "faces": 6},
                                         {"source": "a2.mp4", "first": 0, "last": 10, "faces": 2}]},
        "holdout": {"faces": 2, "frames": [{"source": "a2.mp4", "first": 20, "last": 30, "faces": 2}]}}
    for part in ("train", "holdout"):
        index = json.loads((tmp_path / part / "index.json").read_text())
        assert index["split"] == {"part": part, **split} and split["fraction"] == 0.2
        assert index["split"][part] == str((tmp_path / part).resolve())
    # each part is a whole data set: the trainer loads the training part, evaluate the held-out one in frame order
    assert {name: len(f) for name, f in D.load_faces(tmp_path / "train", regions=False).items()} == {"ada": 8,
                                                                                                     "ben": 8}
    held_faces, _ = quality.faces_from_dataset(tmp_path / "holdout")
    assert held_faces["ben"].labels == ["b.mp4#80", "b.mp4#80", "b.mp4#90"]
    assert list(held_faces["ada"].segments) == [0, 0]  # consecutive frames of one clip: flicker is measured
    assert quality.dataset_split(tmp_path / "holdout")["part"] == "holdout" and quality.dataset_split(faces) is None
    # faces extracted into a part would bypass the split
    cv2.imwrite(str(tmp_path / "photo.png"), np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(E.ExtractError, match="is the holdout part of"):
        E.extract([tmp_path / "photo.png"], tmp_path / "holdout", "ada", size=16, progress=False)


def test_split_again_replaces_its_parts_and_refuses_everything_else(tmp_path):
    faces = _faces_set(tmp_path / "faces", SPLIT_FACES)
    S.split_holdout(faces, tmp_path / "train", tmp_path / "holdout")
    split = S.split_holdout(faces, tmp_path / "train", tmp_path / "holdout", fraction=0.5)
    assert split["identities"]["ada"]["holdout"]["faces"] == 5 and len(_keys(tmp_path / "holdout")) == 5 + 6
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    for fraction in (0, 1, 1.5):
        with pytest.raises(E.ExtractError, match="between 0 and 1"):
            S.split_holdout(faces, tmp_path / "train", tmp_path / "holdout", fraction=fraction)
    with pytest.raises(E.ExtractError, match="not an earlier split"):
        S.split_holdout(faces, tmp_path / "mine", tmp_path / "holdout")
    with pytest.raises(E.ExtractError, match="neither inside the other"):
        S.split_holdout(faces, faces / "train", tmp_path / "holdout")
    with pytest.raises(E.ExtractError, match="already the train part"):
        S.split_holdout(tmp_path / "train", tmp_path / "t2", tmp_path / "h2")
    one = _faces_set(tmp_path / "one", {"ada": [("a.mp4", 0, 0), ("a.mp4", 0, 1)], "ben": [("b.mp4", 0, 0)] * 2})
    with pytest.raises(E.ExtractError, match="'ada' has 2 face.s. from 1 frame"):
        S.split_holdout(one, tmp_path / "t3", tmp_path / "h3")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me" and not (tmp_path / "t3").exists()
    # A part that cannot be written leaves both parts as they were: never a new held-out part beside an old train one.
    (tmp_path / "afile").write_text("")
    held_before = _keys(tmp_path / "holdout")
    with pytest.raises(OSError):
        S.split_holdout(faces, tmp_path / "afile" / "train", tmp_path / "holdout", fraction=0.2)
    assert _keys(tmp_path / "holdout") == held_before
    assert json.loads((tmp_path / "holdout" / "index.json").read_text())["split"]["fraction"] == 0.5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_parts_of_different_splits_are_refused_together(tmp_path):
    """A split killed between replacing its two parts leaves a new train part beside the old held-out part."""
    from facetwin.training import quality

    faces = _faces_set(tmp_path / "faces", SPLIT_FACES)
    S.split_holdout(faces, tmp_path / "train", tmp_path / "holdout")
    for part in ("train", "holdout"):
        S.check_pair(quality.dataset_split(tmp_path / part))  # one split's parts
    old_holdout = tmp_path / "old-holdout"
    (tmp_path / "holdout").rename(old_holdout)
    S.split_holdout(faces, tmp_path / "train", tmp_path / "holdout", fraction=0.5)
    shutil.rmtree(tmp_path / "holdout")
    old_holdout.rename(tmp_path / "holdout")  # as the kill left them: the new train part, the old held-out part
    for part in ("train", "holdout"):
        with pytest.raises(ValueError, match=f"the split of {faces} was interrupted: .* run facetwin-train split "
                                             "again"):
            S.check_pair(quality.dataset_split(tmp_path / part))
