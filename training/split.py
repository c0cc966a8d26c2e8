"""`split`: one extracted data set becomes a training set and a held-out set, so scores measure frames the model
never saw: train on the one, `evaluate --data` the other.

The held-out part is the end of each identity's footage, in frame order (flicker needs consecutive frames), so
near-identical neighbouring frames never sit on both sides. Both parts are whole data sets in extract's layout
(training/extract.py), each index naming its part under "split".
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from facetwin.core.files import replace_folder
from facetwin.training.extract import ExtractError, index_json, read_index
from facetwin.training.layout import INDEX_NAME, playing_order

HOLDOUT_FRACTION = 0.2  # the share of each identity's faces, the end of its footage, kept out of training


def _frame_ranges(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """{"faces": n, "frames": [{"source": file name, "first", "last", "faces"}, ...]}: one part's frames, per run
    of consecutive faces from one source."""
    ranges: list[dict[str, Any]] = []
    for entry in entries:
        source, frame = Path(str(entry.get("source"))).name, entry.get("frame")
        if not ranges or ranges[-1]["source"] != source:
            ranges.append({"source": source, "first": frame, "last": frame, "faces": 0})
        ranges[-1]["last"] = frame
        ranges[-1]["faces"] += 1
    return {"faces": len(entries), "frames": ranges}


def _replaceable(folder: Path) -> bool:
    """split_holdout may replace a folder that is absent, empty, or a part it wrote before -- nothing else."""
    if not folder.exists():
        return True
    if not folder.is_dir() or folder.is_symlink():
        return False
    if not any(folder.iterdir()):
        return True
    try:
        index = json.loads((folder / INDEX_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(index, dict) and "split" in index


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except FileNotFoundError:
        raise ExtractError(f"{source} is missing: the data set is damaged (extract it again)") from None
    except OSError:  # another file system, or one without hard links
        shutil.copyfile(source, target)


def split_holdout(data_dir: str | Path, train_dir: str | Path, holdout_dir: str | Path,
                  fraction: float = HOLDOUT_FRACTION) -> dict[str, Any]:
    """Splits an extracted data set in two: per identity, the last `fraction` of its faces in playing order (at
    least one, never all) go to holdout_dir, the rest to train_dir; train on one, `evaluate --data` the other.

    The held-out faces are one block at the end of each identity's footage, in frame order (flicker needs
    consecutive frames), so near-identical neighbouring frames never sit on both sides (only the two faces at the
    cut are neighbours), and every face of one frame stays on one side. Both parts are complete data sets (PNGs
    hard-linked, copied where links fail) in the data set's own image order; each index adds "split": {"part",
    "of", "fraction", "train", "holdout", "identities": {name: {"train" | "holdout": {"faces", "frames": [{"source",
    "first", "last", "faces"}]}}}}. Re-running replaces both parts (only empty folders or earlier parts are
    replaced, each atomically). Returns that "split" entry without "part"."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ExtractError(f"the held-out fraction must lie between 0 and 1 (both excluded), got {fraction!r}")
    folders = {"data set": Path(data_dir).resolve(), "train": Path(train_dir).resolve(),
               "held-out": Path(holdout_dir).resolve()}
    named = list(folders.items())
    for i, (name_a, a) in enumerate(named):
        for name_b, b in named[i + 1:]:
            if a.is_relative_to(b) or b.is_relative_to(a):
                raise ExtractError(f"the {name_a} folder {a} and the {name_b} folder {b} must be apart (neither "
                                   "inside the other)")
    data_dir, train_dir, holdout_dir = folders.values()
    if not (data_dir / INDEX_NAME).is_file():
        raise ExtractError(f"{data_dir} is not a data set: {INDEX_NAME} is missing (make one with facetwin-train "
                           "extract)")
    index = read_index(data_dir)
    if "split" in index:
        raise ExtractError(f"{data_dir} is already the {index['split'].get('part')} part of a split: split "
                           f"{index['split'].get('of')} instead")
    for part, folder in (("train", train_dir), ("held-out", holdout_dir)):
        if not _replaceable(folder):
            raise ExtractError(f"{folder} is not empty and not an earlier split: choose another folder for the "
                               f"{part} part")
    held: set[int] = set()  # id() of the held-out entries
    identities = {}
    # every identity the index names, faces or not: one without faces of 2 frames cannot be split
    for name, entries in {**{ident["name"]: [] for ident in index["identities"]}, **playing_order(index)}.items():
        frames = [(e.get("source"), e.get("frame")) for e in entries]
        cuts = [i for i in range(1, len(frames)) if frames[i] != frames[i - 1]]  # one frame's faces stay together
        if not cuts:
            raise ExtractError(f"identity {name!r} has {len(entries)} face(s) from {len(set(frames))} frame(s): a "
                               "split needs faces of at least 2 frames (one to train on, one to hold out)")
        wanted = len(entries) - max(1, int(len(entries) * fraction + 0.5))
        cut = min(cuts, key=lambda i: (abs(i - wanted), i))  # the nearest; on a tie the larger held-out part
        held.update(id(entry) for entry in entries[cut:])
        identities[name] = {"train": _frame_ranges(entries[:cut]), "holdout": _frame_ranges(entries[cut:])}
    # "id" pairs the two parts: check_pair tells a mismatched pair by it.
    split = {"of": str(data_dir), "fraction": fraction, "train": str(train_dir), "holdout": str(holdout_dir),
             "id": secrets.token_hex(8), "identities": identities}
    head = {k: v for k, v in index.items() if k != "images"}
    # Both parts are staged before either replaces its folder: a failure while they are written (a folder that
    # cannot be written, a full disk, Ctrl-C) leaves both as they were. The two replacements at the end are two
    # renames, though: a process killed between them leaves the new train part beside the old held-out part, which
    # check_pair then refuses.
    with replace_folder(holdout_dir) as holdout_staging, replace_folder(train_dir) as train_staging:
        for part, staging in (("holdout", holdout_staging), ("train", train_staging)):
            images = [e for e in index["images"] if (id(e) in held) == (part == "holdout")]
            staging.chmod(0o755)  # mkdtemp's 0700 would hide the part from other users
            for entry in images:
                for key in ("file", "mask"):
                    (staging / entry[key]).parent.mkdir(parents=True, exist_ok=True)
                    _link_or_copy(data_dir / entry[key], staging / entry[key])
            (staging / INDEX_NAME).write_text(index_json({**head, "split": {"part": part, **split}, "images": images}))
    return split


def check_pair(split: dict[str, Any]) -> None:
    """ValueError where `split`, one part's "split" entry, and the other part's on disk are not of the same split
    (a split killed between replacing its two parts): a model trained on one part would be scored on frames that are
    not held out from it, or on too few."""
    other = "train" if split.get("part") == "holdout" else "holdout"
    if not split.get(other) or not (Path(split[other]) / INDEX_NAME).is_file():
        return
    try:
        theirs = json.loads((Path(split[other]) / INDEX_NAME).read_text()).get("split") or {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        theirs = {}
    if theirs.get("id") != split.get("id"):
        raise ValueError(f"the split of {split.get('of')} was interrupted: {split.get('train')} and "
                         f"{split.get('holdout')} are parts of different splits; run facetwin-train split again")
