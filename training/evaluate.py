"""Ground-truth swap score for bundles trained on synthetic faces (training/synth.py).

On real faces a swap A->B has no right answer; on synthetic faces it has one: identity B rendered under A's pose,
expression, lighting and background. synthetic_swap_score renders held-out poses for A, runs the bundle's ONNX graph
for target B (ONNX Runtime on the CPU, exactly what the server's ORT backend runs, without torch or the server), and
compares the result with that rendering: SSIM over the whole crop, SSIM over B's face, and mean absolute error.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from facetwin.server.bundle import Manifest, atomic_write_bytes, load_manifest
from facetwin.training import synth

SSIM_WINDOW = 11  # Gaussian window side, as in Wang et al. 2004
SSIM_SIGMA = 1.5  # Gaussian window sigma
SSIM_K1, SSIM_K2 = 0.01, 0.03  # stabilisers of the luminance and contrast terms
DATA_RANGE = 255.0  # images are compared in 0..255
BATCH = 32  # images per ONNX Runtime call: bounds memory at large resolutions


def ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Structural similarity of two images (HxW or HxWxC, values in 0..255), averaged over channels.

    The local statistics use an 11x11 Gaussian window (sigma 1.5) with reflected borders, so the SSIM map covers
    every pixel (small face crops cannot spare a border). With `mask` (HxW, nonzero = inside) the map is averaged
    over the masked pixels only."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim not in (2, 3):
        raise ValueError(f"ssim needs two images of the same HxW or HxWxC shape, got {a.shape} and {b.shape}")
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2

    def blur(x: np.ndarray) -> np.ndarray:
        out = cv2.GaussianBlur(x, (SSIM_WINDOW, SSIM_WINDOW), SSIM_SIGMA, borderType=cv2.BORDER_REFLECT)
        return out.reshape(x.shape)  # cv2 drops a trailing channel axis of 1

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a * mu_a
    var_b = blur(b * b) - mu_b * mu_b
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    if mask is None:
        return float(ssim_map.mean())
    mask = np.asarray(mask)
    if mask.shape != a.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} != image shape {a.shape[:2]}")
    inside = mask > 0
    if not inside.any():
        raise ValueError("mask is empty: SSIM over no pixels is undefined")
    return float(ssim_map[inside].mean())


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


def synthetic_swap_score(bundle_dir: str | os.PathLike, count: int = 64, seed: int = 1234,
                         source: str | None = None, target: str | None = None) -> dict[str, Any]:
    """Scores swaps A->B against the true rendering of B on `count` held-out poses (synth.test_poses(count, seed)).

    Returns {"pairs": [{"source", "target", "ssim", "ssim_face", "l1"}], "ssim", "ssim_face", "l1", "count", ...}
    where ssim_face is SSIM over B's ground-truth face mask (dilated a little, so the face outline counts) and l1
    is the mean absolute error in 0..1; the top-level values are means over the pairs."""
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
        pred = swapped * 255.0
        results.append({
            "source": a,
            "target": b,
            "ssim": float(np.mean([ssim(p, t) for p, t in zip(pred, truth)])),
            "ssim_face": float(np.mean([ssim(p, t, m) for p, t, m in zip(pred, truth, face)])),
            "l1": float(np.mean(np.abs(swapped - truth / 255.0))),
        })
    summary = {key: float(np.mean([r[key] for r in results])) for key in ("ssim", "ssim_face", "l1")}
    return {"pairs": results, **summary, "count": count, "seed": seed, "synth_seed": synth_seed,
            "resolution": res}


def swap_grid(bundle_dir: str | os.PathLike, out_png: str | os.PathLike, count: int = 6, seed: int = 1234,
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
    grid = compose_grid(rows, scale)
    ok, png = cv2.imencode(".png", cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("cv2.imencode failed to encode the grid PNG")
    return atomic_write_bytes(Path(out_png), png.tobytes())


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
