"""ONNX Runtime on the CPU: the embedded default that runs anywhere."""

from __future__ import annotations

import numpy as np

from .base import Backend


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    # Two sessions with half the cores each beat one session with all of them: on the 2-core host, batch 16 of the
    # demo model ran at 550-564 faces/s as two 1-thread sessions side by side vs 468-488 as one 2-thread session
    # (a parallel op waits for its slowest thread), and while one batch runs the next one is already going.
    default_workers = 2

    def __init__(self, bundle_dir, manifest, target, **options) -> None:
        super().__init__(bundle_dir, manifest, target, **options)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.intra_op_threads  # 0 = one per core
        options.inter_op_num_threads = 1
        path = bundle_dir / manifest.targets[target]
        self._session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        self._input = manifest.input.name
        self._outputs = [manifest.output_face.name, manifest.output_mask.name]
        self._dtype = np.float16 if manifest.input.dtype == "float16" else np.float32

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return False, "onnxruntime is not installed (pip install 'facetwin[server]')"
        return True, ""

    def infer(self, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        face, mask = self._session.run(self._outputs, {self._input: faces.astype(self._dtype, copy=False)})
        return face, mask

    def close(self) -> None:
        self._session = None
