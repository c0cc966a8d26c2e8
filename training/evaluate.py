"""Swap scores: the ground truth of synthetic faces, and the real-face metrics of training/quality.py, as one report.

On real faces a swap A->B has no right answer; on synthetic faces it has one: identity B rendered under A's pose,
expression, lighting and background. synthetic_swap_score renders held-out poses for A, runs the bundle's ONNX graph
for target B (ONNX Runtime on the CPU, exactly what the server's ORT backend runs, without torch or the server), and
compares the result with that rendering: SSIM over the whole crop, SSIM over B's face, and mean absolute error.

evaluate_bundle builds the report `facetwin-train evaluate --json` prints (`compare` prints one table row per bundle):

    synthetic   ssim, l1 on B's face mask; ssim_crop, l1_crop over the whole crop; ssim_rebuild: B -> B on the same
                poses, the model's own ceiling (bundles trained on synth faces)
    identity    dist_to_target, dist_to_source (dlib descriptors on dlib-framed chips; raw_* on the raw output)
    landmarks   nme: 68-landmark error between source and served swap / face width (raw_nme: the raw output);
                motion_error: the raw swap's landmark motion vs the source's (0 = followed, 1 = a still face)
    temporal    flicker_ratio: frame-to-frame change of the swapped clip / that of the source clip (served_*: served)
    reasons     why each section that is null could not be computed (never an exception for that)

Real faces come from an extracted data set (`--data`, frame order from the index) and/or a video (`--video`).
The swaps scored on them can also come from a file another host saved (bundle_swaps / save_swaps / load_swaps:
a GPU host that trained the model without dlib's weights; bench/gpu_real.py).
When the data set is one part of `facetwin-train split` (the held-out part: the end of each identity's footage,
kept out of training), the report's "split" says which frames those are and the Markdown table says so under it.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from facetwin.core import alignment, blending
from facetwin.core.bundle import Manifest, load_manifest
from facetwin.core.files import atomic_write_bytes
from facetwin.training import quality, synth
from facetwin.training.layout import HELD_OUT_POSES, HELD_OUT_SEED, png_bytes
from facetwin.training.split import check_pair

BATCH = 32  # images per ONNX Runtime call: bounds memory at large resolutions


def ssim_maps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel SSIM of two batches of images (N, H, W, C) in 0..255, averaged over channels: (N, H, W). It is the
    training loss's SSIM (losses.ssim_map: Wang et al. 2004, reflected borders, so the map covers every pixel),
    computed in float32 as in training (6x faster on a CPU than float64; a face SSIM moves by ~1e-5)."""
    # torch is imported here, not with the module: scripts that only read reports or draw grids (the examples, the
    # CLI's compare) start without its 2 s import.
    import torch

    from facetwin.training import losses

    maps = []
    for start in range(0, len(a), BATCH):  # bounds the memory of the five stacked statistics at large sides
        x, y = (torch.from_numpy(np.ascontiguousarray(v[start:start + BATCH].transpose(0, 3, 1, 2), np.float32))
                for v in (a, b))
        maps.append(losses.ssim_map(x, y, data_range=255.0).mean(dim=1).numpy())
    return np.concatenate(maps)


def masked_mean(ssim_map: np.ndarray, mask: np.ndarray) -> float:
    """The mean of an (H, W) SSIM map over the pixels where mask (H, W) is nonzero."""
    mask = np.asarray(mask)
    if mask.shape != ssim_map.shape:
        raise ValueError(f"mask shape {mask.shape} != image shape {ssim_map.shape}")
    inside = mask > 0
    if not inside.any():
        raise ValueError("mask is empty: SSIM over no pixels is undefined")
    return float(ssim_map[inside].mean())


def ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Structural similarity of two images (HxW or HxWxC, values in 0..255), averaged over channels (ssim_maps);
    with `mask` (HxW, nonzero = inside) averaged over the masked pixels only."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim not in (2, 3):
        raise ValueError(f"ssim needs two images of the same HxW or HxWxC shape, got {a.shape} and {b.shape}")
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    ssim_map = ssim_maps(a[None], b[None])[0]
    return float(ssim_map.mean()) if mask is None else masked_mean(ssim_map, mask)


class SwapRunner:
    """The bundle's ONNX graphs, one InferenceSession per target identity, fed RGB uint8 images."""

    def __init__(self, bundle_dir: str | os.PathLike, threads: int = 2):
        import onnxruntime as ort  # only evaluation needs it; importing synth data must not

        self.bundle_dir = Path(bundle_dir)
        self.manifest: Manifest = load_manifest(self.bundle_dir)
        self._ort, self._threads = ort, threads  # intra-op threads per session: the demo machine has 2 cores
        self._sessions: dict[str, Any] = {}

    def _session(self, target: str) -> Any:
        if target not in self.manifest.targets:
            raise ValueError(f"bundle {self.bundle_dir} has no graph for target {target!r}; "
                             f"targets: {sorted(self.manifest.targets)}")
        if target not in self._sessions:
            options = self._ort.SessionOptions()
            options.intra_op_num_threads = self._threads
            path = str(self.bundle_dir / self.manifest.targets[target])
            self._sessions[target] = self._ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        return self._sessions[target]

    def swap(self, images: np.ndarray, target: str) -> tuple[np.ndarray, np.ndarray]:
        """(N, R, R, 3) uint8 RGB aligned faces -> (swapped faces (N, R, R, 3) float in 0..1, masks (N, R, R))."""
        m = self.manifest
        if images.ndim != 4 or images.shape[1:] != (m.resolution, m.resolution, 3):
            raise ValueError(f"expected (N, {m.resolution}, {m.resolution}, 3) images, got {images.shape}")
        session, faces, masks = self._session(target), [], []
        for start in range(0, len(images), BATCH):
            batch = np.ascontiguousarray(images[start:start + BATCH].transpose(0, 3, 1, 2), np.float32) / 255.0
            face, mask = session.run([m.output_face.name, m.output_mask.name],
                                     {m.input.name: batch.astype(m.input.dtype)})
            if face.shape != batch.shape or mask.shape != (len(batch), 1) + batch.shape[2:]:
                raise ValueError(f"target {target!r} returned face {face.shape} and mask {mask.shape} for input "
                                 f"{batch.shape}; the bundle contract wants (B, 3, R, R) and (B, 1, R, R)")
            faces.append(np.clip(face.astype(np.float64), 0, 1).transpose(0, 2, 3, 1))
            masks.append(np.clip(mask.astype(np.float64)[:, 0], 0, 1))
        return np.concatenate(faces), np.concatenate(masks)


def synth_identities(manifest: Manifest) -> tuple[int, dict[str, synth.Identity]]:
    """The synth seed and Identity of every identity a bundle was trained on, from its training_config."""
    data = manifest.training_config.get("data")
    if not isinstance(data, dict) or data.get("kind") != "synth":
        raise ValueError('the bundle was not trained on synthetic faces: training_config lacks '
                         '"data": {"kind": "synth", "seed": ..., "identities": [...]}, so there is no ground truth')
    seed, names = data.get("seed"), data.get("identities")
    if not isinstance(seed, int) or not isinstance(names, list) or not names:
        raise ValueError(f'training_config "data" needs an integer "seed" and a list "identities", got {data!r}')
    identities = {}
    for i, name in enumerate(names):
        ident = synth.make_identity(i, seed)
        if ident.name != name:
            raise ValueError(f"training identity {i} is {name!r} but synth.make_identity({i}, seed={seed}) is "
                             f"{ident.name!r}: the bundle's synthetic identities cannot be reproduced")
        identities[name] = ident
    for name in manifest.identities:
        if name not in identities:
            raise ValueError(f"bundle identity {name!r} is not among the synthetic training identities {names}")
    return seed, identities


def _pairs(manifest: Manifest, known: dict[str, synth.Identity], source: str | None,
           target: str | None) -> list[tuple[str, str]]:
    for label, name in (("source", source), ("target", target)):
        if name is not None and name not in known:
            raise ValueError(f"{label} {name!r} is not a synthetic identity of this bundle: {sorted(known)}")
    if target is not None and target not in manifest.targets:
        raise ValueError(f"target {target!r} has no graph in the bundle; targets: {sorted(manifest.targets)}")
    if source is not None and target is not None:
        return [(source, target)]  # both given: A == B is allowed and scores reconstruction
    pairs = [(a, b) for a, b in itertools.product(manifest.identities, sorted(manifest.targets)) if a != b]
    return [(a, b) for a, b in pairs if source in (None, a) and target in (None, b)]


def synthetic_swap_score(bundle_dir: str | os.PathLike, count: int = HELD_OUT_POSES, seed: int = HELD_OUT_SEED,
                         source: str | None = None, target: str | None = None) -> dict[str, Any]:
    """Scores swaps A->B against the true rendering of B on `count` held-out poses (synth.test_poses(count, seed)).

    Returns {"pairs": [{"source", "target", "ssim", "ssim_face", "l1", "l1_face"}], "ssim", "ssim_face", "l1",
    "l1_face", "ssim_face_rebuild", "rebuild", "count", ...} where ssim_face / l1_face are taken over B's
    ground-truth face mask (dilated a little, so the face outline counts), ssim / l1 over the whole crop, l1 as mean
    absolute error in 0..1; the top-level values are means over the pairs. rebuild: per target B, the face SSIM of
    B's own faces under the same poses through B's graph (B -> B); ssim_face_rebuild is their mean."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    runner = SwapRunner(bundle_dir)
    manifest = runner.manifest
    synth_seed, known = synth_identities(manifest)
    pairs = _pairs(manifest, known, source, target)
    if not pairs:
        raise ValueError(f"no (source, target) pair to score with source={source!r}, target={target!r}")
    res, poses = manifest.resolution, synth.test_poses(count, seed)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * max(1, res // 32) + 1,) * 2)
    renders: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def rendered(name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in renders:
            out = [synth.render(known[name], pose, res) for pose in poses]
            renders[name] = np.stack([o[0] for o in out]), np.stack([cv2.dilate(o[1], kernel) for o in out])
        return renders[name]

    results = []
    for a, b in pairs:
        swapped, _ = runner.swap(rendered(a)[0], b)
        truth, face = rendered(b)
        maps = ssim_maps(swapped * 255.0, truth)
        results.append({
            "source": a,
            "target": b,
            "ssim": float(maps.mean()),  # every image has the same size: the mean of the per-image means
            "ssim_face": float(np.mean([masked_mean(m, f) for m, f in zip(maps, face)])),
            "l1": float(np.mean(np.abs(swapped - truth / 255.0))),
            "l1_face": float(np.mean([np.abs(p - t / 255.0)[m > 0].mean() for p, t, m in zip(swapped, truth, face)])),
        })
    summary = {key: float(np.mean([r[key] for r in results])) for key in ("ssim", "ssim_face", "l1", "l1_face")}
    # The same poses of each target rebuilt by its own decoder: what the model can draw at all, so a reader can tell
    # missing detail (low here too) from identity the swap leaks (high here, low above).
    rebuild = {}
    for b in sorted({b for _, b in pairs}):
        truth, face = rendered(b)
        rebuilt, _ = runner.swap(truth, b)
        rebuild[b] = float(np.mean([masked_mean(m, f) for m, f in zip(ssim_maps(rebuilt * 255.0, truth), face)]))
    return {"pairs": results, **summary, "ssim_face_rebuild": float(np.mean(list(rebuild.values()))),
            "rebuild": rebuild, "count": count, "seed": seed, "synth_seed": synth_seed, "resolution": res}


def swap_grid(bundle_dir: str | os.PathLike, out_png: str | os.PathLike, count: int = 6, seed: int = HELD_OUT_SEED,
              source: str | None = None, target: str | None = None, scale: int = 3) -> Path:
    """Writes a PNG with rows source A | swap A->B | ground truth B, then the same for B->A when the bundle has a
    graph for A; `count` held-out poses per row, upscaled `scale` times (nearest) with a label column."""
    if count < 1 or scale < 1:
        raise ValueError(f"count and scale must be >= 1, got {count} and {scale}")
    runner = SwapRunner(bundle_dir)
    manifest = runner.manifest
    _, known = synth_identities(manifest)
    source = source or manifest.identities[0]
    target = target or next(n for n in manifest.identities if n != source and n in manifest.targets)
    _pairs(manifest, known, source, target)  # validates the names
    res, poses = manifest.resolution, synth.test_poses(count, seed)
    rows: list[tuple[str, np.ndarray]] = []
    for a, b in ((source, target), (target, source)):
        if b not in manifest.targets:
            continue
        images = np.stack([synth.render(known[a], pose, res)[0] for pose in poses])
        swapped, _ = runner.swap(images, b)
        truth = np.stack([synth.render(known[b], pose, res)[0] for pose in poses])
        rows += [(a, images), (f"{a}->{b}", np.round(swapped * 255).astype(np.uint8)), (f"true {b}", truth)]
    return atomic_write_bytes(Path(out_png), png_bytes(compose_grid(rows, scale)))


def compose_grid(rows: list[tuple[str, list[np.ndarray] | np.ndarray]], scale: int = 3) -> np.ndarray:
    """Labelled rows of equal-sized RGB images -> one RGB grid image, each cell upscaled `scale` times (nearest)."""
    res = rows[0][1][0].shape[0]
    count = max(len(images) for _, images in rows)
    cell, gap = res * scale, 2
    font, font_scale = cv2.FONT_HERSHEY_PLAIN, 0.9
    label_w = max(cv2.getTextSize(label, font, font_scale, 1)[0][0] for label, _ in rows) + 12
    height, width = len(rows) * (cell + gap) + gap, label_w + count * (cell + gap) + gap
    grid = np.full((height, width, 3), 255, np.uint8)
    for r, (label, images) in enumerate(rows):
        y = gap + r * (cell + gap)
        cv2.putText(grid, label, (6, y + cell // 2 + 4), font, font_scale, (20, 20, 20), 1, cv2.LINE_AA)
        for c, image in enumerate(images):
            x = label_w + gap + c * (cell + gap)
            grid[y:y + cell, x:x + cell] = cv2.resize(image, (cell, cell), interpolation=cv2.INTER_NEAREST)
    return grid


# ------------------------------------------------------------------------------------------------ the report

REAL_FACES = 16  # real faces swapped per (source, target) pair, consecutive in playing order
REFERENCE_FACES = 32  # real crops averaged into each identity's reference embedding, spread over its clip


@dataclasses.dataclass
class RealInput:
    """Real faces to score bundles on: an extracted data set and/or the faces of one video, loaded once (compare
    reuses it for every bundle). identity_map renames data set / video identities to bundle identities."""

    dataset: dict[str, quality.RealFaces] | None = None  # data set identity -> faces, at the set's crop side
    margin: float = alignment.DEFAULT_MARGIN  # crop margin the faces were (or will be) aligned with
    video: quality.VideoFaces | None = None
    video_identity: str | None = None  # the bundle identity the video shows
    identity_map: dict[str, str] = dataclasses.field(default_factory=dict)
    described: str = ""  # where the faces came from, for the report
    split: dict[str, Any] | None = None  # the data set's "split" entry when it is a part of `facetwin-train split`

    @classmethod
    def load(cls, data: str | os.PathLike | None = None, video: str | os.PathLike | None = None,
             video_identity: str | None = None, identity_map: dict[str, str] | None = None, every: int = 1,
             max_frames: int | None = 120) -> "RealInput":
        """Reads the data set and/or detects the video's faces; MetricsError when either is unusable."""
        real = cls(identity_map=dict(identity_map or {}))
        parts = []
        if data is not None:
            real.dataset, real.margin = quality.faces_from_dataset(data)
            real.split = quality.dataset_split(data)
            if real.split:
                parts.append(f"data set {data}, the {real.split.get('part')} part of {real.split.get('of')} "
                             f"({quality.describe_split(real.split)})")
            else:
                parts.append(f"data set {data} ({', '.join(f'{k}: {len(v.crops)}' for k, v in real.dataset.items())})")
        if video is not None:
            if not video_identity:
                raise quality.MetricsError("--video needs --video-identity: the bundle identity the video shows")
            real.video = quality.faces_from_video(video, every=every, max_frames=max_frames)
            real.video_identity = video_identity
            parts.append(f"video {video} as {video_identity} ({len(real.video.frames)} frames with a face)")
        real.described = "; ".join(parts)
        return real

    def faces_for(self, manifest: Manifest) -> tuple[dict[str, quality.RealFaces], dict[str, quality.RealFaces]]:
        """(clips to swap, faces for reference embeddings), both keyed by bundle identity, at the bundle's side.
        The video, when given, is the clip of its identity; references prefer the data set."""
        size, clips, refs = manifest.resolution, {}, {}
        for name, faces in (self.dataset or {}).items():
            ident = self.identity_map.get(name, name)
            if ident in manifest.identities:
                clips[ident] = refs[ident] = quality.resized(faces, size, ident)
        if self.video is not None:
            ident = self.identity_map.get(self.video_identity, self.video_identity)
            if ident in manifest.identities:
                clips[ident] = self.video.at(ident, size, self.margin)
                refs.setdefault(ident, clips[ident])
        return clips, refs


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return float(np.mean([r[key] for r in rows]))


def real_pairs(manifest: Manifest, clips: dict[str, quality.RealFaces]) -> list[tuple[str, str]]:
    """(source, target) pairs to score: every identity with real faces to every other target of the bundle."""
    return [(a, b) for a in manifest.identities for b in sorted(manifest.targets) if a != b and a in clips]


@dataclasses.dataclass
class SavedSwaps:
    """Swaps of real faces made on one host and scored on another (save_swaps / load_swaps): a GPU host that trains
    the full model has no dlib weights to score with, and its bundle is too big to carry back. Per (source, target)
    pair the source crops and the raw model outputs (faces and masks), and the bundle's manifest; scoring checks that
    the crops it would swap are exactly the saved ones."""

    manifest: Manifest
    pairs: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]  # (source, target) -> (crops, swaps), uint8 RGB
    # (source, target) -> the model's masks of the swaps, uint8 (N, R, R); missing from files saved without them,
    # whose served faces are then pasted through the hull alone
    masks: dict[tuple[str, str], np.ndarray] = dataclasses.field(default_factory=dict)

    def swapper(self, target: str):
        def swap(crops: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
            for (a, b), (saved, swapped) in self.pairs.items():
                if b == target and saved.shape[1:] == crops.shape[1:] and len(saved) >= len(crops) \
                        and np.array_equal(saved[:len(crops)], crops):
                    masks = self.masks.get((a, b))
                    return swapped[:len(crops)], None if masks is None else masks[:len(crops)]
            raise quality.MetricsError(f"no saved swaps to {target!r} of these {len(crops)} faces: score the data "
                                       "set the swaps were saved from, with at most as many --faces")
        return swap


def bundle_swaps(bundle_dir: str | os.PathLike, real: RealInput, faces_per_pair: int = REAL_FACES) -> SavedSwaps:
    """Runs the bundle on the real faces evaluate would score (the first `faces_per_pair` of each source, in
    playing order, to every other target): needs ONNX Runtime, not dlib."""
    runner = SwapRunner(bundle_dir)
    return swap_clips(runner, real.faces_for(runner.manifest)[0], faces_per_pair)


def swap_clips(runner: SwapRunner, clips: dict[str, quality.RealFaces], faces_per_pair: int) -> SavedSwaps:
    """The first `faces_per_pair` faces of each clip (RealInput.faces_for) swapped to every other target."""
    pairs, masks = {}, {}
    for a, b in real_pairs(runner.manifest, clips):
        crops = clips[a].crops[:faces_per_pair]
        swapped, masks[(a, b)] = (np.round(v * 255.0).astype(np.uint8) for v in runner.swap(crops, b))
        pairs[(a, b)] = (crops, swapped)
    return SavedSwaps(runner.manifest, pairs, masks)


def save_swaps(swaps: SavedSwaps, path: str | os.PathLike) -> Path:
    """One compressed .npz (no pickle): the manifest as JSON, "crops:<source>:<target>", "swaps:<...>" and
    "masks:<...>" arrays."""
    arrays = {f"{kind}:{a}:{b}": array for (a, b), pair in swaps.pairs.items()
              for kind, array in zip(("crops", "swaps"), pair)}
    arrays.update({f"masks:{a}:{b}": array for (a, b), array in swaps.masks.items()})
    buffer = io.BytesIO()
    np.savez_compressed(buffer, manifest=np.array(swaps.manifest.to_json()), **arrays)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def load_swaps(path: str | os.PathLike) -> SavedSwaps:
    """A save_swaps file (read without pickle); MetricsError when it is not one."""
    try:
        with np.load(path, allow_pickle=False) as data:
            manifest = Manifest.from_dict(json.loads(str(data["manifest"])))
            pairs, masks = {}, {}
            for key in data.files:
                kind, _, rest = key.partition(":")
                if kind == "crops":
                    a, b = rest.split(":")
                    pairs[(a, b)] = (data[key], data[f"swaps:{a}:{b}"])
                elif kind == "masks":
                    a, b = rest.split(":")
                    masks[(a, b)] = data[key]
    except (OSError, KeyError, ValueError) as exc:
        raise quality.MetricsError(f"{path} is not a file of saved swaps: {exc}") from exc
    return SavedSwaps(manifest, pairs, masks)


def real_face_sections(bundle_dir: str | os.PathLike | None, real: RealInput, faces_per_pair: int = REAL_FACES,
                       reference_faces: int = REFERENCE_FACES, keep_shape: float = blending.KEEP_SHAPE,
                       saved: SavedSwaps | None = None, paste_mask: str = blending.PASTE_MASK,
                       progress: Callable[[str], None] = lambda stage: None,
                       ) -> tuple[dict[str, Any], dict[str, str]]:
    """The identity, landmarks and temporal sections (see training/quality.py), and a reason for each that
    cannot be computed. keep_shape, paste_mask: the server settings the served faces are scored with. With `saved`, the swaps
    come from that file instead of running the bundle (bundle_dir is then unused); without, the bundle's swaps are
    made first (swap_clips) and scored the same way. progress(stage) is told each stage as it starts."""
    reasons: dict[str, str] = {}
    sections: dict[str, Any] = {"identity": None, "landmarks": None, "temporal": None}
    missing = quality.dlib_missing()
    if missing is not None:
        return sections, {k: f"dlib is unavailable: {missing}" for k in sections}
    runner = SwapRunner(bundle_dir) if saved is None else None
    manifest = runner.manifest if runner is not None else saved.manifest
    clips, ref_faces = real.faces_for(manifest)
    if not clips:
        names = sorted(set(real.dataset or {}) | ({real.video_identity} if real.video_identity else set()))
        why = (f"no real faces of the bundle's identities {list(manifest.identities)} (the real faces are of "
               f"{names}; map them with --map DATA=BUNDLE)")
        return sections, {k: why for k in sections}
    pairs = real_pairs(manifest, clips)
    if not pairs:
        why = f"no target other than {sorted(clips)} to swap their faces to (targets: {sorted(manifest.targets)})"
        return sections, {k: why for k in sections}
    if runner is not None:
        progress(f"swapping {faces_per_pair} real faces of {len(clips)} identities")
        saved = swap_clips(runner, clips, faces_per_pair)
    progress("reference embeddings")
    scorer = quality.ChipScorer(manifest.resolution, real.margin)
    references = {name: quality.reference_embedding(scorer, faces, reference_faces)[0]
                  for name, faces in ref_faces.items()}
    rows = []
    for number, (a, b) in enumerate(pairs, 1):
        progress(f"scoring {a} -> {b} ({number}/{len(pairs)})")
        rows.append(quality.score_pair(scorer, saved.swapper(b), clips[a], faces_per_pair, references, b, keep_shape,
                                       paste_mask))
    moving = [r for r in rows if r["motion_error"] is not None]
    if not moving:
        reasons["landmarks.motion_error"] = "one face per pair: no motion to follow (swap more faces: --faces)"
    sections["landmarks"] = {"nme": _mean(rows, "nme"), "raw_nme": _mean(rows, "raw_nme"),
                             "motion_error": _mean(moving, "motion_error") if moving else None,
                             "mouth_motion_error": _mean(moving, "mouth_motion_error") if moving else None,
                             "keep_shape": keep_shape, "paste_mask": paste_mask, "normalised_by": "face width (x extent of the jaw line)",
                             "pairs": [{k: r[k] for k in ("source", "target", "faces", "nme", "raw_nme", "motion_error",
                                                          "mouth_motion_error")} for r in rows]}
    scored = [r for r in rows if "dist_to_target" in r]
    if scored:
        sections["identity"] = {
            "dist_to_target": _mean(scored, "dist_to_target"), "dist_to_source": _mean(scored, "dist_to_source"),
            "references_apart": _mean(scored, "references_apart"), "chip": quality.CHIP_DETAILS,
            "reference_faces": {n: int(min(len(f.crops), reference_faces)) for n, f in ref_faces.items()},
            "raw_dist_to_target": _mean(scored, "raw_dist_to_target"),
            "raw_dist_to_source": _mean(scored, "raw_dist_to_source"),
            "pairs": [{k: r[k] for k in ("source", "target", "faces", "dist_to_target", "dist_to_source",
                                         "raw_dist_to_target", "raw_dist_to_source")} for r in scored]}
    else:
        reasons["identity"] = (f"no real faces of any target identity for a reference embedding (real faces of "
                               f"{sorted(ref_faces)}; targets {sorted(manifest.targets)}): pass --data with them")
    timed = [r for r in rows if r.get("frame_pairs") and r["source_change"] > 0]
    if timed:
        for r in timed:
            r["flicker_ratio"] = r["swap_change"] / r["source_change"]
            r["served_flicker_ratio"] = r["served_change"] / r["source_change"]
        sections["temporal"] = {
            "flicker_ratio": _mean(timed, "flicker_ratio"), "served_flicker_ratio": _mean(timed, "served_flicker_ratio"),
            "source_change": _mean(timed, "source_change"), "swap_change": _mean(timed, "swap_change"),
            "served_change": _mean(timed, "served_change"),
            "pairs": [{k: r[k] for k in ("source", "target", "frame_pairs", "source_change", "swap_change",
                                         "served_change", "flicker_ratio", "served_flicker_ratio")} for r in timed]}
    else:
        reasons["temporal"] = ("no two consecutive frames among the swapped faces (a data set without frame order, "
                               "single images, or a still clip)")
    return sections, reasons


def synthetic_section(bundle_dir: str | os.PathLike, count: int, seed: int) -> dict[str, Any]:
    """synthetic_swap_score renamed for the report: ssim / l1 on the face, *_crop over the whole crop, ssim_rebuild
    the face SSIM of each target rebuilding its own faces (the ceiling the swap is measured against)."""
    score = synthetic_swap_score(bundle_dir, count=count, seed=seed)
    rename = {"ssim_face": "ssim", "l1_face": "l1", "ssim": "ssim_crop", "l1": "l1_crop"}
    return {"ssim": score["ssim_face"], "l1": score["l1_face"], "ssim_crop": score["ssim"], "l1_crop": score["l1"],
            "ssim_rebuild": score["ssim_face_rebuild"], "count": score["count"], "seed": score["seed"],
            "pairs": [{rename.get(k, k): v for k, v in pair.items()} for pair in score["pairs"]]}


def evaluate_bundle(bundle_dir: str | os.PathLike, real: RealInput | None = None, count: int = HELD_OUT_POSES, seed: int = HELD_OUT_SEED,
                    faces_per_pair: int = REAL_FACES, reference_faces: int = REFERENCE_FACES,
                    keep_shape: float = blending.KEEP_SHAPE, saved: SavedSwaps | None = None,
                    paste_mask: str = blending.PASTE_MASK,
                    progress: Callable[[str], None] = lambda stage: None) -> dict[str, Any]:
    """One bundle's report: {"model", "variant", "resolution", "identities", "synthetic", "identity", "landmarks",
    "temporal", "reasons"}. A section that cannot be computed is None and `reasons` says why; only a bundle that
    cannot be read at all raises (BundleError). keep_shape, paste_mask: the server's --keep-shape and --paste-mask
    the served faces get. progress(stage) is told each stage as it starts.
    With `saved` (load_swaps), bundle_dir names the swaps file and the real-face sections score its swaps."""
    bundle_dir = Path(bundle_dir)
    manifest = load_manifest(bundle_dir) if saved is None else saved.manifest
    if real is not None:
        check_held_out(bundle_dir, manifest, real.split)
    trained_on = training_folder(manifest)
    report: dict[str, Any] = {"model": bundle_dir.name if saved is None else bundle_dir.stem,
                              "bundle": str(bundle_dir), "variant": manifest.variant,
                              "resolution": manifest.resolution, "identities": list(manifest.identities),
                              "trained_on": None if trained_on is None else str(trained_on),
                              "real_faces": real.described if real else None, "split": real.split if real else None}
    reasons: dict[str, str] = {}
    if saved is not None:
        report["synthetic"], reasons["synthetic"] = None, f"scored from saved swaps ({bundle_dir.name}), not a bundle"
    else:
        try:
            synth_identities(manifest)  # first: no synthetic poses are announced for a bundle that has none
            progress(f"swapping {count} held-out synthetic poses")
            report["synthetic"] = synthetic_section(bundle_dir, count, seed)
        except (ValueError, RuntimeError) as exc:
            report["synthetic"], reasons["synthetic"] = None, str(exc)
    if real is None:
        sections = dict.fromkeys(("identity", "landmarks", "temporal"))
        reasons.update(dict.fromkeys(sections, "no real faces given (--data DIR or --video FILE)"))
    else:
        try:
            sections, why = real_face_sections(bundle_dir, real, faces_per_pair, reference_faces, keep_shape, saved,
                                               paste_mask, progress)
        except (ValueError, RuntimeError) as exc:  # e.g. a graph ONNX Runtime refuses: report it, score the rest
            sections = dict.fromkeys(("identity", "landmarks", "temporal"))
            first_line = (str(exc).strip().splitlines() or [""])[0]
            why = dict.fromkeys(sections, f"{type(exc).__name__}: {first_line}")
        reasons.update(why)
    report.update(sections)
    report["reasons"] = reasons
    return report


def training_folder(manifest: Manifest) -> Path | None:
    """The data folder the bundle's model trained on (training records it absolute; an older relative record is
    taken from the current folder), or None where the bundle records none (an imported one)."""
    folder = manifest.training_config.get("data_dir")
    return Path(folder).resolve() if isinstance(folder, str) and folder else None


def check_held_out(bundle_dir: str | os.PathLike, manifest: Manifest, split: dict[str, Any] | None) -> None:
    """ValueError where `split` is a held-out part whose frames the bundle trained on: it trained on the data set
    that part was split from, or on the part itself. Scores on it would claim frames the model never saw."""
    trained = training_folder(manifest)
    if trained is None or not split or split.get("part") != "holdout":
        return
    parts = {"of": "the whole data set it was split from (its held-out frames included)",
             "holdout": "the held-out part itself"}
    seen = next((what for key, what in parts.items() if split.get(key) and Path(split[key]).resolve() == trained),
                None)
    if split.get("train") and Path(split["train"]).resolve() == trained:
        check_pair(split)
    if seen is not None:
        raise ValueError(f"{Path(bundle_dir).name} was trained on {trained}, {seen}, so {split.get('holdout')} is "
                         f"not held out from it: train on the training part {split.get('train')} and export again, "
                         f"or evaluate --data {trained} to score it on frames it trained on")


def headline(report: dict[str, Any]) -> dict[str, float | None]:
    """The comparison's numbers: synthetic SSIM / L1, identity distances and landmark NME (of the served full-frame
    blend, then of the raw model output), flicker ratio."""
    def get(section: str, key: str) -> float | None:
        return report[section][key] if report.get(section) else None

    return {"synthetic.ssim": get("synthetic", "ssim"), "synthetic.l1": get("synthetic", "l1"),
            "identity.dist_to_target": get("identity", "dist_to_target"),
            "identity.dist_to_source": get("identity", "dist_to_source"),
            "identity.raw_dist_to_target": get("identity", "raw_dist_to_target"),
            "identity.raw_dist_to_source": get("identity", "raw_dist_to_source"),
            "landmarks.nme": get("landmarks", "nme"), "landmarks.raw_nme": get("landmarks", "raw_nme"),
            "landmarks.motion_error": get("landmarks", "motion_error"),
            "temporal.flicker_ratio": get("temporal", "flicker_ratio")}


def reason(reasons: dict[str, str], key: str) -> str:
    """Why headline number `key` ("section.name") is null: its own reason, else its section's."""
    return reasons.get(key) or reasons.get(key.split(".")[0], "not computed")


def markdown_table(reports: list[dict[str, Any]], columns: list[str] | None = None,
                   extra: dict[str, list[str]] | None = None) -> str:
    """The seed paper's comparison, with numbers: one row per bundle (variant), one column per metric; n/a cells
    are explained under the table. `columns` picks headline metrics (default: all of them); `extra` adds columns
    after px, name -> one cell per report (make compare-real: steps and seconds trained)."""
    columns = columns if columns is not None else (list(headline(reports[0])) if reports else [])
    extra = extra or {}
    names = list(extra) + columns
    lines = ["| variant | model | px | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    notes = []
    for row, report in enumerate(reports):
        cells = [values[row] for values in extra.values()]
        numbers = headline(report)
        for key in columns:
            value = numbers[key]
            if value is None:
                label = key if key in report["reasons"] else key.split(".")[0]  # one note per section
                notes.append(f"{report['model']} {label}: {reason(report['reasons'], key)}")
                cells.append("n/a")
            else:
                cells.append(f"{value:.4f}")
        head = f"| {report['variant']} | {report['model']} | {report['resolution']} | "
        lines.append(head + " | ".join(cells) + " |")
    unique = list(dict.fromkeys(notes))
    if unique:
        lines += [""] + [f"- n/a: {note}" for note in unique]
    splits = list(dict.fromkeys(split_note(r["split"], r.get("trained_on", "")) for r in reports if r.get("split")))
    if splits:
        lines += [""] + [f"Real faces: {note}" for note in splits]
    return "\n".join(lines) + "\n"


def split_note(split: dict[str, Any], trained_on: str | None = "") -> str:
    """What the faces of a `facetwin-train split` part are, for the Markdown report. `trained_on`: the bundle's
    training data folder (None: not recorded; "": not checked); the held-out claim is the split's alone unless the
    bundle trained on its training part."""
    if split.get("part") == "holdout":
        kind = (f"held-out frames (the last {split['fraction']:.0%} of each identity's faces, kept out of the "
                f"training part {split.get('train')})")
    else:
        kind = f"the {split.get('part')} part (frames a model trained on it saw)"
    note = f"{kind} of {split.get('of')}: {quality.describe_split(split)}"
    if split.get("part") != "holdout" or trained_on == "":
        return note
    if trained_on is None:
        return note + " (the bundle records no training data folder: whether it saw these frames is unknown)"
    if split.get("train") and Path(trained_on).resolve() == Path(split["train"]).resolve():
        return note
    return note + (f" (but the bundle trained on {trained_on}, not that training part: these frames are unseen only "
                   "if that folder holds none of them)")
