"""Latents on the torch side: VAE (de)normalisation, noising, `to_pid` for tensors.

The conventions: docs/model.md#latent-conventions. The numpy conversion read workers use is
`pid_batch.backbones.arrays`; this module is its face for decoders, VAEs and user code.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pid_batch.backbones import backbone as backbone_row
from pid_batch.backbones.arrays import euler_norm, flux2_stats, to_pid_array, validate_sigma


def _as_float_tensor(latent: torch.Tensor | np.ndarray, where: str) -> torch.Tensor:
    """Torch view/copy of a floating-point tensor or array; ValueError for other dtypes."""
    if isinstance(latent, np.ndarray):
        if latent.dtype.kind != "f":
            raise ValueError(
                f"{where} latent must be a floating-point array; got dtype {latent.dtype}"
            )
        return torch.from_numpy(np.array(latent, copy=True))
    if not isinstance(latent, torch.Tensor):
        raise ValueError(
            f"{where} latent must be a torch.Tensor or numpy array; got {type(latent)}"
        )
    if not latent.is_floating_point():
        raise ValueError(
            f"{where} latent must be a floating-point tensor; got dtype {latent.dtype}"
        )
    return latent


def euler_to_vp(x: torch.Tensor, sigma_eu: float) -> tuple[torch.Tensor, float]:
    """EulerDiscrete VE state x0+σε -> VP state and σ: x/sqrt(σ²+1), σ/sqrt(σ²+1).

    See docs/model.md#sdxl-euler-and-vp-frames.
    """
    norm = euler_norm(sigma_eu)
    return x.to(torch.float32) / norm, float(sigma_eu) / norm


def flux2_patchify(z: torch.Tensor) -> torch.Tensor:
    """[..., 32, H, W] -> [..., 128, H/2, W/2], channel c·4 + a·2 + b (a row, b column offset)."""
    *lead, c, h, w = z.shape
    z = z.reshape(*lead, c, h // 2, 2, w // 2, 2)  # [..., c, i, a, j, b]
    n = len(lead)
    z = z.permute(*range(n), n, n + 2, n + 4, n + 1, n + 3)  # [..., c, a, b, i, j]
    return z.reshape(*lead, c * 4, h // 2, w // 2)


def flux2_unpatchify(x: torch.Tensor) -> torch.Tensor:
    """Inverse of flux2_patchify: [..., 128, h, w] -> [..., 32, 2h, 2w]."""
    *lead, c4, h, w = x.shape
    x = x.reshape(*lead, c4 // 4, 2, 2, h, w)  # [..., c, a, b, i, j]
    n = len(lead)
    x = x.permute(*range(n), n, n + 3, n + 1, n + 4, n + 2)  # [..., c, i, a, j, b]
    return x.reshape(*lead, c4 // 4, h * 2, w * 2)


def _flux2_stats(flux2_bn, where: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) [128, 1, 1] fp32 on `device`, from the FLUX.2 VAE BatchNorm running stats."""
    mean, std = flux2_stats(flux2_bn, where)
    return torch.from_numpy(mean).to(device), torch.from_numpy(std).to(device)


def _vae_side(x, backbone: str, channels: str, what: str):
    """(backbone row, x as an fp32 tensor) after checking x is [..., row.<channels>, H, W] of a VAE."""
    conv = backbone_row(backbone)
    where = conv.name
    x = _as_float_tensor(x, where).to(torch.float32)
    if conv.raw_channels is None:
        raise ValueError(
            f"{where} features come normalised from the RAE encoder; no VAE normalisation"
        )
    c = getattr(conv, channels)
    if x.dim() < 3 or x.shape[-3] != c:
        raise ValueError(f"{where} {what} must be [..., {c}, H, W]; got shape {tuple(x.shape)}")
    return conv, x


def _mean_std(conv, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std) [C, 1, 1] of a backbone normalised that way (Qwen-Image)."""
    mean = torch.tensor(conv.latents_mean, device=device).view(-1, 1, 1)
    return mean, torch.tensor(conv.latents_std, device=device).view(-1, 1, 1)


def normalize_vae_latent(z, backbone: str, flux2_bn=None) -> torch.Tensor:
    """Raw VAE posterior mean [..., C_raw, H, W] -> the LDM's normalised latent, fp32.

    The normalisation per backbone: docs/model.md#latent-conventions.
    """
    conv, z = _vae_side(z, backbone, "raw_channels", "raw VAE latent")
    if conv.name == "flux2":
        if z.shape[-2] % 2 or z.shape[-1] % 2:
            raise ValueError(
                f"{conv.name} raw latent H, W must be even for 2×2 packing; got {tuple(z.shape)}"
            )
        mean, std = _flux2_stats(flux2_bn, conv.name, z.device)
        return (flux2_patchify(z) - mean) / std
    if conv.latents_mean is not None:
        mean, std = _mean_std(conv, z.device)
        return (z - mean) / std
    return conv.scaling_factor * (z - conv.shift_factor)


def denormalize_vae_latent(x, backbone: str, flux2_bn=None) -> torch.Tensor:
    """Inverse of normalize_vae_latent: normalised latent -> raw VAE latent for native decoding."""
    conv, x = _vae_side(x, backbone, "channels", "latent")
    if conv.name == "flux2":
        mean, std = _flux2_stats(flux2_bn, conv.name, x.device)
        return flux2_unpatchify(x * std + mean)
    if conv.latents_mean is not None:
        mean, std = _mean_std(conv, x.device)
        return x * std + mean
    return x / conv.scaling_factor + conv.shift_factor


def noise_latent(
    lq: torch.Tensor, sigma: float, backbone: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Noise a clean latent to `sigma` in the backbone's frame, fp32.

    See docs/model.md#degrade-sigma.
    """
    conv = backbone_row(backbone)
    sigma = validate_sigma(sigma, conv.name)
    x0 = lq.to(torch.float32)
    device = generator.device if generator is not None else x0.device
    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32, device=device).to(
        x0.device
    )
    if conv.noise_frame == "vp":
        return math.sqrt(1.0 - sigma * sigma) * x0 + sigma * eps
    return (1.0 - sigma) * x0 + sigma * eps


def to_pid(
    latent: torch.Tensor | np.ndarray,
    backbone: str,
    latent_format: str = "pid",
    sigma: float | None = None,
    *,
    height: int | None = None,
    width: int | None = None,
    sigma_frame: str | None = None,
    flux2_bn: tuple[torch.Tensor, torch.Tensor] | None = None,
    sample_id: str | None = None,
) -> tuple[torch.Tensor, float]:
    """`backbones.arrays.to_pid_array` as an fp32 tensor (on the input tensor's device); same checks."""
    lq, sigma_value = to_pid_array(
        latent,
        backbone,
        latent_format,
        sigma,
        height=height,
        width=width,
        sigma_frame=sigma_frame,
        flux2_bn=flux2_bn,
        sample_id=sample_id,
    )
    out = torch.from_numpy(lq)
    if isinstance(latent, torch.Tensor) and latent.device.type != "cpu":
        out = out.to(latent.device)
    return out, sigma_value


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Pixels PiD and the VAEs decode to, [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]: truncating
    `uint8((x + 1) * 127.5)` (docs/model.md)."""
    x = (images.detach().float().clamp(-1, 1) + 1) * 127.5
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
