"""Loads every bundle in the model directory and owns one backend + one batcher per (model, target)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import queue
from pathlib import Path

import numpy as np

from facetwin.core.bundle import BundleError, Manifest, check_name, load_manifest, manifest_sha256

from . import imaging
from .backends import Backend, get_backend
from .batcher import DynamicBatcher
from .config import ServerConfig
from .errors import InvalidInputError, ModelFailedError, NotFoundError, UnavailableError, shorten

log = logging.getLogger(__name__)

LOADING, READY, FAILED = "loading", "ready", "failed"


def worker_plan(config: ServerConfig, backend_cls: type[Backend]) -> tuple[int, int]:
    """(inference workers per target, intra-op threads per worker; 0 = the backend's default) on this host."""
    workers = config.inference_workers or backend_cls.default_workers
    if config.intra_op_threads or workers == 1:
        return workers, config.intra_op_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return workers, max(1, cores // (workers * config.processes))  # the serving processes share the cores too


@dataclasses.dataclass
class LoadedTarget:
    """One target identity of a bundle: its backends (one per inference worker) and the batcher that feeds them."""

    backends: list[Backend]
    batcher: DynamicBatcher
    _free: queue.SimpleQueue = dataclasses.field(default_factory=queue.SimpleQueue, init=False, repr=False)

    def __post_init__(self) -> None:
        for backend in self.backends:
            self._free.put(backend)

    @property
    def manifest(self) -> Manifest:
        return self.backends[0].manifest

    def run_batch(self, faces: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """RGB uint8 (R, R, 3) faces -> [(swapped RGB uint8 (R, R, 3), mask uint8 (R, R))]; runs in a worker thread
        on whichever backend is free (the batcher runs at most one batch per backend; other callers wait)."""
        backend = self._free.get()
        try:
            swapped, masks = backend.infer(imaging.to_nchw_float(faces))
        finally:
            self._free.put(backend)
        swapped_u8 = imaging.to_hwc_uint8(swapped)
        masks_u8 = imaging.to_hwc_uint8(masks)[..., 0]
        return list(zip(swapped_u8, masks_u8))


@dataclasses.dataclass
class LoadedModel:
    """One bundle as the server sees it."""

    name: str
    path: Path
    status: str = LOADING
    error: str = ""
    manifest: Manifest | None = None
    manifest_sha256: str = ""
    targets: dict[str, LoadedTarget] = dataclasses.field(default_factory=dict)
    ready: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


def find_bundles(model_dir: Path) -> dict[str, Path]:
    """Every sub-folder of model_dir holding a manifest.json, by name; what is skipped is logged with the reason."""
    if not model_dir.exists():
        raise FileNotFoundError(f"model directory {model_dir} does not exist (--model-dir)")
    if not model_dir.is_dir():
        raise NotADirectoryError(f"model directory {model_dir} is a file, not a folder (--model-dir)")
    try:
        entries = sorted(model_dir.iterdir())
    except OSError as exc:
        raise OSError(f"model directory {model_dir} cannot be read: {exc.strerror or exc} (--model-dir)") from None
    bundles = {}
    for path in entries:
        if path.name.startswith(".") or not path.is_dir():  # .engines and other files of the folder's own
            continue
        try:
            is_bundle = (path / "manifest.json").is_file()
        except OSError as exc:  # a folder this user may not read: the other bundles still serve
            log.warning("skipping %s: it cannot be read (%s)", path, exc.strerror or exc)
            continue
        if not is_bundle:
            log.warning("skipping %s: no manifest.json (not a model bundle)", path)
            continue
        try:
            check_name(path.name, "model folder name")
        except BundleError as exc:
            log.warning("skipping %s: %s", path, exc)
            continue
        bundles[path.name] = path
    return bundles


def pin_bundles(model_dir: Path) -> dict[str, str]:
    """The bundles of model_dir with their manifests' sha256 ("" where unreadable): what ModelRegistry(pinned=...)
    serves."""
    pinned = {}
    for name, path in find_bundles(model_dir).items():
        try:
            pinned[name] = manifest_sha256(path)
        except OSError:
            pinned[name] = ""
    return pinned


class ModelRegistry:
    def __init__(self, config: ServerConfig, pinned: dict[str, str] | None = None) -> None:
        """pinned: the bundles to serve and their manifests' sha256, as found when the server started (a serving
        process started again under --processes serves what its siblings serve, whatever the folder holds now)."""
        self.config = config
        self.pinned = pinned
        self.model_dir = Path(config.model_dir)
        self.backend_cls = get_backend(config.backend)
        self.models: dict[str, LoadedModel] = {}

    def discover(self) -> list[str]:
        """Registers every sub-folder holding a manifest.json (status LOADING); returns their names."""
        for name, path in find_bundles(self.model_dir).items():
            if self.pinned is not None and name not in self.pinned:
                log.warning("not serving %s: it was added after the server started (restart the server to serve "
                            "it)", path)
                continue
            self.models[name] = LoadedModel(name=name, path=path)
        for name in sorted(set(self.pinned or ()) - set(self.models)):
            log.error("model %s is served by the other serving processes but is gone from %s", name, self.model_dir)
        return list(self.models)

    async def load_all(self) -> None:
        """Loads and warms every discovered bundle; a broken bundle is marked FAILED, the others still serve."""
        for model in self.models.values():
            try:
                await asyncio.to_thread(self._load, model)
                await self._warm(model)
                model.status = READY
                log.info("model %s ready: identities %s, %d px, backend %s",
                         model.name, list(model.manifest.identities), model.manifest.resolution, self.backend_cls.name)
            except Exception as exc:  # any failure is contained to this one model
                model.status, model.error = FAILED, f"{type(exc).__name__}: {exc}"
                log.error("model %s failed to load: %s", model.name, model.error)
            finally:
                model.ready.set()

    def _load(self, model: LoadedModel) -> None:
        model.manifest = load_manifest(model.path, verify=True)
        model.manifest_sha256 = manifest_sha256(model.path)
        if self.pinned is not None and model.manifest_sha256 != self.pinned.get(model.name):
            raise BundleError("the bundle changed on disk after the server started, so this serving process would "
                              "serve other weights than its siblings under the same name; restart the server to "
                              "serve the new bundle")
        workers, threads = worker_plan(self.config, self.backend_cls)
        for target in model.manifest.targets:
            backends = [self.backend_cls(model.path, model.manifest, target, intra_op_threads=threads,
                                         max_batch=self.config.max_batch,
                                         engine_cache_dir=self.config.engine_cache_dir or None)
                        for _ in range(workers)]
            batcher = DynamicBatcher(
                lambda faces, t=target: model.targets[t].run_batch(faces),
                max_batch=self.config.max_batch,
                max_delay_s=self.config.max_delay_ms / 1000.0,
                max_queue=self.config.max_queue,
                concurrency=workers,
                name=f"{model.name}/{target}",
            )
            model.targets[target] = LoadedTarget(backends, batcher)
        log.info("model %s: %d inference worker(s) per target, intra-op threads %s", model.name, workers,
                 threads or "backend default")

    async def _warm(self, model: LoadedModel) -> None:
        """One batch through every backend of every target, so the first callers do not pay for lazy initialisation."""
        size = model.manifest.resolution
        blank = np.full((size, size, 3), 128, np.uint8)
        for target in model.targets.values():
            await asyncio.gather(*(asyncio.to_thread(target.run_batch, [blank]) for _ in target.backends))

    async def get(self, model_name: str, target: str, timeout: float | None = None) -> tuple[LoadedModel, LoadedTarget]:
        """The loaded target, waiting for a model that is still loading; NotFound / Unavailable otherwise."""
        model = self.models.get(model_name)  # loaded names were checked at load: the hot path is one dict lookup
        if model is None:
            try:
                check_name(model_name, "model name")  # "../x", "" and friends get INVALID_ARGUMENT, not NOT_FOUND
            except BundleError as exc:
                raise InvalidInputError(str(exc)) from None
            raise NotFoundError(f"model {shorten(model_name)} is not loaded; loaded models: "
                                f"{sorted(self.models) or 'none'}")
        if not model.ready.is_set():
            try:
                await asyncio.wait_for(model.ready.wait(), timeout)
            except TimeoutError:
                raise UnavailableError(f"model {model_name!r} is still loading; retry shortly") from None
        if model.status == FAILED:
            raise ModelFailedError(f"model {model_name!r} failed to load: {model.error}")
        loaded = model.targets.get(target)
        if loaded is None:
            try:
                check_name(target, "target identity")  # bundles hold valid names only: a bad one is the caller's
            except BundleError as exc:
                raise InvalidInputError(str(exc)) from None
            raise NotFoundError(
                f"model {model_name!r} has no target identity {shorten(target)}; choose one of {sorted(model.targets)}"
            )
        return model, loaded

    def queued(self) -> int:
        """Requests waiting in every batcher."""
        return sum(t.batcher.queued for m in self.models.values() for t in m.targets.values())

    @property
    def any_ready(self) -> bool:
        return any(m.status == READY for m in self.models.values())

    async def close(self) -> None:
        for model in self.models.values():
            for target in model.targets.values():
                await target.batcher.close()
                for backend in target.backends:
                    backend.close()
