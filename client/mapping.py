"""Face mappings: which faces of a whole frame to swap, and to whom (the proto's FaceMapping).

    from facetwin.client import Client, FaceMapping, FaceRule

    with Client() as client:
        # Only the person in these photos becomes "bob"; everyone else is left as they are.
        result = client.swap(frame, "demo", "bob", color="bgr", faces=FaceMapping.person(photo_png))
        # The largest face becomes "bob" and track 2 of a stream becomes "ada".
        rules = FaceMapping([FaceRule(faces="largest"), FaceRule(track_id=2, target="ada")])

A mapping goes where `faces` goes (Client.swap / stream, swap_image_file / swap_video_file). Each face gets the
target of the first rule that picks it; when two reference rules would pick a face, the nearer one does. In a
stream the mapping travels once, in its first message, and its photos are described once on the server.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal, Union

import grpc
import numpy as np

from facetwin.v1 import facetwin_pb2 as pb

from .errors import InvalidInputError

__all__ = ["FaceRule", "FaceMapping", "LostFaces"]

LostFaces = Literal["pass", "hold", "blur"]  # what a stream shows where it lost a face it was swapping
LOST_FACES = {"pass": pb.LOST_FACE_POLICY_PASS, "hold": pb.LOST_FACE_POLICY_HOLD, "blur": pb.LOST_FACE_POLICY_BLUR}
_SELECTIONS = {"largest": pb.FACE_SELECTION_LARGEST, "all": pb.FACE_SELECTION_ALL}
Photo = Union[np.ndarray, bytes, bytearray, memoryview]  # an image in the call's colour order, or PNG/JPEG bytes


def _invalid(message: str) -> InvalidInputError:
    return InvalidInputError(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclasses.dataclass(frozen=True)
class FaceRule:
    """One rule: the faces it picks (set exactly one of faces, track_id, reference) and the identity they become."""

    target: str | None = None  # an identity of the model; None = the call's target
    faces: Literal["largest", "all"] | int | None = None  # by place: "largest", "all" or a face number (0 = largest)
    track_id: int | None = None  # the face with this track id (SwapResult.faces[i].track_id; streams keep them)
    reference: Sequence[Photo] = ()  # photos of the person: arrays in the call's `color` order, or PNG/JPEG bytes

    def __post_init__(self) -> None:
        picks = [self.faces is not None, self.track_id is not None, len(self.reference) > 0]
        if sum(picks) != 1:
            raise _invalid("a FaceRule picks faces one way: give exactly one of faces ('largest', 'all' or a face "
                           f"number), track_id or reference photos; got faces={self.faces!r}, "
                           f"track_id={self.track_id!r} and {len(self.reference)} reference photo(s)")
        if self.target is not None and (not isinstance(self.target, str) or not self.target):
            raise _invalid(f"FaceRule.target must be an identity name or None (the call's target), got {self.target!r}")
        if self.track_id is not None and (isinstance(self.track_id, bool) or not isinstance(self.track_id, int)
                                          or not 1 <= self.track_id < 2**32):
            raise _invalid(f"track_id must be an integer >= 1 (track ids start at 1), got {self.track_id!r}")
        if self.faces is not None and self.faces not in _SELECTIONS and not (
                isinstance(self.faces, (int, np.integer)) and not isinstance(self.faces, bool)
                and 0 <= self.faces < 2**32):
            raise _invalid(f"FaceRule.faces must be 'largest', 'all' or a face number >= 0, got {self.faces!r}")


@dataclasses.dataclass(frozen=True)
class FaceMapping:
    """The rules, tried in order for each face; match_threshold: the dlib face-descriptor distance up to which a face
    counts as a reference photo's person, in (0, 1] (None = the server's default, 0.6)."""

    rules: Sequence[FaceRule]
    match_threshold: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rules, FaceRule) or not all(isinstance(rule, FaceRule) for rule in self.rules):
            raise _invalid("FaceMapping.rules must be a list of FaceRule")
        if not self.rules:
            raise _invalid("a FaceMapping needs at least one FaceRule")
        if self.match_threshold is not None and (
                isinstance(self.match_threshold, bool) or not isinstance(self.match_threshold, (int, float))
                or not 0.0 < self.match_threshold <= 1.0):
            raise _invalid(f"match_threshold must be a number in (0, 1] (the same person is usually under 0.6), or "
                           f"None for the server's default; got {self.match_threshold!r}")

    @classmethod
    def person(cls, *photos: Photo, target: str | None = None, match_threshold: float | None = None) -> "FaceMapping":
        """Swaps only the person these photos show (to `target`, default the call's)."""
        return cls([FaceRule(target=target, reference=photos)], match_threshold)


def fill_mapping(message: pb.FaceMapping, mapping: FaceMapping, *, color: str) -> None:
    """Writes a FaceMapping into its proto message in place (photos as raw pixels or PNG/JPEG bytes)."""
    from .images import fill_image  # images.py builds requests with this module's help

    if mapping.match_threshold is not None:
        message.match_threshold = float(mapping.match_threshold)
    for rule in mapping.rules:
        out = message.rules.add()
        out.target = rule.target or ""
        if rule.track_id is not None:
            out.track_id = int(rule.track_id)
        elif rule.faces is not None:
            if rule.faces in _SELECTIONS:
                out.selection = _SELECTIONS[rule.faces]
            else:
                out.selection, out.face_index = pb.FACE_SELECTION_INDEX, int(rule.faces)
        else:
            for photo in rule.reference:
                fill_image(out.reference.images.add(), photo, color=color)


def lost_faces_enum(lost_faces: Any) -> int:
    if lost_faces is None:
        return pb.LOST_FACE_POLICY_UNSPECIFIED
    try:
        return LOST_FACES[lost_faces]
    except (KeyError, TypeError):
        raise _invalid(f"lost_faces must be 'pass', 'hold', 'blur' or None (the server's default), "
                       f"got {lost_faces!r}") from None
