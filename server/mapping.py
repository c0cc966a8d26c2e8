"""Which faces of a full frame are swapped, and to which identity: the request's face mapping.

A mapping is a list of rules (the proto's FaceMapping). A rule picks faces by place (every face, the largest, the
n-th largest), by track id (a stream's DetectedFace.track_id), or by who they are: photos of a person, compared with
each face through dlib's 128-D face descriptor (faces.embed: the same person is usually under 0.6 apart, two people
over it). Each face gets the target of the first rule that picks it; when two reference rules would pick a face, the
nearer reference wins. A request without a mapping is the one-rule mapping of its `faces` / `face_index`.

Reference photos are described once: per stream when it starts, and for unary calls through a cache keyed by the
photo's bytes; a stream describes each face once per track (fullframe.py), not every frame.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from facetwin.core.faces import Face

from .errors import InvalidInputError, ResourceExhaustedError, SwapError
from .tracking import TrackedFace

PICKS = ("all", "largest", "index", "track", "reference")
MAX_THRESHOLD = 1.0  # descriptor distances past 1 match nearly any two faces: a threshold above it is a mistake


@dataclasses.dataclass(frozen=True, eq=False)
class Photo:
    """A reference photo as the caller sent it: JPEG/PNG bytes or raw pixels (swap.RawPixels)."""

    encoded: bytes | None = None
    raw: Any = None

    def key(self) -> bytes:
        """Identifies the photo's pixels (the descriptor cache's key)."""
        digest = hashlib.sha256()
        if self.raw is not None:
            r = self.raw
            digest.update(f"{r.height}x{r.width}x{r.channels}:{r.color}:{r.dtype}".encode())
            digest.update(r.data)
        else:
            digest.update(self.encoded or b"")
        return digest.digest()


@dataclasses.dataclass(frozen=True, eq=False)
class Rule:
    """One rule: the faces it picks and the identity they are swapped to."""

    pick: str  # one of PICKS
    target: str = ""  # the identity to render; "" = the request's target
    index: int = 0  # pick "index": the face's number, 0 = largest
    track_id: int = 0  # pick "track"
    photos: tuple[Photo, ...] = ()  # pick "reference": photos of the person
    descriptors: np.ndarray | None = None  # (len(photos), 128) once described (Mapping.describe)

    def __post_init__(self) -> None:
        if self.pick not in PICKS:
            raise InvalidInputError(f"face selection {self.pick!r} is not one of {PICKS}")
        if self.index < 0:
            raise InvalidInputError(f"face_index must be >= 0, got {self.index}")
        if self.pick == "reference" and not self.photos:
            raise InvalidInputError("a reference rule needs at least one photo of the person "
                                    "(FaceRule.reference.images)")
        if self.pick == "track" and self.track_id < 1:
            raise InvalidInputError(f"track_id {self.track_id} names no track: track ids start at 1 "
                                    "(DetectedFace.track_id)")

    def describe_pick(self) -> str:
        return {"all": "every face", "largest": "the largest face", "index": f"face {self.index}",
                "track": f"track {self.track_id}", "reference": "the reference's person"}[self.pick]


def check_limits(rules: int, photos: Callable[[], int], max_rules: int, max_photos: int) -> None:
    """At most max_rules rules and max_photos reference photos in all. `photos` counts the photos, called only once
    the rules are known to be few: a message may hold millions of rules, and counting them is work."""
    if rules > max_rules:
        raise ResourceExhaustedError(f"the face mapping has {rules} rules; this server takes at most {max_rules} "
                                     "(see GetServerInfo limits)")
    count = photos()
    if count > max_photos:
        raise ResourceExhaustedError(f"the face mapping carries {count} reference photos; this server takes at most "
                                     f"{max_photos} per request (see GetServerInfo limits): send fewer, or one or two "
                                     "good frontal photos per person")


@dataclasses.dataclass(frozen=True, eq=False)
class Mapping:
    """The rules of one request or stream, and the descriptor distance that counts as the same person."""

    rules: tuple[Rule, ...]
    threshold: float | None = None  # None: the server's --match-threshold, filled in by SwapEngine.describe
    # The request's faces / face_index rather than a mapping: an index past the last face of a frame that has faces
    # is INVALID_ARGUMENT, as it always was; in a mapping such a rule picks nothing (a stream's face count varies).
    strict_index: bool = False

    def __post_init__(self) -> None:
        if not self.rules:
            raise InvalidInputError("the face mapping has no rules: give at least one FaceRule, or leave mapping "
                                    "unset to use faces / face_index")
        if self.threshold is not None and not 0.0 < self.threshold <= MAX_THRESHOLD:  # NaN fails too
            raise InvalidInputError(f"match_threshold is {self.threshold}: it must be in (0, {MAX_THRESHOLD:g}] "
                                    "(dlib descriptor distance; the same person is usually under 0.6), or unset for "
                                    "the server's default")

    @classmethod
    def selection(cls, mode: str, index: int = 0) -> "Mapping":
        """The mapping of a request's faces / face_index: one rule, the request's target."""
        return cls((Rule(mode, index=index),), strict_index=True)

    @property
    def compares_faces(self) -> bool:
        """Whether faces need descriptors (some rule picks by reference)."""
        return any(rule.pick == "reference" for rule in self.rules)

    @property
    def photo_count(self) -> int:
        return sum(len(rule.photos) for rule in self.rules)

    def targets(self, default: str) -> list[str]:
        """Every identity the rules render (the request's target for rules without one), in rule order."""
        return list(dict.fromkeys(rule.target or default for rule in self.rules))

    def check_limits(self, max_rules: int, max_photos: int) -> None:
        """Before any work: at most max_rules rules and max_photos reference photos in all."""
        check_limits(len(self.rules), lambda: self.photo_count, max_rules, max_photos)

    async def describe(self, descriptor: Callable[[Photo, str], Awaitable[np.ndarray]]) -> "Mapping":
        """This mapping with every reference photo described; descriptor(photo, where) is one photo's descriptor
        (`where` names the photo in error messages)."""
        rules = []
        for number, rule in enumerate(self.rules, 1):
            if rule.pick == "reference" and rule.descriptors is None:
                found = [await descriptor(photo, f"reference photo {k} of rule {number}")
                         for k, photo in enumerate(rule.photos, 1)]
                rule = dataclasses.replace(rule, descriptors=np.stack(found))
            rules.append(rule)
        return dataclasses.replace(self, rules=tuple(rules))


@dataclasses.dataclass(frozen=True)
class Decision:
    """What the mapping says about one face."""

    target: str | None  # the identity to swap it to; None = leave it
    distance: float | None = None  # descriptor distance to the nearest reference photo (reference rules only)
    note: str = ""  # why, in words


def decide(faces: list[TrackedFace], mapping: Mapping, default_target: str,
           descriptors: list[np.ndarray | None]) -> list[Decision]:
    """A decision for each face found in the frame (`faces` largest first, none of them lost). descriptors: each face's
    descriptor, or None where it was not computed (no reference rule, or past the faces compared)."""
    count = len(faces)
    if mapping.strict_index and count:
        for rule in mapping.rules:
            if rule.pick == "index" and rule.index >= count:
                raise InvalidInputError(f"face_index {rule.index} is out of range: the frame has {count} face(s), "
                                        f"numbered 0..{count - 1} largest first (see SwapResponse.faces; the server "
                                        "reports at most ServerLimits.max_faces_detected, the largest)")
    references = [rule for rule in mapping.rules if rule.pick == "reference"]
    out = []
    for position, (face, descriptor) in enumerate(zip(faces, descriptors)):
        distances = {}  # reference rule -> distance to its nearest photo
        if descriptor is not None:
            for rule in references:
                distances[rule] = float(np.linalg.norm(rule.descriptors - descriptor, axis=1).min())
        nearest = min(distances.values()) if distances else None
        chosen = None
        for rule in mapping.rules:
            if _picks(rule, position, face, distances, mapping.threshold):
                chosen = rule
                break
        if chosen is not None:
            target = chosen.target or default_target
            note = f"rule {mapping.rules.index(chosen) + 1} ({chosen.describe_pick()})"
            if chosen.pick == "reference":
                note += f": {nearest:.2f} from the nearest reference photo, threshold {mapping.threshold:.2f}"
            out.append(Decision(target, nearest, note))
        else:
            out.append(Decision(None, nearest, _why_not(mapping, face, nearest, descriptor is not None)))
    return out


def _picks(rule: Rule, position: int, face: TrackedFace, distances: dict, threshold: float) -> bool:
    if rule.pick == "all":
        return True
    if rule.pick == "largest":
        return position == 0
    if rule.pick == "index":
        return position == rule.index
    if rule.pick == "track":
        return face.track_id == rule.track_id
    distance = distances.get(rule)
    return distance is not None and distance <= threshold and distance == min(distances.values())


def _why_not(mapping: Mapping, face: TrackedFace, nearest: float | None, compared: bool) -> str:
    reasons = []
    for number, rule in enumerate(mapping.rules, 1):
        if rule.pick == "track":
            reasons.append(f"rule {number} names track {rule.track_id}, this face is track {face.track_id}")
        elif rule.pick == "reference":
            if not compared:
                reasons.append(f"rule {number}: not compared with the references (past the faces a frame compares)")
            else:
                reasons.append(f"rule {number}: {nearest:.2f} from the nearest reference photo, over the threshold "
                               f"{mapping.threshold:.2f}")
        elif rule.pick in ("largest", "index"):
            reasons.append(f"rule {number} picks {rule.describe_pick()}")
    return "not picked: " + "; ".join(reasons) if reasons else "not picked by any rule"


class DescriptorCache:
    """Face descriptors of reference photos by the photos' bytes: a caller sending the same photos with every unary
    call has them described once. Bounded (least recently used out); safe from one event loop."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._entries: collections.OrderedDict[bytes, asyncio.Future] = collections.OrderedDict()

    async def get(self, photo: Photo, compute: Callable[[], Awaitable[np.ndarray]]) -> np.ndarray:
        """The photo's descriptor: cached, or compute()d once however many callers ask at the same time."""
        key = photo.key()
        entry = self._entries.get(key)
        if entry is None:
            entry = asyncio.ensure_future(compute())
            self._entries[key] = entry
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        try:
            return await asyncio.shield(entry)
        except SwapError:
            self._entries.pop(key, None)  # a photo without a face: the next caller hears the same error, recomputed
            raise


def largest_face(faces: list[Face], where: str) -> Face:
    """The face a reference photo shows (the largest), or the error that says it shows none."""
    if not faces:
        raise InvalidInputError(f"{where} shows no face the server's detector finds: send a photo in which the "
                                "person's face is clearly visible and at least ~80 pixels wide")
    return faces[0]
