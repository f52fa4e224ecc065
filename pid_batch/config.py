"""Typed configuration of the PiD network and the registry of released checkpoints (stdlib only).

Numbers and names follow SPEC.md §2 (official `nv-tlabs/PiD` @ 2c8814c).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

GATE_TYPES = ("sigma_aware_per_token_per_dim", "sigma_aware_per_token")
PADDING_MODES = ("zeros", "replicate")
ROPE_MODES = ("ntk_aware", "original")

# Official constructor kwargs that only matter for training / initialisation: accepted and ignored.
_TRAINING_ONLY_KEYS = (
    "repa_encoder_index",
    "zero_init_lq",
    "train_lq_proj_only",
    "num_text_blocks",
)
# Encoder/decoder compression kwargs: ignored while enable_ed is false.
_ED_KEYS = (
    "ed_compress_ratio",
    "ed_depth_per_stage",
    "ed_window_size",
    "ed_num_heads",
    "ed_hidden_size",
    "ed_use_token_shuffle",
)


@dataclass(frozen=True)
class NetConfig:
    """Inference-relevant `PidNet` constructor arguments; defaults are the released base (§2.2)."""

    in_channels: int = 3
    hidden_size: int = 1536
    num_groups: int = 24
    patch_depth: int = 14
    pixel_hidden_size: int = 16
    pixel_attn_hidden_size: int = 1152
    pixel_num_groups: int = 16
    pixel_depth: int = 2
    patch_size: int = 16
    txt_embed_dim: int = 2304
    txt_max_length: int = 300
    use_text_rope: bool = True
    text_rope_theta: float = 10000.0
    rope_mode: str = "ntk_aware"
    rope_ref_h: int = 1024
    rope_ref_w: int = 1024
    lq_latent_channels: int = 16
    lq_hidden_dim: int = 512
    lq_num_res_blocks: int = 4
    lq_latent_unpatchify_factor: int = 1
    lq_conv_padding_mode: str = "zeros"
    lq_aux_rgb_head: bool = False
    lq_gate_type: str = "sigma_aware_per_token_per_dim"
    lq_interval: int = 2
    sr_scale: int = 4
    latent_spatial_down_factor: int = 8
    pit_lq_inject: bool = False

    def __post_init__(self) -> None:
        positive = (
            "in_channels",
            "hidden_size",
            "num_groups",
            "patch_depth",
            "pixel_hidden_size",
            "pixel_attn_hidden_size",
            "pixel_num_groups",
            "pixel_depth",
            "patch_size",
            "txt_embed_dim",
            "txt_max_length",
            "rope_ref_h",
            "rope_ref_w",
            "lq_latent_channels",
            "lq_hidden_dim",
            "lq_num_res_blocks",
            "lq_latent_unpatchify_factor",
            "lq_interval",
            "sr_scale",
            "latent_spatial_down_factor",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_groups:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_groups={self.num_groups}"
            )
        if self.head_dim % 4:
            raise ValueError(f"patch head dim {self.head_dim} must be a multiple of 4 (2-D RoPE)")
        if self.pixel_attn_hidden_size % self.pixel_num_groups:
            raise ValueError(
                f"pixel_attn_hidden_size={self.pixel_attn_hidden_size} is not divisible by "
                f"pixel_num_groups={self.pixel_num_groups}"
            )
        if self.pixel_head_dim % 4:
            raise ValueError(
                f"PiT head dim {self.pixel_head_dim} must be a multiple of 4 (2-D RoPE)"
            )
        if self.pixel_hidden_size % 4:
            raise ValueError(
                f"pixel_hidden_size={self.pixel_hidden_size} must be a multiple of 4 (sin-cos table)"
            )
        if self.lq_hidden_dim % 4:
            raise ValueError(
                f"lq_hidden_dim={self.lq_hidden_dim} must be a multiple of 4 (GroupNorm, 4 groups)"
            )
        if self.rope_ref_h % self.patch_size or self.rope_ref_w % self.patch_size:
            raise ValueError(
                f"rope_ref_h/w={self.rope_ref_h}/{self.rope_ref_w} must be multiples of "
                f"patch_size={self.patch_size}"
            )
        if self.rope_mode not in ROPE_MODES:
            raise ValueError(f"rope_mode={self.rope_mode!r} is not one of {ROPE_MODES}")
        if self.lq_gate_type not in GATE_TYPES:
            raise ValueError(f"lq_gate_type={self.lq_gate_type!r} is not one of {GATE_TYPES}")
        if self.lq_conv_padding_mode not in PADDING_MODES:
            raise ValueError(
                f"lq_conv_padding_mode={self.lq_conv_padding_mode!r} is not one of {PADDING_MODES}"
            )
        f = self.lq_latent_unpatchify_factor
        if self.lq_latent_channels % (f * f):
            raise ValueError(
                f"lq_latent_channels={self.lq_latent_channels} is not divisible by "
                f"lq_latent_unpatchify_factor**2={f * f}"
            )
        if self.latent_spatial_down_factor % f:
            raise ValueError(
                f"latent_spatial_down_factor={self.latent_spatial_down_factor} is not divisible by "
                f"lq_latent_unpatchify_factor={f}"
            )
        ratio = self.sr_scale * (self.latent_spatial_down_factor // f)
        if ratio % self.patch_size:
            raise ValueError(
                "only integer latent->patch-grid ratios >= 1 are supported: sr_scale*"
                f"latent_spatial_down_factor/unpatchify/patch_size = {ratio}/{self.patch_size}"
            )
        if self.lq_aux_rgb_head and self.patch_size % self.sr_scale:
            raise ValueError(
                f"lq_aux_rgb_head needs patch_size={self.patch_size} divisible by "
                f"sr_scale={self.sr_scale}"
            )

    @property
    def head_dim(self) -> int:
        """Patch-level attention head width (64 for the released nets)."""
        return self.hidden_size // self.num_groups

    @property
    def pixel_head_dim(self) -> int:
        """PiT attention head width (72 for the released nets)."""
        return self.pixel_attn_hidden_size // self.pixel_num_groups

    @property
    def lq_ratio(self) -> int:
        """Nearest-neighbour upsampling factor from the unpatchified latent grid to the patch grid (§3.6)."""
        f = self.lq_latent_unpatchify_factor
        return self.sr_scale * (self.latent_spatial_down_factor // f) // self.patch_size

    @property
    def num_lq_outputs(self) -> int:
        """Number of LQ output heads / gates, `ceil(patch_depth / lq_interval)`."""
        return math.ceil(self.patch_depth / self.lq_interval)

    @property
    def lq_in_channels(self) -> int:
        """Channels entering the LQ conv stack, after the optional unpatchify."""
        return self.lq_latent_channels // self.lq_latent_unpatchify_factor**2

    @property
    def swiglu_hidden(self) -> int:
        """Hidden width of the patch-level SwiGLU FF, `int(2 * int(4 D) / 3)`."""
        return int(2 * int(4 * self.hidden_size) / 3)

    @property
    def gate_width(self) -> int:
        """Output width of a gate's content projection: D (per dim) or 1 (per token)."""
        return self.hidden_size if self.lq_gate_type == "sigma_aware_per_token_per_dim" else 1

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> NetConfig:
        """Build from an official (effective_)constructor_kwargs dict; reject unsupported values."""
        kw = dict(kwargs)
        for key in _TRAINING_ONLY_KEYS:
            kw.pop(key, None)
        if kw.pop("enable_ed", False):
            raise ValueError("enable_ed=True (encoder/decoder token compression) is not supported")
        for key in _ED_KEYS:
            kw.pop(key, None)
        mode = kw.pop("lq_inject_mode", "controlnet")
        if mode != "controlnet":
            raise ValueError(f"lq_inject_mode={mode!r} is not supported (only 'controlnet')")
        lq_in = kw.pop("lq_in_channels", 0)
        if lq_in != 0:
            raise ValueError(f"lq_in_channels={lq_in!r} is not supported (RGB LQ branch; need 0)")
        idx = kw.pop("lq_aux_rgb_head_latent_block_idx", -1)
        if idx != -1:
            raise ValueError(f"lq_aux_rgb_head_latent_block_idx={idx!r} is not supported (need -1)")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kw) - known)
        if unknown:
            raise ValueError(f"unknown PidNet constructor kwargs: {unknown}")
        if "text_rope_theta" in kw:
            kw["text_rope_theta"] = float(kw["text_rope_theta"])
        return cls(**kw)

    def replace(self, **changes: Any) -> NetConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


_BASE = NetConfig()
_V1P5 = _BASE.replace(
    rope_ref_h=2048,
    rope_ref_w=2048,
    lq_conv_padding_mode="replicate",
    lq_aux_rgb_head=True,
    pit_lq_inject=True,
    lq_gate_type="sigma_aware_per_token",
    lq_hidden_dim=1024,
)

VARIANTS: dict[str, NetConfig] = {
    "v1_sr4x_c16": _BASE,
    "v1_sr4x_c4_sdxl": _BASE.replace(lq_latent_channels=4),
    "v1_sr4x_c128_flux2": _BASE.replace(lq_latent_channels=128, latent_spatial_down_factor=16),
    "v1_sr4x_c768_dinov2": _BASE.replace(lq_latent_channels=768, latent_spatial_down_factor=16),
    "v1_sr8x_c1152_siglip": _BASE.replace(
        lq_latent_channels=1152, latent_spatial_down_factor=16, sr_scale=8
    ),
    "v1p5_sr4x_c16": _V1P5,
    "v1p5_sr4x_c128_flux2": _V1P5.replace(
        lq_latent_channels=128, latent_spatial_down_factor=16, lq_latent_unpatchify_factor=2
    ),
}


def tiny(cfg: NetConfig) -> NetConfig:
    """Tiny preset of the same code path (fixture-like widths) for CPU tests and demos."""
    return cfg.replace(
        hidden_size=32,
        num_groups=2,
        patch_depth=4,
        pixel_hidden_size=8,
        pixel_attn_hidden_size=24,
        pixel_num_groups=2,
        pixel_depth=2,
        txt_embed_dim=24,
        txt_max_length=8,
        lq_hidden_dim=16,
        # Reference grid scaled down 16x (v1: 4x4 patches, v1.5: 8x8) so ntk_aware stays active.
        rope_ref_h=max(16, cfg.rope_ref_h // 16),
        rope_ref_w=max(16, cfg.rope_ref_w // 16),
    )


def demo(cfg: NetConfig) -> NetConfig:
    """Demo preset: the size of the bundled CPU-trained decoder (pid_batch.train, ~4.5 M params)."""
    return cfg.replace(
        hidden_size=96,
        num_groups=3,
        patch_depth=4,
        pixel_hidden_size=8,
        pixel_attn_hidden_size=48,
        pixel_num_groups=2,
        pixel_depth=2,
        txt_embed_dim=24,
        txt_max_length=8,
        lq_hidden_dim=48,
        # 16x16 patch reference grid: no NTK rescaling up to the demo's 256-px outputs.
        rope_ref_h=256,
        rope_ref_w=256,
    )


# ---------------------------------------------------------------------------------------------
# Released checkpoints (§2.1, §2.3, §6)

BACKBONES = ("flux", "flux2", "sd3", "dinov2", "siglip", "sdxl", "qwenimage")
CKPT_TYPES = ("2k", "2kto4k", "2kto4k_v1pt5")
ALIASES: dict[str, str] = {
    "zimage": "flux",
    "zimage-turbo": "flux",
    "flux2-klein-4b": "flux2",
    "flux2-klein-9b": "flux2",
    "qwenimage-2512": "qwenimage",
}
DEFAULT_T_LIST = (0.999, 0.866, 0.634, 0.342, 0.0)

# Output sizes (H, W) the checkpoints were trained at (SPEC §7). `2k`: five aspect ratios at
# 2048 px; the RAE backbones (square_only) 2048² alone.
TRAINED_SIZES_2K = ((2048, 2048), (1728, 2304), (2304, 1728), (1536, 2688), (2688, 1536))
# Largest bucket per aspect ratio W:H of the 2K-4K students (SPEC §7; transposes for H:W).
_MULTIRES_CAPS = {(1, 1): (3584, 3584), (4, 3): (4096, 2816), (16, 9): (4096, 2176)}


def _multires_sizes() -> tuple[tuple[int, int], ...]:
    """The 2K-4K buckets: 1:1, 4:3, 3:4, 16:9, 9:16 at area levels 2048..3840 px in steps of 256
    (W·H ≈ level², sides rounded to multiples of 64), clipped to the largest bucket of the ratio.

    SPEC §7 states this for the v1.5 students; v1 `2kto4k`'s data config is not public, and the
    same set (the resolution range its name promises) stands in for it.
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
    latent_channels: int
    vae_scale: int
    sr_scale: int
    t_list: tuple[float, ...] = DEFAULT_T_LIST
    steps: int = 4
    timescale: float = 1000.0
    prediction_type: str = "velocity"
    noise_frame: str = "flow"
    square_only: bool = False

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; known: {sorted(VARIANTS)}")
        cfg = VARIANTS[self.variant]
        if cfg.lq_latent_channels != self.latent_channels or cfg.sr_scale != self.sr_scale:
            raise ValueError(
                f"{self.experiment}: latent_channels/sr_scale {self.latent_channels}/"
                f"{self.sr_scale} disagree with variant {self.variant!r}"
            )
        if self.noise_frame not in ("flow", "vp"):
            raise ValueError(f"noise_frame={self.noise_frame!r} is not 'flow' or 'vp'")

    @property
    def net_config(self) -> NetConfig:
        """The network configuration of this checkpoint."""
        return VARIANTS[self.variant]

    @property
    def filename(self) -> str:
        """Path of the weights inside the `nvidia/PiD` repository."""
        return f"checkpoints/{self.experiment}/model_ema_bf16.pth"

    @property
    def trained_sizes(self) -> tuple[tuple[int, int], ...]:
        """Output sizes (H, W) this checkpoint was trained at (SPEC §7)."""
        if self.square_only:
            return ((2048, 2048),)
        return TRAINED_SIZES_2K if self.ckpt_type == "2k" else TRAINED_SIZES_2KTO4K

    @property
    def latent_cell(self) -> int:
        """Output pixels per latent cell along a side (`vae_scale * sr_scale`: 32, 64 or 128)."""
        return self.vae_scale * self.sr_scale

    def output_hw(self, h: int, w: int) -> tuple[int, int]:
        """Output image size (H, W) for a PiD-form latent of spatial size (h, w)."""
        return h * self.latent_cell, w * self.latent_cell


def _spec(
    backbone: str, ckpt_type: str, experiment: str, variant: str, **kw: Any
) -> CheckpointSpec:
    latent = {"flux": 16, "flux2": 128, "sd3": 16, "dinov2": 768, "siglip": 1152, "sdxl": 4}
    vae = {"flux2": 16, "dinov2": 16, "siglip": 16}
    return CheckpointSpec(
        backbone=backbone,
        ckpt_type=ckpt_type,
        experiment=experiment,
        variant=variant,
        latent_channels=latent.get(backbone, 16),
        vae_scale=vae.get(backbone, 8),
        sr_scale=VARIANTS[variant].sr_scale,
        **kw,
    )


_ENTRIES = (
    _spec("flux", "2k", "PiD_res2k_sr4x_official_flux_distill_4step", "v1_sr4x_c16"),
    _spec("flux2", "2k", "PiD_res2k_sr4x_official_flux2_distill_4step", "v1_sr4x_c128_flux2"),
    _spec("sd3", "2k", "PiD_res2k_sr4x_official_sd3_distill_4step", "v1_sr4x_c16"),
    _spec(
        "dinov2",
        "2k",
        "PiD_res2k_sr4x_official_dinov2_distill_4step",
        "v1_sr4x_c768_dinov2",
        square_only=True,
    ),
    _spec(
        "siglip",
        "2k",
        "PiD_res2k_sr8x_official_siglip_distill_4step",
        "v1_sr8x_c1152_siglip",
        square_only=True,
    ),
    _spec("sd3", "2kto4k", "PiD_res2kto4k_sr4x_official_sd3_distill_4step", "v1_sr4x_c16"),
    _spec(
        "sdxl",
        "2kto4k",
        "PiD_res2kto4k_sr4x_official_sdxl_distill_4step",
        "v1_sr4x_c4_sdxl",
        noise_frame="vp",
    ),
    _spec(
        "flux",
        "2kto4k_v1pt5",
        "PiD_v1pt5_res2kto4k_sr4x_official_flux_distill_4step",
        "v1p5_sr4x_c16",
    ),
    _spec(
        "flux2",
        "2kto4k_v1pt5",
        "PiD_v1pt5_res2kto4k_sr4x_official_flux2_distill_4step",
        "v1p5_sr4x_c128_flux2",
    ),
    _spec(
        "qwenimage",
        "2kto4k_v1pt5",
        "PiD_v1pt5_res2kto4k_sr4x_official_qwenimage_distill_4step",
        "v1p5_sr4x_c16",
    ),
)
REGISTRY: dict[tuple[str, str], CheckpointSpec] = {(e.backbone, e.ckpt_type): e for e in _ENTRIES}


def resolve_checkpoint(backbone: str, ckpt_type: str | None = None) -> CheckpointSpec:
    """Look up a released checkpoint; aliases and case are folded.

    `ckpt_type=None` picks the newest release for the backbone, in the order
    `2kto4k_v1pt5` > `2kto4k` > `2k` (the order of `CKPT_TYPES`, reversed).
    """
    name = backbone.strip().lower()
    name = ALIASES.get(name, name)
    valid = ", ".join(f"{b}/{c}" for b, c in REGISTRY)
    if ckpt_type is None:
        for candidate in reversed(CKPT_TYPES):
            if (name, candidate) in REGISTRY:
                return REGISTRY[(name, candidate)]
        raise ValueError(
            f"unknown backbone {backbone!r}; valid (backbone/ckpt_type) pairs: {valid}; "
            f"aliases: {ALIASES}"
        )
    key = (name, ckpt_type.strip().lower())
    if key not in REGISTRY:
        raise ValueError(
            f"no released checkpoint for backbone={backbone!r}, ckpt_type={ckpt_type!r}; "
            f"valid (backbone/ckpt_type) pairs: {valid}; aliases: {ALIASES}"
        )
    return REGISTRY[key]
