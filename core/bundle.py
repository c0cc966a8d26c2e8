"""The model bundle contract shared by training (writes it) and the server (reads it).

A bundle is a folder in the model directory; its name is the model name callers use::

    models/demo/
        manifest.json          # this module's Manifest, as JSON
        weights.safetensors    # encoder + every decoder (torch backends rebuild the model from it)
        target_<identity>.onnx # one graph per target identity: aligned face -> swapped face + mask

Every graph takes ``input.name`` float32 NCHW RGB in [0, 1] with a dynamic batch axis and returns
``outputs.face`` (B, 3, R, R) RGB in [0, 1] and ``outputs.mask`` (B, 1, R, R) in [0, 1].

Pure standard library: the server and training both import it without torch or onnxruntime.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

from .files import atomic_write_bytes, sha256_file

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "weights.safetensors"
# Model and identity names: safe as folder/file names on every OS, never a path.
MAX_MANIFEST_BYTES = 1 << 20  # read whole before it is parsed; an exported one is a few KB
# The JSON type of each manifest field that is not a plain value.
_FIELD_KINDS = {"input": dict, "output_face": dict, "output_mask": dict, "targets": dict, "files": dict,
                "model_config": dict, "training_config": dict, "export": dict, "identities": list}
_JSON_NAMES = {dict: "object", list: "array"}
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# The training variants a manifest's `variant` names; core/model.py builds each. Here, not in model.py, so code that
# only names a variant (a CLI's choices, the examples) needs no torch.
VARIANTS = ("ae", "vae", "vae-gan", "cyclegan")


class BundleError(ValueError):
    """A bundle is missing, malformed, or does not match its manifest."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One graph input or output."""

    name: str  # tensor name inside every ONNX graph of the bundle
    shape: tuple[str | int, ...]  # "B" marks the dynamic batch axis
    dtype: str = "float32"  # element type
    layout: str = "NCHW"  # axis order
    color_order: str = "RGB"  # for 3-channel tensors
    value_range: tuple[float, float] = (0.0, 1.0)  # pixel values map linearly to this range


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What a bundle holds; written by training/export.py, read by server/registry.py."""

    variant: str  # training variant, one of VARIANTS
    resolution: int  # side of the square aligned face, pixels
    identities: tuple[str, ...]  # every identity the model can render
    input: TensorSpec  # the aligned face fed to every graph
    output_face: TensorSpec  # the swapped face
    output_mask: TensorSpec  # the face mask
    targets: dict[str, str]  # identity -> ONNX file name (relative to the bundle)
    files: dict[str, str]  # file name -> sha256 of every file in the bundle but the manifest
    model_config: dict[str, Any]  # the model's config dataclass, as a dict (rebuilds the torch model)
    training_config: dict[str, Any]  # the effective training config
    export: dict[str, Any] = dataclasses.field(default_factory=dict)  # opset, max ONNX-vs-torch error, ...
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        if not isinstance(data, dict):
            raise BundleError("manifest.json must hold a JSON object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(f"manifest schema_version {version!r} is not supported (this server reads {SCHEMA_VERSION})")
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(f for f in fields if f not in data and f not in ("export", "schema_version"))
        if missing:
            raise BundleError(f"manifest.json lacks {', '.join(missing)}")
        unknown = sorted(set(data) - fields)
        if unknown:
            raise BundleError(f"manifest.json has unknown fields {', '.join(unknown)}")
        for key, kind in _FIELD_KINDS.items():
            if key in data and not isinstance(data[key], kind):
                raise BundleError(f"manifest.json's {key} must be a JSON {_JSON_NAMES[kind]}, not "
                                  f"{type(data[key]).__name__}")
        for key in ("targets", "files"):
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in data[key].items()):
                raise BundleError(f"manifest.json's {key} must map names to strings")
        try:
            kwargs = dict(data)
            for key in ("input", "output_face", "output_mask"):
                spec = dict(kwargs[key])
                spec["shape"] = tuple(spec["shape"])
                spec["value_range"] = tuple(spec.get("value_range", (0.0, 1.0)))
                kwargs[key] = TensorSpec(**spec)
            kwargs["identities"] = tuple(kwargs["identities"])
            manifest = cls(**kwargs)
        except (TypeError, KeyError, ValueError) as exc:
            raise BundleError(f"manifest.json is malformed: {exc}") from exc
        manifest.validate()
        return manifest

    def validate(self) -> None:
        """Checks internal consistency (not the files; see verify_files)."""
        if not isinstance(self.resolution, int) or not 16 <= self.resolution <= 1024:
            raise BundleError(f"resolution {self.resolution!r} must be an integer in 16..1024")
        if len(self.identities) < 2:
            raise BundleError("a bundle needs at least two identities")
        if len(set(self.identities)) != len(self.identities):
            raise BundleError("identities must be unique")
        for ident in self.identities:
            check_name(ident, "identity")
        if not self.targets:
            raise BundleError("a bundle needs at least one target graph")
        for ident, filename in self.targets.items():
            if ident not in self.identities:
                raise BundleError(f"target {ident!r} is not one of the identities {list(self.identities)}")
            if filename not in self.files:
                raise BundleError(f"target file {filename!r} has no sha256 in files")
        for filename in self.files:
            check_name(filename, "bundle file")
        for spec in (self.input, self.output_face, self.output_mask):
            if len(spec.value_range) != 2 or not all(isinstance(v, (int, float)) for v in spec.value_range):
                raise BundleError(f"tensor {spec.name!r}: value_range {spec.value_range!r} must be two numbers")
            if spec.dtype not in ("float32", "float16"):
                raise BundleError(f"tensor {spec.name!r}: dtype {spec.dtype!r} must be float32 or float16")
            if spec.layout != "NCHW" or len(spec.shape) != 4 or spec.shape[0] != "B":
                raise BundleError(f"tensor {spec.name!r}: must be NCHW with a dynamic batch axis 'B'")
            if tuple(spec.shape[2:]) != (self.resolution, self.resolution):
                raise BundleError(f"tensor {spec.name!r}: spatial shape {spec.shape[2:]} != resolution {self.resolution}")


def check_name(name: str, what: str = "name", dots: bool = True) -> str:
    """Returns name if it is a safe single path component (without '.' unless `dots`), else raises BundleError
    saying which characters a name may hold."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or name in (".", "..") or (not dots and "." in name):
        shown = repr(name) if len(repr(name)) <= 72 else f"{repr(name)[:64]}... ({len(name)} characters)"
        allowed = "'_', '-' or '.'" if dots else "'_' or '-'"
        raise BundleError(f"{what} {shown} is not valid: use 1-64 letters, digits, {allowed}, starting with a letter "
                          "or digit")
    return name


def load_manifest(bundle_dir: str | os.PathLike, verify: bool = True) -> Manifest:
    """Reads and validates a bundle's manifest; with verify, also checks every file's sha256."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{bundle_dir} is not a model bundle: {MANIFEST_NAME} is missing")
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{path} is {path.stat().st_size} bytes: a manifest is a few KB (at most "
                              f"{MAX_MANIFEST_BYTES} bytes)")
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise BundleError(f"{path} is not valid JSON: {reason}") from None
    manifest = Manifest.from_dict(data)
    if verify:
        verify_files(bundle_dir, manifest)
    return manifest


def verify_files(bundle_dir: str | os.PathLike, manifest: Manifest) -> None:
    for filename, expected in manifest.files.items():
        file_path = Path(bundle_dir) / filename
        if not file_path.is_file():
            raise BundleError(f"bundle file {filename} is missing from {bundle_dir}")
        actual = sha256_file(file_path)
        if actual != expected:
            raise BundleError(f"bundle file {filename} is corrupt: sha256 {actual[:12]}… != manifest {expected[:12]}…")


def bundle_in_the_way(final: Path, overwrite: bool) -> str | None:
    """Why a new bundle cannot be written to `final` (None: it can). Only a bundle is ever replaced, and only with
    overwrite: a folder or file of anything else at that path is the user's, whatever the flag says."""
    if not final.exists() and not final.is_symlink():
        return None
    if final.is_symlink() or not final.is_dir() or not (final / MANIFEST_NAME).is_file():
        return (f"{final} exists and is not a model bundle; choose another --name or --out (only a bundle is ever "
                "replaced)")
    if not overwrite:
        return f"bundle {final} already exists; --overwrite replaces it"
    return None


def write_manifest(bundle_dir: str | os.PathLike, manifest: Manifest) -> Path:
    """Validates and writes manifest.json atomically (temp file + os.replace)."""
    manifest.validate()
    return atomic_write_bytes(Path(bundle_dir) / MANIFEST_NAME, manifest.to_json().encode())


def manifest_sha256(bundle_dir: str | os.PathLike) -> str:
    return sha256_file(Path(bundle_dir) / MANIFEST_NAME)


def pick_bundle(model_dir: str | os.PathLike, name: str | None = None) -> Path:
    """Bundle `name` of model_dir, or its first bundle (by name) when name is None; BundleError when there is none."""
    model_dir = Path(model_dir)
    if name:
        check_name(name, "model name")
        return model_dir / name
    bundles = sorted(p.parent for p in model_dir.glob(f"*/{MANIFEST_NAME}"))
    if not bundles:
        raise BundleError(f"no model bundle in {model_dir}: train and export one first (make demo), or name another "
                          "model directory")
    return bundles[0]
