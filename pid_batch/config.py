"""Typed configuration of the PiD network, its released variants and presets (stdlib only).

Numbers and names follow the released code (`nv-tlabs/PiD` @ 2c8814c); what they mean is in
docs/model.md#released-checkpoints. The model-level constants at the end have their one home here;
which checkpoint each backbone uses is `pid_batch.backbones`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

GATE_TYPES = ("sigma_aware_per_token_per_dim", "sigma_aware_per_token")
PADDING_MODES = ("zeros", "replicate")
ROPE_MODES = ("ntk_aware", "original")
TXT_MAX_LENGTH = 300  # caption tokens the released nets read (docs/model.md#text-conditioning)

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
    """Inference-relevant `PidNet` constructor arguments; defaults are the released base.

    See docs/model.md#released-checkpoints for the base and the per-variant overrides.
    """

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
    txt_max_length: int = TXT_MAX_LENGTH
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
        """Nearest-neighbour factor from the unpatchified latent grid to the patch grid.

        See docs/model.md#latent-projection.
        """
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
# Model-level constants (docs/model.md#constants); the released checkpoints per backbone are in
# pid_batch.backbones.

DEFAULT_T_LIST = (0.999, 0.866, 0.634, 0.342, 0.0)  # student times (docs/model.md#schedule)
TIMESCALE = 1000.0  # the net sees t * TIMESCALE (docs/model.md#timestep-embedding)
# The paper's latency of one full 4-step 2048² decode on one GB200 (ms); plan.py calibrates its
# time model with it and fake.SleepDecoder sleeps it by default.
PAPER_GB200_MS_PER_2048 = 211.0
