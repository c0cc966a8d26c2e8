"""TensorRT engine cache (keys, lookup, atomic writes), fp16 ONNX conversion, and `build-engines`.

Everything but the real build runs without TensorRT; the build test carries @pytest.mark.tensorrt.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from facetwin.core.bundle import BundleError, load_manifest, manifest_sha256
from facetwin.server.backends.tensorrt_engines import (
    CACHE_ENV,
    BatchProfile,
    EngineCache,
    EngineKey,
    GpuInfo,
    build_all,
    convert_to_fp16,
    default_cache_dir,
    detect_gpu,
    ensure_engine,
    tensorrt_version,
)

ONNX_FLOAT, ONNX_FLOAT16 = 1, 10  # onnx.TensorProto.FLOAT / FLOAT16
FP16_TOLERANCE = 2e-2  # same bound as the fp16 backends' conformance test


def a_key(**changes) -> EngineKey:
    key = EngineKey(manifest_sha256="ab" * 32, target="ada", gpu_name="NVIDIA H100 80GB HBM3",
                    compute_capability="9.0", tensorrt_version="10.13.0", min_batch=1, opt_batch=16, max_batch=16)
    return dataclasses.replace(key, **changes)


@pytest.fixture(scope="module")
def bundle(tiny_model_dir):
    path = tiny_model_dir / "tiny"
    return path, load_manifest(path)


def test_digest_is_stable_and_hex():
    assert a_key().digest() == a_key().digest()
    assert len(a_key().digest()) == 16 and int(a_key().digest(), 16) >= 0
    # Pinned: changing how keys hash silently invalidates every deployed engine cache; do it on purpose only.
    assert a_key().digest() == "bdc7afee56f001bb"


@pytest.mark.parametrize("field,value", [
    ("manifest_sha256", "cd" * 32), ("target", "ben"), ("gpu_name", "NVIDIA H200"), ("compute_capability", "8.9"),
    ("tensorrt_version", "11.0.0"), ("min_batch", 2), ("opt_batch", 8), ("max_batch", 32), ("precision", "fp32"),
])
def test_digest_changes_when_any_field_changes(field, value):
    assert {f.name for f in dataclasses.fields(EngineKey)} >= {field}
    assert a_key(**{field: value}).digest() != a_key().digest()


def test_every_key_field_is_covered_by_the_test_above():
    covered = {"manifest_sha256", "target", "gpu_name", "compute_capability", "tensorrt_version", "min_batch",
               "opt_batch", "max_batch", "precision"}
    assert {f.name for f in dataclasses.fields(EngineKey)} == covered


def test_key_from_host_facts_marks_missing_gpu_and_tensorrt():
    profile = BatchProfile.for_max_batch(8)
    key = EngineKey.create("ff" * 32, "ada", None, None, profile)
    assert (key.gpu_name, key.compute_capability, key.tensorrt_version) == ("none", "none", "none")
    assert (key.min_batch, key.opt_batch, key.max_batch, key.precision) == (1, 8, 8, "fp16")
    key = EngineKey.create("ff" * 32, "ada", GpuInfo("NVIDIA L4", "8.9"), "10.9.0", BatchProfile(1, 4, 8))
    assert (key.gpu_name, key.compute_capability, key.tensorrt_version) == ("NVIDIA L4", "8.9", "10.9.0")
    assert key.opt_batch == 4


def test_batch_profile_must_be_ordered():
    with pytest.raises(ValueError, match="min <= opt <= max"):
        BatchProfile(1, 32, 16)
    with pytest.raises(ValueError):
        BatchProfile(0, 1, 1)


def test_cache_layout(tmp_path):
    cache, key = EngineCache(tmp_path), a_key()
    assert cache.engine_path("demo", key) == tmp_path / "demo" / f"ada.{key.digest()}.engine"
    assert cache.sidecar_path("demo", key) == tmp_path / "demo" / f"ada.{key.digest()}.json"
    assert cache.timing_cache_path == tmp_path / "timing.cache"
    with pytest.raises(BundleError):
        cache.engine_path("../escape", key)
    with pytest.raises(BundleError):
        cache.engine_path("demo", a_key(target="a/b"))


def test_lookup_hits_only_when_every_field_and_the_bytes_match(tmp_path):
    cache, key = EngineCache(tmp_path), a_key()
    assert cache.lookup("demo", key) is None  # empty cache
    path = cache.store("demo", key, b"engine-bytes")
    assert cache.lookup("demo", key) == path and path.read_bytes() == b"engine-bytes"
    sidecar = json.loads(cache.sidecar_path("demo", key).read_text())
    assert sidecar["key"] == key.to_dict() and sidecar["digest"] == key.digest()
    for field, value in (("tensorrt_version", "10.14.0"), ("max_batch", 64), ("gpu_name", "NVIDIA A100")):
        assert cache.lookup("demo", a_key(**{field: value})) is None  # another key: a different file, absent
    assert cache.lookup("other-model", key) is None


def test_lookup_misses_on_a_tampered_sidecar_truncated_engine_or_missing_sidecar(tmp_path):
    cache, key = EngineCache(tmp_path), a_key()
    engine = cache.store("demo", key, b"engine-bytes")
    sidecar = cache.sidecar_path("demo", key)
    recorded = json.loads(sidecar.read_text())
    # Same file name, but the sidecar records another TensorRT version (e.g. a hand-copied cache).
    sidecar.write_text(json.dumps({**recorded, "key": {**recorded["key"], "tensorrt_version": "9.0"}}))
    assert cache.lookup("demo", key) is None
    sidecar.write_text("{not json")
    assert cache.lookup("demo", key) is None
    sidecar.write_text(json.dumps(recorded))
    assert cache.lookup("demo", key) == engine
    engine.write_bytes(b"engine-by")  # truncated
    assert cache.lookup("demo", key) is None
    cache.store("demo", key, b"engine-bytes")
    sidecar.unlink()
    assert cache.lookup("demo", key) is None


def test_store_is_atomic_and_a_failed_write_leaves_no_half_files(tmp_path, monkeypatch):
    cache, key = EngineCache(tmp_path), a_key()
    cache.store("demo", key, b"old")
    real_replace = os.replace

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        cache.store("demo", key, b"new")
    monkeypatch.setattr(os, "replace", real_replace)
    assert cache.lookup("demo", key).read_bytes() == b"old"  # the old engine is intact and still valid
    leftovers = [p.name for p in (tmp_path / "demo").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
    cache.store("demo", key, b"new")
    assert cache.lookup("demo", key).read_bytes() == b"new"


def test_timing_cache_round_trip(tmp_path):
    cache = EngineCache(tmp_path / "cache")
    assert cache.load_timing_cache() == b""
    cache.save_timing_cache(b"\x00timing")
    assert cache.load_timing_cache() == b"\x00timing"


def test_default_cache_dir_honours_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert default_cache_dir(tmp_path / "models") == tmp_path / "models" / ".engines"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "elsewhere"))
    assert default_cache_dir(tmp_path / "models") == tmp_path / "elsewhere"


def test_fp16_conversion_keeps_fp32_io_and_runs_on_onnxruntime(bundle, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    path, manifest = bundle
    source = path / manifest.targets[manifest.identities[0]]
    converted = convert_to_fp16(source, tmp_path / "fp16.onnx")
    model = onnx.load(str(converted))
    onnx.checker.check_model(model, full_check=True)
    assert {init.data_type for init in model.graph.initializer if init.dims} == {ONNX_FLOAT16}  # weights fp16
    assert [t.type.tensor_type.elem_type for t in (*model.graph.input, *model.graph.output)] == [ONNX_FLOAT] * 3
    assert converted.stat().st_size < 0.6 * source.stat().st_size  # half the bytes per weight
    faces = np.random.default_rng(3).random((5, 3, manifest.resolution, manifest.resolution), dtype=np.float32)
    names = [manifest.output_face.name, manifest.output_mask.name]
    fp32 = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    fp16 = ort.InferenceSession(str(converted), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        want = fp32.run(names, {manifest.input.name: faces[:batch]})
        got = fp16.run(names, {manifest.input.name: faces[:batch]})
        for expected, actual in zip(want, got):
            assert actual.dtype == np.float32 and actual.shape == expected.shape
            assert float(np.abs(actual - expected).max()) <= FP16_TOLERANCE


def test_ensure_engine_dry_run_reports_miss_then_hit(bundle, tmp_path):
    path, manifest = bundle
    cache, profile, target = EngineCache(tmp_path), BatchProfile.for_max_batch(4), manifest.identities[0]
    report, engine = ensure_engine(cache, path, manifest, target, gpu=None, trt_version=None, profile=profile,
                                   dry_run=True)
    assert (report.status, engine) == ("miss", None)
    assert report.fp16_onnx_bytes > 0 and not report.path.exists()
    assert report.key.manifest_sha256 == manifest_sha256(path)
    cache.store(path.name, report.key, b"prebuilt")
    report, engine = ensure_engine(cache, path, manifest, target, gpu=None, trt_version=None, profile=profile,
                                   dry_run=True)
    assert (report.status, engine) == ("hit", b"prebuilt")


def _console_script(name: str) -> str:
    beside_python = Path(sys.executable).parent / name
    found = str(beside_python) if beside_python.exists() else shutil.which(name)
    if not found:
        pytest.skip(f"console script {name} is not installed (pip install -e '.[server]')")
    return found


def test_build_engines_dry_run_via_the_console_script(bundle, tmp_path):
    path, manifest = bundle
    cache_dir = tmp_path / "engine-cache"
    # Pre-seed one target under the key this host would compute: the dry run must report it as cached.
    seeded = manifest.identities[0]
    profile = BatchProfile.for_max_batch(8)
    key = EngineKey.create(manifest_sha256(path), seeded, detect_gpu(), tensorrt_version(), profile)
    EngineCache(cache_dir).store(path.name, key, b"prebuilt")
    result = subprocess.run(
        [_console_script("facetwin-server"), "build-engines", "--model-dir", str(path.parent),
         "--cache-dir", str(cache_dir), "--max-batch", "8", "--dry-run"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for target in manifest.targets:
        status = "hit" if target == seeded else "miss"
        assert f"tiny/{target}: {status}" in result.stdout
    assert "fp16 ONNX ok" in result.stdout
    others = len(manifest.targets) - 1
    assert f"{len(manifest.targets)} engine(s): 1 cached, 0 built, {others} to build" in result.stdout
    assert sorted(p.name for p in (cache_dir / "tiny").iterdir()) == sorted([key.target + f".{key.digest()}.engine",
                                                                             key.target + f".{key.digest()}.json"])


def test_build_engines_without_tensorrt_exits_2_with_a_clear_message(bundle, tmp_path):
    from facetwin.server.backends.tensorrt import TensorRTBackend

    if TensorRTBackend.available()[0]:
        pytest.skip("TensorRT is available here")
    path, _ = bundle
    result = subprocess.run(
        [_console_script("facetwin-server"), "build-engines", "--model-dir", str(path.parent),
         "--cache-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "cannot build TensorRT engines here" in result.stderr and "--dry-run" in result.stderr


def test_build_engines_dry_run_errors_on_a_missing_model_dir(tmp_path):
    result = subprocess.run(
        [_console_script("facetwin-server"), "build-engines", "--model-dir", str(tmp_path / "nope"), "--dry-run"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "does not exist" in result.stderr


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_build_all_builds_then_hits_the_cache(bundle, tmp_path):
    from facetwin.server.backends.tensorrt import TensorRTBackend

    ok, why = TensorRTBackend.available()
    if not ok:
        pytest.skip(why)
    path, manifest = bundle
    first = build_all(path.parent, tmp_path, max_batch=4)
    assert [r.status for r in first] == ["built"] * len(manifest.targets)
    assert all(r.path.is_file() for r in first) and (tmp_path / "timing.cache").is_file()
    second = build_all(path.parent, tmp_path, max_batch=4)
    assert [r.status for r in second] == ["hit"] * len(manifest.targets)
