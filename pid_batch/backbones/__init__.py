"""Everything pid-batch knows per backbone, in one table, and the released checkpoints per backbone.

A `Backbone` row says what its latent looks like (channels, VAE scale, packing, noise frame,
normalisation), whether it is a VAE or a representation autoencoder (RAE), which diffusers class
its VAE is, and its aliases. `CheckpointSpec` rows (one per released distilled checkpoint) take
their latent facts from it. The meaning of every field: docs/model.md#latent-conventions and
docs/model.md#released-checkpoints. Stdlib only: read workers import this without torch.

The modules of this package convert latents: `arrays` (numpy; read workers), `tensors` (torch;
decoders and VAEs), `vae` (the backbones' own diffusers VAEs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pid_batch.config import DEFAULT_T_LIST, VARIANTS, NetConfig

# v1.5 students saw degrade_sigma ~ U[0, 0.8] (docs/model.md#degrade-sigma).
TRAINED_SIGMA_MAX = 0.8
# AutoencoderKLFlux2 config `batch_norm_eps` (docs/model.md#flux2-packing-and-batchnorm).
FLUX2_BN_EPS = 1e-4
# DINOv2 RAE time shift, ≈ 13.856 (docs/model.md#rae-time-shift).
RAE_SHIFT = math.sqrt(768 * 32 * 32 / 4096)

LATENT_FORMATS = (
    "pid",
    "diffusers",
)  # how a stored latent is laid out (docs/model.md#diffusers-outputs)


@dataclass(frozen=True)
class Backbone:
    """One generator family's latent, as PiD consumes it (docs/model.md#latent-conventions)."""

    name: str
    channels: int  # C of the PiD-form lq_latent [C, h, w]
    vae_scale: int  # generator-image pixels per PiD-form latent cell
    noise_frame: str  # "flow": (1-σ)x0+σε, "vp": sqrt(1-σ²)x0+σε
    sr_scale: int  # PiD output / generator image size of the released checkpoints
    aliases: tuple[str, ...] = ()
    vae_class: str | None = None  # diffusers 0.42.1 class of its VAE; None: an RAE (no VAE here)
    raw_channels: int | None = None  # channels of the raw VAE posterior mean (None: RAE features)
    packed_channels: int | None = None  # last dim of diffusers' packed [seq, ·] latents
    packed_patch: int = 1  # latent cells per packed token side (2: flux/qwen 2×2 tokens)
    scaling_factor: float | None = None  # normalised = scaling_factor·(z − shift_factor)
    shift_factor: float = 0.0
    latents_mean: tuple[float, ...] | None = None  # per-channel normalisation instead of a scale
    latents_std: tuple[float, ...] | None = None
    fixed_hw: tuple[int, int] | None = None  # RAEs decode one size only (2048²)
    tokens: int | None = None  # RAE features may come as a token sequence [tokens, C]

    @property
    def is_rae(self) -> bool:
        """A representation autoencoder: features come normalised, there is no VAE to run."""
        return self.vae_class is None


# AutoencoderKLQwenImage (Wan2.1 VAE) `latents_mean` / `latents_std`.
_QWEN_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
_QWEN_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone(
            "flux", 16, 8, "flow", 4, aliases=("zimage", "zimage-turbo"),
            vae_class="AutoencoderKL", raw_channels=16, packed_channels=64, packed_patch=2,
            scaling_factor=0.3611, shift_factor=0.1159,
        ),
        Backbone(
            "flux2", 128, 16, "flow", 4, aliases=("flux2-klein-4b", "flux2-klein-9b"),
            vae_class="AutoencoderKLFlux2", raw_channels=32, packed_channels=128,
        ),
        Backbone(
            "sd3", 16, 8, "flow", 4, vae_class="AutoencoderKL", raw_channels=16,
            scaling_factor=1.5305, shift_factor=0.0609,
        ),
        Backbone(
            "sdxl", 4, 8, "vp", 4, vae_class="AutoencoderKL", raw_channels=4,
            scaling_factor=0.13025,
        ),
        Backbone(
            "qwenimage", 16, 8, "flow", 4, aliases=("qwenimage-2512",),
            vae_class="AutoencoderKLQwenImage", raw_channels=16, packed_channels=64,
            packed_patch=2, latents_mean=_QWEN_MEAN, latents_std=_QWEN_STD,
        ),
        Backbone("dinov2", 768, 16, "flow", 4, fixed_hw=(32, 32), tokens=1024),
        Backbone("siglip", 1152, 16, "flow", 8, fixed_hw=(16, 16), tokens=256),
    )
}  # fmt: skip
ALIASES: dict[str, str] = {a: b.name for b in BACKBONES.values() for a in b.aliases}


def _fold(backbone: str) -> str:
    """Case, spaces and aliases folded; not checked against the table."""
    name = str(backbone).strip().lower()
    return ALIASES.get(name, name)


def canonical_backbone(backbone: str) -> str:
    """Canonical backbone name for a name or alias (case folded); ValueError listing valid names."""
    name = _fold(backbone)
    if name not in BACKBONES:
        valid = sorted([*BACKBONES, *ALIASES])
        raise ValueError(f"unknown backbone {backbone!r}; valid names: {', '.join(valid)}")
    return name


def backbone(name: str) -> Backbone:
    """The table row of a backbone (aliases accepted)."""
    return BACKBONES[canonical_backbone(name)]


# ---------------------------------------------------------------------------------------------
# Released checkpoints (docs/model.md#released-checkpoints, #sampler)

CKPT_TYPES = ("2k", "2kto4k", "2kto4k_v1pt5")  # oldest first

# Output sizes (H, W) the checkpoints were trained at (docs/model.md#resolution). `2k`: five
# aspect ratios at 2048 px; the RAE backbones 2048² alone.
TRAINED_SIZES_2K = ((2048, 2048), (1728, 2304), (2304, 1728), (1536, 2688), (2688, 1536))
# Largest bucket per aspect ratio W:H of the 2K-4K students (transposed for H:W).
_MULTIRES_CAPS = {(1, 1): (3584, 3584), (4, 3): (4096, 2816), (16, 9): (4096, 2176)}


def _multires_sizes() -> tuple[tuple[int, int], ...]:
    """The 2K-4K buckets: 1:1, 4:3, 3:4, 16:9, 9:16 at area levels 2048..3840 px in steps of 256
    (W·H ≈ level², sides rounded to multiples of 64), clipped to the largest bucket of the ratio.

    Stated for the v1.5 students (docs/model.md#resolution); v1 `2kto4k`'s data config is not
    public, and the same set (the resolution range its name promises) stands in for it.
    """
    sizes = set()
    for (a, b), cap in _MULTIRES_CAPS.items():
        for ra, rb, (cap_w, cap_h) in ((a, b, cap), (b, a, cap[::-1])):
            for level in range(2048, 3840 + 1, 256):
                w = round(level * math.sqrt(ra / rb) / 64) * 64
                h = round(level * math.sqrt(rb / ra) / 64) * 64
                sizes.add((cap_h, cap_w) if w > cap_w or h > cap_h else (h, w))
    return tuple(sorted(sizes))


TRAINED_SIZES_2KTO4K = _multires_sizes()


@dataclass(frozen=True)
class CheckpointSpec:
    """One released distilled checkpoint: file folder, network variant and sampling constants."""

    backbone: str
    ckpt_type: str
    experiment: str
    variant: str
    t_list: tuple[float, ...] = DEFAULT_T_LIST
    steps: int = 4

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; known: {sorted(VARIANTS)}")
        b, cfg = BACKBONES[self.backbone], VARIANTS[self.variant]
        if (cfg.lq_latent_channels, cfg.sr_scale) != (b.channels, b.sr_scale):
            raise ValueError(
                f"{self.experiment}: variant {self.variant!r} reads {cfg.lq_latent_channels} "
                f"channels at {cfg.sr_scale}x; backbone {b.name!r} has {b.channels} at {b.sr_scale}x"
            )

    @property
    def net_config(self) -> NetConfig:
        """The network configuration of this checkpoint."""
        return VARIANTS[self.variant]

    @property
    def latent_channels(self) -> int:
        return BACKBONES[self.backbone].channels

    @property
    def vae_scale(self) -> int:
        return BACKBONES[self.backbone].vae_scale

    @property
    def sr_scale(self) -> int:
        return BACKBONES[self.backbone].sr_scale

    @property
    def fixed_hw(self) -> tuple[int, int] | None:
        """The one latent size an RAE checkpoint decodes (its 2048² output), else None."""
        return BACKBONES[self.backbone].fixed_hw

    @property
    def filename(self) -> str:
        """Path of the weights inside the `nvidia/PiD` repository."""
        return f"checkpoints/{self.experiment}/model_ema_bf16.pth"

    @property
    def trained_sizes(self) -> tuple[tuple[int, int], ...]:
        """Output sizes (H, W) this checkpoint was trained at (docs/model.md#resolution)."""
        if self.fixed_hw is not None:
            return (self.output_hw(*self.fixed_hw),)
        return TRAINED_SIZES_2K if self.ckpt_type == "2k" else TRAINED_SIZES_2KTO4K

    @property
    def latent_cell(self) -> int:
        """Output pixels per latent cell along a side (`vae_scale * sr_scale`: 32, 64 or 128)."""
        return self.vae_scale * self.sr_scale

    def output_hw(self, h: int, w: int) -> tuple[int, int]:
        """Output image size (H, W) for a PiD-form latent of spatial size (h, w)."""
        return h * self.latent_cell, w * self.latent_cell


def _official(backbone: str, ckpt_type: str, variant: str) -> CheckpointSpec:
    """A release of the official repository, named by its experiment-folder convention."""
    res = {"2k": "res2k", "2kto4k": "res2kto4k", "2kto4k_v1pt5": "v1pt5_res2kto4k"}[ckpt_type]
    sr = VARIANTS[variant].sr_scale
    experiment = f"PiD_{res}_sr{sr}x_official_{backbone}_distill_4step"
    return CheckpointSpec(backbone, ckpt_type, experiment, variant)


REGISTRY: dict[tuple[str, str], CheckpointSpec] = {
    (e.backbone, e.ckpt_type): e
    for e in (
        _official("flux", "2k", "v1_sr4x_c16"),
        _official("flux2", "2k", "v1_sr4x_c128_flux2"),
        _official("sd3", "2k", "v1_sr4x_c16"),
        _official("dinov2", "2k", "v1_sr4x_c768_dinov2"),
        _official("siglip", "2k", "v1_sr8x_c1152_siglip"),
        _official("sd3", "2kto4k", "v1_sr4x_c16"),
        _official("sdxl", "2kto4k", "v1_sr4x_c4_sdxl"),
        _official("flux", "2kto4k_v1pt5", "v1p5_sr4x_c16"),
        _official("flux2", "2kto4k_v1pt5", "v1p5_sr4x_c128_flux2"),
        _official("qwenimage", "2kto4k_v1pt5", "v1p5_sr4x_c16"),
    )
}


def resolve_checkpoint(backbone: str, ckpt_type: str | None = None) -> CheckpointSpec:
    """Look up a released checkpoint; aliases and case are folded.

    `ckpt_type=None` picks the newest release for the backbone, in the order
    `2kto4k_v1pt5` > `2kto4k` > `2k` (the order of `CKPT_TYPES`, reversed).
    """
    valid = ", ".join(f"{b}/{c}" for b, c in REGISTRY)
    name = _fold(backbone)
    if ckpt_type is None:
        if name not in BACKBONES:
            raise ValueError(
                f"unknown backbone {backbone!r}; valid (backbone/ckpt_type) pairs: {valid}; "
                f"aliases: {ALIASES}"
            )
        return next(REGISTRY[(name, c)] for c in reversed(CKPT_TYPES) if (name, c) in REGISTRY)
    key = (name, str(ckpt_type).strip().lower())
    if key not in REGISTRY:
        raise ValueError(
            f"no released checkpoint for backbone={backbone!r}, ckpt_type={ckpt_type!r}; "
            f"valid (backbone/ckpt_type) pairs: {valid}; aliases: {ALIASES}"
        )
    return REGISTRY[key]
