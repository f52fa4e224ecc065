"""The demo latent space: a tiny convolutional autoencoder with FLUX's latent shape (16 ch, /8).

No pretrained VAE can be downloaded here, so the bundled demo decoder reads latents of this small
autoencoder instead (trained by `pid_batch.train`). Its `encode` returns the *normalised* latent
(per-channel mean/std over the training set removed), the form PiD's `lq_latent` takes
(docs/model.md#latent-conventions); `decode` gives the low-resolution image the PiD output is
compared against.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn import functional as F


@dataclass(frozen=True)
class AutoencoderConfig:
    """Widths of the demo autoencoder; `latent_channels` x (H/8, W/8) like the FLUX VAE."""

    latent_channels: int = 16
    widths: tuple[int, ...] = (16, 32, 64, 96)  # one width per resolution level; 3 downsamplings

    def __post_init__(self) -> None:
        if self.latent_channels < 1 or len(self.widths) != 4 or min(self.widths) < 1:
            raise ValueError(f"invalid autoencoder config: {self}")

    @property
    def scale(self) -> int:
        """Spatial down-sampling factor of the latent."""
        return 2 ** (len(self.widths) - 1)


class ResBlock(nn.Module):
    """x + conv(silu(conv(silu(x)))), 3x3, same width."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class DemoAutoencoder(nn.Module):
    """Image [B, 3, H, W] in [-1, 1] <-> normalised latent [B, C, H/8, W/8]."""

    def __init__(self, cfg: AutoencoderConfig = AutoencoderConfig()):
        super().__init__()
        self.cfg = cfg
        w = cfg.widths
        enc: list[nn.Module] = [nn.Conv2d(3, w[0], 3, padding=1), ResBlock(w[0])]
        for a, b in zip(w[:-1], w[1:]):
            enc += [nn.Conv2d(a, b, 3, stride=2, padding=1), ResBlock(b)]
        enc += [nn.SiLU(), nn.Conv2d(w[-1], cfg.latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [
            nn.Conv2d(cfg.latent_channels, w[-1], 3, padding=1),
            ResBlock(w[-1]),
        ]
        for a, b in zip(w[:0:-1], w[-2::-1]):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(a, b, 3, padding=1)]
            dec += [ResBlock(b)]
        dec += [nn.SiLU(), nn.Conv2d(w[0], 3, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        # Latent normalisation (set from training-set statistics after training).
        self.register_buffer("latent_mean", torch.zeros(cfg.latent_channels))
        self.register_buffer("latent_std", torch.ones(cfg.latent_channels))

    def encode_raw(self, image: Tensor) -> Tensor:
        """[B, 3, H, W] -> raw latent [B, C, H/8, W/8]; H and W must be multiples of 8."""
        s = self.cfg.scale
        if image.shape[-2] % s or image.shape[-1] % s:
            raise ValueError(f"image size {tuple(image.shape[-2:])} is not a multiple of {s}")
        return self.encoder(image)

    def decode_raw(self, z: Tensor) -> Tensor:
        """Raw latent [B, C, h, w] -> image [B, 3, 8h, 8w] (unclamped)."""
        return self.decoder(z)

    def encode(self, image: Tensor) -> Tensor:
        """[B, 3, H, W] in [-1, 1] -> normalised latent (PiD `LQ_latent` form)."""
        z = self.encode_raw(image)
        return (z - self.latent_mean[:, None, None]) / self.latent_std[:, None, None]

    def decode(self, latent: Tensor) -> Tensor:
        """Normalised latent [B, C, h, w] -> image [B, 3, 8h, 8w] clamped to [-1, 1]."""
        z = latent * self.latent_std[:, None, None] + self.latent_mean[:, None, None]
        return self.decode_raw(z).clamp(-1, 1)


def save_autoencoder(ae: DemoAutoencoder, path: str | Path) -> None:
    """safetensors file with the config in its metadata (fp32; the net is ~1 M parameters)."""
    state = {k: v.detach().cpu().contiguous() for k, v in ae.state_dict().items()}
    save_file(state, str(path), metadata={"config": json.dumps(asdict(ae.cfg))})


def load_autoencoder(path: str | Path, device: str | torch.device = "cpu") -> DemoAutoencoder:
    """Strict load of a file written by `save_autoencoder`."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ValueError(f"{path}: not a demo autoencoder file (no 'config' metadata)")
    raw = json.loads(meta["config"])
    cfg = AutoencoderConfig(latent_channels=raw["latent_channels"], widths=tuple(raw["widths"]))
    ae = DemoAutoencoder(cfg)
    ae.load_state_dict(load_file(str(path)), strict=True)
    return ae.to(device).eval().requires_grad_(False)
