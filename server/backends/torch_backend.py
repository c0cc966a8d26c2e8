"""PyTorch backends: rebuild the model from the bundle's weights and run it in-process.

Both rebuild the per-target ``SwapGraph`` from ``weights.safetensors`` + ``manifest.model_config`` (never a
pickle), so they serve exactly the weights the ONNX graphs were exported from:

* ``torch-cuda``: fp16, channels_last, one CUDA graph per batch-size bucket (powers of two up to the server's
  max batch). A graph replays a whole forward pass with a single launch, which is what makes small batches
  fast on a GPU; inputs are padded up to the bucket and outputs sliced back. Host<->device copies go through
  pinned buffers so they run asynchronously on the backend's own stream. The server runs two instances per
  target (``default_workers``), each with its own stream, pinned buffers and graphs: a batch's work on the CPU
  (uint8 -> float, filling the pinned buffer, waiting for the stream, float -> uint8) then overlaps the other
  instance's work on the GPU, which one instance would leave idle in between. Graphs are captured in the
  thread-local error mode, so a capture does not fail CUDA calls that other threads make meanwhile (a model
  loading while another already serves).
* ``torch-cpu``: fp32, eager. Mostly here so the same rebuild path is exercised on machines without a GPU.

torch is imported lazily: the ``server`` extra does not install it, and importing this module must stay free.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from facetwin.core.bundle import WEIGHTS_NAME, BundleError, Manifest
from facetwin.core.cuda import CAPTURE_LOCK

from ..config import ServerConfig
from .base import Backend

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

# Largest batch a backend is prepared for when the caller does not say: the server's default max_batch.
DEFAULT_MAX_BATCH = ServerConfig.max_batch
# Eager passes on a side stream before capturing a CUDA graph: cuDNN autotuning and lazy allocations must
# happen outside the capture (PyTorch's documented recipe uses a few).
GRAPH_WARMUP_PASSES = 3


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes to prepare for: powers of two below max_batch, then max_batch itself.

    Ending on max_batch exactly (not the next power of two) means a full batch is never padded.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    buckets, size = [], 1
    while size < max_batch:
        buckets.append(size)
        size *= 2
    buckets.append(max_batch)
    return tuple(buckets)


def plan_chunks(batch: int, buckets: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """Splits a batch into (start, stop, bucket) runs, each padded up to the smallest bucket that holds it.

    A batch larger than the largest bucket runs as full largest-bucket chunks plus one padded remainder.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
        raise ValueError(f"buckets must be increasing positive sizes, got {buckets}")
    largest = buckets[-1]
    chunks, start = [], 0
    while start < batch:
        size = min(batch - start, largest)
        bucket = next(b for b in buckets if b >= size)
        chunks.append((start, start + size, bucket))
        start += size
    return chunks


def load_swap_graph(bundle_dir: Path, manifest: Manifest, target: str) -> "torch.nn.Module":
    """The target's SwapGraph with the bundle's weights, on the CPU, eval, for any variant the manifest names.

    ``facetwin.core.model.swap_graph_from_state`` picks the tensors (ae/vae/vae-gan: the shared encoder and the
    target's decoder; cyclegan: the target's own generator); strict loading rejects a weights file that does not
    match the manifest's model_config. training.model imports nothing but torch, so the server stays free of
    training-only dependencies.
    """
    from safetensors.torch import load_file

    from facetwin.core.model import ModelConfig, ModelConfigError, swap_graph_from_state

    if target not in manifest.targets:
        raise BundleError(f"target {target!r} is not in the bundle; it has {sorted(manifest.targets)}")
    weights_path = Path(bundle_dir) / WEIGHTS_NAME
    if not weights_path.is_file():
        raise BundleError(f"{bundle_dir} has no {WEIGHTS_NAME}; the torch backends rebuild the model from it")
    try:
        config = ModelConfig.from_dict(dict(manifest.model_config))
    except ModelConfigError as exc:
        raise BundleError(f"{bundle_dir}: the manifest's model_config is not valid: {exc}") from exc
    state = load_file(str(weights_path), device="cpu")
    try:
        return swap_graph_from_state(config, state, target)
    except KeyError as exc:
        raise BundleError(f"target {target!r} is not an identity of the manifest's model_config "
                          f"{list(config.identities)}") from exc
    except RuntimeError as exc:
        raise BundleError(f"{weights_path} does not fit the manifest's model_config: {exc}".splitlines()[0]) from exc


class TorchBackend(Backend):
    """A SwapGraph on one torch device; subclasses pick the device, the precision and whether to use CUDA graphs."""

    device_type = "cpu"  # torch device type
    dtype_name = "float32"  # weights and activations precision
    use_cuda_graphs = False  # replay captured CUDA graphs per batch bucket (CUDA only)

    def __init__(self, bundle_dir: Path, manifest: Manifest, target: str, *, intra_op_threads: int = 0,
                 max_batch: int | None = None, **options) -> None:
        super().__init__(bundle_dir, manifest, target, intra_op_threads=intra_op_threads, **options)
        ok, why = self.available()
        if not ok:
            raise RuntimeError(f"backend {self.name!r} is not available: {why}")
        import torch

        self._torch = torch
        self.max_batch = DEFAULT_MAX_BATCH if max_batch is None else int(max_batch)
        self.buckets = batch_buckets(self.max_batch)
        self.dtype = getattr(torch, self.dtype_name)
        self.device = torch.device(self.device_type)
        self.resolution = manifest.resolution
        self._lock = threading.Lock()  # the batcher serialises calls; this guards direct users (bench, tests)
        if self.device.type == "cpu" and intra_op_threads > 0:
            torch.set_num_threads(intra_op_threads)  # process-wide in torch; 0 keeps torch's default (all cores)
        graph = load_swap_graph(bundle_dir, manifest, target)
        memory_format = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format
        self.memory_format = memory_format
        graph = graph.to(device=self.device, dtype=self.dtype)
        # Documented Module.to keyword, missing from torch's typing overloads.
        self.graph = graph.to(memory_format=memory_format)  # type: ignore[call-overload]
        self._graphs: dict[int, Any] = {}
        if self.device.type == "cuda":
            self._setup_cuda()

    # ---- CUDA: pinned buffers, a private stream, one captured graph per bucket ----

    def _setup_cuda(self) -> None:
        torch = self._torch
        largest = self.buckets[-1]
        shape = (largest, 3, self.resolution, self.resolution)
        self._stream = torch.cuda.Stream(self.device)
        self._host_in = torch.empty(shape, dtype=torch.float32, pin_memory=True)
        self._host_face = torch.empty(shape, dtype=torch.float32, pin_memory=True)
        self._host_mask = torch.empty((largest, 1, self.resolution, self.resolution), dtype=torch.float32,
                                      pin_memory=True)
        # One static device input shared by every bucket: a graph reads the [:bucket] view it was captured with.
        self._device_in = torch.zeros(shape, dtype=torch.float32, device=self.device)
        self._outputs: dict[int, tuple[Any, Any]] = {}
        if self.use_cuda_graphs:
            # Shapes are fixed per bucket: cuDNN times its kernels once, here, and the graphs keep the fastest. The
            # switch is process-wide, so it is put back: on, the face models' varying batch sizes would be timed
            # again at every new size while frames wait. The lock keeps other threads' cache releases (their own
            # captures, the face models' autotuning while the switch is on) out of the captures.
            with CAPTURE_LOCK:
                benchmark = torch.backends.cudnn.benchmark
                torch.backends.cudnn.benchmark = True
                try:
                    for bucket in self.buckets:
                        self._capture(bucket)
                finally:
                    torch.backends.cudnn.benchmark = benchmark

    def _forward(self, faces32: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
        """fp32 NCHW in -> fp32 outputs; the casts run on the GPU (inside the graph when captured)."""
        x = faces32.to(dtype=self.dtype, memory_format=self.memory_format)
        face, mask = self.graph(x)
        return face.float().contiguous(), mask.float().contiguous()

    def _capture(self, bucket: int) -> None:
        torch = self._torch
        static_in = self._device_in[:bucket]
        with torch.inference_mode(), torch.cuda.device(self.device):
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                for _ in range(GRAPH_WARMUP_PASSES):
                    self._forward(static_in)
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
            graph = torch.cuda.CUDAGraph()
            # Each bucket gets its own memory pool: graphs replay in any order, so they must not share one.
            # thread_local: only this thread's unsafe calls abort the capture; the global default would make every
            # other thread's CUDA calls fail while it lasts (another model's workers serving meanwhile).
            with torch.cuda.graph(graph, stream=self._stream, capture_error_mode="thread_local"):
                self._outputs[bucket] = self._forward(static_in)
            self._stream.synchronize()
        self._graphs[bucket] = graph

    def _infer_cuda(self, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        batch = faces.shape[0]
        out_face = np.empty((batch, 3, self.resolution, self.resolution), np.float32)
        out_mask = np.empty((batch, 1, self.resolution, self.resolution), np.float32)
        host_in = self._host_in.numpy()
        with torch.inference_mode(), torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            for start, stop, bucket in plan_chunks(batch, self.buckets):
                count = stop - start
                host_in[:count] = faces[start:stop]
                host_in[count:bucket] = 0.0  # padding rows: computed, then dropped
                self._device_in[:bucket].copy_(self._host_in[:bucket], non_blocking=True)
                if self.use_cuda_graphs:
                    self._graphs[bucket].replay()
                    face, mask = self._outputs[bucket]
                else:
                    face, mask = self._forward(self._device_in[:bucket])
                self._host_face[:count].copy_(face[:count], non_blocking=True)
                self._host_mask[:count].copy_(mask[:count], non_blocking=True)
                self._stream.synchronize()  # the pinned buffers are reused by the next chunk
                out_face[start:stop] = self._host_face[:count].numpy()
                out_mask[start:stop] = self._host_mask[:count].numpy()
        return out_face, out_mask

    # ---- Backend interface ----

    def infer(self, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        expected = (3, self.resolution, self.resolution)
        if faces.ndim != 4 or faces.shape[1:] != expected or faces.shape[0] < 1:
            raise ValueError(f"faces must be (B, {', '.join(map(str, expected))}) with B >= 1, got {faces.shape}")
        faces = np.ascontiguousarray(faces, dtype=np.float32)
        with self._lock:
            if self.device.type == "cuda":
                return self._infer_cuda(faces)
            with self._torch.inference_mode():
                face, mask = self.graph(self._torch.from_numpy(faces).to(self.dtype))
            return face.float().numpy(), mask.float().numpy()

    def close(self) -> None:
        self._graphs.clear()
        self.graph = None
        if self.device.type == "cuda":
            self._outputs.clear()
            self._host_in = self._host_face = self._host_mask = self._device_in = None
            self._torch.cuda.empty_cache()


class TorchCpuBackend(TorchBackend):
    name = "torch-cpu"
    device_type = "cpu"
    dtype_name = "float32"
    use_cuda_graphs = False

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            import safetensors  # noqa: F401
            import torch  # noqa: F401
        except ImportError as exc:
            return False, f"{exc.name} is not installed (pip install 'facetwin[training]')"
        return True, ""


class TorchCudaBackend(TorchBackend):
    name = "torch-cuda"
    device_type = "cuda"
    dtype_name = "float16"
    use_cuda_graphs = True
    # Two instances, two streams: one batch's host work overlaps the other's GPU work (module docstring).
    default_workers = 2

    @classmethod
    def available(cls) -> tuple[bool, str]:
        ok, why = TorchCpuBackend.available()
        if not ok:
            return ok, why
        import torch

        if torch.version.cuda is None:
            return False, f"torch {torch.__version__} is a CPU-only build (install a CUDA build of torch)"
        if not torch.cuda.is_available():
            return False, f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"
        return True, ""
