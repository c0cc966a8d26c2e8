"""DeepFaceLab interop: a bundle target as a DeepFaceLab/DeepFaceLive ``.dfm``, and a ``.dfm`` as a bundle.

A ``.dfm`` is a plain ONNX file. Its signature, as DeepFaceLab's exporters write it (``export_dfm`` of the SAEHD
and AMP models: tf2onnx, ``input_names=['in_face:0']``, ``output_names=['out_face_mask:0', 'out_celeb_face:0',
'out_celeb_face_mask:0']``) and as DeepFaceLive's ``DFMModel`` reads it (checked against both sources):

* input ``in_face:0``: (N, R, R, 3) float32 NHWC, BGR, values in [0, 1]; DeepFaceLive takes R from
  ``inputs[0].shape[1:3]`` and feeds ``{'in_face:0': img}``. AMP models add a second input ``morph_value:0``
  (shape (1,), DeepFaceLive's default 0.75); more inputs, or an input without ``in_face`` in its name, are invalid.
* outputs, in this order -- DeepFaceLive unpacks ``sess.run(None, ...)`` positionally: ``out_face_mask:0`` (N, R,
  R, 1) the mask of the input face (DFL's dst decoder), ``out_celeb_face:0`` (N, R, R, 3) BGR the swapped face
  (the src or "celeb" decoder), ``out_celeb_face_mask:0`` (N, R, R, 1) the celeb decoder's mask.

A facetwin bundle graph takes (B, 3, R, R) RGB and returns the swapped face (B, 3, R, R) RGB and its mask
(B, 1, R, R). Both directions wrap the other graph inside one ONNX graph (built with the ``onnx`` library) between
a Transpose and a channel-reversing Gather, so the weights are untouched and the outputs are bit-identical.
``out_face_mask`` comes from a second bundle identity's decoder when ``face_mask_from`` names one (that is what
DFL's dst decoder is), else it repeats the celeb mask. DFL exports at opset 12 (SAEHD) / 13 (AMP), and imports of
either work; exported files keep the bundle's opset (17 by default), which needs ONNX Runtime >= 1.12 -- whether a
given DeepFaceLive build ships one that new was not checked.

Crop framing is not converted: DFL models are trained on its own face types (``whole_face``, ``head``...), facetwin
models on core/alignment.py's crop. The tensors fit either way; the swaps look right only with the framing the model
was trained on.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from facetwin.core.bundle import (
    BundleError,
    Manifest,
    TensorSpec,
    bundle_in_the_way,
    check_name,
    load_manifest,
    write_manifest,
)
from facetwin.core.files import DIR_MODE, FILE_MODE, atomic_write_bytes, replace_folder, sha256_file

from .export import check_finite

DFM_INPUT = "in_face:0"
DFM_MORPH = "morph_value:0"
DFM_FACE_MASK, DFM_CELEB, DFM_CELEB_MASK = "out_face_mask:0", "out_celeb_face:0", "out_celeb_face_mask:0"
DFM_OUTPUTS = (DFM_FACE_MASK, DFM_CELEB, DFM_CELEB_MASK)  # DeepFaceLive's positional order
DEFAULT_MORPH = 0.75  # DeepFaceLive's default morph factor for AMP models
DEFAULT_DST = "dst"  # name of the second bundle identity of an imported .dfm: DFL calls the faces it swaps "dst"
BUNDLE_INPUT, BUNDLE_FACE, BUNDLE_MASK = "face", "swapped", "mask"  # the names training/export.py uses
MAX_ABS_ERROR = 1e-5  # wrapped vs unwrapped graph: the wrapper only moves values, so this is float noise at most
MAX_ABS_ERROR_FP16 = 2e-2  # the same for float16 bundles (the backends' fp16 conformance tolerance)
INNER, SECOND, WRAPPED = "facetwin/", "facetwin_dst/", "dfm/"  # name prefixes of the wrapped graphs


class DfmError(ValueError):
    """A .dfm file does not have DeepFaceLab's signature, or a conversion failed its check."""


def _onnx():
    import onnx  # training extra; imported lazily so `facetwin-train --help` stays fast

    return onnx


def _base(name: str) -> str:
    return name[:-2] if name.endswith(":0") else name


def _dims(value_info: Any) -> list[int | str]:
    """A graph input/output's shape: ints, dim_param strings, or '?' for an unknown dimension."""
    dims = []
    for dim in value_info.type.tensor_type.shape.dim:
        dims.append(dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or "?"))
    return dims


def _const(name: str, values: list[int]) -> Any:
    onnx = _onnx()
    return onnx.helper.make_tensor(name, onnx.TensorProto.INT64, [len(values)], values)


def _channel_flip(src: str, dst: str, axis: int, prefix: str) -> tuple[list[Any], Any]:
    """RGB <-> BGR: Gather the channel axis with indices [2, 1, 0]."""
    index = _const(f"{prefix}bgr_index_{axis}", [2, 1, 0])
    return [_onnx().helper.make_node("Gather", [src, index.name], [dst], axis=axis, name=f"{prefix}flip_{dst}")], index


def _transpose(src: str, dst: str, perm: list[int], prefix: str) -> Any:
    return _onnx().helper.make_node("Transpose", [src], [dst], perm=perm, name=f"{prefix}transpose_{dst}")


def _prefixed(model: Any, prefix: str) -> Any:
    return _onnx().compose.add_prefix(model, prefix)


def _session(model_or_path: Any) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    data = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------------------------------ bundle -> .dfm


def bundle_to_dfm(bundle_dir: str | Path, target: str, out_path: str | Path, face_mask_from: str | None = None,
                  overwrite: bool = False) -> Path:
    """Writes bundle target `target` as a .dfm; `face_mask_from` (another target of the bundle) supplies
    out_face_mask. Checked in ONNX Runtime against the bundle graph before it is written."""
    onnx = _onnx()
    bundle_dir, out_path = Path(bundle_dir), Path(out_path)
    manifest = load_manifest(bundle_dir)
    if target not in manifest.targets:
        raise DfmError(f"bundle {bundle_dir} has no graph for target {target!r}; targets: {sorted(manifest.targets)}")
    if face_mask_from is not None and face_mask_from not in manifest.targets:
        raise DfmError(f"--face-mask-from {face_mask_from!r} has no graph in the bundle; targets: "
                       f"{sorted(manifest.targets)}")
    if out_path.exists() and not overwrite:
        raise DfmError(f"{out_path} already exists; pass overwrite=True (--overwrite) to replace it")
    res, half = manifest.resolution, manifest.input.dtype == "float16"
    inner = _prefixed(onnx.load(str(bundle_dir / manifest.targets[target])), INNER)
    nodes: list[Any] = []
    flip, index = _channel_flip(DFM_INPUT, "rgb_nhwc", 3, "pre/")
    nodes += flip
    nodes.append(_transpose("rgb_nhwc", "rgb_nchw", [0, 3, 1, 2], "pre/"))
    feed = "rgb_nchw"
    if half:
        nodes.append(onnx.helper.make_node("Cast", [feed], ["rgb_nchw16"], to=onnx.TensorProto.FLOAT16))
        feed = "rgb_nchw16"
    graphs = [(inner, INNER)]
    if face_mask_from is not None:
        graphs.append((_prefixed(onnx.load(str(bundle_dir / manifest.targets[face_mask_from])), SECOND), SECOND))
    initializers = [index]
    for graph_model, prefix in graphs:
        nodes.append(onnx.helper.make_node("Identity", [feed], [graph_model.graph.input[0].name],
                                           name=f"{prefix}input"))
        nodes += list(graph_model.graph.node)
        initializers += list(graph_model.graph.initializer)

    def out(name: str, prefix: str) -> str:
        produced = f"{prefix}{name}"
        if not half:
            return produced
        nodes.append(onnx.helper.make_node("Cast", [produced], [f"{produced}_f32"], to=onnx.TensorProto.FLOAT))
        return f"{produced}_f32"

    face_name = manifest.output_face.name
    mask_name = manifest.output_mask.name
    nodes.append(_transpose(out(face_name, INNER), "celeb_rgb_nhwc", [0, 2, 3, 1], "post/"))
    flip, index_out = _channel_flip("celeb_rgb_nhwc", DFM_CELEB, 3, "post/")
    nodes += flip
    initializers.append(index_out)
    nodes.append(_transpose(out(mask_name, INNER), DFM_CELEB_MASK, [0, 2, 3, 1], "post/"))
    if face_mask_from is not None:
        nodes.append(_transpose(out(mask_name, SECOND), DFM_FACE_MASK, [0, 2, 3, 1], "post/"))
    else:
        nodes.append(onnx.helper.make_node("Identity", [DFM_CELEB_MASK], [DFM_FACE_MASK], name="post/face_mask"))
    value = onnx.helper.make_tensor_value_info
    float32 = onnx.TensorProto.FLOAT
    graph = onnx.helper.make_graph(
        nodes, f"facetwin_{bundle_dir.name}_{target}",
        [value(DFM_INPUT, float32, ["N", res, res, 3])],
        [value(DFM_FACE_MASK, float32, ["N", res, res, 1]), value(DFM_CELEB, float32, ["N", res, res, 3]),
         value(DFM_CELEB_MASK, float32, ["N", res, res, 1])],
        initializer=initializers)
    model = onnx.helper.make_model(graph, opset_imports=list(inner.opset_import), producer_name="facetwin",
                                   ir_version=inner.ir_version)
    onnx.helper.set_model_props(model, {"facetwin.bundle": bundle_dir.name, "facetwin.target": target,
                                        "facetwin.face_mask_from": face_mask_from or "",
                                        "facetwin.identities": ",".join(manifest.identities)})
    onnx.checker.check_model(model, full_check=True)
    error = _check_dfm_against_bundle(model, bundle_dir, manifest, target, face_mask_from)
    # float16 graphs: ONNX Runtime may fold the wrapper's casts and compute some ops in float32 instead
    limit = MAX_ABS_ERROR_FP16 if half else MAX_ABS_ERROR
    if error > limit:
        raise DfmError(f"the .dfm differs from the bundle graph by {error:.2e} (> {limit})")
    return atomic_write_bytes(out_path, model.SerializeToString())


def _bundle_run(bundle_dir: Path, manifest: Manifest, target: str, rgb_nchw: np.ndarray) -> list[np.ndarray]:
    session = _session(bundle_dir / manifest.targets[target])
    dtype = np.float16 if manifest.input.dtype == "float16" else np.float32
    return [o.astype(np.float32) for o in session.run([manifest.output_face.name, manifest.output_mask.name],
                                                       {manifest.input.name: rgb_nchw.astype(dtype)})]


def _finite(what: str, *arrays: np.ndarray) -> None:
    try:
        check_finite(what, *arrays)
    except ValueError as exc:
        raise DfmError(str(exc)) from None


def _check_dfm_against_bundle(model: Any, bundle_dir: Path, manifest: Manifest, target: str,
                              face_mask_from: str | None, seed: int = 0) -> float:
    """Largest |.dfm output - bundle output| on random faces, run the way DeepFaceLive runs a .dfm."""
    res = manifest.resolution
    bgr = np.random.default_rng(seed).random((2, res, res, 3), dtype=np.float32)
    face_mask, celeb, celeb_mask = _session(model).run(None, {DFM_INPUT: bgr})
    rgb_nchw = np.ascontiguousarray(bgr[..., ::-1].transpose(0, 3, 1, 2))
    face, mask = _bundle_run(bundle_dir, manifest, target, rgb_nchw)
    want_face_mask = _bundle_run(bundle_dir, manifest, face_mask_from, rgb_nchw)[1] if face_mask_from else mask
    _finite(f"the bundle {bundle_dir.name}", face, mask, want_face_mask)
    _finite("the .dfm written from it", face_mask, celeb, celeb_mask)
    pairs = ((celeb, face.transpose(0, 2, 3, 1)[..., ::-1]), (celeb_mask, mask.transpose(0, 2, 3, 1)),
             (face_mask, want_face_mask.transpose(0, 2, 3, 1)))
    return max(float(np.abs(got - want).max()) for got, want in pairs)


# ------------------------------------------------------------------------------------------ .dfm -> bundle


def read_dfm_signature(model: Any) -> dict[str, Any]:
    """Checks a loaded .dfm against DeepFaceLab's signature (module docstring); raises DfmError saying what is off.
    Returns {"resolution", "input", "morph" (name or None), "outputs": {base name: graph name}}."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    expected = (f"a DeepFaceLab .dfm has input {DFM_INPUT} (N, R, R, 3) [+ {DFM_MORPH}] and outputs "
                f"{', '.join(DFM_OUTPUTS)}")
    if not inputs or "in_face" not in inputs[0].name or len(inputs) > 2:
        raise DfmError(f"not a DeepFaceLab .dfm: inputs are {[i.name for i in inputs]}; {expected}")
    morph = None
    if len(inputs) == 2:
        if "morph_value" not in inputs[1].name:
            raise DfmError(f"not a DeepFaceLab .dfm: second input {inputs[1].name!r} is not {DFM_MORPH}; {expected}")
        morph = inputs[1].name
    face_in = inputs[0]
    dims = _dims(face_in)
    if face_in.type.tensor_type.elem_type != _onnx().TensorProto.FLOAT:
        raise DfmError(f"{face_in.name} must be float32, it is ONNX type {face_in.type.tensor_type.elem_type}")
    if len(dims) != 4 or dims[3] != 3 or not isinstance(dims[1], int) or dims[1] != dims[2] or not dims[1]:
        raise DfmError(f"{face_in.name} has shape {dims}; a .dfm takes square NHWC faces (N, R, R, 3)")
    if isinstance(dims[0], int) and dims[0] > 0:
        raise DfmError(f"{face_in.name} has a fixed batch size {dims[0]}; a facetwin bundle needs a dynamic batch axis")
    res = dims[1]
    if not 16 <= res <= 1024:
        raise DfmError(f"{face_in.name} resolution {res} is outside 16..1024")
    outputs = {_base(o.name): o for o in model.graph.output}
    missing = [name for name in DFM_OUTPUTS if _base(name) not in outputs]
    if missing:
        raise DfmError(f"not a DeepFaceLab .dfm: outputs {missing} are missing (it has {sorted(outputs)}); {expected}")
    for name, channels in ((DFM_CELEB, 3), (DFM_CELEB_MASK, 1), (DFM_FACE_MASK, 1)):
        shape = _dims(outputs[_base(name)])
        if len(shape) != 4 or shape[3] != channels or shape[1:3] != [res, res]:
            raise DfmError(f"output {name} has shape {shape}; expected (N, {res}, {res}, {channels}) NHWC")
    return {"resolution": res, "input": face_in.name, "morph": morph,
            "outputs": {_base(name): outputs[_base(name)].name for name in DFM_OUTPUTS}}


def dfm_to_bundle(dfm_path: str | Path, model_dir: str | Path, name: str, celeb: str | None = None,
                  dst: str = DEFAULT_DST, morph: float = DEFAULT_MORPH, overwrite: bool = False) -> Path:
    """Converts a .dfm into bundle `model_dir/name` with one target, `celeb` (default: the file's stem, or the
    facetwin target recorded in a .dfm this module wrote), and a second identity `dst` (the faces it swaps).
    An AMP model's morph_value input becomes a constant `morph`. Checked against the .dfm in ONNX Runtime."""
    dfm_path, model_dir = Path(dfm_path), Path(model_dir)
    original = _load_dfm(dfm_path)
    signature = read_dfm_signature(original)
    props = {p.key: p.value for p in original.metadata_props}
    celeb = celeb or props.get("facetwin.target") or dfm_path.stem
    _check_import_options(name, celeb, dst, morph)
    final = model_dir / name
    if reason := bundle_in_the_way(final, overwrite):
        raise DfmError(reason)
    model = _bundle_graph_of_dfm(original, signature, name, morph)
    error = _check_converted(model, original, signature, morph, dfm_path)
    res = signature["resolution"]
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    imported_from = {"format": "DeepFaceLab .dfm", "file": dfm_path.name,
                     "sha256": hashlib.sha256(dfm_path.read_bytes()).hexdigest(),
                     "morph_value": morph if signature["morph"] else None, "metadata": props}
    manifest = Manifest(
        variant="dfm", resolution=res, identities=(celeb, dst),
        input=TensorSpec(BUNDLE_INPUT, ("B", 3, res, res)), output_face=TensorSpec(BUNDLE_FACE, ("B", 3, res, res)),
        output_mask=TensorSpec(BUNDLE_MASK, ("B", 1, res, res)), targets={}, files={}, model_config={},
        training_config={"imported_from": imported_from},
        export={"opset": opset, "max_abs_error": error, "checked": True,
                "note": "no weights.safetensors: serve with the onnxruntime or tensorrt backend"})
    return _write_bundle(final, celeb, model, manifest)


def _load_dfm(dfm_path: Path) -> Any:
    if not dfm_path.is_file():
        raise DfmError(f".dfm file {dfm_path} does not exist")
    try:
        return _onnx().load(str(dfm_path))
    except Exception as exc:  # protobuf raises DecodeError, onnx its own: all mean "not an ONNX file"
        raise DfmError(f"{dfm_path} is not an ONNX model (a .dfm is one): {type(exc).__name__}: {exc}") from None


def _check_import_options(name: str, celeb: str, dst: str, morph: float) -> None:
    try:
        for what, value in (("model name", name), ("celeb identity", celeb), ("dst identity", dst)):
            check_name(value, what)
    except BundleError as exc:
        raise DfmError(f"{exc} (pass --name / --celeb / --dst)") from None
    if celeb == dst:
        raise DfmError(f"the celeb and dst identities are both {celeb!r}: pass --dst with another name")
    if not 0.0 <= morph <= 1.0:
        raise DfmError(f"morph must be in 0..1, got {morph}")


def _bundle_graph_of_dfm(original: Any, signature: dict[str, Any], name: str, morph: float) -> Any:
    """The .dfm's graph inside the bundle signature: RGB NCHW in, Transpose + channel flip to its BGR NHWC input,
    the same back on its celeb outputs; an AMP model's morph_value input becomes a constant."""
    onnx = _onnx()
    res = signature["resolution"]
    wrapped = _prefixed(original, WRAPPED)
    graph = wrapped.graph
    inner_in = f"{WRAPPED}{signature['input']}"
    initializers = list(graph.initializer)
    if signature["morph"] is not None:
        morph_name = f"{WRAPPED}{signature['morph']}"
        morph_input = next(i for i in graph.input if i.name == morph_name)
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in _dims(morph_input)] or []
        initializers.append(onnx.numpy_helper.from_array(np.full(shape, morph, np.float32), morph_name))
    nodes = [_transpose(BUNDLE_INPUT, "rgb_nhwc", [0, 2, 3, 1], "pre/")]
    flip, index = _channel_flip("rgb_nhwc", inner_in, 3, "pre/")
    nodes += flip + list(graph.node)
    outs = {k: f"{WRAPPED}{v}" for k, v in signature["outputs"].items()}
    flip, index_out = _channel_flip(outs[_base(DFM_CELEB)], "celeb_rgb_nhwc", 3, "post/")
    nodes += flip
    nodes.append(_transpose("celeb_rgb_nhwc", BUNDLE_FACE, [0, 3, 1, 2], "post/"))
    nodes.append(_transpose(outs[_base(DFM_CELEB_MASK)], BUNDLE_MASK, [0, 3, 1, 2], "post/"))
    value = onnx.helper.make_tensor_value_info
    float32 = onnx.TensorProto.FLOAT
    new_graph = onnx.helper.make_graph(
        nodes, f"dfm_{name}", [value(BUNDLE_INPUT, float32, ["B", 3, res, res])],
        [value(BUNDLE_FACE, float32, ["B", 3, res, res]), value(BUNDLE_MASK, float32, ["B", 1, res, res])],
        initializer=initializers + [index, index_out], value_info=list(graph.value_info))
    opsets = list(wrapped.opset_import)  # the wrapper's Transpose / Gather exist in every opset (DFL: 12 and 13)
    return onnx.helper.make_model(new_graph, opset_imports=opsets, producer_name="facetwin dfm-import",
                                  ir_version=wrapped.ir_version)


def _check_converted(model: Any, original: Any, signature: dict[str, Any], morph: float, dfm_path: Path) -> float:
    """onnx.checker, then the largest |bundle graph - .dfm| (DfmError above MAX_ABS_ERROR)."""
    try:
        _onnx().checker.check_model(model, full_check=True)
    except Exception as exc:
        raise DfmError(f"the converted graph of {dfm_path} fails onnx.checker: {exc}") from None
    error = _check_bundle_against_dfm(model, original, signature, signature["resolution"], morph)
    if error > MAX_ABS_ERROR:
        raise DfmError(f"the converted bundle differs from {dfm_path} by {error:.2e} (> {MAX_ABS_ERROR})")
    return error


def _write_bundle(final: Path, celeb: str, model: Any, manifest: Manifest) -> Path:
    """Writes the graph and its manifest (targets and files filled in) into a staging folder beside `final`,
    verifies it as the server will, and renames it into place; an old bundle is moved aside first."""
    with replace_folder(final, mode=DIR_MODE) as staging:
        filename = check_name(f"target_{celeb}.onnx", "bundle file")
        (staging / filename).write_bytes(model.SerializeToString())
        (staging / filename).chmod(FILE_MODE)
        write_manifest(staging, dataclasses.replace(manifest, targets={celeb: filename},
                                                    files={filename: sha256_file(staging / filename)}))
        load_manifest(staging, verify=True)
    return final


def _check_bundle_against_dfm(model: Any, original: Any, signature: dict[str, Any], res: int, morph: float,
                              seed: int = 0) -> float:
    rgb = np.random.default_rng(seed).random((2, 3, res, res), dtype=np.float32)
    face, mask = _session(model).run([BUNDLE_FACE, BUNDLE_MASK], {BUNDLE_INPUT: rgb})
    feeds = {signature["input"]: np.ascontiguousarray(rgb.transpose(0, 2, 3, 1)[..., ::-1])}
    session = _session(original)
    if signature["morph"] is not None:
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in _dims(original.graph.input[1])]
        feeds[signature["morph"]] = np.full(shape, morph, np.float32)
    names = signature["outputs"]
    celeb, celeb_mask = session.run([names[_base(DFM_CELEB)], names[_base(DFM_CELEB_MASK)]], feeds)
    _finite("the .dfm", celeb, celeb_mask)
    _finite("the bundle converted from it", face, mask)
    return max(float(np.abs(face - celeb[..., ::-1].transpose(0, 3, 1, 2)).max()),
               float(np.abs(mask - celeb_mask.transpose(0, 3, 1, 2)).max()))
