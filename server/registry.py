"""Loads every bundle in the model directory and owns one backend + one batcher per (model, target)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import queue
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from facetwin.core.bundle import BundleError, Manifest, check_name, load_manifest, manifest_sha256

from . import imaging, metrics
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


def _set_event() -> asyncio.Event:
    event = asyncio.Event()
    event.set()
    return event


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
    users: int = 0  # calls between get() and their last batch: a model replaced or removed is freed after them
    idle: asyncio.Event = dataclasses.field(default_factory=_set_event)

    def target(self, name: str) -> LoadedTarget:
        """A target identity of this (READY) model; NotFound, or InvalidInput for a name no bundle can hold."""
        loaded = self.targets.get(name)
        if loaded is None:
            try:
                check_name(name, "target identity")  # bundles hold valid names only: a bad one is the caller's
            except BundleError as exc:
                raise InvalidInputError(str(exc)) from None
            raise NotFoundError(f"model {self.name!r} has no target identity {shorten(name)}; choose one of "
                                f"{sorted(self.targets)}")
        return loaded

    @contextlib.contextmanager
    def lease(self) -> Iterator[LoadedModel]:
        """Holds the model's backends for one call; taken on the event loop right after get(), with no await
        between, so a reload can never free them under the call."""
        self.users += 1
        self.idle.clear()
        try:
            yield self
        finally:
            self.users -= 1
            if not self.users:
                self.idle.set()


def find_bundles(model_dir: Path, quiet: bool = False) -> dict[str, Path]:
    """Every sub-folder of model_dir holding a manifest.json, by name; what is skipped is logged with the reason
    (unless quiet)."""
    say = log.debug if quiet else log.warning
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
            say("skipping %s: it cannot be read (%s)", path, exc.strerror or exc)
            continue
        if not is_bundle:
            say("skipping %s: no manifest.json (not a model bundle)", path)
            continue
        try:
            check_name(path.name, "model folder name")
        except BundleError as exc:
            say("skipping %s: %s", path, exc)
            continue
        bundles[path.name] = path
    return bundles


def pin_bundles(model_dir: Path, quiet: bool = False) -> dict[str, str]:
    """The bundles of model_dir with their manifests' sha256 ("" where unreadable): what ModelRegistry(pins=...)
    serves."""
    pinned = {}
    for name, path in find_bundles(model_dir, quiet).items():
        try:
            pinned[name] = manifest_sha256(path)
        except OSError:
            pinned[name] = ""
    return pinned


class FolderWatch:
    """--model-poll-s: whether the model folder looks different from the last look. A look is each bundle's manifest
    sha256 and its files' names, sizes and modification times (a bundle still being copied when a reload read it
    changes again once the copy ends, and is read again then), or why the folder could not be read."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.seen = self._look()

    def changed(self) -> bool:
        now = self._look()
        changed, self.seen = now != self.seen, now
        return changed

    def _look(self) -> dict[str, tuple] | str:
        try:
            return {name: (sha, tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                                             for f in (self.model_dir / name).iterdir())))
                    for name, sha in pin_bundles(self.model_dir, quiet=True).items()}
        except OSError as exc:
            return str(exc)


class ModelRegistry:
    def __init__(self, config: ServerConfig, pins: Callable[[], dict[str, str]] | None = None) -> None:
        """pins: the bundles to serve and their manifests' sha256, as the parent of several serving processes found
        them at start or at its last reload (see pin_bundles), read at discover() and at each reload(): every
        process then serves the same weights under a name, whichever process a connection lands on; a process
        started again later serves what its siblings serve, whatever the folder holds by then. None: whatever the
        folder holds."""
        self.config = config
        self.pins = pins
        self.pinned: dict[str, str] | None = None
        self.model_dir = Path(config.model_dir)
        self.backend_cls = get_backend(config.backend)
        self.models: dict[str, LoadedModel] = {}
        self._changing = asyncio.Lock()  # one load or reload at a time
        self._retiring: set[asyncio.Task] = set()

    def _scan(self) -> dict[str, Path]:
        """The bundles of the folder this process may serve (see pins)."""
        found = find_bundles(self.model_dir)
        self.pinned = None if self.pins is None else self.pins()
        if self.pinned is None:
            return found
        for name in sorted(set(found) - set(self.pinned)):
            log.warning("not serving %s: it was added after the other serving processes read the folder (reload "
                        "the server to serve it)", found[name])
        for name in sorted(set(self.pinned) - set(found)):
            log.error("model %s is served by the other serving processes but is gone from %s", name, self.model_dir)
        return {name: path for name, path in found.items() if name in self.pinned}

    def discover(self) -> list[str]:
        """Registers every sub-folder holding a manifest.json (status LOADING); returns their names."""
        for name, path in self._scan().items():
            self.models[name] = LoadedModel(name=name, path=path)
        return list(self.models)

    async def load_all(self) -> None:
        """Loads and warms every discovered bundle; a broken bundle is marked FAILED, the others still serve."""
        async with self._changing:
            for model in self.models.values():
                await self._bring_up(model)

    async def reload(self) -> dict[str, str]:
        """Reads the model folder again and serves what it holds now: new bundles are loaded (LOADING, then READY or
        FAILED, as at start); a bundle whose manifest changed, or that failed before, is loaded beside the one
        serving and takes its name once warm; a bundle gone from the folder stops taking calls. Calls already
        running finish on the backends they started on, which are then freed. A new version that fails to load
        leaves the one serving in place. Returns {name: what happened}."""
        async with self._changing:
            try:
                found = await asyncio.to_thread(self._scan)
            except OSError as exc:
                log.error("reload: %s; still serving %s", exc, sorted(self.models))
                return {}
            changes = {}
            for name in sorted(set(self.models) - set(found)):
                self._retire(self.models.pop(name))
                changes[name] = "removed"
            for name, path in found.items():
                current = self.models.get(name)
                if current is None:
                    model = self.models[name] = LoadedModel(name=name, path=path)
                    await self._bring_up(model)
                    changes[name] = "added" if model.status == READY else "failed"
                    continue
                try:
                    sha = await asyncio.to_thread(manifest_sha256, path)
                except OSError:
                    sha = ""
                if current.status == READY and sha == current.manifest_sha256:
                    continue
                candidate = LoadedModel(name=name, path=path)
                await self._bring_up(candidate)
                if candidate.status == FAILED and current.status == READY:
                    log.error("model %s: the new bundle failed to load, so the one loaded before (manifest %s) "
                              "still serves", name, current.manifest_sha256[:12])
                    self._retire(candidate)
                    changes[name] = "kept"
                    continue
                self.models[name] = candidate
                self._retire(current)
                changes[name] = "replaced" if candidate.status == READY else "failed"
            log.info("reloaded %s: %s", self.model_dir,
                     ", ".join(f"{name} {what}" for name, what in changes.items()) or "nothing changed")
            return changes

    async def _bring_up(self, model: LoadedModel) -> None:
        """Loads and warms one bundle: READY, or FAILED with the reason (a failure stays with this one model)."""
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
        metrics.MODEL_LOADS.labels(model.name, model.status).inc()  # names from the folder: the operator's, bounded

    def _retire(self, model: LoadedModel) -> None:
        """Frees a model no longer listed once the calls that hold it (LoadedModel.lease) have finished."""
        async def retire() -> None:
            try:
                await model.idle.wait()
            finally:  # the server's close() cancels the wait: the backends are freed all the same
                await self._unload(model)
            if model.status == READY:
                log.info("model %s (manifest %s) unloaded", model.name, model.manifest_sha256[:12])

        task = asyncio.ensure_future(retire())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _load(self, model: LoadedModel) -> None:
        model.manifest = load_manifest(model.path, verify=True)
        model.manifest_sha256 = manifest_sha256(model.path)
        if self.pinned is not None and model.manifest_sha256 != self.pinned.get(model.name):
            raise BundleError("the bundle changed on disk after the server read the folder, so this serving process "
                              "would serve other weights than its siblings under the same name; reload the server "
                              "to serve the new bundle")
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
        return model, model.target(target)

    def queued(self) -> int:
        """Requests waiting in every batcher. Also called from the metrics thread while a reload changes the models:
        list() copies each dict in one step under the GIL."""
        return sum(t.batcher.queued for m in list(self.models.values()) for t in list(m.targets.values()))

    @property
    def any_ready(self) -> bool:
        return any(m.status == READY for m in self.models.values())

    async def close(self) -> None:
        """Frees every model (after the server stopped taking calls), those being retired too."""
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        for model in self.models.values():
            await self._unload(model)

    @staticmethod
    async def _unload(model: LoadedModel) -> None:
        for target in model.targets.values():
            await target.batcher.close()
            for backend in target.backends:
                backend.close()
        model.targets = {}
