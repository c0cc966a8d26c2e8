"""Deterministic parametric synthetic faces with ground truth.

Demo training data and a quality benchmark in one: an identity (face shape, skin, eyes, brows, nose, mouth, hair)
is separate from the per-image pose (head rotation, expression, lighting, background), so any identity can be
rendered under any pose. A swap A->B (the model's output for A's image decoded as B) is then scored against the true
rendering of B under A's pose, lighting and background (see training/evaluate.py).

Images look like aligned face crops: the head stays near the centre and the features move with the pose (the
renderer is training/synth_render.py). No global RNG is used: identities and poses come from `np.random.default_rng`
seeded per identity / per pose stream, and rendering is deterministic, so the same arguments give the same bytes on
every run.

This module holds the parameters (Identity, Pose), how they are drawn, and the on-disk dataset::

    out_dir/index.json               {"schema": "facetwin-synth/1", "size", "seed", "identities", "images"}
    out_dir/<name>/00000.png         RGB face crop
    out_dir/<name>/00000_mask.png    0/255 face mask (no hair, no background)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from facetwin.core.files import atomic_write_bytes
from facetwin.training.layout import INDEX_NAME, SYNTH_SCHEMA, IndexProblem, check_identity, png_bytes, read_index
from facetwin.training.synth_render import render_face

RENDERER_VERSION = 2  # bump when synth_render's output changes, so write_dataset re-renders cached datasets
MIN_SIZE, MAX_SIZE = 16, 512
PARALLEL_MIN_IMAGES = 400  # below this, starting worker processes costs more than it saves
PARALLEL_CHUNK = 50  # images per worker task: few round trips, still a smooth progress bar
# Friendly names of the first identities; later ones are id<index>.
NAMES = ("ada", "ben", "cleo", "dev", "eli", "fay", "gus", "hana", "ivo", "jun", "kai", "lea", "max", "nia", "otto",
         "pia")
HAIR_STYLES = ("short", "fringe", "long", "bald", "afro")
# Ordered so that consecutive identities alternate between light and dark tones.
SKIN_TONES = ((250, 218, 190), (150, 98, 64), (228, 178, 136), (104, 66, 44), (255, 204, 168), (188, 126, 84),
              (236, 196, 166), (168, 110, 70))
HAIR_COLOURS = ((28, 22, 20), (96, 58, 32), (214, 176, 96), (156, 56, 28), (72, 72, 80), (222, 222, 226),
                (46, 30, 22), (130, 96, 60))
IRIS_COLOURS = ((64, 112, 170), (92, 58, 32), (64, 124, 80), (126, 96, 48), (104, 128, 142), (46, 32, 24))
SHIRT_COLOURS = ((40, 70, 140), (160, 40, 50), (40, 120, 80), (220, 200, 80), (90, 90, 96), (230, 230, 230),
                 (120, 60, 140), (230, 120, 40))
RGB = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class Identity:
    """Everything that stays the same across one person's images. Lengths are in crop half-widths."""

    name: str  # folder name in the dataset and identity name in bundles
    head_width: float  # half-width of the head ellipsoid
    head_height: float  # half-height of the head ellipsoid (crown to chin / 2)
    jaw: float  # -0.5 (square, broad jaw) .. 1 (narrow, pointed chin)
    skin: RGB  # skin albedo
    eye_size: float  # eye half-width, fraction of head_width
    eye_spacing: float  # eye centre distance from the midline, fraction of head_width
    iris: RGB  # iris colour
    brow_thickness: float  # fraction of head_height
    brow_angle: float  # degrees; positive lifts the outer ends
    brow_colour: RGB  # eyebrow colour
    nose_length: float  # eye line to nose tip, fraction of head_height
    nose_width: float  # half-width of the nose base, fraction of head_width
    mouth_width: float  # half-width of the mouth, fraction of head_width
    lip_colour: RGB  # lip colour
    hair_colour: RGB  # hair colour (unused when bald)
    hair_style: str  # one of HAIR_STYLES
    shirt_colour: RGB  # clothing seen at the bottom of the crop


@dataclasses.dataclass(frozen=True)
class Pose:
    """Everything that changes from image to image."""

    yaw: float  # degrees, + turns the face towards the viewer's right
    pitch: float  # degrees, + tilts the face up
    roll: float  # degrees, + tilts the head clockwise in the image
    mouth_open: float  # 0 closed .. 1 wide open
    smile: float  # 0 neutral .. 1 broad smile
    blink: float  # 0 eyes open .. 1 closed
    light_azimuth: float  # degrees in the image plane the light comes from: 0 right, 90 above
    light_elevation: float  # degrees between the image plane and the light: 90 = from the camera
    light_intensity: float  # diffuse (Lambert) strength
    ambient: float  # light that reaches every surface
    background_a: RGB  # colour at one end of the background gradient
    background_b: RGB  # colour at the other end
    background_angle: float  # direction of the gradient, degrees
    shift_x: float  # crop jitter of the head centre, crop half-widths
    shift_y: float
    scale: float  # crop jitter of the head size


def _rgb(values: Any) -> RGB:
    return tuple(int(np.clip(round(float(v)), 0, 255)) for v in values)  # type: ignore[return-value]


def make_identity(index: int, seed: int = 0) -> Identity:
    """Identity `index` of the family `seed`. Categorical traits cycle through palettes with strides that keep the
    first identities far apart (all hair styles within any 5, all skin tones within any 8); continuous traits are
    drawn from an rng seeded by (seed, index)."""
    if not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"identity index must be an integer >= 0, got {index!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    index, seed = int(index), int(seed)
    rng = np.random.default_rng([seed, index, 0x1D])
    skin = np.array(SKIN_TONES[(index + seed) % len(SKIN_TONES)], float) * rng.uniform(0.96, 1.04)
    hair = np.array(HAIR_COLOURS[(5 * index + 2 * seed) % len(HAIR_COLOURS)], float)
    style = HAIR_STYLES[(index + seed) % len(HAIR_STYLES)]
    brow = hair * 0.8 if hair.mean() < 150 else hair * 0.55
    if style == "bald":
        brow = np.minimum(skin * 0.35, 90)
    lip = skin * np.array([0.82, 0.52, 0.52]) + rng.uniform(-12, 12, 3)
    return Identity(
        name=NAMES[index] if index < len(NAMES) else f"id{index}",
        head_width=float(rng.uniform(0.50, 0.60)),
        head_height=float(rng.uniform(0.68, 0.76)),
        jaw=float(rng.uniform(-0.5, 1.0)),
        skin=_rgb(skin),
        eye_size=float(rng.uniform(0.15, 0.21)),
        eye_spacing=float(rng.uniform(0.34, 0.44)),
        iris=IRIS_COLOURS[int(rng.integers(len(IRIS_COLOURS)))],
        brow_thickness=float(rng.uniform(0.035, 0.08)),
        brow_angle=float(rng.uniform(-14, 14)),
        brow_colour=_rgb(brow),
        nose_length=float(rng.uniform(0.24, 0.36)),
        nose_width=float(rng.uniform(0.12, 0.22)),
        mouth_width=float(rng.uniform(0.26, 0.40)),
        lip_colour=_rgb(lip),
        hair_colour=_rgb(hair),
        hair_style=style,
        shirt_colour=SHIRT_COLOURS[(7 * index + seed) % len(SHIRT_COLOURS)],
    )


def sample_pose(rng: np.random.Generator) -> Pose:
    """One random pose; modest head rotations as in aligned face crops, mostly open eyes."""
    return Pose(
        yaw=float(rng.uniform(-25, 25)),
        pitch=float(rng.uniform(-15, 15)),
        roll=float(rng.uniform(-12, 12)),
        mouth_open=float(rng.uniform(0, 1) ** 2),
        smile=float(rng.uniform(0, 1)),
        blink=float(rng.uniform(0, 1) ** 4),
        light_azimuth=float(rng.uniform(0, 360)),
        light_elevation=float(rng.uniform(30, 80)),
        light_intensity=float(rng.uniform(0.45, 0.75)),
        ambient=float(rng.uniform(0.30, 0.50)),
        background_a=_rgb(rng.integers(0, 256, 3)),
        background_b=_rgb(rng.integers(0, 256, 3)),
        background_angle=float(rng.uniform(0, 360)),
        shift_x=float(rng.uniform(-0.03, 0.03)),
        shift_y=float(rng.uniform(-0.03, 0.03)),
        scale=float(rng.uniform(0.95, 1.05)),
    )


def test_poses(count: int, seed: int) -> list[Pose]:
    """Held-out evaluation poses: their rng stream is tagged differently from write_dataset's, so they never repeat
    a training pose even when the seeds coincide."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    rng = np.random.default_rng([int(seed), 0x7E57])
    return [sample_pose(rng) for _ in range(count)]


test_poses.__test__ = False  # type: ignore[attr-defined]  # not a pytest test despite the name


def render(identity: Identity, pose: Pose, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Renders one aligned face crop: (image HxWx3 uint8 RGB, face mask HxW uint8 0/255 without hair)."""
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be an integer in {MIN_SIZE}..{MAX_SIZE}, got {size!r}")
    return render_face(identity, pose, int(size))



def _from_dict(cls: type, data: Any, what: str) -> Any:
    """Rebuilds a frozen dataclass from JSON (lists back to RGB tuples), with errors that name the bad field."""
    if not isinstance(data, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(data).__name__}")
    fields = {f.name: f.type for f in dataclasses.fields(cls)}  # annotations are strings: "RGB", "float", "str"
    missing, unknown = sorted(set(fields) - set(data)), sorted(set(data) - set(fields))
    if missing or unknown:
        raise ValueError(f"{what} does not match {cls.__name__}: missing {missing}, unknown {unknown}")
    values: dict[str, Any] = {}
    for key, value in data.items():
        kind = fields[key]
        if kind == "RGB":
            if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(
                    isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value):
                raise ValueError(f"{what}.{key} must be an RGB triple of integers 0..255, got {value!r}")
            values[key] = tuple(value)
        elif kind == "str" and isinstance(value, str):
            values[key] = value
        elif kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(
                value):
            values[key] = float(value)
        else:
            raise ValueError(f"{what}.{key} must be a {kind}, got {value!r}")
    return cls(**values)


def pose_from_dict(data: dict[str, Any]) -> Pose:
    """The Pose of an index.json image entry's "pose" (floats round-trip exactly through JSON)."""
    return _from_dict(Pose, data, "pose")


def identity_from_dict(data: dict[str, Any]) -> Identity:
    """The Identity of an index.json "identities" entry: {"name": ..., "params": {...}}."""
    if not isinstance(data, dict) or "name" not in data or "params" not in data:
        raise ValueError('identity entry must be {"name": ..., "params": {...}}')
    if not isinstance(data["params"], dict):
        raise ValueError(f"identity {data['name']!r}: params must be a JSON object")
    ident = _from_dict(Identity, {"name": data["name"], **data["params"]}, f"identity {data['name']!r}")
    check_identity(ident.name)
    if ident.hair_style not in HAIR_STYLES:
        raise ValueError(f"identity {ident.name!r}: hair_style {ident.hair_style!r} is not one of {HAIR_STYLES}")
    return ident


def _identity_entry(ident: Identity) -> dict[str, Any]:
    params = dataclasses.asdict(ident)
    return {"name": params.pop("name"), "params": params}


def dataset_index(identities: int, images: int, size: int = 64, seed: int = 0) -> dict[str, Any]:
    """The index.json write_dataset produces for these arguments, computed without rendering anything."""
    for label, value, lo, hi in (("identities", identities, 2, None), ("images", images, 1, None),
                                 ("size", size, MIN_SIZE, MAX_SIZE), ("seed", seed, 0, None)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < lo or (hi and value > hi):
            bound = f"in {lo}..{hi}" if hi else f">= {lo}"
            raise ValueError(f"{label} must be an integer {bound}, got {value!r}")
    idents = [make_identity(i, seed) for i in range(identities)]
    entries = []
    for i, ident in enumerate(idents):
        rng = np.random.default_rng([int(seed), i, 0x905E])  # each identity has its own pose stream
        for k in range(images):
            pose = sample_pose(rng)
            entries.append({"identity": ident.name, "file": f"{ident.name}/{k:05d}.png",
                            "mask": f"{ident.name}/{k:05d}_mask.png", "pose": dataclasses.asdict(pose)})
    return {"schema": SYNTH_SCHEMA, "renderer": RENDERER_VERSION, "size": int(size), "seed": int(seed),
            "identities": [_identity_entry(ident) for ident in idents], "images": entries}


def _render_files(out_dir: str, identities: list[dict[str, Any]], entries: list[dict[str, Any]], size: int) -> int:
    """Renders and writes the PNGs of index entries; module-level so that worker processes can run it."""
    by_name = {e["name"]: identity_from_dict(e) for e in identities}
    for entry in entries:
        image, mask = render(by_name[entry["identity"]], pose_from_dict(entry["pose"]), size)
        (Path(out_dir) / entry["file"]).write_bytes(png_bytes(image))
        (Path(out_dir) / entry["mask"]).write_bytes(png_bytes(mask))
    return len(entries)


def write_dataset(out_dir: str | os.PathLike, identities: int, images: int, size: int = 64, seed: int = 0,
                  progress: bool = True, workers: int = 1) -> Path:
    """Writes out_dir/<name>/<i:05d>.png (+ _mask.png) for every identity and out_dir/index.json last.

    index.json only ever lists complete files: an index for other arguments is removed before anything is
    rewritten, and the new one is written atomically after every image. When out_dir already holds this exact
    index, only missing files are rendered (none on a plain re-run). With workers > 1 that many processes render
    in parallel once there are enough images to repay their start-up; they are spawned (not forked: the caller may
    run torch/OpenMP threads), so a calling script needs the usual `if __name__ == "__main__":` guard."""
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    index = dataset_index(identities, images, size, seed)
    payload = (json.dumps(index, indent=1, sort_keys=True) + "\n").encode()
    out = Path(out_dir)
    index_path = out / INDEX_NAME
    todo = index["images"]
    if index_path.is_file() and index_path.read_bytes() == payload:
        todo = [e for e in todo if not ((out / e["file"]).is_file() and (out / e["mask"]).is_file())]
        if not todo:
            return out
    else:
        index_path.unlink(missing_ok=True)
    for entry in index["identities"]:
        (out / entry["name"]).mkdir(parents=True, exist_ok=True)
    chunks = [todo[i:i + PARALLEL_CHUNK] for i in range(0, len(todo), PARALLEL_CHUNK)]
    from tqdm import tqdm

    with tqdm(total=len(todo), desc=f"synth {identities}x{images} @{size}px", unit="img", disable=not progress) as bar:
        if workers > 1 and len(todo) >= PARALLEL_MIN_IMAGES:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn, not fork: the caller may already run torch/OpenMP threads, which do not survive a fork.
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(min(workers, len(chunks)), mp_context=context) as pool:
                for done in pool.map(_render_files, *zip(*[(str(out), index["identities"], chunk, size)
                                                           for chunk in chunks])):
                    bar.update(done)
        else:
            for chunk in chunks:
                bar.update(_render_files(str(out), index["identities"], chunk, size))
    atomic_write_bytes(index_path, payload)
    return out


def load_index(data_dir: str | os.PathLike) -> dict[str, Any]:
    """Reads and checks data_dir/index.json of a dataset made by write_dataset."""
    try:
        index = read_index(data_dir, (SYNTH_SCHEMA,))
    except IndexProblem as exc:
        raise ValueError(f"{exc} (make synthetic faces with facetwin-train synth)") from None
    for key in ("size", "seed"):
        if key not in index:
            raise ValueError(f"{Path(data_dir) / INDEX_NAME} lacks {key!r}")
    return index
