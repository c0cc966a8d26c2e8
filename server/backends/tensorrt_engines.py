"""TensorRT engine cache, fp16 ONNX conversion and engine build.

A TensorRT engine is compiled for one GPU model, one TensorRT version and one range of input shapes, and
building one takes from seconds to minutes; the server therefore keeps built engines on disk::

    <cache_dir>/timing.cache                       # TensorRT's persistent kernel-timing cache (speeds up rebuilds)
    <cache_dir>/<model>/<target>.<digest>.engine   # serialized engine
    <cache_dir>/<model>/<target>.<digest>.json     # sidecar: every key field + the engine's sha256

The digest hashes an ``EngineKey`` (bundle manifest sha256, target, GPU name, compute capability, TensorRT
version, batch profile, precision). ``lookup`` returns an engine only when the sidecar repeats every key field
and the engine's sha256 still matches: anything else is a miss and the engine is rebuilt. Both files are
written atomically, the sidecar last, so a crash mid-write can only cause a rebuild, never a bad load.

TensorRT 11 dropped ``BuilderFlag.FP16`` (weak typing): the precision now lives in the graph. The bundle's fp32
ONNX is converted to fp16 (fp32 inputs/outputs kept, so the server's buffers stay float32) and built as a
strongly typed network.

Only ``build_engine`` needs TensorRT; everything else here runs on any machine (and ``build-engines --dry-run``
exercises it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from facetwin.core.bundle import MANIFEST_NAME, BundleError, Manifest, check_name, load_manifest, manifest_sha256
from facetwin.core.files import atomic_write_bytes, sha256_file

from ..config import ServerConfig, env_name

log = logging.getLogger(__name__)

PRECISION = "fp16"  # the only precision built: strongly typed fp16 graph, fp32 I/O
CACHE_ENV = env_name("engine_cache_dir")  # overrides the default cache folder (<model_dir>/.engines)
CACHE_FOLDER = ".engines"  # default cache folder inside the model dir; starts with "." so it is never a bundle
TIMING_CACHE_NAME = "timing.cache"
DEFAULT_WORKSPACE_BYTES = 4 << 30  # TensorRT scratch memory while building; tactics needing more are skipped
UNKNOWN = "none"  # key value for a GPU or TensorRT version that this host does not have (dry runs)


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the ONNX graph or build an engine from it."""


@dataclasses.dataclass(frozen=True)
class GpuInfo:
    name: str  # e.g. "NVIDIA H100 80GB HBM3"
    compute_capability: str  # "major.minor", e.g. "9.0"


@dataclasses.dataclass(frozen=True)
class BatchProfile:
    """The batch sizes an engine accepts (min..max) and the one TensorRT tunes its kernels for (opt)."""

    min: int = 1  # smallest batch
    opt: int = ServerConfig.max_batch  # tuned batch: full batches are the common case under load
    max: int = ServerConfig.max_batch  # largest batch (the server's max_batch)

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"batch profile needs 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")

    @classmethod
    def for_max_batch(cls, max_batch: int, opt_batch: int | None = None) -> "BatchProfile":
        return cls(1, max_batch if opt_batch is None else opt_batch, max_batch)


@dataclasses.dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on; two keys with one differing field never share an engine file."""

    manifest_sha256: str  # pins the bundle (the manifest holds every file's sha256)
    target: str  # target identity: one engine per target graph
    gpu_name: str  # engines are tuned per GPU model
    compute_capability: str  # and compiled per SM architecture
    tensorrt_version: str  # engines do not load across TensorRT versions
    min_batch: int
    opt_batch: int
    max_batch: int
    precision: str = PRECISION

    @classmethod
    def create(cls, manifest_sha: str, target: str, gpu: GpuInfo | None, tensorrt_version: str | None,
               profile: BatchProfile, precision: str = PRECISION) -> "EngineKey":
        return cls(manifest_sha, target, gpu.name if gpu else UNKNOWN, gpu.compute_capability if gpu else UNKNOWN,
                   tensorrt_version or UNKNOWN, profile.min, profile.opt, profile.max, precision)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """Stable hex digest of the key: sha256 of its fields as canonical JSON, first 16 hex digits."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class EngineCache:
    """Engines and the timing cache under one folder (see the module docstring for the layout)."""

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.cache_dir = Path(cache_dir)

    def engine_path(self, model: str, key: EngineKey) -> Path:
        check_name(model, "model name")
        check_name(key.target, "target")
        return self.cache_dir / model / f"{key.target}.{key.digest()}.engine"

    def sidecar_path(self, model: str, key: EngineKey) -> Path:
        return self.engine_path(model, key).with_suffix(".json")

    @property
    def timing_cache_path(self) -> Path:
        return self.cache_dir / TIMING_CACHE_NAME

    def lookup(self, model: str, key: EngineKey) -> Path | None:
        """The cached engine for key, or None when it is missing, stale or corrupt (then: rebuild)."""
        engine, sidecar = self.engine_path(model, key), self.sidecar_path(model, key)
        if not engine.is_file() or not sidecar.is_file():
            return None
        try:
            recorded = json.loads(sidecar.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            log.warning("engine sidecar %s is unreadable (%s); rebuilding", sidecar, exc)
            return None
        if not isinstance(recorded, dict) or recorded.get("key") != key.to_dict():
            log.warning("engine sidecar %s does not match the wanted key; rebuilding", sidecar)
            return None
        if recorded.get("engine_sha256") != sha256_file(engine):
            log.warning("engine %s does not match its recorded sha256 (truncated or replaced); rebuilding", engine)
            return None
        return engine

    def store(self, model: str, key: EngineKey, engine_bytes: bytes) -> Path:
        """Writes the engine, then its sidecar (both atomically); returns the engine path."""
        engine = atomic_write_bytes(self.engine_path(model, key), engine_bytes)
        sidecar = {
            "key": key.to_dict(),
            "digest": key.digest(),
            "model": model,
            "engine_sha256": hashlib.sha256(engine_bytes).hexdigest(),
            "engine_bytes": len(engine_bytes),
            "created_unix": int(time.time()),
        }
        text = json.dumps(sidecar, indent=2, sort_keys=True) + "\n"
        atomic_write_bytes(self.sidecar_path(model, key), text.encode())
        return engine

    def load_timing_cache(self) -> bytes:
        """The persisted timing cache, or b"" (TensorRT starts an empty one from that)."""
        try:
            return self.timing_cache_path.read_bytes()
        except FileNotFoundError:
            return b""

    def save_timing_cache(self, data: bytes) -> None:
        atomic_write_bytes(self.timing_cache_path, data)


def default_cache_dir(model_dir: str | os.PathLike) -> Path:
    """$FACETWIN_ENGINE_CACHE_DIR, else <model_dir>/.engines (the server and build-engines agree on it)."""
    override = os.environ.get(CACHE_ENV)
    return Path(override) if override else Path(model_dir) / CACHE_FOLDER


def tensorrt_version() -> str | None:
    try:
        import tensorrt
    except ImportError:
        return None
    return getattr(tensorrt, "__version__", None)


def detect_gpu() -> GpuInfo | None:
    """GPU 0 as seen by pycuda, else torch, else nvidia-smi; None without a visible CUDA device."""
    try:
        import pycuda.driver as cuda

        cuda.init()
        if cuda.Device.count() > 0:
            device = cuda.Device(0)
            return GpuInfo(device.name(), "{}.{}".format(*device.compute_capability()))
    except Exception:  # ImportError, a loader's OSError, pycuda.driver.Error (no driver): the next source is asked
        pass
    try:
        import torch

        if torch.cuda.is_available():
            return GpuInfo(torch.cuda.get_device_name(0), "{}.{}".format(*torch.cuda.get_device_capability(0)))
    except ImportError:
        pass
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout
            name, capability = (part.strip() for part in out.splitlines()[0].split(","))
            return GpuInfo(name, capability)
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            pass
    return None


def convert_to_fp16(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Writes an fp16 copy of an fp32 ONNX graph (weights and compute fp16, inputs/outputs still fp32).

    Uses onnxconverter-common (``pip install onnxconverter-common``); the result passes onnx.checker.
    """
    import onnx

    try:
        from onnxconverter_common import float16
    except ImportError as exc:
        raise RuntimeError("fp16 conversion needs onnxconverter-common (pip install onnxconverter-common)") from exc
    model = onnx.load(str(src))
    converted = float16.convert_float_to_float16(model, keep_io_types=True)
    onnx.checker.check_model(converted, full_check=True)
    dst = Path(dst)
    atomic_write_bytes(dst, converted.SerializeToString())
    return dst


def build_engine(onnx_path: str | os.PathLike, input_name: str, resolution: int, profile: BatchProfile,
                 timing_cache: bytes = b"", workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> tuple[bytes, bytes]:
    """Builds a strongly typed engine from an (fp16) ONNX file; returns (engine bytes, updated timing cache).

    Needs TensorRT >= 10 and a CUDA device (the build runs on the current one).
    """
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # STRONGLY_TYPED makes the graph's own dtypes (fp16 here) binding; TRT 11 always does this and ignores the flag.
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if strongly_typed is None else 1 << int(strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT could not parse {onnx_path}: {errors or 'no detail'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    optimization = builder.create_optimization_profile()
    dims = [trt.Dims([batch, 3, resolution, resolution]) for batch in (profile.min, profile.opt, profile.max)]
    optimization.set_shape(input_name, dims[0], dims[1], dims[2])
    config.add_optimization_profile(optimization)
    cache = config.create_timing_cache(timing_cache)
    if not config.set_timing_cache(cache, False):
        log.warning("the timing cache was made on another GPU or TensorRT version; starting a fresh one")
        config.set_timing_cache(config.create_timing_cache(b""), False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    return bytes(serialized), bytes(config.get_timing_cache().serialize())


@dataclasses.dataclass
class EngineReport:
    """What `ensure_engine` / `build-engines` did for one (model, target)."""

    model: str
    target: str
    key: EngineKey
    path: Path  # where the engine is (or would be) cached
    status: str  # "hit", "built", or "miss" (dry run: would build)
    fp16_onnx_bytes: int = 0  # size of the converted graph (0 on a cache hit: not converted)
    seconds: float = 0.0  # conversion + build time


def ensure_engine(cache: EngineCache, bundle_dir: Path, manifest: Manifest, target: str, *, gpu: GpuInfo | None,
                  trt_version: str | None, profile: BatchProfile, dry_run: bool = False,
                  workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> tuple[EngineReport, bytes | None]:
    """Cached engine bytes for one target, converting and building on a miss (dry run: convert and check only).

    Returns the report and the engine bytes (None in a dry run without a cache hit). A cache folder that cannot
    be written (read-only model dir) is logged and the freshly built engine is still returned.
    """
    model = bundle_dir.name
    key = EngineKey.create(manifest_sha256(bundle_dir), target, gpu, trt_version, profile)
    path = cache.engine_path(model, key)
    started = time.perf_counter()
    hit = cache.lookup(model, key)
    if hit is not None:
        return EngineReport(model, target, key, hit, "hit"), hit.read_bytes()
    with tempfile.TemporaryDirectory(prefix="facetwin-fp16-") as tmp:
        fp16 = convert_to_fp16(bundle_dir / manifest.targets[target], Path(tmp) / f"{target}.fp16.onnx")
        size = fp16.stat().st_size
        if dry_run:
            return EngineReport(model, target, key, path, "miss", size, time.perf_counter() - started), None
        engine, timing = build_engine(fp16, manifest.input.name, manifest.resolution, profile,
                                      cache.load_timing_cache(), workspace_bytes)
    try:
        cache.store(model, key, engine)
        cache.save_timing_cache(timing)
    except OSError as exc:
        log.warning("could not write engine cache %s (%s); the engine will be rebuilt next start", cache.cache_dir, exc)
    return EngineReport(model, target, key, path, "built", size, time.perf_counter() - started), engine


def discover_bundles(model_dir: str | os.PathLike) -> list[Path]:
    """Every sub-folder of model_dir that holds a manifest.json and has a valid model name."""
    root = Path(model_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"model directory {root} does not exist")
    found = []
    for path in sorted(root.iterdir()):
        if (path / MANIFEST_NAME).is_file():
            try:
                check_name(path.name, "model folder name")
            except BundleError as exc:
                log.warning("skipping %s: %s", path, exc)
                continue
            found.append(path)
    return found


def build_all(model_dir: str | os.PathLike, cache_dir: str | os.PathLike, *, max_batch: int,
              opt_batch: int | None = None, dry_run: bool = False, workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
              report: Callable[[EngineReport], None] | None = None) -> list[EngineReport]:
    """Ensures an engine for every (model, target) in model_dir; `report` is called after each one."""
    profile = BatchProfile.for_max_batch(max_batch, opt_batch)
    bundles = discover_bundles(model_dir)
    if not bundles:
        raise FileNotFoundError(f"no model bundle (folder with {MANIFEST_NAME}) in {model_dir}")
    cache = EngineCache(cache_dir)
    gpu, version = detect_gpu(), tensorrt_version()
    reports = []
    for bundle_dir in bundles:
        manifest = load_manifest(bundle_dir, verify=True)
        for target in manifest.targets:
            result, _ = ensure_engine(cache, bundle_dir, manifest, target, gpu=gpu, trt_version=version,
                                      profile=profile, dry_run=dry_run, workspace_bytes=workspace_bytes)
            reports.append(result)
            if report is not None:
                report(result)
    return reports
