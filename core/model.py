"""The classic deepfake autoencoder (one shared encoder, one decoder per identity) and its three rivals from the
seed report: a variational autoencoder, a VAE-GAN and a CycleGAN.

Training teaches every decoder to rebuild its own identity's faces from the shared latent code, so the
encoder has to describe what all identities have in common (pose, expression, lighting) and each decoder
learns how its identity looks. A swap encodes a face of identity A and decodes it with B's decoder::

    face A (B, 3, R, R) -> Encoder -> (B, C, R/2^(n-1), R/2^(n-1)) -> Decoder[B] -> face in B's likeness + mask

Separate decoders each learn their own reading of the shared code, so A's code for a pose can mean a slightly
different pose to B's decoder. ``ModelConfig.shared_upscales`` ties the decoders' first Upscales into one trunk
that reads the code the same way for every identity, each identity modulating it with its own FiLM gains and biases
(Perez et al. 2018) and keeping its own last Upscales and output heads (``Decoder``). Each target's swap graph is
still one encoder + one decoder; 0 gives the 2017 model's fully separate decoders.

Variants (``ModelConfig.variant``), all exported the same way -- per target identity, face (B, 3, R, R) ->
swapped face (B, 3, R, R) + mask (B, 1, R, R) -- so ONNX-based serving cannot tell them apart
(``swap_graph_from_state`` rebuilds any variant's graph from a bundle's weights for torch-based serving):

* ``ae``: the autoencoder above (deepfakes 2017 / faceswap "Original").
* ``vae``: the encoder predicts the mean and log-variance of a diagonal Gaussian q(z|x); training decodes a sample
  z = mu + sigma * eps (the reparameterisation trick) and adds KL(q(z|x) || N(0, I)) to the loss (Kingma &
  Welling 2014); inference and export decode mu.
* ``vae-gan``: the vae plus one PatchGAN ``Discriminator`` per identity judging that identity's decoder outputs,
  trained with the least-squares GAN loss (Larsen et al. 2016; Isola et al. 2017; Mao et al. 2017), mixup of
  real and fake as in faceswap-GAN. One critic per identity rather than one shared, identity-conditioned critic:
  each decoder faces its own critic as in faceswap-GAN and CycleGAN, no critic capacity is traded between
  identities, and a critic costs little next to a decoder.
* ``cyclegan``: two independent generators G: A -> B and F: B -> A, each an Encoder + Decoder, with one
  discriminator per domain, cycle consistency F(G(a)) ~ a and the identity loss G(b) ~ b (Zhu et al. 2017).
  The identity loss is the autoencoder's reconstruction loss (L1 + DSSIM + mask), so masks are learnt too.
  The generators reuse the autoencoder's blocks so that the comparison measures the objective, not the
  architecture. Exactly two identities; the export's target B is G (A -> B).

The 128 and 256 px family (``ModelConfig.residual``) is the same autoencoder in the style of today's deepfake
models (DeepFaceLab's SAEHD, faceswap's larger models): stride-2 convs down to an 8 px bottleneck whatever the
resolution, so the dense code stays one size, and a ``ResidualBlock`` after each decoder Upscale, which lets the
decoder refine detail at every scale without making the network harder to train (He et al. 2016).

Shapes in comments are for ``ModelConfig.original`` at R = 64 (encoder 128-256-512-1024, latent 1024).
Inputs and outputs are float32 NCHW RGB in [0, 1].
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from facetwin.core.bundle import VARIANTS, check_name

VARIATIONAL = ("vae", "vae-gan")  # the encoder predicts (mu, logvar) instead of a code
ADVERSARIAL = ("vae-gan", "cyclegan")  # trained against one Discriminator per identity
# Slope of the generators' LeakyReLUs, as in the faceswap / DeepFaceLab models.
LEAKY_SLOPE = 0.1
CRITIC_SLOPE = 0.2  # LeakyReLU slope of the discriminators (DCGAN, pix2pix, CycleGAN)
RESIDUAL_SLOPE = 0.2  # LeakyReLU slope inside and after a ResidualBlock (DeepFaceLab's)
RESIDUAL_INIT_SCALE = 0.1  # a fresh ResidualBlock's second conv starts at this fraction of its He init
INITIAL_LOGVAR = -4.0  # starting log sigma^2 of the VAE posterior (see Encoder)
# log sigma^2 is clamped to this range, as VAE code commonly does: one face's log-variance once spiked past 177 in a
# bf16 vae-gan run (step 2,973 of make compare-real), exp(logvar / 2) overflowed and the decoder returned NaN.
LOGVAR_RANGE = (-30.0, 20.0)


class ModelConfigError(ValueError):
    """A ModelConfig is inconsistent (shapes that cannot fit together, bad identity names, ...)."""


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network; saved in checkpoints and bundle manifests."""

    identities: tuple[str, ...]  # one decoder per name; at least two (no default: comes from the data set)
    resolution: int = 64  # side of the square aligned face, pixels (the "64 px" of the original deepfakes model)
    encoder_widths: tuple[int, ...] = (128, 256, 512, 1024)  # channels of each stride-2 conv: 64 -> 4 px
    latent: int = 1024  # size of the dense bottleneck, the code shared by all identities
    encoder_upscale_width: int = 512  # channels after the encoder's closing Upscale (the decoders' input)
    decoder_widths: tuple[int, ...] = (256, 128, 64)  # channels of each decoder Upscale: 8 -> 64 px
    # How many of the decoders' leading Upscales all identities share, each identity scaling and shifting their
    # channels with its own FiLM parameters (see Decoder); 0 keeps fully separate decoders, as the 2017 model.
    shared_upscales: int = 0
    variant: str = "ae"  # "ae", "vae", "vae-gan" or "cyclegan" (see the module docstring)
    # ResidualBlocks after each decoder Upscale (the residual family; 0 keeps the 2017 decoder: Upscales only).
    residual_blocks: int = 0
    # Channels of the PatchGAN discriminators' stride-2 convs (vae-gan, cyclegan only; pix2pix: 64-128-256);
    # () takes the encoder's first three widths, so a critic stays a fraction of a generator at any size.
    discriminator_widths: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # Accept lists (JSON round trips) but store tuples so configs stay hashable and comparable.
        for name in ("identities", "encoder_widths", "decoder_widths", "discriminator_widths"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        if self.variant not in VARIANTS:
            raise ModelConfigError(f"variant {self.variant!r} is not one of {', '.join(VARIANTS)}")
        if len(self.identities) < 2:
            raise ModelConfigError(f"a face-swap model needs at least two identities, got {list(self.identities)}")
        if self.variant == "cyclegan" and len(self.identities) != 2:
            raise ModelConfigError(f"cyclegan translates between exactly two identities (one generator each way), "
                                   f"got {len(self.identities)}: {list(self.identities)}; use ae, vae or vae-gan")
        if len(set(self.identities)) != len(self.identities):
            raise ModelConfigError(f"identity names must be unique, got {list(self.identities)}")
        for identity in self.identities:
            try:
                check_name(identity, "identity")
            except ValueError as exc:
                raise ModelConfigError(str(exc)) from exc
        widths = (*self.encoder_widths, *self.decoder_widths, *self.discriminator_widths, self.latent,
                  self.encoder_upscale_width)
        if not self.encoder_widths or not self.decoder_widths or any(int(w) != w or w < 1 for w in widths):
            raise ModelConfigError("encoder_widths, decoder_widths, latent and encoder_upscale_width must be positive")
        # The encoder halves the side len(encoder_widths) times, its Upscale doubles it once, and every
        # decoder Upscale doubles it again: the decoder must land exactly on the input resolution.
        downs = len(self.encoder_widths)
        if self.resolution % (2**downs) or self.resolution // (2**downs) < 2:
            raise ModelConfigError(
                f"resolution {self.resolution} must be divisible by 2^{downs} (one halving per encoder width) "
                "and leave at least 2 px"
            )
        if len(self.decoder_widths) != downs - 1:
            raise ModelConfigError(
                f"decoder_widths needs {downs - 1} entries (encoder_widths has {downs}; the encoder's own Upscale "
                f"covers one doubling), got {len(self.decoder_widths)}"
            )
        shared = self.shared_upscales
        if not isinstance(shared, int) or isinstance(shared, bool) or not 0 <= shared <= len(self.decoder_widths):
            raise ModelConfigError(f"shared_upscales must be an integer from 0 to {len(self.decoder_widths)} (the "
                                   f"decoders' Upscales), got {shared!r}")
        blocks = self.residual_blocks
        if not isinstance(blocks, int) or isinstance(blocks, bool) or not 0 <= blocks <= 8:
            raise ModelConfigError(f"residual_blocks must be an integer from 0 to 8 (per decoder Upscale), got {blocks!r}")
        if self.variant == "cyclegan" and shared:
            raise ModelConfigError("cyclegan's two generators share nothing (Zhu et al. 2017): shared_upscales must "
                                   f"be 0, got {shared}")
        if self.resolution // (2 ** len(self.critic_widths)) < 2:
            raise ModelConfigError(f"discriminator_widths {list(self.critic_widths)} halve {self.resolution} px "
                                   "below 2 px; use fewer")

    @property
    def variational(self) -> bool:
        return self.variant in VARIATIONAL

    @property
    def adversarial(self) -> bool:
        return self.variant in ADVERSARIAL

    @property
    def critic_widths(self) -> tuple[int, ...]:
        """The discriminators' widths with the () default resolved."""
        return self.discriminator_widths or self.encoder_widths[:3]

    @property
    def bottleneck_side(self) -> int:
        """Side of the smallest feature map, where the encoder flattens into the dense latent."""
        return self.resolution // (2 ** len(self.encoder_widths))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        if not isinstance(data, dict):
            raise ModelConfigError("model config must be a mapping")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelConfigError(f"model config has unknown fields {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ModelConfigError(f"model config is malformed: {exc}") from exc

    @classmethod
    def original(cls, identities: tuple[str, ...] | list[str]) -> "ModelConfig":
        """The 2017 deepfakes / faceswap "Original" model at 64 px: 82 M parameters with two decoders, 76 M per swap
        graph (the dense bottleneck holds 34 M of them); GPU sized."""
        return cls(identities=tuple(identities))

    @classmethod
    def demo(cls, identities: tuple[str, ...] | list[str]) -> "ModelConfig":
        """CPU demo: learns a clean swap of the synthetic faces in a few minutes on two cores."""
        return cls(
            identities=tuple(identities),
            encoder_widths=(32, 64, 128, 256),  # a quarter of the original's widths
            # A narrow code learns faster and leaks less identity: each decoder sees one identity, so skin and
            # hair colour never help it, and with little room the encoder drops them (pose and light stay).
            latent=64,
            encoder_upscale_width=128,
            decoder_widths=(64, 32, 16),  # the decoders dominate the cost: 3 Upscales at 8 -> 64 px
            # 8 -> 32 px shared, FiLM-conditioned; 32 -> 64 px and the heads per identity. Synthetic swap SSIM on the
            # face after the demo's 360 s: 0.647 with separate decoders, 0.687 / 0.715 / 0.687 sharing 1 / 2 / 3.
            shared_upscales=2,
        )

    @classmethod
    def residual(cls, identities: tuple[str, ...] | list[str], resolution: int = 128, encoder_width: int = 128,
                 decoder_width: int = 64, latent: int = 512, residual_blocks: int = 1,
                 shared_upscales: int = 0) -> "ModelConfig":
        """The residual family at `resolution` (a power of two, 32 px or more): the modern deepfake autoencoder.

        The encoder halves the face down to 8 px with widths encoder_width x 1, 2, 4, ... (128 px: 4 convs,
        256 px: 5), so the dense bottleneck (8 x 8 x last width -> latent -> back) has the same size at every
        resolution; its Upscale gives the decoders 16 px at decoder_width x 8 channels (x 4 at 64 px), and each
        decoder Upscale doubles the side and halves the width down to decoder_width at full resolution, each followed by
        `residual_blocks` ResidualBlocks. The defaults are the GPU model at 128 px: 111 M parameters per swap
        graph, like the reference classic autoencoder (convs 128-256-512-1024, dense bottleneck, pixel-shuffle
        decoder) measured on an H200.
        """
        downs = (resolution // 8).bit_length() - 1
        if resolution < 32 or 8 * 2**downs != resolution:
            raise ModelConfigError(f"the residual family needs a power-of-two resolution of 32 px or more, got "
                                   f"{resolution}")
        ups = downs - 1
        return cls(
            identities=tuple(identities),
            resolution=resolution,
            encoder_widths=tuple(encoder_width * 2**i for i in range(downs)),  # 128 px: 128 -> 8 px
            latent=latent,
            encoder_upscale_width=decoder_width * 2**min(ups, 3),  # 16 px
            decoder_widths=tuple(decoder_width * 2**min(ups - 1 - i, 3) for i in range(ups)),  # 16 px -> resolution
            residual_blocks=residual_blocks,
            shared_upscales=shared_upscales,
        )

    @classmethod
    def tiny(cls, identities: tuple[str, ...] | list[str]) -> "ModelConfig":
        """For tests and dry runs: hundreds of steps in seconds, any quality."""
        return cls(
            identities=tuple(identities),
            resolution=32,
            encoder_widths=(8, 16, 32),
            latent=32,
            encoder_upscale_width=16,
            decoder_widths=(16, 8),
        )


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """5x5 stride-2 conv + LeakyReLU: halves the side, as in the original encoder."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=5, stride=2, padding=2)
    _he_init(conv)
    return nn.Sequential(conv, nn.LeakyReLU(LEAKY_SLOPE))


def _he_init(layer: nn.Conv2d | nn.Linear, nonlinearity: str = "leaky_relu") -> None:
    """He initialisation (as faceswap's he_uniform): keeps activations at unit scale through the deep stack.

    torch's default init shrinks the signal layer by layer; through ~10 layers and a dense bottleneck the
    first outputs are a constant grey and training idles on a plateau for hundreds of steps.
    """
    nn.init.kaiming_uniform_(layer.weight, a=LEAKY_SLOPE, nonlinearity=nonlinearity)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def _icnr_init(conv: nn.Conv2d, scale: int = 2) -> None:
    """ICNR (Aitken et al. 2017), as in faceswap: every sub-pixel of a PixelShuffle group starts with the same
    kernel, so the fresh Upscale is a nearest-neighbour upsample -- no checkerboard artifacts to unlearn."""
    out_channels, in_channels, kh, kw = conv.weight.shape
    sub = torch.empty(out_channels // scale**2, in_channels, kh, kw)
    nn.init.kaiming_uniform_(sub, a=LEAKY_SLOPE, nonlinearity="leaky_relu")
    with torch.no_grad():
        conv.weight.copy_(sub.repeat_interleave(scale**2, dim=0))
        if conv.bias is not None:
            conv.bias.zero_()


class ResidualBlock(nn.Module):
    """Two 3x3 convs whose output is added to the input, as in DeepFaceLab's decoders: x + conv(lrelu(conv(x))).

    The block starts as (nearly) the identity -- its second conv's weights start small -- so stacking blocks into
    a fresh decoder does not change what it first draws, and each block learns a correction at its scale.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.act = nn.LeakyReLU(RESIDUAL_SLOPE)
        _he_init(self.conv1)
        _he_init(self.conv2)
        with torch.no_grad():
            self.conv2.weight.mul_(RESIDUAL_INIT_SCALE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.conv2(self.act(self.conv1(x))))  # (B, C, H, W)


class Upscale(nn.Module):
    """Sub-pixel upscaling (Shi et al. 2016): a conv makes 4x the channels, PixelShuffle folds them into 2x the side;
    then `residual_blocks` ResidualBlocks at the new side (none in the 2017 model)."""

    def __init__(self, in_channels: int, out_channels: int, residual_blocks: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels * 4, kernel_size=3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.act = nn.LeakyReLU(LEAKY_SLOPE)
        # No parameters when empty: bundles of models without blocks keep their state-dict keys.
        self.residual = nn.Sequential(*(ResidualBlock(out_channels) for _ in range(residual_blocks)))
        _icnr_init(self.conv)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None,
                shift: torch.Tensor | None = None) -> torch.Tensor:
        x = self.conv(x)  # (B, 4*C_out, H, W)
        x = self.shuffle(x)  # (B, C_out, 2H, 2W)
        if scale is not None and shift is not None:  # FiLM: one identity's gain and bias per channel
            x = x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        return self.residual(self.act(x))


class Encoder(nn.Module):
    """Shared by every identity: face -> dense latent code -> small feature map the decoders start from.

    For the variational variants ``to_latent`` is the posterior mean mu(x) and ``to_logvar`` adds log sigma^2(x);
    ``forward`` (inference, export) always decodes the mean, so every variant exports the same graph.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        widths = (3, *config.encoder_widths)
        self.convs = nn.Sequential(*(_conv_block(cin, cout) for cin, cout in zip(widths, widths[1:])))
        side = config.bottleneck_side
        self._side = side
        self._channels = config.encoder_widths[-1]
        self.flatten = nn.Flatten()
        # The dense bottleneck is what forces identity-independent features: every decoder reads the same code.
        self.to_latent = nn.Linear(self._channels * side * side, config.latent)
        self.to_logvar: nn.Linear | None = None
        if config.variational:
            self.to_logvar = nn.Linear(self._channels * side * side, config.latent)
            # Zero weights, bias -4: q(z|x) starts nearly deterministic (sigma ~0.14 against a unit-scale mu),
            # so the decoders first learn faces as in the ae and the KL term then widens the posterior.
            nn.init.zeros_(self.to_logvar.weight)
            nn.init.constant_(self.to_logvar.bias, INITIAL_LOGVAR)
        self.from_latent = nn.Linear(config.latent, self._channels * side * side)
        self.upscale = Upscale(self._channels, config.encoder_upscale_width)
        _he_init(self.to_latent, "linear")  # no activation between the two dense layers
        _he_init(self.from_latent, "linear")

    def encode(self, face: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """face -> (code or posterior mean mu, log-variance or None): both (B, latent)."""
        # Centre the [0, 1] input on zero: the first conv then starts unbiased and learns faster.
        x = self.flatten(self.convs(face * 2.0 - 1.0))  # (B, 3, 64, 64) -> (B, 1024, 4, 4) -> (B, 1024*4*4)
        mu = self.to_latent(x)  # (B, 1024): the latent code
        return mu, (self.to_logvar(x).clamp(*LOGVAR_RANGE) if self.to_logvar is not None else None)

    def expand(self, z: torch.Tensor) -> torch.Tensor:
        """Latent code (B, latent) -> the decoders' input feature map."""
        x = self.from_latent(z)  # (B, 1024*4*4)
        x = x.view(-1, self._channels, self._side, self._side)  # (B, 1024, 4, 4)
        return self.upscale(x)  # (B, 512, 8, 8)

    def forward(self, face: torch.Tensor) -> torch.Tensor:
        return self.expand(self.encode(face)[0])  # the mean code: deterministic at inference


class Decoder(nn.Module):
    """One per identity: feature map -> that identity's face (RGB) and a face mask, both in [0, 1].

    With ``config.shared_upscales`` = k > 0 the first k Upscales are one ``trunk`` that every identity's decoder
    holds (the same modules, so the same weights), and each identity keeps its own FiLM parameters (Perez et al.
    2018): a gain and a bias per channel after each trunk Upscale, then its own remaining Upscales and heads.
    Separate decoders each learn their own reading of the code, so A's code for a pose can mean a slightly
    different pose to B's decoder; a shared trunk reads the code one way for everyone (DeepFaceLab's LIAE shares
    its decoder for the same reason), and the trunk learns from every identity's faces. A decoder built
    without a trunk (one target's swap graph) makes its own, so state-dict keys are the same either way.
    """

    def __init__(self, config: ModelConfig, trunk: nn.ModuleList | None = None) -> None:
        super().__init__()
        layers, shared = _decoder_layers(config), config.shared_upscales
        self.trunk = trunk if trunk is not None else make_trunk(config)  # None when nothing is shared
        self.film_scale = nn.ParameterList([nn.Parameter(torch.ones(cout)) for _, cout in layers[:shared]])
        self.film_shift = nn.ParameterList([nn.Parameter(torch.zeros(cout)) for _, cout in layers[:shared]])
        self.upscales = nn.Sequential(*(Upscale(cin, cout, config.residual_blocks) for cin, cout in layers[shared:]))
        self.face_head = nn.Conv2d(config.decoder_widths[-1], 3, kernel_size=5, padding=2)
        self.mask_head = nn.Conv2d(config.decoder_widths[-1], 1, kernel_size=5, padding=2)
        for head in (self.face_head, self.mask_head):  # Glorot before a sigmoid: starts near 0.5, not saturated
            nn.init.xavier_uniform_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = features
        for upscale, scale, shift in zip(self.trunk or (), self.film_scale, self.film_shift):
            x = upscale(x, scale, shift)  # shared weights, this identity's FiLM
        x = self.upscales(x)  # (B, 512, 8, 8) -> (B, 64, 64, 64)
        face = torch.sigmoid(self.face_head(x))  # (B, 3, 64, 64) RGB in [0, 1]
        mask = torch.sigmoid(self.mask_head(x))  # (B, 1, 64, 64), 1 = face
        return face, mask


def _decoder_layers(config: ModelConfig) -> list[tuple[int, int]]:
    """(in, out) channels of each decoder Upscale: from the encoder's closing Upscale through decoder_widths."""
    widths = (config.encoder_upscale_width, *config.decoder_widths)
    return list(zip(widths, widths[1:]))


def make_trunk(config: ModelConfig) -> nn.ModuleList | None:
    """The decoders' shared leading Upscales (config.shared_upscales of them; Decoder); None when none are shared."""
    layers = _decoder_layers(config)[:config.shared_upscales]
    return nn.ModuleList([Upscale(cin, cout, config.residual_blocks) for cin, cout in layers]) if layers else None


class FaceSwapAutoencoder(nn.Module):
    """The ae / vae / vae-gan generator: a shared Encoder and one Decoder per identity (ModuleDict by name)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.variant == "cyclegan":
            raise ModelConfigError("a cyclegan config builds a CycleGAN, not a FaceSwapAutoencoder (use build_model)")
        self.config = config
        self.encoder = Encoder(config)
        trunk = make_trunk(config)  # one set of weights in every decoder (None: separate decoders)
        self.decoders = nn.ModuleDict({name: Decoder(config, trunk) for name in config.identities})

    def training_forward(self, inputs: torch.Tensor, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One training pass over every identity's batch at once; identity i owns rows [i*B, (i+1)*B).

        inputs (I*B, 3, R, R): the warped faces. noise (I*B, latent): eps ~ N(0, I) for the reparameterisation
        z = mu + exp(logvar / 2) * eps (variational variants; None decodes mu). Returns "face" and "mask" (each
        identity's decoder on its own rows), "mu" and, for the variational variants, "logvar".
        """
        mu, logvar = self.encoder.encode(inputs)  # (I*B, latent) each
        z = mu if logvar is None or noise is None else reparameterize(mu, logvar, noise)
        features = self.encoder.expand(z).chunk(len(self.decoders))  # I x (B, 512, 8, 8)
        outputs = [decoder(part) for decoder, part in zip(self.decoders.values(), features)]
        result = {"face": torch.cat([face for face, _ in outputs]), "mask": torch.cat([mask for _, mask in outputs]),
                  "mu": mu}
        if logvar is not None:
            result["logvar"] = logvar
        return result

    def forward(self, face: torch.Tensor, identity: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Encodes `face` (any identity) and renders it as `identity`: reconstruction or swap."""
        if identity not in self.decoders:
            raise KeyError(f"unknown identity {identity!r}; the model has {list(self.decoders)}")
        return self.decoders[identity](self.encoder(face))

    def swap_graph(self, identity: str) -> "SwapGraph":
        if identity not in self.decoders:
            raise KeyError(f"unknown identity {identity!r}; the model has {list(self.decoders)}")
        return SwapGraph(self.encoder, self.decoders[identity])


class SwapGraph(nn.Module):
    """Encoder + one decoder: the per-target graph that export traces to ONNX (face -> swapped face, mask)."""

    def __init__(self, encoder: Encoder, decoder: Decoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, face: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decoder(self.encoder(face))  # (B, 3, R, R), (B, 1, R, R)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * eps with sigma = exp(logvar / 2) (Kingma & Welling 2014): a sample of q(z|x) that
    gradients flow through. The caller draws eps ~ N(0, I), so runs stay reproducible."""
    return mu + torch.exp(0.5 * logvar) * noise


class CycleGAN(nn.Module):
    """Zhu et al. 2017 for two identities A, B: generators G: A -> B and F: B -> A, nothing shared.

    ``generators[name]`` renders any face as `name` (generators[B] is G, generators[A] is F); each is an Encoder +
    Decoder pair (a SwapGraph), so the generators have the autoencoder's capacity and export as its swap graph.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.variant != "cyclegan":
            raise ModelConfigError(f"CycleGAN needs variant 'cyclegan', got {config.variant!r}")
        self.config = config
        self.generators = nn.ModuleDict({name: SwapGraph(Encoder(config), Decoder(config))
                                         for name in config.identities})

    def forward(self, face: torch.Tensor, identity: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Renders `face` (either identity) as `identity`: a translation, or the identity mapping."""
        return self.swap_graph(identity)(face)

    def swap_graph(self, identity: str) -> "SwapGraph":
        if identity not in self.generators:
            raise KeyError(f"unknown identity {identity!r}; the model has {list(self.generators)}")
        return self.generators[identity]  # type: ignore[return-value]

    def training_forward(self, inputs: torch.Tensor, reals: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every generator pass of one CycleGAN step; rows [0, B) are identity A, [B, 2B) identity B.

        inputs: the warped faces (2B, 3, R, R); reals: the un-warped faces. Returns, each (2B, C, R, R) in the
        same row order (rows of identity X hold what generators[X] produced or what ends in X):
          "same", "same_mask": generators[X](warped x) -- the identity mapping, trained like the autoencoder;
          "fake", "fake_mask": generators[X](y) for the other identity's y -- the translation (the swap);
          "cycled": generators[X](generators[Y](x)) -- x through the other domain and back (cycle consistency).
        """
        warped_a, warped_b = inputs.chunk(2)  # (B, 3, R, R) each
        real_a, real_b = reals.chunk(2)
        to_a, to_b = self.generators.values()  # F: B -> A and G: A -> B
        same_a_and_fake_a, masks_a = to_a(torch.cat([warped_a, real_b]))  # F(a~), F(b): (2B, 3, R, R)
        same_b_and_fake_b, masks_b = to_b(torch.cat([warped_b, real_a]))  # G(b~), G(a)
        same_a, fake_a = same_a_and_fake_a.chunk(2)
        same_b, fake_b = same_b_and_fake_b.chunk(2)
        same_mask_a, fake_mask_a = masks_a.chunk(2)
        same_mask_b, fake_mask_b = masks_b.chunk(2)
        cycled_a, _ = to_a(fake_b)  # F(G(a)) ~ a
        cycled_b, _ = to_b(fake_a)  # G(F(b)) ~ b
        return {"same": torch.cat([same_a, same_b]), "same_mask": torch.cat([same_mask_a, same_mask_b]),
                "fake": torch.cat([fake_a, fake_b]), "fake_mask": torch.cat([fake_mask_a, fake_mask_b]),
                "cycled": torch.cat([cycled_a, cycled_b])}


class Discriminator(nn.Module):
    """PatchGAN critic (Isola et al. 2017): a stack of 4x4 stride-2 convs whose output is one real/fake score
    per overlapping patch, not per image, so it judges texture and local detail -- what L1 blurs away.

    No sigmoid: the least-squares GAN loss (Mao et al. 2017) regresses the raw scores to 1 (real) / 0 (fake).
    Instance norm after every conv but the first, as in CycleGAN's discriminator (batch norm would need
    synchronising across DistributedDataParallel ranks).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        widths = (3, *config.critic_widths)
        for index, (cin, cout) in enumerate(zip(widths, widths[1:])):
            layers.append(nn.Conv2d(cin, cout, kernel_size=4, stride=2, padding=1))
            if index > 0:
                layers.append(nn.InstanceNorm2d(cout, affine=True))
            layers.append(nn.LeakyReLU(CRITIC_SLOPE))
        self.features = nn.Sequential(*layers)
        self.score = nn.Conv2d(widths[-1], 1, kernel_size=3, padding=1)  # one score per patch

    def forward(self, face: torch.Tensor) -> torch.Tensor:
        x = self.features(face * 2.0 - 1.0)  # (B, 3, 64, 64) -> (B, 512, 8, 8) for widths 128-256-512
        return self.score(x)  # (B, 1, 8, 8): one score per receptive-field patch


class Discriminators(nn.Module):
    """One Discriminator per identity; one forward call scores a batch for every identity (what DDP needs)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.critics = nn.ModuleDict({name: Discriminator(config) for name in config.identities})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (I*N, 3, R, R), identity i's rows [i*N, (i+1)*N) -> scores (I*N, 1, P, P), each by its critic."""
        parts = images.chunk(len(self.critics))
        return torch.cat([critic(part) for critic, part in zip(self.critics.values(), parts)])


def build_model(config: ModelConfig) -> "FaceSwapAutoencoder | CycleGAN":
    """The generator(s) of a config's variant; both classes offer forward(face, identity) and swap_graph."""
    return CycleGAN(config) if config.variant == "cyclegan" else FaceSwapAutoencoder(config)


def build_discriminators(config: ModelConfig) -> Discriminators | None:
    """The per-identity critics of the adversarial variants; None for ae and vae."""
    return Discriminators(config) if config.adversarial else None


def swap_graph_from_state(config: ModelConfig, state: dict[str, torch.Tensor], target: str) -> SwapGraph:
    """The target's SwapGraph from a full model state dict (a bundle's weights), for any variant; strict.

    Raises KeyError for an unknown target and RuntimeError when the weights do not fit the config.
    """
    if target not in config.identities:
        raise KeyError(f"unknown identity {target!r}; the model has {list(config.identities)}")
    if config.variant == "cyclegan":
        graph_state = {key[len(f"generators.{target}."):]: value for key, value in state.items()
                       if key.startswith(f"generators.{target}.")}
    else:
        decoder_prefix = f"decoders.{target}."
        graph_state = {key: value for key, value in state.items() if key.startswith("encoder.")}
        graph_state.update({"decoder." + key[len(decoder_prefix):]: value
                            for key, value in state.items() if key.startswith(decoder_prefix)})
    graph = SwapGraph(Encoder(config), Decoder(config))
    graph.load_state_dict(graph_state, strict=True)
    return graph.eval()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
