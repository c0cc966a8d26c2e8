"""Every backend gives onnxruntime's answers; batch bucketing; `--backend auto` selection.

The conformance test is parametrised over the whole registry: on this CPU host onnxruntime and torch-cpu run,
on a GPU host torch-cuda (and tensorrt where installed) run too; the rest skip with their reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import threading

import numpy as np
import pytest

from facetwin.core.bundle import BundleError, load_manifest
from facetwin.server.backends import AUTO_ORDER, BACKENDS, get_backend, select_backend
from facetwin.server.backends.torch_backend import batch_buckets, load_swap_graph, plan_chunks

REFERENCE = "onnxruntime"
# Largest |backend - onnxruntime| over both outputs, per backend: fp32 backends must agree to float rounding,
# fp16 ones to half precision on sigmoid outputs in [0, 1] (measured on the tiny bundle: ~1e-3).
TOLERANCE = {"onnxruntime": 1e-4, "torch-cpu": 1e-4, "torch-cuda": 2e-2, "tensorrt": 2e-2}
GPU_BACKENDS = {"torch-cuda", "tensorrt"}
SMALL_MAX_BATCH = 4  # so batch 5 exercises both padding (1 -> bucket 1) and chunking (5 = 4 + 1)


def _params():
    for name in BACKENDS:
        marks = [pytest.mark.gpu] if name in GPU_BACKENDS else []
        if name == "tensorrt":
            marks.append(pytest.mark.tensorrt)
        yield pytest.param(name, marks=marks, id=name)


def make_backend(name, bundle, manifest, target, tmp_path=None, **options):
    """Constructs a registered backend, passing max_batch / engine_cache_dir only to backends that take them."""
    cls = BACKENDS[name]
    ok, why = cls.available()
    if not ok:
        pytest.skip(f"{name} is not available here: {why}")
    accepted = inspect.signature(cls.__init__).parameters
    if tmp_path is not None:
        options["engine_cache_dir"] = tmp_path / "engines"
    return cls(bundle, manifest, target, **{k: v for k, v in options.items() if k in accepted})


@pytest.fixture(scope="module")
def bundle(tiny_model_dir):
    path = tiny_model_dir / "tiny"
    return path, load_manifest(path)


@pytest.fixture(scope="module")
def faces(bundle):
    _, manifest = bundle
    size = manifest.resolution
    return np.random.default_rng(7).random((5, 3, size, size), dtype=np.float32)


def test_every_backend_has_a_tolerance():
    assert set(BACKENDS) <= set(TOLERANCE), "a new backend needs a stated conformance tolerance"


@pytest.fixture(scope="module", params=[128, 256], ids=["128px", "256px"])
def residual_bundle(request, tmp_path_factory):
    """The residual family (residual blocks, a shared trunk) at a real resolution with tiny widths, trained two steps
    on synthetic faces of that size and exported: the sizes users judge a swap at, in test time."""
    pytest.importorskip("torch")
    from facetwin.core.model import ModelConfig
    from facetwin.training import synth
    from facetwin.training.config import TrainConfig
    from facetwin.training.export import export_bundle
    from facetwin.training.train import train

    size, root = request.param, tmp_path_factory.mktemp(f"residual{request.param}")
    data = synth.write_dataset(root / "data", identities=2, images=2, size=size, seed=0, progress=False)
    model = ModelConfig.residual(["ada", "ben"], size, encoder_width=4, decoder_width=4, latent=16, shared_upscales=1)
    cfg = TrainConfig.from_preset("tiny", data, root / "run", steps=2, batch_size=2, model=model, tensorboard=False)
    path = export_bundle(train(cfg, progress=False), root / "models", name=f"residual{size}")
    manifest = load_manifest(path, verify=True)
    assert manifest.resolution == size and manifest.model_config["residual_blocks"] == 1
    return path, manifest


def assert_matches_onnxruntime(name, path, manifest, faces, tmp_path, batches=(1, 5)):
    """Every target of the bundle through backend `name` and through onnxruntime: the same faces and masks."""
    for target in manifest.targets:
        reference = make_backend(REFERENCE, path, manifest, target)
        backend = make_backend(name, path, manifest, target, tmp_path, max_batch=SMALL_MAX_BATCH)
        try:
            for batch in batches:
                want = reference.infer(faces[:batch])
                got = backend.infer(faces[:batch])
                for expected, actual, channels in zip(want, got, (3, 1)):
                    assert actual.shape == (batch, channels, manifest.resolution, manifest.resolution)
                    assert actual.dtype == np.float32
                    assert 0.0 <= actual.min() and actual.max() <= 1.0
                    error = float(np.abs(actual - expected).max())
                    assert error <= TOLERANCE[name], f"{name}/{target} batch {batch}: max |diff| {error:.2e}"
        finally:
            backend.close()
            reference.close()


@pytest.mark.parametrize("name", list(_params()))
def test_backend_matches_onnxruntime(name, bundle, faces, tmp_path):
    path, manifest = bundle
    assert_matches_onnxruntime(name, path, manifest, faces, tmp_path)


@pytest.mark.parametrize("name", list(_params()))
def test_backend_matches_onnxruntime_at_128_and_256_px(name, residual_bundle, tmp_path):
    path, manifest = residual_bundle
    size = manifest.resolution
    faces = np.random.default_rng(8).random((5, 3, size, size), dtype=np.float32)
    assert_matches_onnxruntime(name, path, manifest, faces, tmp_path, batches=(5,))  # padded and chunked: 4 + 1


def test_batch_buckets_are_powers_of_two_ending_at_max_batch():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(16) == (1, 2, 4, 8, 16)
    assert batch_buckets(20) == (1, 2, 4, 8, 16, 20)  # a full batch is never padded
    with pytest.raises(ValueError, match="max_batch"):
        batch_buckets(0)


def test_plan_chunks_pads_to_the_smallest_bucket_and_splits_oversized_batches():
    buckets = batch_buckets(16)
    assert plan_chunks(1, buckets) == [(0, 1, 1)]
    assert plan_chunks(5, buckets) == [(0, 5, 8)]
    assert plan_chunks(16, buckets) == [(0, 16, 16)]
    assert plan_chunks(37, buckets) == [(0, 16, 16), (16, 32, 16), (32, 37, 8)]
    for batch in range(1, 70):
        chunks = plan_chunks(batch, buckets)
        assert chunks[0][0] == 0 and chunks[-1][1] == batch
        for (start, stop, bucket), following in zip(chunks, chunks[1:] + [(batch, None, None)]):
            assert stop == following[0]  # contiguous, no gaps or overlaps
            assert bucket in buckets and stop - start <= bucket
            assert bucket == min(b for b in buckets if b >= stop - start)  # the tightest bucket
    for bad_batch, bad_buckets in ((0, buckets), (3, ()), (3, (4, 2))):
        with pytest.raises(ValueError):
            plan_chunks(bad_batch, bad_buckets)


def test_auto_picks_the_first_available_backend_and_says_why_others_were_skipped():
    cls, reason = select_backend("auto")
    available = [name for name in AUTO_ORDER if BACKENDS[name].available()[0]]
    assert cls is BACKENDS[available[0]]
    for name in AUTO_ORDER[:AUTO_ORDER.index(available[0])]:
        assert f"{name}: {BACKENDS[name].available()[1]}" in reason
    assert get_backend("auto") is cls


def test_auto_on_a_host_without_cuda_picks_onnxruntime():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA; auto picks a GPU backend here")
    cls, reason = select_backend("auto")
    assert cls.name == "onnxruntime"
    assert "skipped tensorrt:" in reason and "torch-cuda:" in reason


def test_unknown_backend_name_errors_with_the_choices():
    with pytest.raises(ValueError, match=r"unknown backend 'tensorflow'.*'auto'.*'onnxruntime'.*'torch-cpu'"):
        select_backend("tensorflow")


def test_unavailable_backend_errors_with_its_reason():
    missing = [name for name, cls in BACKENDS.items() if not cls.available()[0]]
    if not missing:
        pytest.skip("every backend is available on this host")
    with pytest.raises(ValueError, match=f"backend '{missing[0]}' is not available here: .+"):
        get_backend(missing[0])


def test_torch_rebuild_rejects_weights_that_do_not_fit_the_manifest(bundle):
    path, manifest = bundle
    wrong = dataclasses.replace(manifest, model_config={**manifest.model_config, "latent": 7})
    with pytest.raises(BundleError, match="does not fit the manifest's model_config"):
        load_swap_graph(path, wrong, manifest.identities[0])
    with pytest.raises(BundleError, match="target 'nobody' is not in the bundle"):
        load_swap_graph(path, manifest, "nobody")


def test_torch_cpu_rejects_a_wrong_input_shape(bundle):
    path, manifest = bundle
    backend = make_backend("torch-cpu", path, manifest, manifest.identities[0])
    with pytest.raises(ValueError, match=r"faces must be \(B, 3, 32, 32\)"):
        backend.infer(np.zeros((2, 3, 16, 16), np.float32))


@pytest.mark.parametrize("backend", ["torch-cpu", "auto"])
def test_registry_serves_concurrent_requests_through_the_batcher(backend, bundle):
    """The server path: registry load + warm-up (one worker thread), then batched calls (the batcher's thread).

    With "auto" this runs onnxruntime on a CPU host and torch-cuda (CUDA graphs) on a GPU host.
    """
    from facetwin.server.config import ServerConfig
    from facetwin.server.registry import READY, ModelRegistry, worker_plan

    path, manifest = bundle
    expected_name = select_backend(backend)[0].name
    registry = ModelRegistry(ServerConfig(model_dir=str(path.parent), backend=backend))
    size, target_name = manifest.resolution, manifest.identities[1]
    faces = list(np.random.default_rng(5).integers(0, 256, (6, size, size, 3), dtype=np.uint8))

    async def load_and_swap():
        registry.discover()
        await registry.load_all()
        try:
            model, target = await registry.get("tiny", target_name)
            batched = await asyncio.gather(*(target.batcher.submit(face, caller=i) for i, face in enumerate(faces)))
            alone = [await asyncio.to_thread(target.run_batch, [face]) for face in faces]
            return model, target, batched, alone
        finally:
            await registry.close()

    model, target, batched, alone = asyncio.run(load_and_swap())
    assert model.status == READY, model.error
    workers, _ = worker_plan(registry.config, select_backend(backend)[0])
    assert len(target.backends) == workers  # onnxruntime and torch-cuda: two side by side; torch-cpu: one
    assert {type(b).name for b in target.backends} == {expected_name}
    assert max(info.size for _, info in batched) > 1  # requests really were batched together
    for ((swapped, mask), _), [(swapped_alone, mask_alone)] in zip(batched, alone):
        assert swapped.shape == (size, size, 3) and mask.shape == (size, size)
        # uint8 levels: a face must not depend on which batch (and padding bucket) it rode in
        assert np.abs(swapped.astype(int) - swapped_alone).max() <= 3
        assert np.abs(mask.astype(int) - mask_alone).max() <= 3


@pytest.mark.gpu
def test_torch_cuda_captures_one_graph_per_bucket_and_padding_does_not_leak(bundle, faces):
    path, manifest = bundle
    backend = make_backend("torch-cuda", path, manifest, manifest.identities[0], max_batch=SMALL_MAX_BATCH)
    try:
        assert sorted(backend._graphs) == list(batch_buckets(SMALL_MAX_BATCH))
        alone = [backend.infer(faces[i:i + 1]) for i in range(3)]
        together = backend.infer(faces[:3])  # padded 3 -> 4: the padding row must not change real rows
        for i, (face, mask) in enumerate(alone):
            np.testing.assert_allclose(together[0][i:i + 1], face, atol=1e-2)
            np.testing.assert_allclose(together[1][i:i + 1], mask, atol=1e-2)
        big = np.concatenate([faces, faces])  # 10 faces with max batch 4: chunks 4 + 4 + 2
        face, mask = backend.infer(big)
        np.testing.assert_allclose(face[:5], face[5:], atol=1e-2)
    finally:
        backend.close()


@pytest.mark.gpu
def test_torch_cuda_captures_graphs_while_another_instance_serves(bundle, faces):
    """A server loads a model while others already serve: capturing one instance's CUDA graphs must not fail the
    CUDA calls another thread makes meanwhile (the capture's error mode is thread-local, not global)."""
    path, manifest = bundle
    serving = make_backend("torch-cuda", path, manifest, manifest.identities[0], max_batch=SMALL_MAX_BATCH)
    expected = serving.infer(faces[:3])
    stop, errors, calls = threading.Event(), [], []

    def serve() -> None:
        while not stop.is_set():
            try:
                face, _ = serving.infer(faces[:3])
                calls.append(float(np.abs(face - expected[0]).max()))
            except Exception as exc:  # reported below: the assertion names it
                errors.append(exc)
                return

    worker = threading.Thread(target=serve)
    worker.start()
    try:
        for _ in range(3):  # each captures one graph per bucket (1, 2, 4, ..., 64) while `serve` runs
            make_backend("torch-cuda", path, manifest, manifest.identities[1], max_batch=64).close()
    finally:
        stop.set()
        worker.join()
        serving.close()
    assert not errors, errors[0]
    assert calls and max(calls) <= 1e-2


@pytest.fixture(scope="module")
def cyclegan_bundle(tmp_path_factory):
    """A tiny cyclegan trained a few steps and exported: its weights hold two generators, no shared encoder."""
    pytest.importorskip("torch")
    from tests.conftest import train_and_export

    path = train_and_export(tmp_path_factory.mktemp("cyclegan"), name="cyclegan", variant="cyclegan")
    return path, load_manifest(path)


def test_torch_cpu_serves_a_cyclegan_bundle_like_onnxruntime(cyclegan_bundle):
    path, manifest = cyclegan_bundle
    assert manifest.variant == "cyclegan"
    size = manifest.resolution
    faces = np.random.default_rng(11).random((3, 3, size, size), dtype=np.float32)
    for target in manifest.targets:
        reference = make_backend(REFERENCE, path, manifest, target)
        backend = make_backend("torch-cpu", path, manifest, target, max_batch=SMALL_MAX_BATCH)
        try:
            for expected, actual in zip(reference.infer(faces), backend.infer(faces)):
                error = float(np.abs(actual - expected).max())
                assert error <= TOLERANCE["torch-cpu"], f"cyclegan/{target}: max |diff| {error:.2e}"
        finally:
            backend.close()
            reference.close()


def test_torch_rebuild_of_a_cyclegan_bundle_reports_bad_weights_as_a_bundle_error(cyclegan_bundle):
    path, manifest = cyclegan_bundle
    wrong = dataclasses.replace(manifest, model_config={**manifest.model_config, "latent": 7})
    with pytest.raises(BundleError, match="does not fit the manifest's model_config"):
        load_swap_graph(path, wrong, manifest.identities[0])
    # a manifest whose targets name someone the model_config does not know: KeyError -> BundleError
    stranger = dataclasses.replace(manifest, targets={**manifest.targets, "nobody": "target_nobody.onnx"})
    with pytest.raises(BundleError, match="'nobody' is not an identity"):
        load_swap_graph(path, stranger, "nobody")
