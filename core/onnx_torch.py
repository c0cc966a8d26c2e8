"""The ONNX graphs tflite_onnx.py writes, run on torch (a CUDA GPU on GPU hosts), with the calls of many threads
batched into one.

On a GPU host the face models should run where the swap model runs, and a full frame's detection and landmark
passes (a pyramid level, a batch of 192 px FaceMesh crops) are small: one at a time they leave the GPU idle between
launches. TorchSession offers ONNX Runtime's ``InferenceSession.run`` so the detectors of blazeface.py use either
without knowing which, and its one worker thread joins the calls waiting at the moment it is free into one batch
(same input shape past the batch dimension: every FaceMesh call, and the pyramid levels of frames of one size).
Frames of many streams then share launches, as the swap model's requests share them in the server's batcher: run at
once when the worker is idle, gather while it is busy.

The graphs come from one converter whose operator set is small and known (Conv, MaxPool, Pad, PRelu, Relu, Clip,
Tanh, Add, Concat, Reshape, Resize, Transpose, Identity), so they are interpreted here node by node with
torch.nn.functional rather than through a general ONNX-to-torch package (onnx2torch, for one, needs torchvision,
which does not install beside the CPU build of torch). An operator outside that set is refused when the session is
built, never at the first frame.
"""

from __future__ import annotations

import atexit
import math
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from .cuda import CAPTURE_LOCK

MAX_BATCH = 64  # calls joined into one run at most: bounds the memory of a batch of large pyramid levels


class UnsupportedGraph(ValueError):
    """The graph uses an operator or attribute this runner does not implement."""


def _same_upper(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """ONNX's SAME_UPPER padding of one dimension: output ceil(size / stride), the odd pixel at the end."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class TorchGraph:
    """An ONNX graph of the supported operators as a torch function on one device: float32 NHWC/NCHW tensors in,
    the graph's outputs out, in the graph's output order."""

    def __init__(self, model: onnx.ModelProto, device: str = "cpu") -> None:
        import torch

        self.torch, self.device = torch, torch.device(device)
        self.input_name = model.graph.input[0].name
        self.output_names = [o.name for o in model.graph.output]
        arrays = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
        # Shape-like inputs (pads, scales, shapes, bounds) become Python values when the node is compiled: read from
        # device tensors at every call, each would stall the GPU on a copy back to the host.
        self.steps = [self._compile(node, arrays) for node in model.graph.node]
        used = {name for _, inputs, _ in self.steps for name in inputs}
        self.constants = {name: torch.from_numpy(array).to(self.device) for name, array in arrays.items()
                          if name in used}

    def _compile(self, node: onnx.NodeProto,
                 arrays: dict[str, np.ndarray]) -> tuple[Callable[..., Any], list[str], str]:
        """One node as (function of its input tensors, input names, output name); `arrays`: the graph's constants."""

        def static(index: int) -> np.ndarray | None:
            """Input `index` as the constant it must be (None where it is omitted)."""
            if index >= len(node.input) or not node.input[index]:
                return None
            if node.input[index] not in arrays:
                raise UnsupportedGraph(f"{node.op_type} {node.name or node.output[0]}: input {index} must be a constant")
            return arrays[node.input[index]]

        F, attrs = self.torch.nn.functional, _attributes(node)
        op, inputs = node.op_type, node.input
        if op == "Conv":
            strides, dilations = attrs.get("strides", [1, 1]), attrs.get("dilations", [1, 1])
            kernel, group, auto_pad = attrs["kernel_shape"], attrs.get("group", 1), attrs.get("auto_pad", b"NOTSET")
            if auto_pad not in (b"SAME_UPPER", b"VALID") or attrs.get("pads"):
                raise UnsupportedGraph(f"Conv with auto_pad {auto_pad!r} / pads is not supported")

            def conv(x: Any, weight: Any, bias: Any = None) -> Any:
                if auto_pad == b"SAME_UPPER":
                    (top, bottom), (left, right) = (_same_upper(x.shape[2 + i], kernel[i], strides[i], dilations[i])
                                                    for i in range(2))
                    x = F.pad(x, (left, right, top, bottom))
                return F.conv2d(x, weight, bias, stride=strides, dilation=dilations, groups=group)
            function: Callable[..., Any] = conv
        elif op == "MaxPool":
            kernel, strides, auto_pad = attrs["kernel_shape"], attrs.get("strides", [1, 1]), attrs.get("auto_pad")
            if auto_pad not in (b"SAME_UPPER", b"VALID") or attrs.get("pads"):
                raise UnsupportedGraph(f"MaxPool with auto_pad {auto_pad!r} / pads is not supported")

            def max_pool(x: Any) -> Any:
                if auto_pad == b"SAME_UPPER":
                    (top, bottom), (left, right) = (_same_upper(x.shape[2 + i], kernel[i], strides[i], 1)
                                                    for i in range(2))
                    x = F.pad(x, (left, right, top, bottom), value=-math.inf)
                return F.max_pool2d(x, kernel, strides)
            function = max_pool
        elif op == "Pad":
            if attrs.get("mode", b"constant") != b"constant":
                raise UnsupportedGraph(f"Pad mode {attrs['mode']!r} is not supported")

            pads, fill = static(1).tolist(), static(2)
            rank = len(pads) // 2
            widths = [w for axis in reversed(range(rank)) for w in (pads[axis], pads[rank + axis])]
            fill_value = 0.0 if fill is None else float(fill)

            def pad(x: Any) -> Any:
                return F.pad(x, widths, value=fill_value)
            function, inputs = pad, node.input[:1]
        elif op == "Resize":
            mode, transform = attrs.get("mode", b"nearest"), attrs.get("coordinate_transformation_mode")
            if mode != b"linear" or transform not in (b"half_pixel", b"align_corners"):
                raise UnsupportedGraph(f"Resize {mode!r} / {transform!r} is not supported")

            factors = static(2).tolist()
            if factors[:2] != [1.0, 1.0]:
                raise UnsupportedGraph("Resize of the batch or channel axis is not supported")

            def resize(x: Any) -> Any:
                return F.interpolate(x, scale_factor=factors[2:], mode="bilinear",
                                     align_corners=transform == b"align_corners")
            function, inputs = resize, node.input[:1]
        elif op == "Reshape":
            shape = static(1).tolist()

            def reshape(x: Any) -> Any:
                return x.reshape([x.shape[i] if v == 0 else v for i, v in enumerate(shape)])
            function, inputs = reshape, node.input[:1]
        elif op == "Transpose":
            perm = attrs["perm"]

            def transpose(x: Any) -> Any:
                return x.permute(perm)
            function = transpose
        elif op == "Concat":
            axis = attrs["axis"]

            def concat(*xs: Any) -> Any:
                return self.torch.cat(xs, axis)
            function = concat
        elif op == "Clip":
            low, high = static(1), static(2)
            bounds = (None if low is None else float(low), None if high is None else float(high))

            def clip(x: Any) -> Any:
                return x.clamp(*bounds)
            function, inputs = clip, node.input[:1]
        elif op == "PRelu":
            def prelu(x: Any, slope: Any) -> Any:
                return self.torch.where(x >= 0, x, x * slope)
            function = prelu
        else:
            simple = {"Relu": F.relu, "Tanh": self.torch.tanh, "Add": self.torch.add, "Identity": lambda x: x}
            if op not in simple:
                raise UnsupportedGraph(f"operator {op} is not supported (node {node.name or node.output[0]})")
            function = simple[op]
        return function, list(inputs), node.output[0]

    def __call__(self, x: Any) -> list[Any]:
        values = dict(self.constants)
        values[self.input_name] = x
        for function, inputs, output in self.steps:
            # An empty name is an omitted optional input: passed as None.
            values[output] = function(*[values[name] if name else None for name in inputs])
        return [values[name] for name in self.output_names]


class _Call:
    __slots__ = ("array", "outputs", "error", "done")

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.outputs, self.error, self.done = array, None, None, threading.Event()


class TorchSession:
    """``InferenceSession.run`` on torch: calls from any thread, run by one worker thread that joins the calls
    waiting with the same input shape (past the batch dimension) into one batch of up to max_batch inputs."""

    def __init__(self, model: onnx.ModelProto, device: str = "cpu", max_batch: int = MAX_BATCH) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.graph, self.max_batch = TorchGraph(model, device), max_batch
        self.runs = 0  # batches run: with `calls`, how well calls were joined
        self.calls = 0
        self._waiting: list[_Call] = []
        self._wake = threading.Condition()
        self._worker: threading.Thread | None = None
        self._closed = False

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The graph's outputs (all of them, or those named) for one input, batch first, as ONNX Runtime returns."""
        if set(feeds) != {self.graph.input_name}:
            raise ValueError(f"expected one input named {self.graph.input_name!r}, got {sorted(feeds)}")
        call = _Call(np.ascontiguousarray(feeds[self.graph.input_name], np.float32))
        with self._wake:
            if self._closed:
                raise RuntimeError("this TorchSession is closed")
            self._waiting.append(call)
            if self._worker is None:
                self._worker = threading.Thread(target=self._serve, name="facetwin-face-models", daemon=True)
                self._worker.start()
                # A daemon thread still inside torch when the interpreter exits aborts the process: stop it first.
                atexit.register(self.close)
            self._wake.notify()
        call.done.wait()
        if call.error is not None:
            raise call.error
        names = output_names or self.graph.output_names
        return [call.outputs[self.graph.output_names.index(name)] for name in names]

    def close(self) -> None:
        """Stops the worker once the calls already waiting are answered; later calls raise."""
        with self._wake:
            self._closed = True
            self._wake.notify()
            worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            worker.join()

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._closed:
                    self._wake.wait()
                if not self._waiting:
                    return
                shape = self._waiting[0].array.shape[1:]
                batch, size = [], 0
                for call in self._waiting:  # the oldest call always goes, even alone over max_batch
                    if call.array.shape[1:] == shape and (not batch or size + len(call.array) <= self.max_batch):
                        batch.append(call)
                        size += len(call.array)
                taken = {id(call) for call in batch}
                self._waiting = [call for call in self._waiting if id(call) not in taken]
            self._run(batch)

    def _run(self, batch: list[_Call]) -> None:
        torch = self.graph.torch
        try:
            # On the GPU, not while a swap model captures its CUDA graphs (core/cuda.py).
            with torch.inference_mode(), CAPTURE_LOCK:
                inputs = torch.from_numpy(np.concatenate([c.array for c in batch])).to(self.graph.device)
                outputs = [o.float().cpu().numpy() for o in self.graph(inputs)]
            start = 0
            for call in batch:
                end = start + len(call.array)
                call.outputs = [o[start:end] for o in outputs]
                start = end
        except Exception as exc:  # every caller of the batch gets the error; the worker serves on
            for call in batch:
                call.error = exc
        finally:
            self.runs += 1
            self.calls += len(batch)
            for call in batch:
                call.done.set()
