"""DeepFaceLab .dfm interop on the real tiny bundle: the signature DeepFaceLive expects, the round trip
bundle -> .dfm -> bundle, an imported bundle served over real gRPC, and clear errors for files that are no .dfm
(the dfm-export / dfm-import commands: tests/training/test_cli.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from facetwin.core.bundle import load_manifest
from facetwin.server.config import ServerConfig
from facetwin.training import dfm


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def bundle_outputs(bundle: Path, target: str, rgb_nchw: np.ndarray) -> list[np.ndarray]:
    manifest = load_manifest(bundle)
    return session(bundle / manifest.targets[target]).run(
        [manifest.output_face.name, manifest.output_mask.name], {manifest.input.name: rgb_nchw})


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> Path:
    return tiny_model_dir / "tiny"


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory) -> tuple[Path, str, str]:
    """The tiny bundle's second identity as a .dfm, with the first identity's decoder as out_face_mask."""
    manifest = load_manifest(tiny)
    celeb, dst = manifest.identities[1], manifest.identities[0]
    path = dfm.bundle_to_dfm(tiny, celeb, tmp_path_factory.mktemp("dfm") / f"{celeb}.dfm", face_mask_from=dst)
    return path, celeb, dst


def real_faces(tiny_model_dir, identity: str, count: int = 4) -> np.ndarray:
    """Training faces of the tiny fixture's data set: (N, R, R, 3) uint8 RGB."""
    import cv2

    files = sorted((tiny_model_dir.parent / "data" / identity).glob("[0-9][0-9][0-9][0-9][0-9].png"))[:count]
    return np.stack([cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB) for f in files])


def test_dfm_has_deepfacelive_signature_and_matches_the_bundle(exported, tiny, tiny_model_dir):
    path, celeb, dst = exported
    res = load_manifest(tiny).resolution
    sess = session(path)
    # What DeepFaceLive's DFMModel checks and does: input 0 named in_face, its shape[1:3] is the resolution,
    # sess.run(None, {'in_face:0': NHWC float}) unpacked positionally as (face mask, celeb face, celeb mask).
    assert [i.name for i in sess.get_inputs()] == ["in_face:0"]
    assert sess.get_inputs()[0].shape[1:] == [res, res, 3] and isinstance(sess.get_inputs()[0].shape[0], str)
    assert [o.name for o in sess.get_outputs()] == ["out_face_mask:0", "out_celeb_face:0", "out_celeb_face_mask:0"]
    rgb = real_faces(tiny_model_dir, dst, 3).astype(np.float32) / 255.0
    bgr_nhwc = np.ascontiguousarray(rgb[..., ::-1])
    face_mask, celeb_face, celeb_mask = sess.run(None, {"in_face:0": bgr_nhwc})
    assert celeb_face.shape == (3, res, res, 3) and celeb_mask.shape == face_mask.shape == (3, res, res, 1)
    rgb_nchw = np.ascontiguousarray(rgb.transpose(0, 3, 1, 2))
    want_face, want_mask = bundle_outputs(tiny, celeb, rgb_nchw)
    np.testing.assert_array_equal(celeb_face, want_face.transpose(0, 2, 3, 1)[..., ::-1])  # BGR out
    np.testing.assert_array_equal(celeb_mask, want_mask.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(face_mask, bundle_outputs(tiny, dst, rgb_nchw)[1].transpose(0, 2, 3, 1))
    assert not np.array_equal(face_mask, celeb_mask)  # really the other decoder's mask


def test_round_trip_gives_the_same_outputs(exported, tiny, tmp_path):
    path, celeb, _ = exported
    imported = dfm.dfm_to_bundle(path, tmp_path / "models", "from-dfm")
    manifest = load_manifest(imported)
    assert manifest.identities == (celeb, "dst") and list(manifest.targets) == [celeb]  # target name from metadata
    assert manifest.variant == "dfm" and manifest.export["max_abs_error"] == 0.0
    rgb = np.random.default_rng(3).random((5, 3, manifest.resolution, manifest.resolution), dtype=np.float32)
    for before, after in zip(bundle_outputs(tiny, celeb, rgb), bundle_outputs(imported, celeb, rgb)):
        np.testing.assert_array_equal(before, after)
    with pytest.raises(dfm.DfmError, match="already exists"):
        dfm.dfm_to_bundle(path, tmp_path / "models", "from-dfm")
    (tmp_path / "models" / "mine").mkdir()
    (tmp_path / "models" / "mine" / "keep.txt").write_text("kept")
    with pytest.raises(dfm.DfmError, match="is not a model bundle"):  # --overwrite replaces a bundle, nothing else
        dfm.dfm_to_bundle(path, tmp_path / "models", "mine", overwrite=True)
    assert (tmp_path / "models" / "mine" / "keep.txt").read_text() == "kept"


def test_a_dfm_with_broken_weights_is_refused_not_compared(exported, tmp_path):
    """NaN weights give NaN outputs, which compare as 'no error' against NaN: they are refused by name."""
    from onnx import numpy_helper

    path, _, _ = exported
    model = onnx.load(str(path))
    first = next(t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) > 1)
    broken = numpy_helper.to_array(first).copy()
    broken[...] = np.nan
    first.CopyFrom(numpy_helper.from_array(broken, first.name))
    onnx.save(model, str(tmp_path / "broken.dfm"))
    with pytest.raises(dfm.DfmError, match="NaN or infinite outputs"):
        dfm.dfm_to_bundle(tmp_path / "broken.dfm", tmp_path / "models", "broken")
    assert not (tmp_path / "models" / "broken").exists()


def test_imported_bundle_is_served_by_the_real_server(exported, tiny, tiny_model_dir, tmp_path):
    from facetwin.client import Client
    from tests.conftest import ServerThread

    path, celeb, dst = exported
    dfm.dfm_to_bundle(path, tmp_path / "models", "imported", dst="someone")
    server = ServerThread(ServerConfig(address="127.0.0.1:0", model_dir=str(tmp_path / "models"), grace_s=1.0))
    try:
        faces = real_faces(tiny_model_dir, dst, 2)
        with Client(server.address, timeout=30) as client:
            models = client.list_models()
            assert [m.name for m in models] == ["imported"], models
            served = [client.swap(face, "imported", celeb, color="rgb", return_mask=True) for face in faces]
    finally:
        server.stop()
    want_face, want_mask = bundle_outputs(tiny, celeb, np.ascontiguousarray(
        faces.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0)
    for result, face, mask in zip(served, want_face, want_mask):
        expected = np.clip(face.transpose(1, 2, 0) * 255.0, 0, 255)
        assert np.abs(result.image.astype(np.float64) - expected).max() <= 1.0  # uint8 rounding only
        assert np.abs(result.mask.astype(np.float64) - mask[0] * 255.0).max() <= 1.0


def amp_like_dfm(res: int = 16, **changes) -> onnx.ModelProto:
    """A hand-built .dfm with DFL's AMP signature: out_celeb_face = in_face * morph_value, masks = channel mean.
    Opset 12, what DFL's SAEHD exporter (tf2onnx) writes."""
    spec = dict(in_name="in_face:0", in_shape=["N", res, res, 3], outputs=dfm.DFM_OUTPUTS, extra_input=False)
    spec.update(changes)
    nodes = [helper.make_node("Mul", [spec["in_name"], "morph_value:0"], ["out_celeb_face:0"]),
             helper.make_node("ReduceMean", [spec["in_name"]], ["out_celeb_face_mask:0"], axes=[3], keepdims=1),
             helper.make_node("Identity", ["out_celeb_face_mask:0"], ["out_face_mask:0"])]
    shapes = {"out_face_mask:0": ["N", res, res, 1], "out_celeb_face:0": ["N", res, res, 3],
              "out_celeb_face_mask:0": ["N", res, res, 1]}
    inputs = [helper.make_tensor_value_info(spec["in_name"], TensorProto.FLOAT, spec["in_shape"]),
              helper.make_tensor_value_info("morph_value:0", TensorProto.FLOAT, [1])]
    if spec["extra_input"]:
        inputs.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1]))
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shapes[n]) for n in spec["outputs"]]
    return helper.make_model(helper.make_graph(nodes, "amp", inputs, outputs),
                             opset_imports=[helper.make_opsetid("", 12)], ir_version=7)


def test_amp_dfm_imports_with_morph_baked_in_and_colour_order_converted(tmp_path):
    path = tmp_path / "amp.dfm"
    onnx.save(amp_like_dfm(), str(path))
    bundle = dfm.dfm_to_bundle(path, tmp_path / "models", "amp", celeb="celeb", morph=0.5)
    manifest = load_manifest(bundle)
    assert manifest.training_config["imported_from"]["morph_value"] == 0.5
    rgb = np.random.default_rng(0).random((2, 3, 16, 16), dtype=np.float32)
    face, mask = bundle_outputs(bundle, "celeb", rgb)
    np.testing.assert_allclose(face, rgb * 0.5, rtol=0, atol=1e-7)  # BGR in, BGR out: both flips cancel
    np.testing.assert_allclose(mask[:, 0], rgb.mean(1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("changes, message", [
    ({"in_name": "face"}, "inputs are ['face', 'morph_value:0']"),
    ({"in_shape": ["N", 3, 16, 16]}, "square NHWC"),
    ({"in_shape": [1, 16, 16, 3]}, "fixed batch size 1"),
    ({"outputs": ("out_celeb_face:0", "out_celeb_face_mask:0")}, "['out_face_mask:0'] are missing"),
    ({"extra_input": True}, "not a DeepFaceLab .dfm"),
])
def test_wrong_signature_is_a_clear_error(tmp_path, changes, message):
    path = tmp_path / "bad.dfm"
    onnx.save(amp_like_dfm(**changes), str(path))
    with pytest.raises(dfm.DfmError) as caught:
        dfm.dfm_to_bundle(path, tmp_path / "models", "bad")
    assert message in str(caught.value)
    assert not (tmp_path / "models").exists()


def test_float16_bundle_exports_with_casts(tmp_path):
    """A bundle whose graphs take float16 (allowed by the contract): the .dfm still speaks float32 NHWC."""
    from facetwin.core.bundle import Manifest, TensorSpec, write_manifest
    from facetwin.core.files import sha256_file

    res, half = 16, TensorProto.FLOAT16
    nodes = [helper.make_node("Identity", ["face"], ["swapped"]),
             helper.make_node("ReduceMean", ["face"], ["mask"], axes=[1], keepdims=1)]
    graph = helper.make_graph(nodes, "half", [helper.make_tensor_value_info("face", half, ["B", 3, res, res])],
                              [helper.make_tensor_value_info("swapped", half, ["B", 3, res, res]),
                               helper.make_tensor_value_info("mask", half, ["B", 1, res, res])])
    bundle = tmp_path / "half"
    bundle.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(bundle / "target_a.onnx"))
    spec = {"dtype": "float16"}
    write_manifest(bundle, Manifest(
        variant="ae", resolution=res, identities=("a", "b"), input=TensorSpec("face", ("B", 3, res, res), **spec),
        output_face=TensorSpec("swapped", ("B", 3, res, res), **spec),
        output_mask=TensorSpec("mask", ("B", 1, res, res), **spec), targets={"a": "target_a.onnx"},
        files={"target_a.onnx": sha256_file(bundle / "target_a.onnx")}, model_config={}, training_config={}))
    path = dfm.bundle_to_dfm(bundle, "a", tmp_path / "a.dfm")
    bgr = np.random.default_rng(0).random((2, res, res, 3), dtype=np.float32)
    face_mask, celeb, celeb_mask = session(path).run(None, {"in_face:0": bgr})
    assert celeb.dtype == np.float32
    np.testing.assert_allclose(celeb, bgr, atol=1e-3)  # float16 rounding only; BGR in, BGR out
    np.testing.assert_allclose(celeb_mask[..., 0], bgr.mean(-1), atol=2e-3)
    np.testing.assert_array_equal(face_mask, celeb_mask)  # no --face-mask-from: the celeb mask repeated
