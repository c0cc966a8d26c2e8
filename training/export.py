"""Turns a training checkpoint into a model bundle the server loads (contract: ``core/bundle.py``).

    <out_dir>/<name>/
        manifest.json              # Manifest: identities, tensor specs, configs, sha256 of every file, export check
        weights.safetensors        # every generator weight (encoder + all decoders; cyclegan: both generators), no pickle
        target_<identity>.onnx     # SwapGraph(encoder, decoder[identity]): face -> swapped face + mask

Every variant exports the same contract: the vae's graphs decode the posterior mean, the vae-gan's
discriminators stay in the checkpoint (training only), and the cyclegan's target B is its generator A -> B.

The bundle is assembled in a hidden temp folder next to its final place and renamed into place only when
every graph has been checked (onnx.checker + ONNX Runtime vs torch within 1e-3), so a crash or a failed
check never leaves a half bundle where the server looks.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facetwin.core.bundle import (
    MANIFEST_NAME,
    WEIGHTS_NAME,
    Manifest,
    TensorSpec,
    bundle_in_the_way,
    check_name,
    load_manifest,
    write_manifest,
)
from facetwin.core.files import DIR_MODE, FILE_MODE, replace_folder, sha256_file
from facetwin.core.model import CycleGAN, FaceSwapAutoencoder, SwapGraph
from facetwin.training.checkpoint import (
    check_checkpoint_file,
    load_checkpoint,
    model_from_checkpoint,
)

INPUT_NAME = "face"
OUTPUT_FACE = "swapped"
OUTPUT_MASK = "mask"
MAX_ABS_ERROR = 1e-3  # ONNX Runtime vs torch on the same inputs; float32 graphs land near 1e-6
CHECK_BATCHES = (1, 3)  # batch sizes run through both runtimes (1 and >1 exercise the dynamic axis)


def check_finite(what: str, *arrays: np.ndarray) -> None:
    """Raises ValueError when any output holds a NaN or an infinity: such a graph compares as 'no error' against
    another broken one (every comparison with NaN is false), so its outputs are checked first."""
    if not all(np.isfinite(a).all() for a in arrays):
        raise ValueError(f"{what} gives NaN or infinite outputs: its weights are broken (a diverged run, a damaged "
                         "file); export an earlier checkpoint, or train again with a lower --lr")


class ExportError(ValueError):
    """The export cannot proceed (bad name, bundle exists) or a graph failed its check."""


def target_file(identity: str) -> str:
    return check_name(f"target_{identity}.onnx", "bundle file")


def export_graph(graph: SwapGraph, resolution: int, opset: int) -> bytes:
    """One SwapGraph as ONNX bytes: input "face" (B, 3, R, R), outputs "swapped" and "mask", dynamic batch."""
    sample = torch.rand(1, 3, resolution, resolution)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo one, but it needs no onnxscript and
        # yields a plain, stable graph for this conv/linear/pixel-shuffle model.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(
            graph, (sample,), buffer, dynamo=False, opset_version=opset, do_constant_folding=True,
            input_names=[INPUT_NAME], output_names=[OUTPUT_FACE, OUTPUT_MASK],
            dynamic_axes={INPUT_NAME: {0: "B"}, OUTPUT_FACE: {0: "B"}, OUTPUT_MASK: {0: "B"}},
        )
    return buffer.getvalue()


def check_graph(path: Path, graph: SwapGraph, resolution: int, seed: int = 0) -> float:
    """onnx.checker, then the largest |ONNX Runtime - torch| over both outputs and the check batches."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path), full_check=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # small graphs; keeps the check from fighting training for cores
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch in CHECK_BATCHES:
        face = torch.rand(batch, 3, resolution, resolution, generator=generator)
        with torch.no_grad():
            expected = [t.numpy() for t in graph(face)]
        actual = session.run([OUTPUT_FACE, OUTPUT_MASK], {INPUT_NAME: face.numpy()})
        try:
            check_finite("the model", *expected)
            check_finite("its ONNX graph", *actual)
        except ValueError as exc:
            raise ExportError(f"{path.name}: {exc}") from None
        for want, got in zip(expected, actual):
            if want.shape != got.shape:
                raise ExportError(f"{path.name}: ONNX output shape {got.shape} != torch {want.shape} at batch {batch}")
            worst = max(worst, float(np.abs(want - got).max()))
    return worst


def _tensor_specs(resolution: int) -> tuple[TensorSpec, TensorSpec, TensorSpec]:
    return (
        TensorSpec(INPUT_NAME, ("B", 3, resolution, resolution)),
        TensorSpec(OUTPUT_FACE, ("B", 3, resolution, resolution)),
        TensorSpec(OUTPUT_MASK, ("B", 1, resolution, resolution)),
    )


def _save_weights(model: FaceSwapAutoencoder | CycleGAN, path: Path) -> None:
    from safetensors.torch import save_file

    # safetensors refuses shared or non-contiguous storage. A shared decoder trunk (ModelConfig.shared_upscales)
    # appears under every identity's decoder with the same tensors: each key gets its own copy, so any target's
    # weights load on their own (swap_graph_from_state) and the file stays a plain name -> tensor map.
    seen: set[int] = set()
    state = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().contiguous()
        state[key] = tensor.clone() if tensor.data_ptr() in seen else tensor
        seen.add(tensor.data_ptr())
    from safetensors import SafetensorError

    try:
        save_file(state, str(path), metadata={"format": "pt", "model": f"facetwin.core.model.{type(model).__name__}"})
    except SafetensorError as exc:  # its writer reports the OS's error as text: "... (os error 28)"
        found = re.search(r"\(os error (\d+)\)", str(exc))
        if found is None:
            raise
        raise OSError(int(found[1]), os.strerror(int(found[1])), str(path)) from exc


def _training_config(checkpoint: dict[str, Any]) -> dict[str, Any]:
    config = dict(checkpoint["config"])
    config.pop("model", None)  # the manifest keeps it separately, as model_config
    data = checkpoint.get("data")
    if isinstance(data, dict) and data.get("kind") == "synth":
        config["data"] = {"kind": "synth", "seed": data.get("seed"), "identities": list(data.get("identities", []))}
    config["step"] = int(checkpoint["step"])
    return config


def export_bundle(checkpoint: str | Path, out_dir: str | Path, name: str | None = None, opset: int = 17,
                  check: bool = True, overwrite: bool = False) -> Path:
    """Writes bundle `out_dir/<name>` from a checkpoint (name defaults to the run folder's name); returns its path."""
    checkpoint = Path(checkpoint)
    check_checkpoint_file(checkpoint)  # before the name it would lend: the missing file is what to report
    name = name if name is not None else checkpoint.resolve().parent.name
    try:
        check_name(name, "model name")
    except ValueError as exc:
        raise ExportError(f"{exc} (pass --name)") from exc
    out_dir = Path(out_dir)
    final = out_dir / name
    if reason := bundle_in_the_way(final, overwrite):
        raise ExportError(reason)

    loaded = load_checkpoint(checkpoint)
    model = model_from_checkpoint(loaded)
    config = loaded["train_config"].model
    for identity in config.identities:
        target_file(identity)  # fail before any work if an identity cannot be a file name

    try:
        _write_bundle(final, model, loaded, opset, check, overwrite)
    except OSError as exc:  # named after the bundle: the staging folder's hidden name means nothing to a reader
        kept = "the bundle there from before is left as it was" if final.exists() else "no bundle was written"
        raise type(exc)(exc.errno, f"{exc.strerror} while writing {Path(exc.filename or final).name} ({kept})",
                        str(final)) from None
    return final


def _write_bundle(final: Path, model: FaceSwapAutoencoder | CycleGAN, loaded: dict[str, Any], opset: int,
                  check: bool, overwrite: bool) -> None:
    config = loaded["train_config"].model
    resolution = config.resolution
    # DIR_MODE, not mkdtemp's 0700: the server may run as another user (the container's).
    with replace_folder(final, mode=DIR_MODE) as staging:
        _save_weights(model, staging / WEIGHTS_NAME)
        targets: dict[str, str] = {}
        worst = 0.0
        for identity in config.identities:
            graph = model.swap_graph(identity).eval()
            filename = target_file(identity)
            (staging / filename).write_bytes(export_graph(graph, resolution, opset))
            if check:
                error = check_graph(staging / filename, graph, resolution)
                if error > MAX_ABS_ERROR:
                    raise ExportError(f"{filename}: ONNX Runtime differs from torch by {error:.2e} (> {MAX_ABS_ERROR})")
                worst = max(worst, error)
            targets[identity] = filename
        input_spec, face_spec, mask_spec = _tensor_specs(resolution)
        for path in staging.iterdir():
            path.chmod(FILE_MODE)  # some writers (safetensors) create 0600 files
        files = {path.name: sha256_file(path) for path in sorted(staging.iterdir()) if path.name != MANIFEST_NAME}
        manifest = Manifest(
            variant=config.variant, resolution=resolution, identities=tuple(config.identities),
            input=input_spec, output_face=face_spec, output_mask=mask_spec, targets=targets, files=files,
            model_config=config.to_dict(), training_config=_training_config(loaded),
            export={"opset": opset, "max_abs_error": worst if check else None, "checked": check,
                    "torch_version": torch.__version__},
        )
        write_manifest(staging, manifest)
        load_manifest(staging, verify=True)  # what the server will do: the bundle must pass its own reader
        if reason := bundle_in_the_way(final, overwrite):
            raise ExportError(f"while exporting: {reason}")
