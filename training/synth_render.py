"""The renderer behind synth.render: a ray-cast ellipsoid head, face-plane features lifted onto it, a hair shell.

Coordinates: the crop spans -1..1 in x (right) and y (up); head-local coordinates have x right, y up, z towards the
camera, in the same units. The head is an ellipsoid whose lower half a jaw profile narrows or widens, ray-cast
orthographically per supersampled pixel (inside its projected bounding box only) and shaded Lambert-style. Eyes,
brows, nose and mouth are polygons on the face plane, lifted onto the ellipsoid, rotated and projected onto the
head's albedo. Hair is a shell between the head and an inflated ellipsoid. Everything is drawn at SUPERSAMPLE times
the output size and INTER_AREA-downsampled, which anti-aliases every edge. Nothing here is random: all variation
comes from the Identity and Pose passed in.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

if TYPE_CHECKING:  # synth imports this module; the types are only needed for annotations
    from facetwin.training.synth import RGB, Identity, Pose

SUPERSAMPLE = 4  # render at 4x and INTER_AREA-downsample: 16 samples per output pixel
HEAD_CENTRE_Y = 0.0  # head centre height in crop units; 0 centres it like an aligned crop
# Hair cap per style: (inflate, base, curve, side_x0, side_drop). A point of the inflated head ellipsoid with unit
# coordinates u is hair when u_y > base + curve*u_x^2 - side_drop*smoothstep(side_x0, side_x0+0.15, |u_x|).
HAIR_CAPS = {
    "short": (1.05, 0.50, -0.25, 0.80, 0.50),
    "fringe": (1.07, 0.30, -0.10, 0.76, 0.45),
    "long": (1.08, 0.46, -0.20, 0.70, 1.70),
    "afro": (1.30, 0.52, -0.20, 0.62, 0.90),
}


def _rotation(pose: Pose) -> np.ndarray:
    """Local head coordinates (x right, y up, z towards the camera) -> world."""
    y, p, r = (math.radians(v) for v in (pose.yaw, -pose.pitch, -pose.roll))
    ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    return rz @ rx @ ry


def _jaw_scale(y_unit: np.ndarray | float, jaw: float) -> np.ndarray | float:
    """Width multiplier of the head at unit height y (1 crown, -1 chin): the jaw narrows or widens the lower half."""
    t = np.minimum(np.maximum(-np.asarray(y_unit), 0.0), 1.0)
    return 1.0 - 0.32 * jaw * (t * np.sqrt(t))


def _smoothstep(lo: float, hi: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3 - 2 * t)


class _Scene:
    """One render: the projection for a pose plus helpers that lift face-plane shapes onto the head."""

    def __init__(self, ident: Identity, pose: Pose, size: int):
        self.ident, self.pose, self.s = ident, pose, size * SUPERSAMPLE
        self.rot = _rotation(pose)
        self.axes = np.array([ident.head_width, ident.head_height, 0.9 * ident.head_width]) * pose.scale
        self.centre = np.array([pose.shift_x, HEAD_CENTRE_Y + pose.shift_y])
        az, el = math.radians(pose.light_azimuth), math.radians(pose.light_elevation)
        self.light = np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
        centres = (np.arange(self.s) + 0.5) / self.s * 2 - 1  # pixel centres in crop units
        self.xs, self.ys = centres, -centres
        self.queued: list[tuple[np.ndarray, Any, np.ndarray | float]] = []  # face-plane shapes awaiting draw_shapes

    def surface(self, xy: np.ndarray, lift: np.ndarray | float = 0.0) -> np.ndarray:
        """Face-plane points (N, 2), in head units, -> 3D points on the front of the head (+ lift along z)."""
        a, b, c = self.axes
        x, y = xy[:, 0], xy[:, 1]
        width = a * _jaw_scale(y / b, self.ident.jaw)
        z = c * np.sqrt(np.maximum(1 - (x / width) ** 2 - (y / b) ** 2, 0)) + lift
        return np.column_stack([x, y, z])

    def project(self, pts: np.ndarray) -> np.ndarray:
        """3D local points (N, 3) -> cv2 pixel coordinates (pixel centres at integers)."""
        world = pts @ self.rot.T
        px = (world[:, 0] + self.centre[0] + 1) * 0.5 * self.s - 0.5
        py = (1 - (world[:, 1] + self.centre[1])) * 0.5 * self.s - 0.5
        return np.column_stack([px, py])

    def fill(self, canvas: np.ndarray, pts3: np.ndarray, colour: Any) -> None:
        pix = np.round(self.project(pts3) * 4).astype(np.int32)  # 2 bits of sub-pixel precision
        cv2.fillPoly(canvas, [pix], tuple(float(v) for v in colour), cv2.LINE_AA, shift=2)

    def shape(self, xy: np.ndarray, colour: Any, lift: np.ndarray | float = 0.0) -> None:
        """Queues a face-plane polygon (N, 2); draw_shapes lifts every queued point in one go (per-shape numpy
        calls were most of the render time)."""
        self.queued.append((xy, colour, lift))

    def draw_shapes(self, canvas: np.ndarray) -> None:
        """Draws the queued shapes in order onto canvas."""
        if not self.queued:
            return
        lifts = [np.broadcast_to(np.asarray(lift, float), (len(xy),)) for xy, _, lift in self.queued]
        pix = np.round(self.project(self.surface(np.concatenate([xy for xy, _, _ in self.queued]),
                                                 np.concatenate(lifts))) * 4).astype(np.int32)
        ends = np.cumsum([len(xy) for xy, _, _ in self.queued])
        for (_, colour, _), poly in zip(self.queued, np.split(pix, ends[:-1])):
            cv2.fillPoly(canvas, [poly], tuple(float(v) for v in colour), cv2.LINE_AA, shift=2)
        self.queued.clear()

    def raycast(self, axes: np.ndarray, jaw: float, offset: np.ndarray):
        """Orthographic rays against an ellipsoid at local `offset`, cast only inside its projected bounding box.

        Returns (the box as (rows, cols) slices, hit mask, hit point in unit-sphere coordinates (ux, uy, uz),
        Lambert shading at the hit, exit point in unit-sphere coordinates). The jaw makes the width depend on
        the height; it is taken where the ray crosses the front half of the head: exact enough for a smooth
        profile, and it keeps a single quadratic solve."""
        rot, s = self.rot, self.s
        width = axes[0] * max(1.0, float(_jaw_scale(-1.0, jaw)))
        half = np.sqrt(((rot[:2] * np.array([width, axes[1], axes[2]])) ** 2).sum(1)) + 2.0 / s
        cx, cy = self.centre + (rot @ offset)[:2]
        c0, c1 = (int(np.clip(math.floor((v + 1) * 0.5 * s), 0, s)) for v in (cx - half[0], cx + half[0] + 4.0 / s))
        r0, r1 = (int(np.clip(math.floor((1 - v) * 0.5 * s), 0, s)) for v in (cy + half[1], cy - half[1] - 4.0 / s))
        x = (self.xs[c0:c1] - cx).astype(np.float32)[None, :]
        y = (self.ys[r0:r1] - cy).astype(np.float32)[:, None]
        rt = rot.T.astype(np.float32)  # world -> local
        ox, oy, oz = (rt[i, 0] * x + rt[i, 1] * y - np.float32(offset[i]) for i in range(3))
        d = rt[:, 2]  # the world +z (towards the camera) in local coordinates
        b, c = np.float32(axes[1]), np.float32(axes[2])
        if jaw:
            y_front = oy + (0.5 * c - oz) / d[2] * d[1]
            inv_a = 1 / (np.float32(axes[0]) * _jaw_scale(y_front / b, jaw).astype(np.float32))
        else:
            inv_a = np.float32(1 / axes[0])
        qx, qy, qz = ox * inv_a, oy / b, oz / c
        rx, ry, rz = d[0] * inv_a, d[1] / b, d[2] / c
        rr = rx * rx + (ry * ry + rz * rz)
        qr = qx * rx + qy * ry + qz * rz
        disc = qr * qr - rr * (qx * qx + qy * qy + qz * qz - 1)
        t = (np.sqrt(np.maximum(disc, 0)) - qr) / rr  # the root nearest the camera
        ux, uy, uz = qx + t * rx, qy + t * ry, qz + t * rz
        nx, ny, nz = ux * inv_a, uy / b, uz / c  # local normal (unnormalised); rotation keeps lengths
        lx, ly, lz = (rt @ self.light).astype(np.float32)
        lambert = np.maximum((lx * nx + ly * ny + lz * nz) / np.sqrt(nx * nx + ny * ny + nz * nz + 1e-12), 0)
        shade = np.float32(self.pose.ambient) + np.float32(self.pose.light_intensity) * lambert
        t_far = (-np.sqrt(np.maximum(disc, 0)) - qr) / rr  # where the ray leaves the ellipsoid again
        far = (qx + t_far * rx, qy + t_far * ry, qz + t_far * rz)
        return (slice(r0, r1), slice(c0, c1)), disc > 0, (ux, uy, uz), shade, far

    @property
    def flat_shade(self) -> float:
        """Shading of surfaces that are not ray-cast (neck, ears, clothes): half-lit."""
        return self.pose.ambient + 0.5 * self.pose.light_intensity


def _solid(size: int, colour: RGB) -> np.ndarray:
    """A writable size x size RGB image of one colour (numpy's broadcasting fill is ~100x slower here)."""
    return np.frombuffer(bytearray(bytes(colour) * (size * size)), np.uint8).reshape(size, size, 3)


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 28) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _draw_eyes(sc: _Scene) -> None:
    a, b, _ = sc.axes
    ident, pose = sc.ident, sc.pose
    skin, lash = np.array(ident.skin, float), np.array(ident.brow_colour, float) * 0.6
    w = ident.eye_size * a
    opening = (1 - pose.blink) * (1 - 0.3 * pose.smile)  # smiling squints
    h, ye, lid = 0.55 * w * opening, 0.04 * b, 0.022 * b
    xs = np.linspace(-w, w, 25)
    env = np.sqrt(np.clip(1 - (xs / w) ** 2, 0, 1))
    for side in (-1, 1):
        cx = side * ident.eye_spacing * a
        sc.shape(_ellipse(cx, ye + 0.15 * w, 1.4 * w, 0.95 * w), skin * 0.9)  # socket shadow
        upper, lower = ye + h * env, ye - 0.75 * h * env
        if opening > 0.08:
            sc.shape(np.concatenate([np.stack([cx + xs, upper], 1), np.stack([cx + xs, lower], 1)[::-1]]),
                     (238, 234, 226))
            for radius, colour in ((0.5 * w, ident.iris), (0.22 * w, (18, 14, 14))):
                circle = _ellipse(cx, ye + 0.1 * h, radius, radius)
                half = np.sqrt(np.clip(1 - ((circle[:, 0] - cx) / w) ** 2, 0, 1))
                circle[:, 1] = np.clip(circle[:, 1], ye - 0.75 * h * half, ye + h * half)  # eyelids cover the iris
                sc.shape(circle, colour)
        band = np.concatenate([np.stack([cx + xs * 1.08, upper + lid * env], 1),
                               np.stack([cx + xs * 1.08, upper - 0.4 * lid * env], 1)[::-1]])
        sc.shape(band, lash)  # upper lid and lashes; a closed eye is just this line


def _draw_brows(sc: _Scene) -> None:
    a, b, _ = sc.axes
    ident, pose = sc.ident, sc.pose
    w = ident.eye_size * a
    yb = (0.04 + 0.21 + 0.05 * pose.mouth_open) * b  # brows rise when the mouth opens (surprise)
    u = np.linspace(0, 1, 14)
    length = 2.2 * w
    centre = yb + math.tan(math.radians(ident.brow_angle)) * (u - 0.3) * length + 0.05 * b * np.sin(np.pi * u)
    half = 0.5 * ident.brow_thickness * b * (1 - 0.55 * u)  # thick inner end, tapering outwards
    for side in (-1, 1):
        x = side * (ident.eye_spacing * a - 0.9 * w + u * length)
        sc.shape(np.concatenate([np.stack([x, centre + half], 1), np.stack([x, centre - half], 1)[::-1]]),
                 ident.brow_colour)


def _draw_nose(sc: _Scene) -> None:
    a, b, c = sc.axes
    ident = sc.ident
    skin = np.array(ident.skin, float)
    ye, yn, nw = 0.0, (0.04 - ident.nose_length) * b, ident.nose_width * a
    protrude = 0.3 * c * ident.nose_length / 0.3

    def lift(xy: np.ndarray) -> np.ndarray:  # the nose sticks out of the face: its tip moves more with yaw
        along = np.clip((ye - xy[:, 1]) / (ye - yn), 0, 1.1) ** 1.4
        return protrude * along * np.clip(1 - (xy[:, 0] / (1.6 * nw)) ** 2, 0, 1)

    side = -1.0 if (sc.rot.T @ sc.light)[0] > 0 else 1.0  # the side of the nose facing away from the light
    t = np.linspace(0, 1, 10)
    y = ye - 0.1 * b - t * (ye - 0.1 * b - yn) * 0.9
    flank = np.concatenate([np.stack([side * (0.15 + 0.75 * t) * nw, y], 1),
                            np.stack([side * 0.25 * t * nw, y], 1)[::-1]])
    for shape, colour in ((flank, skin * 0.74),
                          (_ellipse(0, yn + 0.03 * b, nw, 0.08 * b), skin * 0.88),
                          (_ellipse(-0.1 * side * nw, yn + 0.05 * b, 0.35 * nw, 0.045 * b), skin * 1.08),
                          (_ellipse(0, yn - 0.035 * b, 0.7 * nw, 0.02 * b), skin * 0.78),
                          (_ellipse(-0.45 * nw, yn, 0.24 * nw, 0.028 * b), skin * 0.3),
                          (_ellipse(0.45 * nw, yn, 0.24 * nw, 0.028 * b), skin * 0.3)):
        sc.shape(shape, np.minimum(colour, 255), lift(shape))


def _draw_mouth(sc: _Scene) -> None:
    a, b, _ = sc.axes
    ident, pose = sc.ident, sc.pose
    lip = np.array(ident.lip_colour, float)
    ym = (0.04 - ident.nose_length - 0.2) * b
    mw = ident.mouth_width * a * (1 + 0.15 * pose.smile)
    x = np.linspace(-mw, mw, 29)
    env = np.sqrt(np.clip(1 - (x / mw) ** 2, 0, 1))
    line = ym + pose.smile * 0.11 * b * ((x / mw) ** 2 - 0.3)  # smiling lifts the corners
    gap = pose.mouth_open * 0.17 * b
    inner_up, inner_lo = line + 0.25 * gap * env, line - 0.75 * gap * env
    top = inner_up + 0.045 * b * env**0.6 - 0.012 * b * np.exp(-((x / (0.15 * mw)) ** 2))  # cupid's bow
    bottom = inner_lo - 0.06 * b * env**0.7

    def band(upper: np.ndarray, lower: np.ndarray) -> np.ndarray:
        return np.concatenate([np.stack([x, upper], 1), np.stack([x, lower], 1)[::-1]])

    if pose.smile > 0.2:  # smile lines from the nose wings to beyond the mouth corners
        t = np.linspace(0, 1, 12)
        nose_y = (0.04 - ident.nose_length) * b
        for side in (-1, 1):
            fx = side * ((ident.nose_width + 0.08) * a + (mw - ident.nose_width * a + 0.02 * a) * t**1.5)
            fy = nose_y + 0.02 * b + (line[0] - nose_y - 0.05 * b) * t
            thick = 0.012 * b * np.sin(np.pi * t) + 0.002 * b
            sc.shape(np.concatenate([np.stack([fx, fy + thick], 1), np.stack([fx, fy - thick], 1)[::-1]]),
                     np.array(ident.skin, float) * (1 - 0.3 * pose.smile))
    if gap > 0.01 * b:
        sc.shape(band(inner_up, inner_lo), (70, 24, 30))
        sc.shape(band(inner_up, inner_up - np.minimum(gap, 0.04 * b) * env * 0.8), (236, 232, 222))
    sc.shape(band(top, inner_up), lip * 0.9)
    sc.shape(band(inner_lo, bottom), lip)
    sc.shape(band(line + 0.006 * b * env, line - 0.006 * b * env), lip * 0.5)


def _draw_body(sc: _Scene, canvas: np.ndarray) -> None:
    """Everything behind the head: long hair, neck, shirt, ears (flat-shaded)."""
    a, b, c = sc.axes
    ident, s, shade = sc.ident, sc.s, sc.flat_shade
    skin = np.array(ident.skin, float)
    if ident.hair_style == "long":
        t = np.linspace(0, np.pi, 20)
        curtain = np.concatenate([np.stack([1.12 * a * np.cos(t), 0.2 * b + 0.95 * b * np.sin(t)], 1),
                                  [[-1.3 * a, -1.9 * b], [1.3 * a, -1.9 * b]]])
        sc.fill(canvas, np.concatenate([curtain, np.full((len(curtain), 1), -0.4 * c)], 1),
                np.array(ident.hair_colour) * 0.6 * shade)
    top = sc.project(np.array([[-0.42 * a, -0.55 * b, -0.3 * c], [0.42 * a, -0.55 * b, -0.3 * c]]))
    neck = np.array([top[0], top[1], [top[1, 0] + 0.04 * s, 1.3 * s], [top[0, 0] - 0.04 * s, 1.3 * s]])
    cv2.fillPoly(canvas, [np.round(neck * 4).astype(np.int32)], tuple(skin * 0.78 * shade), cv2.LINE_AA, shift=2)
    base_x = 0.5 * (top[0, 0] + top[1, 0])
    cv2.ellipse(canvas, (int(base_x * 4), int(1.1 * s * 4)), (int(0.95 * s * 2), int(0.16 * s * 4)), 0, 0, 360,
                tuple(np.array(ident.shirt_colour) * shade), -1, cv2.LINE_AA, shift=2)
    if ident.hair_style not in ("long", "afro"):
        for side in (-1, 1):
            t = np.linspace(0, 2 * np.pi, 24, endpoint=False)[:, None]
            out, up = np.array([side * 0.6, 0, -0.8]) * 0.2 * a, np.array([0, 1, 0]) * 0.19 * b
            centre = np.array([side * a * _jaw_scale(0.08, ident.jaw), -0.08 * b, -0.1 * c])
            sc.fill(canvas, centre + np.cos(t) * out + np.sin(t) * up, skin * 0.92 * shade)
            sc.fill(canvas, centre + 0.55 * (np.cos(t) * out + np.sin(t) * up), skin * 0.72 * shade)


def _hair(sc: _Scene, head: np.ndarray) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray] | None:
    """The hair cap inside its bounding box: (box, coverage, shaded colour), or None when bald.

    The cap is a shell between the head (`head`: the full-frame hit mask) and an inflated ellipsoid. A ray shows
    hair where it enters the shell in the hair region, or, missing the head, where it leaves the shell through the
    hair region at the back (the inside of the cap, seen above the forehead)."""
    style = sc.ident.hair_style
    if style not in HAIR_CAPS:
        return None
    inflate, base, curve, x0, drop = HAIR_CAPS[style]
    grow = inflate - 1
    offset = np.array([0, 0.5 * grow * sc.axes[1], -0.3 * grow * sc.axes[2]])  # volume sits on the crown
    box, hit, (ux, uy, uz), shade, far = sc.raycast(sc.axes * inflate, 0.0, offset)

    def is_hair(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        start = base + 0.12 * x + 0.035 * np.sin(30 * x) if style == "fringe" else base  # swept, ragged bangs
        return y > start + curve * x**2 - drop * _smoothstep(x0, x0 + 0.15, np.abs(x)) - 0.8 * np.maximum(-z, 0)

    front = is_hair(ux, uy, uz)
    inside = ~front & ~head[box] & is_hair(*far)
    cover = hit & (front | inside)
    shade = np.where(inside, 0.55 * shade, shade)  # the inside of the cap is in shadow
    if style == "afro":
        texture = 0.8 + 0.2 * np.sin(34 * ux) * np.sin(34 * uy) * np.sin(34 * uz)
    else:
        angle = np.arctan2(ux, uy + 0.7)  # strands radiate from behind the crown, unevenly spaced
        texture = 0.88 + 0.12 * np.sin(60 * angle + 2.5 * np.sin(13 * angle))
    light = texture * shade
    colour = cv2.multiply(cv2.merge([light, light, light]), tuple(float(v) for v in sc.ident.hair_colour),
                          dtype=cv2.CV_8U)  # cv2 rounds and saturates; numpy's per-pixel broadcast is ~4x slower
    return box, cover, colour


def feature_outlines(identity: Identity, pose: Pose, size: int) -> dict[str, list[np.ndarray]]:
    """Outlines of the eyes (lids and lashes) and the mouth (lips at their opening and smile), as (N, 2) float
    arrays in output pixel coordinates (pixel centres at integers): what the trainer weights higher. Uses the same
    geometry as _draw_eyes and _draw_mouth; occlusion by yaw is ignored (the region is a loss weight, not a mask)."""
    sc = _Scene(identity, pose, size)
    a, b, _ = sc.axes
    w = identity.eye_size * a
    eyes = [_ellipse(side * identity.eye_spacing * a, 0.04 * b + 0.1 * w, 1.1 * w, 0.6 * w) for side in (-1, 1)]
    ym = (0.04 - identity.nose_length - 0.2) * b
    mw = identity.mouth_width * a * (1 + 0.15 * pose.smile)
    lift, gap = pose.smile * 0.11 * b * 0.7, pose.mouth_open * 0.17 * b  # corners rise with a smile; lips part
    mouth = _ellipse(0.0, ym + 0.5 * lift - 0.25 * gap, 1.05 * mw, 0.08 * b + 0.5 * lift + 0.5 * gap)

    def to_pixels(xy: np.ndarray) -> np.ndarray:
        return (sc.project(sc.surface(xy)) + 0.5) / SUPERSAMPLE - 0.5

    return {"eyes": [to_pixels(eye) for eye in eyes], "mouth": [to_pixels(mouth)]}


def render_face(identity: Identity, pose: Pose, size: int) -> tuple[np.ndarray, np.ndarray]:
    """synth.render without its argument checks."""
    sc = _Scene(identity, pose, size)
    s = sc.s
    theta = math.radians(pose.background_angle)
    ramp = (sc.xs[None, :] * math.cos(theta) + sc.ys[:, None] * math.sin(theta)).astype(np.float32)
    ramp = ramp * np.float32(1 / (2 * math.sqrt(2))) + np.float32(0.5)
    image = cv2.merge([(ramp * np.float32(b - a) + np.float32(a)).astype(np.uint8)
                       for a, b in zip(pose.background_a, pose.background_b)])
    _draw_body(sc, image)

    albedo = _solid(s, identity.skin)
    for draw in (_draw_eyes, _draw_brows, _draw_nose, _draw_mouth):
        draw(sc)
    sc.draw_shapes(albedo)
    box, hit, _, shade, _ = sc.raycast(sc.axes, identity.jaw, np.zeros(3))
    lit = cv2.multiply(albedo[box], cv2.merge([shade, shade, shade]), dtype=cv2.CV_8U)
    cv2.copyTo(lit, hit.view(np.uint8), image[box])  # writes into the view; ~50x faster than np.copyto(where=)
    head = np.zeros((s, s), bool)
    head[box] = hit
    face = head.copy()
    hair = _hair(sc, head)
    if hair is not None:
        box, cover, colour = hair
        cv2.copyTo(colour, cover.view(np.uint8), image[box])
        face[box] &= ~cover
    image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    mask = cv2.resize(face.view(np.uint8) * np.uint8(255), (size, size), interpolation=cv2.INTER_AREA)
    return image, np.where(mask >= 128, 255, 0).astype(np.uint8)
