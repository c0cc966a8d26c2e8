"""core/model.py: the shapes documented in its comments, one decoder per identity, output ranges, configs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from facetwin.core.model import (
    INITIAL_LOGVAR,
    LOGVAR_RANGE,
    CycleGAN,
    Decoder,
    Discriminators,
    Encoder,
    FaceSwapAutoencoder,
    ModelConfig,
    ModelConfigError,
    ResidualBlock,
    SwapGraph,
    build_discriminators,
    build_model,
    count_parameters,
    swap_graph_from_state,
)

NAMES = ("ada", "ben", "cleo")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny tensors run fastest on one thread; two spin-waiting OpenMP threads crawl on a busy 2-core host."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny() -> FaceSwapAutoencoder:
    torch.manual_seed(0)
    return FaceSwapAutoencoder(ModelConfig.tiny(NAMES)).eval()


def faces(batch: int, resolution: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset, resolution, bottleneck, features", [
    # tiny: 32 px, encoder (8, 16, 32): 32 -> 4 px, Upscale to 8 px with 16 channels; decoder (16, 8): 8 -> 32 px
    ("tiny", 32, (32, 4, 4), (16, 8, 8)),
    # demo: 64 px, encoder (32, 64, 128, 256): 64 -> 4 px, Upscale to 8 px with 128 channels; decoder 8 -> 64 px
    ("demo", 64, (256, 4, 4), (128, 8, 8)),
])
def test_encoder_and_decoder_shapes_follow_the_module_comments(preset, resolution, bottleneck, features):
    torch.manual_seed(0)
    config = getattr(ModelConfig, preset)(NAMES[:2])
    assert config.resolution == resolution and config.bottleneck_side == bottleneck[1]
    encoder, decoder = Encoder(config), Decoder(config)
    x = faces(2, resolution)
    with torch.no_grad():
        convs = encoder.convs(x * 2 - 1)
        latent = encoder.to_latent(encoder.flatten(convs))
        out = encoder(x)
        face, mask = decoder(out)
    assert tuple(convs.shape) == (2, *bottleneck)
    assert tuple(latent.shape) == (2, config.latent)
    assert tuple(out.shape) == (2, *features)
    assert tuple(face.shape) == (2, 3, resolution, resolution)
    assert tuple(mask.shape) == (2, 1, resolution, resolution)


def test_original_config_is_the_64px_deepfakes_model():
    config = ModelConfig.original(["ada", "ben"])
    assert (config.resolution, config.encoder_widths, config.latent) == (64, (128, 256, 512, 1024), 1024)
    assert config.bottleneck_side == 4 and config.decoder_widths == (256, 128, 64)


def test_one_decoder_per_identity_and_one_shared_encoder(tiny):
    assert list(tiny.decoders) == list(NAMES)
    decoder_params = [{id(p) for p in tiny.decoders[name].parameters()} for name in NAMES]
    assert all(a.isdisjoint(b) for i, a in enumerate(decoder_params) for b in decoder_params[i + 1:])
    encoder_params = {id(p) for p in tiny.encoder.parameters()}
    assert count_parameters(tiny) == count_parameters(tiny.encoder) + sum(
        count_parameters(tiny.decoders[name]) for name in NAMES)
    for name in NAMES:
        graph = tiny.swap_graph(name)
        assert graph.encoder is tiny.encoder and graph.decoder is tiny.decoders[name]
        assert encoder_params <= {id(p) for p in graph.parameters()}


@pytest.mark.parametrize("shared", [1, 2])
def test_a_shared_trunk_is_one_set_of_weights_and_each_identity_keeps_its_film_and_heads(shared):
    torch.manual_seed(0)
    model = FaceSwapAutoencoder(dataclasses.replace(ModelConfig.tiny(NAMES), shared_upscales=shared))
    separate = FaceSwapAutoencoder(ModelConfig.tiny(NAMES))
    trunk = model.decoders["ada"].trunk
    assert trunk is not None and len(trunk) == shared
    assert all(model.decoders[name].trunk is trunk for name in NAMES)
    assert len(model.decoders["ada"].upscales) == 2 - shared
    trunk_ids = {id(p) for p in trunk.parameters()}
    own = [{id(p) for p in model.decoders[name].parameters()} - trunk_ids for name in NAMES]
    assert all(a.isdisjoint(b) for i, a in enumerate(own) for b in own[i + 1:])  # FiLM, own Upscales, heads
    # The trunk counts once: three decoders cost two trunks less than separate ones, plus each identity's FiLM (a
    # gain and a bias per trunk output channel).
    film = sum(2 * up.conv.out_channels // 4 for up in trunk)
    assert count_parameters(model) == (count_parameters(separate) - (len(NAMES) - 1) * count_parameters(trunk)
                                       + len(NAMES) * film)
    # Every identity's faces train the trunk: ada's loss alone moves the weights ben's decoder reads.
    face, _ = model(faces(2, 32), "ada")
    face.mean().backward()
    assert model.decoders["ben"].trunk[0].conv.weight.grad.abs().sum() > 0
    assert model.decoders["ben"].face_head.weight.grad is None
    # FiLM starts as the identity map (gain 1, bias 0): each identity learns how it differs from the shared trunk.
    assert all(torch.equal(p, torch.ones_like(p)) for p in model.decoders["cleo"].film_scale)
    assert all(torch.equal(p, torch.zeros_like(p)) for p in model.decoders["cleo"].film_shift)


def test_forward_renders_as_the_named_identity(tiny):
    x = faces(2, 32)
    with torch.no_grad():
        features = tiny.encoder(x)
        outputs = {name: tiny(x, name) for name in NAMES}
        for name in NAMES:
            expected_face, expected_mask = tiny.decoders[name](features)
            torch.testing.assert_close(outputs[name][0], expected_face)
            torch.testing.assert_close(outputs[name][1], expected_mask)
    # Separately initialised decoders render the same code differently: the identity really picks the decoder.
    assert (outputs["ada"][0] - outputs["ben"][0]).abs().max() > 1e-3
    with pytest.raises(KeyError, match="unknown identity 'zoe'"):
        tiny(x, "zoe")
    with pytest.raises(KeyError, match="unknown identity"):
        tiny.swap_graph("zoe")


@pytest.mark.parametrize("batch", [1, 3])
def test_swap_graph_outputs_lie_in_unit_range(tiny, batch):
    graph = tiny.swap_graph("ben")
    assert isinstance(graph, SwapGraph)
    inputs = torch.cat([faces(batch, 32, seed=1), torch.zeros(1, 3, 32, 32), torch.ones(1, 3, 32, 32)])
    with torch.no_grad():
        face, mask = graph(inputs)
    assert face.shape == (batch + 2, 3, 32, 32) and mask.shape == (batch + 2, 1, 32, 32)
    for tensor in (face, mask):
        assert tensor.dtype == torch.float32 and torch.isfinite(tensor).all()
        assert tensor.min() >= 0.0 and tensor.max() <= 1.0
    # A fresh model starts near 0.5 (Glorot heads before a sigmoid), not saturated at 0 or 1.
    assert 0.05 < float(face.mean()) < 0.95 and 0.05 < float(mask.mean()) < 0.95


def test_fresh_model_is_not_a_constant_grey(tiny):
    """He/ICNR init keep the signal alive through the bottleneck: different faces give different outputs."""
    with torch.no_grad():
        face, _ = tiny(faces(4, 32, seed=2), "ada")
    assert float(face.std(dim=0).mean()) > 1e-3


@pytest.mark.parametrize("changes, message", [
    ({"identities": ("ada",)}, "at least two identities"),
    ({"identities": ("ada", "ada")}, "unique"),
    ({"identities": ("ada", "../etc")}, "not valid"),
    ({"identities": ("ada", "two words")}, "not valid"),
    ({"variant": "gan"}, "not one of"),
    ({"variant": "cyclegan", "identities": ("ada", "ben", "cleo")}, "exactly two identities"),
    ({"discriminator_widths": (8, 16, 32, 64, 64)}, "below 2 px"),
    ({"encoder_widths": ()}, "positive"),
    ({"encoder_widths": (8, 0, 32)}, "positive"),
    ({"latent": -1}, "positive"),
    ({"decoder_widths": (16, 8.5)}, "positive"),
    ({"resolution": 36}, r"resolution 36 must be divisible by 2\^3"),
    ({"resolution": 8}, "resolution 8 .* leave at least 2 px"),
    ({"decoder_widths": (16, 8, 4)}, "needs 2 entries"),
    ({"shared_upscales": 3}, "shared_upscales must be an integer from 0 to 2"),
    ({"shared_upscales": -1}, "shared_upscales must be an integer from 0 to 2"),
    ({"shared_upscales": 1.5}, "shared_upscales must be an integer"),
    ({"variant": "cyclegan", "shared_upscales": 1}, "share nothing"),
    ({"residual_blocks": -1}, "residual_blocks must be an integer from 0 to 8"),
    ({"residual_blocks": 1.0}, "residual_blocks must be an integer"),
])
def test_inconsistent_configs_are_refused_with_a_reason(changes, message):
    values = {**ModelConfig.tiny(["ada", "ben"]).to_dict(), **changes}
    with pytest.raises(ModelConfigError, match=message):
        ModelConfig(**values)
    assert issubclass(ModelConfigError, ValueError)  # callers (the CLI) treat it as a user error


def small_residual(resolution: int, **changes) -> ModelConfig:
    """The residual family at a real resolution with tiny widths: shapes and cost of the real thing, test speed."""
    return ModelConfig.residual(NAMES[:2], resolution, **{"encoder_width": 4, "decoder_width": 4, "latent": 16,
                                                          **changes})


@pytest.mark.parametrize("resolution, encoder, decoder", [
    # 128 px: four stride-2 convs down to 8 px; the encoder's Upscale gives 16 px; three decoder Upscales to 128.
    (128, (4, 8, 16, 32), (16, 8, 4)),
    # 256 px: one more halving and one more Upscale; the widths stop doubling at 8x (the 16 px input stays 32 wide).
    (256, (4, 8, 16, 32, 64), (32, 16, 8, 4)),
])
def test_the_residual_family_bottlenecks_at_8_px_and_upscales_with_residual_blocks(resolution, encoder, decoder):
    torch.manual_seed(0)
    config = small_residual(resolution, residual_blocks=2)
    assert (config.encoder_widths, config.encoder_upscale_width, config.decoder_widths) == (encoder, 32, decoder)
    assert config.bottleneck_side == 8
    model = FaceSwapAutoencoder(config).eval()
    decoder_model = model.decoders["ben"]
    assert [len(up.residual) for up in decoder_model.upscales] == [2] * len(decoder)
    assert all(isinstance(block, ResidualBlock) for up in decoder_model.upscales for block in up.residual)
    assert len(model.encoder.upscale.residual) == 0  # the blocks refine the decoders' drawing, not the code
    with torch.no_grad():
        features = model.encoder(faces(2, resolution))
        face, mask = model(faces(2, resolution), "ben")
    assert tuple(features.shape) == (2, 32, 16, 16)
    assert face.shape == (2, 3, resolution, resolution) and mask.shape == (2, 1, resolution, resolution)
    assert 0.0 <= float(face.min()) and float(face.max()) <= 1.0 and float(face.std(dim=0).mean()) > 1e-3
    # The blocks share the decoders' trunk like the Upscales they follow.
    shared = FaceSwapAutoencoder(small_residual(resolution, shared_upscales=2))
    assert shared.decoders["ada"].trunk[1].residual[0] is shared.decoders["ben"].trunk[1].residual[0]


def test_the_residual_family_presets_are_the_reference_sizes():
    """gpu-128 is sized like the reference classic autoencoder measured on an H200 (119 M parameters at 128 px),
    gpu-256 like its 256 px row (145 M); counted from the shapes, without building 500 MB of weights."""
    from facetwin.training.config import PRESET_MODELS

    def parameters(config: ModelConfig) -> int:
        with torch.device("meta"):  # shapes only
            return count_parameters(FaceSwapAutoencoder(config))

    assert round(parameters(PRESET_MODELS["gpu-128"](NAMES[:2])) / 1e6) == 119
    assert round(parameters(PRESET_MODELS["gpu-256"](NAMES[:2])) / 1e6) == 147
    cpu = PRESET_MODELS["cpu-128"](NAMES[:2])
    assert (cpu.resolution, cpu.residual_blocks, cpu.shared_upscales) == (128, 1, 2)
    assert round(parameters(cpu) / 1e5) == 49
    with pytest.raises(ModelConfigError, match="power-of-two resolution of 32 px or more"):
        ModelConfig.residual(NAMES[:2], 96)
    with pytest.raises(ModelConfigError, match="power-of-two"):
        ModelConfig.residual(NAMES[:2], 16)


def test_a_fresh_residual_block_is_nearly_the_identity_on_positive_inputs():
    torch.manual_seed(0)
    block = ResidualBlock(8)
    x = torch.rand(2, 8, 16, 16) + 0.5
    with torch.no_grad():
        y = block(x)
    assert y.shape == x.shape
    assert float((y - x).abs().mean()) < 0.2 * float(x.abs().mean())


@pytest.mark.parametrize("preset", ["tiny", "demo", "original"])
def test_config_round_trips_through_dict_and_json(preset):
    config = getattr(ModelConfig, preset)(NAMES)
    assert ModelConfig.from_dict(config.to_dict()) == config
    # JSON turns tuples into lists; the config comes back equal, hashable, with tuples again.
    restored = ModelConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config and hash(restored) == hash(config)
    assert isinstance(restored.identities, tuple) and isinstance(restored.encoder_widths, tuple)


def test_from_dict_rejects_malformed_mappings():
    good = ModelConfig.tiny(["ada", "ben"]).to_dict()
    with pytest.raises(ModelConfigError, match="unknown fields colour"):
        ModelConfig.from_dict({**good, "colour": "red"})
    with pytest.raises(ModelConfigError, match="malformed"):
        ModelConfig.from_dict({k: v for k, v in good.items() if k != "identities"})
    with pytest.raises(ModelConfigError, match="mapping"):
        ModelConfig.from_dict(["ada", "ben"])  # type: ignore[arg-type]
    with pytest.raises(ModelConfigError, match="at least two"):
        ModelConfig.from_dict({**good, "identities": ["ada"]})


def test_ae_weights_keep_their_names_and_old_configs_still_load():
    """Checkpoints and bundles of the ae predate the variants: same state-dict keys, configs without new fields."""
    model = FaceSwapAutoencoder(ModelConfig.tiny(["ada", "ben"]))
    keys = set(model.state_dict())
    assert not any("logvar" in key or "critic" in key for key in keys)
    assert {"encoder.to_latent.weight", "encoder.from_latent.weight", "decoders.ben.face_head.weight"} <= keys
    old = {k: v for k, v in ModelConfig.tiny(["ada", "ben"]).to_dict().items()
           if k not in ("discriminator_widths", "residual_blocks")}
    assert ModelConfig.from_dict(old) == ModelConfig.tiny(["ada", "ben"])
    assert not any("residual" in key for key in keys)  # no blocks: the 2017 decoder's keys exactly


@pytest.mark.parametrize("variant, shared", [("ae", 0), ("vae", 0), ("vae-gan", 0), ("cyclegan", 0), ("ae", 1),
                                             ("ae", 2), ("vae", 2)])
def test_every_variant_rebuilds_its_swap_graph_from_a_state_dict(variant, shared):
    config = dataclasses.replace(ModelConfig.tiny(["ada", "ben"]), variant=variant, shared_upscales=shared)
    torch.manual_seed(0)
    model = build_model(config).eval()
    assert isinstance(model, CycleGAN if variant == "cyclegan" else FaceSwapAutoencoder)
    assert (build_discriminators(config) is not None) == config.adversarial
    x = faces(2, 32, seed=4)
    for target in ("ada", "ben"):
        graph = swap_graph_from_state(config, model.state_dict(), target)
        with torch.no_grad():
            assert all(torch.equal(a, b) for a, b in zip(graph(x), model(x, target)))
    with pytest.raises(KeyError, match="cleo"):
        swap_graph_from_state(config, model.state_dict(), "cleo")


def test_the_vae_encoder_adds_a_log_variance_head_and_starts_nearly_deterministic():
    config = dataclasses.replace(ModelConfig.tiny(["ada", "ben"]), variant="vae")
    encoder = Encoder(config)
    mu, logvar = encoder.encode(faces(3, 32))
    assert mu.shape == logvar.shape == (3, config.latent)
    assert torch.allclose(logvar, torch.full_like(logvar, INITIAL_LOGVAR))
    assert Encoder(ModelConfig.tiny(["ada", "ben"])).encode(faces(3, 32))[1] is None


def test_the_vae_log_variance_is_clamped_so_a_spike_cannot_turn_the_decoder_to_nan():
    config = dataclasses.replace(ModelConfig.tiny(["ada", "ben"]), variant="vae")
    model = FaceSwapAutoencoder(config)
    with torch.no_grad():
        model.encoder.to_logvar.bias.fill_(400.0)  # exp(400 / 2) overflows float32 and bfloat16 alike
    inputs = faces(4, 32)
    out = model.training_forward(inputs, torch.randn(4, config.latent))
    assert out["logvar"].max() == LOGVAR_RANGE[1]
    assert torch.isfinite(out["face"]).all() and torch.isfinite(out["mask"]).all()


def test_patch_discriminators_score_each_identity_separately():
    config = dataclasses.replace(ModelConfig.tiny(["ada", "ben"]), variant="vae-gan")
    assert config.critic_widths == config.encoder_widths[:3]  # the () default
    critics = Discriminators(config)
    scores = critics(faces(4, 32))  # rows 0-1 for ada's critic, 2-3 for ben's
    assert scores.shape == (4, 1, 4, 4)  # 32 px halved three times: a 4 x 4 grid of patch scores
    with torch.no_grad():
        assert torch.equal(scores[2:], critics.critics["ben"](faces(4, 32)[2:]))
    wide = dataclasses.replace(config, discriminator_widths=(4, 8))
    assert Discriminators(wide)(faces(2, 32)).shape == (2, 1, 8, 8)
