"""The data set folder both kinds of training faces share: the index file, the schemas it names, the PNG encoding.

    data/index.json                 {"schema": SYNTH_SCHEMA or FACES_SCHEMA, "size", "identities", "images", ...}
    data/<identity>/00000.png       aligned RGB face
    data/<identity>/00000_mask.png  0/255 face mask

training/synth.py writes synthetic faces (with ground truth), training/extract.py real ones; training/data.py
trains on either, training/quality.py and training/split.py read real ones in playing order. Kept free of torch and
dlib so that each of them can import it.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePath
from typing import Any

import cv2
import numpy as np

from facetwin.core.bundle import check_name

INDEX_NAME = "index.json"
SYNTH_SCHEMA = "facetwin-synth/1"  # synthetic faces with ground truth (training/synth.py)
FACES_SCHEMA = "facetwin-faces/1"  # real faces extracted from photos/videos (training/extract.py)
SCHEMA_NAMES = {SYNTH_SCHEMA: "synthetic faces", FACES_SCHEMA: "real faces"}
# The held-out synthetic poses every score uses (synth.test_poses draws them from this seed, apart from the poses a
# data set is rendered with): the same seed everywhere keeps every reported synthetic score comparable.
HELD_OUT_SEED = 1234
HELD_OUT_POSES = 64  # per direction


def check_identity(name: object) -> str:
    """Returns a training identity's name, else raises ValueError saying why: a bundle name (core.bundle.check_name)
    without '.', since each identity names a decoder in the model and PyTorch's module names hold no dots."""
    return check_name(name, "identity name", dots=False)  # type: ignore[arg-type]  # BundleError is a ValueError


class IndexProblem(ValueError):
    """What is wrong with a data set's index file, naming the file; readers add what to do about it."""


def read_index(folder: str | Path, schemas: tuple[str, ...]) -> dict[str, Any]:
    """folder/index.json, parsed: of one of `schemas`, with identities and images lists whose entries are sound
    (index_problem). IndexProblem otherwise."""
    path = Path(folder) / INDEX_NAME
    if not path.is_file():
        raise IndexProblem(f"{folder} is not a data set: {INDEX_NAME} is missing")
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexProblem(f"{path} is not valid JSON ({exc})") from None
    schema = index.get("schema") if isinstance(index, dict) else None
    if schema not in schemas:
        held = SCHEMA_NAMES.get(schema, "no facetwin data set")  # type: ignore[arg-type]
        wanted = " or ".join(SCHEMA_NAMES[s] for s in schemas)
        raise IndexProblem(f"{folder} holds {held}, not {wanted} ({INDEX_NAME} schema {schema!r})")
    for key in ("identities", "images"):
        if not isinstance(index.get(key), list):
            raise IndexProblem(f"{path}: {key!r} must be a list")
    if problem := index_problem(index):
        raise IndexProblem(f"{path}: {problem}")
    return index


def index_problem(index: dict[str, Any]) -> str | None:
    """What is wrong with an index's identities and images lists (None: nothing): each identity an object with a
    valid name, each image an object naming its identity and two files inside the data set's folder."""
    for number, entry in enumerate(index["identities"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            return f'identities[{number}] must be an object with a "name"'
        try:
            check_identity(entry["name"])
        except ValueError as exc:
            return str(exc)
    for number, entry in enumerate(index["images"]):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("identity", "file", "mask")):
            return f'images[{number}] must be an object with "identity", "file" and "mask" strings'
        for key in ("file", "mask"):
            relative = PurePath(entry[key])
            if relative.is_absolute() or ".." in relative.parts:
                return f"images[{number}].{key} {entry[key]!r} leaves the data folder; name a file inside it"
    return None


def png_bytes(array: np.ndarray) -> bytes:
    """An RGB (H, W, 3) or grey (H, W) uint8 array as the bytes of a PNG file."""
    ok, data = cv2.imencode(".png", cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if array.ndim == 3 else array,
                            [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise RuntimeError("cv2.imencode failed to encode a PNG")
    return data.tobytes()


def playing_order(index: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """A real-face index's image entries per identity (in order of first appearance) in playing order: its sources
    as the index lists them, then frame, then face slot. split holds out the end of this order and quality scores
    flicker along it, so both read it here."""
    rank: dict[Any, int] = {}  # source path -> its place in the index's source lists
    for ident in index.get("identities", []):
        for source in ident.get("sources", []):
            rank.setdefault(source.get("path"), len(rank))
    by_identity: dict[str, list[dict[str, Any]]] = {}
    for entry in index.get("images", []):
        by_identity.setdefault(entry["identity"], []).append(entry)
    for entries in by_identity.values():
        entries.sort(key=lambda e: (rank.get(e.get("source"), len(rank)), str(e.get("source")), e.get("frame", 0),
                                    e.get("face", 0)))
    return by_identity
