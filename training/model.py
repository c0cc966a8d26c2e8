"""The classic deepfake autoencoder: one shared encoder, one decoder per identity.

Training teaches every decoder to rebuild its own identity's faces from the shared latent code, so the
encoder has to describe what all identities have in common (pose, expression, lighting) and each decoder
learns how its identity looks. A swap encodes a face of identity A and decodes it with B's decoder::

    face A (B, 3, R, R) -> Encoder -> (B, C, R/2^(n-1), R/2^(n-1)) -> Decoder[B] -> face in B's likeness + mask

Shapes in comments are for ``ModelConfig.original`` at R = 64 (encoder 128-256-512-1024, latent 1024).
Inputs and outputs are float32 NCHW RGB in [0, 1].
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from facetwin.server.bundle import check_name

VARIANTS = ("ae", "vae", "vae-gan", "cyclegan")
# Slope of every LeakyReLU, as in the faceswap / DeepFaceLab models.
LEAKY_SLOPE = 0.1


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
    variant: str = "ae"  # training variant; only the plain autoencoder ("ae") is implemented so far

    def __post_init__(self) -> None:
        # Accept lists (JSON round trips) but store tuples so configs stay hashable and comparable.
        for name in ("identities", "encoder_widths", "decoder_widths"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        if self.variant not in VARIANTS:
            raise ModelConfigError(f"variant {self.variant!r} is not one of {', '.join(VARIANTS)}")
        if self.variant != "ae":
            raise ModelConfigError(f"variant {self.variant!r} is not implemented yet; use 'ae'")
        if len(self.identities) < 2:
            raise ModelConfigError(f"a face-swap model needs at least two identities, got {list(self.identities)}")
        if len(set(self.identities)) != len(self.identities):
            raise ModelConfigError(f"identity names must be unique, got {list(self.identities)}")
        for identity in self.identities:
            try:
                check_name(identity, "identity")
            except ValueError as exc:
                raise ModelConfigError(str(exc)) from exc
        widths = (*self.encoder_widths, *self.decoder_widths, self.latent, self.encoder_upscale_width)
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
        """The 2017 deepfakes / faceswap "Original" model at 64 px (~50 M parameters; GPU sized)."""
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


class Upscale(nn.Module):
    """Sub-pixel upscaling (Shi et al. 2016): a conv makes 4x the channels, PixelShuffle folds them into 2x the side."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels * 4, kernel_size=3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.act = nn.LeakyReLU(LEAKY_SLOPE)
        _icnr_init(self.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)  # (B, 4*C_out, H, W)
        x = self.shuffle(x)  # (B, C_out, 2H, 2W)
        return self.act(x)


class Encoder(nn.Module):
    """Shared by every identity: face -> dense latent code -> small feature map the decoders start from."""

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
        self.from_latent = nn.Linear(config.latent, self._channels * side * side)
        self.upscale = Upscale(self._channels, config.encoder_upscale_width)
        _he_init(self.to_latent, "linear")  # no activation between the two dense layers
        _he_init(self.from_latent, "linear")

    def forward(self, face: torch.Tensor) -> torch.Tensor:
        # Centre the [0, 1] input on zero: the first conv then starts unbiased and learns faster.
        x = self.convs(face * 2.0 - 1.0)  # (B, 3, 64, 64) -> (B, 1024, 4, 4)
        x = self.to_latent(self.flatten(x))  # (B, 1024): the latent code
        x = self.from_latent(x)  # (B, 1024*4*4)
        x = x.view(-1, self._channels, self._side, self._side)  # (B, 1024, 4, 4)
        return self.upscale(x)  # (B, 512, 8, 8)


class Decoder(nn.Module):
    """One per identity: feature map -> that identity's face (RGB) and a face mask, both in [0, 1]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        widths = (config.encoder_upscale_width, *config.decoder_widths)
        self.upscales = nn.Sequential(*(Upscale(cin, cout) for cin, cout in zip(widths, widths[1:])))
        self.face_head = nn.Conv2d(widths[-1], 3, kernel_size=5, padding=2)
        self.mask_head = nn.Conv2d(widths[-1], 1, kernel_size=5, padding=2)
        for head in (self.face_head, self.mask_head):  # Glorot before a sigmoid: starts near 0.5, not saturated
            nn.init.xavier_uniform_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.upscales(features)  # (B, 512, 8, 8) -> (B, 64, 64, 64)
        face = torch.sigmoid(self.face_head(x))  # (B, 3, 64, 64) RGB in [0, 1]
        mask = torch.sigmoid(self.mask_head(x))  # (B, 1, 64, 64), 1 = face
        return face, mask


class FaceSwapAutoencoder(nn.Module):
    """The whole model: a shared Encoder and one Decoder per identity (ModuleDict keyed by identity name)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoders = nn.ModuleDict({name: Decoder(config) for name in config.identities})

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


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
