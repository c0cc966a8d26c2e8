"""Synthetic occluders: hands, microphones and other objects, and hair strands drawn over training faces.

A face swap must leave alone what sits in front of the face. The model learns where that is through its mask head:
a training face gets an occluder drawn over it (``AugmentConfig.occluders`` of the faces, data.py), the network's
input shows it, and the mask target is the face mask minus the occluder. The decoder's image target stays the clean
face, which only a synthetic occluder provides: each decoder is never asked to draw an occluder (which it would
then paste over every swap), and what it draws under one is the face, so the paste's soft edge around an occluder
blends face into face. Real-footage recipes that only have occluded frames (DeepFaceLab's XSeg, faceswap's
occlusion masks) get the same effect by leaving the occluder out of the reconstruction loss instead.

Every occluder is a union of capsules (line segments with a radius: discs, bars, fingers, strand pieces), placed in
units of the face: its centre is the mask's centroid and its unit the radius of a disc of the mask's area, so an
occluder covers the same part of any face at any crop size and framing. A hand is a palm, an arm, four fingers and
usually a thumb, in the face's own skin tone or another; a bar is a microphone, pen or phone held to the face; an
object is one or two blobs (a cup, a ball); strands are thin locks of hair across the forehead and eyes. Each gets
a colour, a shading gradient, a darker rim and, for objects, stripes (a microphone's mesh, patterned cloth) and
low-frequency noise. The shapes are drawn on the training device as signed distances, anti-aliased to a pixel, so
drawing costs a few batched tensor operations; the random parameters come from the step's CPU generator (data.py),
so a seed draws the same occluders on every device and a resumed run draws what the uninterrupted one would.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from facetwin.training import synth

KINDS = ("hand", "bar", "object", "strands")
KIND_WEIGHTS = (0.4, 0.2, 0.2, 0.2)  # hands are the commonest occluder of a talking face
MAX_CAPSULES = 32  # per occluder: strands use the most (up to 8 strands of 4 pieces)
NOISE_GRID = 5  # the texture noise is drawn on this many x this many points per occluder and upsampled
FAR = 1e3  # where unused capsules sit, in face units: never drawn
EMPTY_FACE = (0.5, 0.5, 0.3)  # (centre x, centre y, radius) as fractions of the side for a face with an empty mask
# Skin tones of hands that are not the face's own (sRGB 0..255): the synthetic renderer's range plus darker and
# ruddier ones, so the network cannot tell a hand from a face by its colour.
SKIN_TONES = synth.SKIN_TONES + ((78, 52, 38), (214, 150, 130))
HAIR_COLOURS = synth.HAIR_COLOURS


class Occluder(NamedTuple):
    """One occluder's parameters, in face units (x right, y down, 1 = the face radius) around the face centre."""

    capsules: np.ndarray  # (MAX_CAPSULES, 5): ax, ay, bx, by, radius; unused rows sit at FAR with radius 0
    colour: np.ndarray  # (3,) RGB in 0..1 (with own_skin: a gain on the face's mean colour instead)
    own_skin: float  # 1: coloured like the face it covers (a hand of the same person); 0: `colour`
    gradient: np.ndarray  # (2,) shading change per face unit along x and y
    rim: float  # how much darker the edge is than the middle (0: flat)
    stripes: np.ndarray  # (4,): amplitude, cycles per face unit, direction (radians), phase
    noise: float  # amplitude of the low-frequency texture noise
    opacity: float  # 1: solid; strands are a little translucent


def _direction(rng: np.random.Generator, below: float = 0.7) -> float:
    """An angle (radians, y down) from which something reaches the face: from below or the sides with
    probability `below`, else from anywhere."""
    if rng.random() < below:
        return float(rng.uniform(-0.15 * math.pi, 1.15 * math.pi))  # right, below, left
    return float(rng.uniform(0, 2 * math.pi))


def _unit(angle: float) -> np.ndarray:
    return np.array([math.cos(angle), math.sin(angle)])


def _hand(rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """A palm reaching over the face's edge, fingers towards its middle (or curled into a fist), a thumb, the arm."""
    size = rng.uniform(0.32, 0.5)  # palm half-width
    toward = _direction(rng)  # the hand comes from this side of the face ...
    palm = _unit(toward) * rng.uniform(0.45, 1.35)  # ... its palm this far from the centre
    along = _unit(toward + math.pi + rng.uniform(-0.9, 0.9))  # the fingers' direction
    across = np.array([-along[1], along[0]]) * (1 if rng.random() < 0.5 else -1)  # the thumb's side
    parts = [(palm - 0.35 * size * along, palm + 0.25 * size * along, 0.8 * size),  # the palm
             (palm, palm - 3.5 * along, 0.55 * size)]  # the wrist and arm, off the face
    curl = 0.35 if rng.random() < 0.2 else 1.0  # a fist
    spread = rng.uniform(0.0, 0.25)
    for i, (offset, length) in enumerate(zip((-0.6, -0.2, 0.2, 0.6), (1.0, 1.3, 1.2, 0.95))):
        angle = math.atan2(along[1], along[0]) + spread * (i - 1.5) / 1.5
        base = palm + 0.45 * size * along + offset * size * across
        reach = size * length * curl * rng.uniform(0.85, 1.15)
        parts.append((base, base + reach * _unit(angle), 0.19 * size))
    if rng.random() < 0.8:
        base = palm + 0.6 * size * across
        tip = base + 0.9 * size * (0.6 * along + 0.8 * across)
        parts.append((base, tip, 0.22 * size))
    return parts


def _bar(rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """A handle from outside the crop to a head near the face: a microphone (big head), a pen or phone (none)."""
    toward = _direction(rng)
    head = _unit(toward) * rng.uniform(0.1, 1.1)
    outward = _unit(toward + rng.uniform(-0.6, 0.6))
    parts = [(head, head + 4.0 * outward, rng.uniform(0.07, 0.22))]
    if rng.random() < 0.6:
        parts.append((head, head + rng.uniform(0.0, 0.2) * outward, rng.uniform(0.22, 0.42)))
    return parts


def _object(rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """One or two blobs (a cup, a ball, a raised object) over part of the face."""
    parts = []
    for _ in range(int(rng.integers(1, 3))):
        centre = _unit(_direction(rng, below=0.5)) * rng.uniform(0.3, 1.2)
        stretch = _unit(rng.uniform(0, 2 * math.pi)) * rng.uniform(0.0, 0.4)
        parts.append((centre - stretch, centre + stretch, rng.uniform(0.22, 0.55)))
    return parts


def _strands(rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Locks of hair falling from above the brows across the forehead and eyes, each four slightly bent pieces."""
    parts = []
    side, fall = rng.uniform(-0.6, 0.6), math.pi / 2 + rng.uniform(-0.6, 0.6)  # where the locks fall, and which way
    bend, piece = rng.uniform(-0.3, 0.3), rng.uniform(0.12, 0.3)  # the locks curve together
    for _ in range(int(rng.integers(2, MAX_CAPSULES // 4 + 1))):
        point = np.array([side + rng.uniform(-0.3, 0.3), rng.uniform(-1.3, -0.7)])
        angle, radius = fall + rng.uniform(-0.15, 0.15), rng.uniform(0.02, 0.07)
        for _ in range(4):
            end = point + piece * rng.uniform(0.8, 1.2) * _unit(angle)
            parts.append((point, end, radius))
            point, angle = end, angle + bend + rng.uniform(-0.1, 0.1)
    return parts


SHAPES = {"hand": _hand, "bar": _bar, "object": _object, "strands": _strands}


def _colour(rng: np.random.Generator, palette: tuple[tuple[int, int, int], ...], jitter: float) -> np.ndarray:
    base = np.array(palette[int(rng.integers(len(palette)))], np.float64) / 255.0
    return np.clip(base * rng.uniform(1 - jitter, 1 + jitter, 3), 0.0, 1.0)


def draw(rng: np.random.Generator, kind: str | None = None) -> Occluder:
    """A random occluder (of `kind`, else one drawn with KIND_WEIGHTS)."""
    kind = kind or KINDS[int(rng.choice(len(KINDS), p=KIND_WEIGHTS))]
    if kind not in SHAPES:
        raise ValueError(f"occluder kind {kind!r} is not one of {', '.join(KINDS)}")
    parts = SHAPES[kind](rng)[:MAX_CAPSULES]
    capsules = np.tile(np.array([FAR, FAR, FAR, FAR, 0.0]), (MAX_CAPSULES, 1))
    capsules[:len(parts)] = [(*a, *b, r) for a, b, r in parts]
    stripes = np.zeros(4)
    if kind == "hand":
        own = float(rng.random() < 0.5)  # half the hands are the face's own skin, the rest another person's
        colour = rng.uniform(0.85, 1.15, 3).clip(0.0, None) if own else _colour(rng, SKIN_TONES, 0.1)
        rim, noise, opacity = rng.uniform(0.2, 0.45), rng.uniform(0.0, 0.08), 1.0
    elif kind == "strands":
        own, colour = 0.0, _colour(rng, HAIR_COLOURS, 0.15)
        rim, noise, opacity = rng.uniform(0.0, 0.3), rng.uniform(0.0, 0.15), rng.uniform(0.75, 1.0)
    else:  # anything at all: dark plastic, metal, bright paint
        own = 0.0
        colour = rng.uniform(0.0, 0.35, 3) + rng.uniform(0.0, 0.1) if rng.random() < 0.4 else rng.uniform(0, 1, 3)
        rim, noise, opacity = rng.uniform(0.0, 0.4), rng.uniform(0.0, 0.3), 1.0
        if rng.random() < 0.5:
            stripes = np.array([rng.uniform(0.1, 0.4), rng.uniform(1.0, 6.0), rng.uniform(0, math.pi),
                                rng.uniform(0, 2 * math.pi)])
    gradient = _unit(rng.uniform(0, 2 * math.pi)) * rng.uniform(0.0, 0.3)
    return Occluder(capsules, np.asarray(colour, np.float64), own, gradient, float(rim), stripes, float(noise),
                    float(opacity))


def face_frames(masks: torch.Tensor) -> torch.Tensor:
    """(B, 3) centre x, centre y and radius of each face, as fractions of the side: the mask's centroid and the
    radius of a disc of its area (EMPTY_FACE where the mask is empty). masks: (B, 1, R, R) in [0, 1]."""
    side = masks.shape[-1]
    coords = (torch.arange(side, device=masks.device, dtype=masks.dtype) + 0.5) / side
    weight = masks[:, 0]
    area = weight.sum(dim=(1, 2))
    safe = area.clamp_min(1e-6)
    centre_x = (weight * coords.view(1, 1, side)).sum(dim=(1, 2)) / safe
    centre_y = (weight * coords.view(1, side, 1)).sum(dim=(1, 2)) / safe
    radius = torch.sqrt(area / (side * side) / math.pi)
    frames = torch.stack([centre_x, centre_y, radius], dim=1)
    # Filled on the device from Python numbers: a tensor built from a list would be a blocking host-to-device copy.
    empty = torch.stack([torch.full_like(centre_x, value) for value in EMPTY_FACE], dim=1)
    return torch.where((area > 0.5).unsqueeze(1), frames, empty)


# Columns of the packed parameter rows `pack` makes, in order.
COLUMNS = {"capsules": 5 * MAX_CAPSULES, "colour": 3, "own_skin": 1, "gradient": 2, "rim": 1, "stripes": 4,
           "noise": 1, "opacity": 1}


def pack(occluders: list[Occluder]) -> np.ndarray:
    """(N, sum(COLUMNS)) float32: one row of parameters per occluder, so they reach the device in one copy."""
    return np.stack([np.concatenate([np.ravel(getattr(o, name)) for name in COLUMNS]) for o in occluders]
                    ).astype(np.float32)


def _unpack(rows: torch.Tensor) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for name, width in COLUMNS.items():
        out[name] = rows[:, start:start + width]
        start += width
    out["capsules"] = out["capsules"].reshape(len(rows), MAX_CAPSULES, 5)
    return out


def render(rows: torch.Tensor, frames: torch.Tensor, side: int, noise: torch.Tensor,
           capsules: int = MAX_CAPSULES) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws occluders (`pack` rows (N, P)) over faces of the given frames (face_frames rows (N, 3)) at side x side;
    noise: (N, 1, NOISE_GRID, NOISE_GRID) in [-1, 1]; all on one device. capsules: how many of each row's capsules
    to draw (the rest are unused). Returns (shading (N, 1, R, R) to multiply the colour by, coverage (N, 1, R, R)
    in [0, 1])."""
    p = _unpack(rows)
    p["capsules"] = p["capsules"][:, :capsules]  # the cost grows with the capsules: most occluders use a few
    pixels = (torch.arange(side, device=rows.device, dtype=rows.dtype) + 0.5) / side
    # Pixel centres in face units: (N, R, R) each.
    x = (pixels.view(1, 1, side) - frames[:, 0, None, None]) / frames[:, 2, None, None]
    y = (pixels.view(1, side, 1) - frames[:, 1, None, None]) / frames[:, 2, None, None]
    a_x, a_y, b_x, b_y, radius = (p["capsules"][..., i, None, None] for i in range(5))  # (N, K, 1, 1)
    to_x, to_y = x[:, None] - a_x, y[:, None] - a_y  # (N, K, R, R)
    seg_x, seg_y = b_x - a_x, b_y - a_y
    t = ((to_x * seg_x + to_y * seg_y) / (seg_x * seg_x + seg_y * seg_y).clamp_min(1e-9)).clamp(0, 1)
    distance = torch.hypot(to_x - t * seg_x, to_y - t * seg_y) - radius  # signed distance to each capsule
    distance = distance.amin(dim=1)  # (N, R, R): the union
    pixel = 1.0 / (frames[:, 2, None, None] * side)  # one pixel in face units
    coverage = (0.5 - distance / pixel).clamp(0, 1) * p["opacity"].view(-1, 1, 1)
    inside = (-distance / 0.12).clamp(0, 1)  # 0 at the edge, 1 from 0.12 face units in
    gradient = p["gradient"]
    shade = (1 - p["rim"].view(-1, 1, 1) * (1 - inside)) * (1 + gradient[:, 0, None, None] * x
                                                            + gradient[:, 1, None, None] * y)
    amplitude, frequency, angle, phase = (p["stripes"][:, i, None, None] for i in range(4))
    along = x * torch.cos(angle) + y * torch.sin(angle)
    shade = shade * (1 + amplitude * torch.sin(2 * math.pi * frequency * along + phase))
    texture = F.interpolate(noise, size=(side, side), mode="bilinear", align_corners=False)[:, 0]
    shade = shade * (1 + p["noise"].view(-1, 1, 1) * texture)
    return shade.clamp(0, 2).unsqueeze(1), coverage.unsqueeze(1)


def occlude(faces: torch.Tensor, masks: torch.Tensor, generator: torch.Generator,
            probability: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws an occluder over each face with `probability`. faces (B, 3, R, R) and masks (B, 1, R, R) in [0, 1],
    on any device; generator: a CPU generator (one draw from it seeds everything else). Returns (the faces with
    their occluders, the occluders' coverage (B, 1, R, R) in [0, 1], zero where none was drawn)."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"occluder probability must be in 0..1, got {probability}")
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))
    chosen = np.flatnonzero(rng.random(faces.shape[0]) < probability)
    coverage = torch.zeros_like(masks)
    if len(chosen) == 0:
        return faces, coverage
    from facetwin.training.data import to_device  # data.py imports this module

    drawn = [draw(rng) for _ in chosen]
    noise = rng.uniform(-1, 1, (len(chosen), 1, NOISE_GRID, NOISE_GRID))
    index = to_device(torch.from_numpy(chosen), faces.device)
    out = faces.clone()
    out[index], coverage[index] = paint(faces[index], masks[index], drawn, noise)
    return out, coverage


def paint(faces: torch.Tensor, masks: torch.Tensor, drawn: list[Occluder], noise: np.ndarray) -> tuple[torch.Tensor,
                                                                                                       torch.Tensor]:
    """Draws drawn[i] over faces[i]: faces (N, 3, R, R) and masks (N, 1, R, R) in [0, 1] on any device, noise
    (N, 1, NOISE_GRID, NOISE_GRID) in [-1, 1]. Returns (the faces with their occluders, coverage (N, 1, R, R))."""
    from facetwin.training.data import to_device  # data.py imports this module

    device, dtype = faces.device, faces.dtype
    rows = to_device(torch.from_numpy(pack(drawn)), device).to(dtype)
    noise = to_device(torch.from_numpy(np.asarray(noise, np.float32)), device).to(dtype)
    used = max(int((o.capsules[:, 4] > 0).sum()) for o in drawn)  # draw() puts the used capsules first
    shade, alpha = render(rows, face_frames(masks), faces.shape[-1], noise, used)
    # A hand in the face's own skin tone: the face's mean colour (inside its mask) times a small per-channel gain.
    face_colour = (faces * masks).sum(dim=(2, 3)) / masks.sum(dim=(2, 3)).clamp_min(1.0)  # (N, 3)
    params = _unpack(rows)
    own, colour = params["own_skin"], params["colour"]
    colour = own * face_colour * colour + (1 - own) * colour
    layer = (colour[:, :, None, None] * shade).clamp(0, 1)
    return faces * (1 - alpha) + layer * alpha, alpha
