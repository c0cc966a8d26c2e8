"""Mixed precision: which autocast dtype an `amp` setting means on a device, and the fp16 GradScaler.

``auto`` (the default) picks bf16 wherever the hardware computes it natively -- CUDA GPUs with bf16, and CPUs with
AVX512-BF16 or AMX, where it runs a step ~1.3x faster -- and float32 elsewhere and for the adversarial variants
(FLOAT32_UNDER_AUTO). ``bf16`` is plain autocast; ``fp16`` is autocast with a GradScaler, meant for CUDA (on a CPU it
runs, slowly, so the recipe can be checked without a GPU). Weights stay float32 throughout.
"""

from __future__ import annotations

import contextlib
import logging

import torch

AMP_MODES = ("auto", "off", "bf16", "fp16")
# `amp auto` keeps these in float32: a bf16 vae-gan run on the CPU diverged twice (its log-variance spiked past the
# float range at step 2,973, then, clamped, its loss ran to 1e5), while ae and vae trained cleanly in bf16.
# cyclegan, also adversarial, has not been tried in bf16. `--amp bf16` still runs them in bf16 when asked.
FLOAT32_UNDER_AUTO = ("vae-gan", "cyclegan")
log = logging.getLogger(__name__)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX); elsewhere torch emulates it, slower than
    float32."""
    return any(getattr(torch.cpu, probe, lambda: False)()
               for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def cuda_has_bf16(device: torch.device) -> bool:
    """Whether this GPU computes bfloat16 in hardware (Ampere and later). torch.cuda.is_bf16_supported() alone also
    says yes where bf16 is only emulated (V100, T4: slower than float32), and asks the current device, not this one."""
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def autocast_dtype(amp: str, device: torch.device, variant: str = "ae") -> torch.dtype | None:
    """The autocast dtype of an amp setting on this device for this variant; None = full float32."""
    if amp == "off":
        return None
    if amp == "auto":
        if variant in FLOAT32_UNDER_AUTO:
            return None
        if device.type == "cuda":
            return torch.bfloat16 if cuda_has_bf16(device) else None
        return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else None
    if device.type == "cpu":
        if amp == "fp16":  # runs (with its GradScaler) so the CUDA recipe can be checked anywhere; slow everywhere
            log.warning("amp=fp16 on a CPU: torch's fp16 kernels there are many times slower than bf16 or off; "
                        "use it to check the fp16 path, not to train")
            return torch.float16
        if not cpu_has_bf16():
            log.warning("amp=bf16 on a CPU without AVX512-BF16 or AMX: torch emulates it, expect it slower than off")
        return torch.bfloat16
    if device.type != "cuda":
        log.warning("amp=%s ignored: mixed precision runs on CUDA and CPUs, this run is on %s (float32)", amp, device)
        return None
    if amp == "bf16" and not cuda_has_bf16(device):
        raise ValueError(f"amp=bf16 asked for, but {torch.cuda.get_device_name(device)} has no bfloat16 in hardware; "
                         "use fp16")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def grad_scaler(dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler:
    """fp16 gradients underflow without loss scaling; bf16 and float32 keep float32's range (a disabled scaler, whose
    calls pass straight through)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast in `dtype`; a no-op for float32 (None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def describe(dtype: torch.dtype | None) -> str:
    """The precision in words, for logs and the training summary: float32, bfloat16 autocast or float16 autocast."""
    return "float32" if dtype is None else f"{dtype}".replace("torch.", "") + " autocast"
