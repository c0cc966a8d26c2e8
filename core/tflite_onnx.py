"""TFLite flatbuffers -> ONNX graphs, for the few operators MediaPipe's face models use.

MediaPipe ships BlazeFace and FaceMesh only as ``.tflite`` files, and the server runs ONNX Runtime without
TensorFlow. The general converters either need TensorFlow (tf2onnx) or are unmaintained and warn that they do not
handle the fp16 weights these files hold (tflite2onnx), so this module reads the flatbuffer with the pure-Python
``tflite`` package and writes the same graph with ``onnx.helper``: about a dozen operators, each a direct match.

Activations are NHWC in TFLite and NCHW in ONNX: the graph keeps its NHWC input and outputs (so it is fed exactly
what the .tflite file is fed) and transposes once after the input and before each output or Reshape. fp16 weights
(DEQUANTIZE of a constant) are folded to fp32 here. The batch dimension is always symbolic; ``dynamic_size=True``
makes height and width symbolic too, which a fully convolutional detector can then run on any image size.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import tflite
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
TO_NCHW, TO_NHWC = (0, 3, 1, 2), (0, 2, 3, 1)
NHWC_AXIS_IN_NCHW = {0: 0, 1: 2, 2: 3, 3: 1}
TENSOR_DTYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64}
_OPERATOR_NAMES = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}


class UnsupportedModel(ValueError):
    """The .tflite file uses an operator or option this converter does not translate."""


def _options(operator: Any, cls: type) -> Any:
    table = operator.BuiltinOptions()
    options = cls()
    options.Init(table.Bytes, table.Pos)
    return options


class _Converter:
    def __init__(self, data: bytes, dynamic_size: bool) -> None:
        self.model = tflite.Model.GetRootAsModel(data, 0)
        if self.model.SubgraphsLength() != 1:
            raise UnsupportedModel(f"expected one subgraph, found {self.model.SubgraphsLength()}")
        self.graph = self.model.Subgraphs(0)
        self.dynamic_size = dynamic_size
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.constants: dict[int, np.ndarray] = {}  # tflite tensor index -> value (weights, folded DEQUANTIZE)
        self.values: dict[int, tuple[str, bool]] = {}  # tflite tensor index -> (onnx name, holds NCHW)
        self._count = 0

    # ------------------------------------------------------------------------------------------------ helpers
    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def _shape(self, index: int) -> list[int]:
        return [int(v) for v in self.graph.Tensors(index).ShapeAsNumpy()]

    def _constant(self, index: int) -> np.ndarray | None:
        if index in self.constants:
            return self.constants[index]
        tensor = self.graph.Tensors(index)
        raw = self.model.Buffers(tensor.Buffer()).DataAsNumpy()
        if isinstance(raw, int) or raw.size == 0:
            return None
        if tensor.Type() not in TENSOR_DTYPES:
            raise UnsupportedModel(f"tensor {tensor.Name()!r} has unsupported type {tensor.Type()}")
        value = np.frombuffer(raw.tobytes(), TENSOR_DTYPES[tensor.Type()]).reshape(self._shape(index))
        self.constants[index] = value
        return value

    def _initializer(self, value: np.ndarray, hint: str) -> str:
        name = self._name(hint)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def _node(self, op: str, inputs: list[str], hint: str, **attrs: Any) -> str:
        out = self._name(hint)
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def _nchw(self, index: int) -> str:
        """The ONNX name of an activation, as NCHW when it is 4-D."""
        name, is_nchw = self.values[index]
        if len(self._shape(index)) == 4 and not is_nchw:
            name = self._node("Transpose", [name], "to_nchw", perm=TO_NCHW)
            self.values[index] = (name, True)
        return name

    def _nhwc(self, index: int) -> str:
        name, is_nchw = self.values[index]
        return self._node("Transpose", [name], "to_nhwc", perm=TO_NHWC) if is_nchw else name

    def _operand(self, index: int, channels: int) -> str:
        """An elementwise operand: an activation (NCHW) or a constant laid out to broadcast against NCHW."""
        value = self._constant(index)
        if value is None:
            return self._nchw(index)
        value = value.astype(np.float32)
        if value.ndim == 4:
            value = value.transpose(TO_NCHW)
        elif value.size == channels and value.shape[-1] == channels:
            value = value.reshape(channels, 1, 1)
        elif value.size != 1:
            raise UnsupportedModel(f"cannot broadcast a constant of shape {value.shape} against NCHW")
        return self._initializer(value, "const")

    def _activation(self, name: str, code: int) -> str:
        if code == tflite.ActivationFunctionType.NONE:
            return name
        if code == tflite.ActivationFunctionType.RELU:
            return self._node("Relu", [name], "relu")
        if code in (tflite.ActivationFunctionType.RELU6, tflite.ActivationFunctionType.RELU_N1_TO_1):
            low, high = (0.0, 6.0) if code == tflite.ActivationFunctionType.RELU6 else (-1.0, 1.0)
            bounds = [self._initializer(np.float32(v), "clip") for v in (low, high)]
            return self._node("Clip", [name, *bounds], "clip")
        if code == tflite.ActivationFunctionType.TANH:
            return self._node("Tanh", [name], "tanh")
        raise UnsupportedModel(f"unsupported fused activation {code}")

    @staticmethod
    def _auto_pad(padding: int) -> str:
        # TF's SAME puts the odd padding pixel at the end, as ONNX's SAME_UPPER does.
        return "SAME_UPPER" if padding == tflite.Padding.SAME else "VALID"

    # ----------------------------------------------------------------------------------------------- operators
    def _conv(self, op: Any, inputs: list[int], depthwise: bool) -> str:
        weights = self._constant(inputs[1])
        bias = self._constant(inputs[2]) if len(inputs) > 2 and inputs[2] >= 0 else None
        if weights is None:
            raise UnsupportedModel("convolution weights must be constants")
        options = _options(op, tflite.DepthwiseConv2DOptions if depthwise else tflite.Conv2DOptions)
        if depthwise:  # (1, kh, kw, C * multiplier) -> (C * multiplier, 1, kh, kw), one group per input channel
            kernel, group = weights.transpose(3, 0, 1, 2), self._shape(inputs[0])[3]
        else:  # (O, kh, kw, I) -> (O, I, kh, kw)
            kernel, group = weights.transpose(TO_NCHW), 1
        names = [self._nchw(inputs[0]), self._initializer(kernel.astype(np.float32), "weight")]
        if bias is not None:
            names.append(self._initializer(bias.astype(np.float32), "bias"))
        out = self._node("Conv", names, "conv", kernel_shape=list(kernel.shape[2:]), group=group,
                         strides=[options.StrideH(), options.StrideW()], auto_pad=self._auto_pad(options.Padding()),
                         dilations=[options.DilationHFactor(), options.DilationWFactor()])
        return self._activation(out, options.FusedActivationFunction())

    def _operator(self, op: Any, kind: str, inputs: list[int], output: int) -> tuple[str, bool]:
        """The ONNX value computing one TFLite operator's output, and whether it is NCHW."""
        shape = self._shape(output)
        channels = shape[-1] if shape else 1
        if kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            return self._conv(op, inputs, kind == "DEPTHWISE_CONV_2D"), True
        if kind == "ADD":
            out = self._node("Add", [self._operand(i, channels) for i in inputs], "add")
            return self._activation(out, _options(op, tflite.AddOptions).FusedActivationFunction()), len(shape) == 4
        if kind == "RELU":
            return self._node("Relu", [self._nchw(inputs[0])], "relu"), len(shape) == 4
        if kind == "PRELU":
            return self._node("PRelu", [self._nchw(inputs[0]), self._operand(inputs[1], channels)], "prelu"), True
        if kind == "MAX_POOL_2D":
            options = _options(op, tflite.Pool2DOptions)
            out = self._node("MaxPool", [self._nchw(inputs[0])], "maxpool",
                             kernel_shape=[options.FilterHeight(), options.FilterWidth()],
                             strides=[options.StrideH(), options.StrideW()], auto_pad=self._auto_pad(options.Padding()))
            return self._activation(out, options.FusedActivationFunction()), True
        if kind == "PAD":
            paddings = self._constant(inputs[1])
            if paddings is None or paddings.shape != (4, 2):
                raise UnsupportedModel("PAD needs constant 4-D paddings")
            pads = paddings[list(TO_NCHW)].T.reshape(-1).astype(np.int64)  # NCHW begins, then NCHW ends
            return self._node("Pad", [self._nchw(inputs[0]), self._initializer(pads, "pads")], "pad"), True
        if kind == "RESIZE_BILINEAR":
            options = _options(op, tflite.ResizeBilinearOptions)
            before = self._shape(inputs[0])
            scales = np.array([1, 1, shape[1] / before[1], shape[2] / before[2]], np.float32)
            mode = ("align_corners" if options.AlignCorners() else
                    "half_pixel" if options.HalfPixelCenters() else "asymmetric")
            return self._node("Resize", [self._nchw(inputs[0]), "", self._initializer(scales, "scales")], "resize",
                              mode="linear", coordinate_transformation_mode=mode), True
        if kind == "CONCATENATION":
            options = _options(op, tflite.ConcatenationOptions)
            axis = options.Axis() % len(shape)
            if len(shape) == 4:
                names, axis = [self._nchw(i) for i in inputs], NHWC_AXIS_IN_NCHW[axis]
            else:
                names = [self._nhwc(i) for i in inputs]
            out = self._node("Concat", names, "concat", axis=axis)
            return self._activation(out, options.FusedActivationFunction()), len(shape) == 4
        if kind == "RESHAPE":
            # The batch is copied (0); with a symbolic image size the first inner dimension is inferred (-1).
            target = [0, *shape[1:]]
            if self.dynamic_size and len(target) > 2:
                target[1] = -1
            return self._node("Reshape", [self._nhwc(inputs[0]), self._initializer(np.array(target, np.int64),
                                                                                     "shape")], "reshape"), False
        raise UnsupportedModel(f"operator {kind} is not supported by this converter")

    def convert(self, name: str) -> onnx.ModelProto:
        graph = self.graph
        (input_index,) = [graph.Inputs(i) for i in range(graph.InputsLength())]
        input_shape = self._shape(input_index)
        if len(input_shape) != 4:
            raise UnsupportedModel(f"expected one NHWC image input, got shape {input_shape}")
        input_name = graph.Tensors(input_index).Name().decode()
        dims: list[Any] = ["batch", *(["height", "width"] if self.dynamic_size else input_shape[1:3]), input_shape[3]]
        self.values[input_index] = (input_name, False)
        for position in range(graph.OperatorsLength()):
            op = graph.Operators(position)
            code = self.model.OperatorCodes(op.OpcodeIndex())
            kind = _OPERATOR_NAMES.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "CUSTOM")
            inputs, (output,) = [int(i) for i in op.InputsAsNumpy()], [int(i) for i in op.OutputsAsNumpy()]
            if kind == "DEQUANTIZE":
                value = self._constant(inputs[0])
                if value is None or value.dtype != np.float16:
                    raise UnsupportedModel("only DEQUANTIZE of fp16 constants (fp16 weights) is supported")
                self.constants[output] = value.astype(np.float32)
                continue
            self.values[output] = self._operator(op, kind, inputs, output)
        outputs = []
        for i in range(graph.OutputsLength()):
            index = graph.Outputs(i)
            out_name = graph.Tensors(index).Name().decode()
            self.nodes.append(helper.make_node("Identity", [self._nhwc(index)], [out_name]))
            shape = self._shape(index)
            out_dims = ["batch", *(["anchors"] if self.dynamic_size and len(shape) == 3 else shape[1:2]), *shape[2:]]
            outputs.append(helper.make_tensor_value_info(out_name, TensorProto.FLOAT, out_dims))
        onnx_graph = helper.make_graph(self.nodes, name, [helper.make_tensor_value_info(input_name, TensorProto.FLOAT,
                                                                                        dims)],
                                       outputs, self.initializers)
        model = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="facetwin.core.tflite_onnx")
        model.ir_version = 8  # what ONNX Runtime >= 1.14 reads; the onnx package may default to a newer one
        onnx.checker.check_model(model)
        return model


def convert(tflite_bytes: bytes, name: str = "model", dynamic_size: bool = False) -> onnx.ModelProto:
    """The ONNX graph of a .tflite model's contents. dynamic_size: height and width of the input symbolic (only for
    fully convolutional graphs, e.g. a detector whose anchors are laid out on the output grid by its caller)."""
    return _Converter(tflite_bytes, dynamic_size).convert(name)
