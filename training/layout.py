"""The data set folder both kinds of training faces share: the index file, the schemas it names, the PNG encoding.

    data/index.json                 {"schema": SYNTH_SCHEMA or FACES_SCHEMA, "size", "identities", "images", ...}
    data/<identity>/00000.png       aligned RGB face
    data/<identity>/00000_mask.png  0/255 face mask

training/synth.py writes synthetic faces (with ground truth), training/extract.py real ones; training/data.py
trains on either, training/quality.py and training/split.py read real ones in playing order. Kept free of torch and
dlib so that each of them can import it.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

INDEX_NAME = "index.json"
SYNTH_SCHEMA = "facetwin-synth/1"  # synthetic faces with ground truth (training/synth.py)
FACES_SCHEMA = "facetwin-faces/1"  # real faces extracted from photos/videos (training/extract.py)


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
