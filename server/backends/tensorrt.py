"""TensorRT: a strongly typed fp16 engine per target, loaded from the engine cache (built on a miss).

Buffers and the stream come from pycuda on the device's primary context (the one the CUDA runtime, and so
TensorRT, uses). The batcher calls `infer` from worker threads, and a CUDA context is current per thread,
so every entry point pushes the context and pops it again. One execution context per backend instance:
the batcher serialises calls, a lock guards direct users.

No CUDA graphs here: capturing one needs cudaStreamBeginCapture, which pycuda does not expose; TensorRT's
own kernels already fuse most of the graph, so the per-launch overhead matters less than for eager torch.
Batches above the engine's profile maximum run in profile-sized chunks.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from facetwin.core.bundle import Manifest

from ..config import ServerConfig
from .base import Backend
from .tensorrt_engines import BatchProfile, EngineCache, GpuInfo, default_cache_dir, ensure_engine

log = logging.getLogger(__name__)

DEVICE_ORDINAL = 0  # the GPU the backend runs on (CUDA_VISIBLE_DEVICES picks which physical one that is)
MIN_TENSORRT_MAJOR = 10  # the named-tensor API (set_tensor_address, execute_async_v3) arrived in 10


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, bundle_dir: Path, manifest: Manifest, target: str, *, intra_op_threads: int = 0,
                 max_batch: int | None = None, engine_cache_dir: str | Path | None = None) -> None:
        super().__init__(bundle_dir, manifest, target, intra_op_threads=intra_op_threads,
                         engine_cache_dir=engine_cache_dir)
        ok, why = self.available()
        if not ok:
            raise RuntimeError(f"backend {self.name!r} is not available: {why}")
        import pycuda.driver as cuda
        import tensorrt as trt

        self._cuda, self._trt = cuda, trt
        self._lock = threading.Lock()
        self.max_batch = ServerConfig.max_batch if max_batch is None else int(max_batch)
        self.resolution = manifest.resolution
        cache_dir = Path(engine_cache_dir) if engine_cache_dir else default_cache_dir(Path(bundle_dir).parent)
        self._allocations: list[Any] = []
        self._context_handle = cuda.Device(DEVICE_ORDINAL).retain_primary_context()
        self._context_handle.push()
        try:
            self._load_engine(EngineCache(cache_dir))
            self._allocate()
        except BaseException:
            cuda.Context.pop()
            self.close()  # releases what was allocated and the retained context
            raise
        cuda.Context.pop()

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            import tensorrt as trt
        except ImportError:
            return False, "tensorrt is not installed (pip install 'facetwin[gpu]' in an image with NVIDIA's libraries)"
        version = getattr(trt, "__version__", "")
        if not hasattr(trt, "Runtime"):
            return False, "the importable 'tensorrt' has no runtime (type stubs or a broken install?)"
        if not version.split(".")[0].isdigit() or int(version.split(".")[0]) < MIN_TENSORRT_MAJOR:
            return False, f"TensorRT {version or '?'} is too old; needs >= {MIN_TENSORRT_MAJOR}"
        if importlib.util.find_spec("onnxconverter_common") is None:  # an engine build converts the graph to fp16
            return False, "onnxconverter-common is not installed (pip install 'facetwin[gpu]')"
        try:
            import pycuda.driver as cuda

            cuda.init()
            count = cuda.Device.count()
        except ImportError:
            return False, "pycuda is not installed (pip install 'facetwin[gpu]')"
        except Exception as exc:  # pycuda.driver.Error (no driver, no device) and loader OSErrors alike
            return False, f"CUDA is not usable through pycuda: {exc}"
        if count == 0:
            return False, "no CUDA device is visible"
        return True, ""

    def _load_engine(self, cache: EngineCache) -> None:
        cuda, trt = self._cuda, self._trt
        device = cuda.Device(DEVICE_ORDINAL)
        gpu = GpuInfo(device.name(), "{}.{}".format(*device.compute_capability()))
        profile = BatchProfile.for_max_batch(self.max_batch)
        report, engine_bytes = ensure_engine(cache, Path(self.bundle_dir), self.manifest, self.target, gpu=gpu,
                                             trt_version=trt.__version__, profile=profile)
        log.info("tensorrt %s/%s: engine %s (%s, %.1f s)", report.model, self.target, report.path.name,
                 report.status, report.seconds)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(engine_bytes)
        if self._engine is None:
            raise RuntimeError(f"TensorRT could not load engine {report.path}; delete it to force a rebuild")
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self._input: str = self.manifest.input.name
        self._face: str = self.manifest.output_face.name
        self._mask: str = self.manifest.output_mask.name
        for name, mode in ((self._input, trt.TensorIOMode.INPUT), (self._face, trt.TensorIOMode.OUTPUT),
                           (self._mask, trt.TensorIOMode.OUTPUT)):
            if name not in names or self._engine.get_tensor_mode(name) != mode:
                raise RuntimeError(f"engine {report.path.name} lacks {mode.name.lower()} tensor {name!r}; has {names}")
            if trt.nptype(self._engine.get_tensor_dtype(name)) != np.float32:
                raise RuntimeError(f"engine tensor {name!r} is not float32 (converted without keep_io_types?)")

    def _allocate(self) -> None:
        """Pinned host + device buffers for a full profile batch; tensor addresses never change afterwards."""
        cuda = self._cuda
        side, batch = self.resolution, self.max_batch
        shapes = {self._input: (batch, 3, side, side), self._face: (batch, 3, side, side),
                  self._mask: (batch, 1, side, side)}
        self._host: dict[str, np.ndarray] = {}
        self._device: dict[str, Any] = {}
        for name, shape in shapes.items():
            self._host[name] = cuda.pagelocked_empty(shape, np.float32)
            self._device[name] = cuda.mem_alloc(self._host[name].nbytes)
            self._allocations.append(self._device[name])
            if not self._context.set_tensor_address(name, int(self._device[name])):
                raise RuntimeError(f"TensorRT rejected the address of tensor {name!r}")
        self._stream = cuda.Stream()

    def infer(self, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cuda, side = self._cuda, self.resolution
        if faces.ndim != 4 or faces.shape[1:] != (3, side, side) or faces.shape[0] < 1:
            raise ValueError(f"faces must be (B, 3, {side}, {side}) with B >= 1, got {faces.shape}")
        batch = faces.shape[0]
        out_face = np.empty((batch, 3, side, side), np.float32)
        out_mask = np.empty((batch, 1, side, side), np.float32)
        host_in, host_face, host_mask = self._host[self._input], self._host[self._face], self._host[self._mask]
        with self._lock:
            self._context_handle.push()
            try:
                for start in range(0, batch, self.max_batch):
                    count = min(self.max_batch, batch - start)
                    host_in[:count] = faces[start:start + count]
                    cuda.memcpy_htod_async(self._device[self._input], host_in[:count], self._stream)
                    if not self._context.set_input_shape(self._input, (count, 3, side, side)):
                        raise RuntimeError(f"batch {count} is outside the engine's profile 1..{self.max_batch}")
                    if not self._context.execute_async_v3(self._stream.handle):
                        raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
                    cuda.memcpy_dtoh_async(host_face[:count], self._device[self._face], self._stream)
                    cuda.memcpy_dtoh_async(host_mask[:count], self._device[self._mask], self._stream)
                    self._stream.synchronize()  # the pinned buffers are reused by the next chunk
                    out_face[start:start + count] = host_face[:count]
                    out_mask[start:start + count] = host_mask[:count]
            finally:
                cuda.Context.pop()
        return out_face, out_mask

    def close(self) -> None:
        """Frees everything in dependency order inside the context, then releases the context itself."""
        if "_context_handle" not in self.__dict__:
            return
        with self._lock:
            self._context_handle.push()
            try:
                for attribute in ("_context", "_engine", "_runtime", "_stream"):  # TensorRT objects before memory
                    self.__dict__.pop(attribute, None)
                for host in self.__dict__.pop("_host", {}).values():
                    host.base.free()  # pinned memory belongs to the context: free it while it is current
                for allocation in self._allocations:
                    allocation.free()
                self._allocations.clear()
                self.__dict__.pop("_device", None)
            finally:
                self._cuda.Context.pop()
            self._context_handle.detach()
            del self._context_handle
