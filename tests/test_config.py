"""NetConfig validation/kwargs mapping, tiny presets, and the registry of released checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from pid_batch.backbones import (
    ALIASES,
    BACKBONES,
    CKPT_TYPES,
    REGISTRY,
    CheckpointSpec,
    resolve_checkpoint,
)
from pid_batch.config import (
    VARIANTS,
    NetConfig,
    tiny,
)
from pid_batch.model import PidNet


def _kwargs(data_dir, variant="v1_sr4x_c16"):
    return json.loads((data_dir / "keys" / f"{variant}.json").read_text())[
        "effective_constructor_kwargs"
    ]


def test_defaults_are_the_released_base(data_dir):
    assert NetConfig() == VARIANTS["v1_sr4x_c16"] == NetConfig.from_kwargs(_kwargs(data_dir))
    cfg = NetConfig()
    assert (cfg.head_dim, cfg.pixel_head_dim, cfg.swiglu_hidden, cfg.num_lq_outputs) == (
        64,
        72,
        4096,
        7,
    )


@pytest.mark.parametrize(
    "variant, ratio",
    [
        ("v1_sr4x_c16", 2),
        ("v1_sr4x_c4_sdxl", 2),
        ("v1_sr4x_c128_flux2", 4),
        ("v1_sr4x_c768_dinov2", 4),
        ("v1_sr8x_c1152_siglip", 8),
        ("v1p5_sr4x_c16", 2),
        ("v1p5_sr4x_c128_flux2", 2),
    ],
)
def test_lq_ratio(variant, ratio):
    assert VARIANTS[variant].lq_ratio == ratio


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("enable_ed", True, "enable_ed=True"),
        ("lq_in_channels", 3, "lq_in_channels=3"),
        ("lq_inject_mode", "token_add", "lq_inject_mode='token_add'"),
        ("lq_aux_rgb_head_latent_block_idx", 2, "lq_aux_rgb_head_latent_block_idx=2"),
        ("lq_gate_type", "sigmoid", "lq_gate_type='sigmoid'"),
        ("lq_conv_padding_mode", "reflect", "lq_conv_padding_mode='reflect'"),
        ("rope_mode", "yarn", "rope_mode='yarn'"),
        ("frobnicate", 1, r"unknown PidNet constructor kwargs: \['frobnicate'\]"),
        ("num_groups", 5, "hidden_size=1536 is not divisible by num_groups=5"),
        ("sr_scale", 1, "integer latent->patch-grid ratios"),
        ("hidden_size", 0, "hidden_size must be a positive int, got 0"),
        ("lq_latent_unpatchify_factor", 3, "lq_latent_channels=16 is not divisible"),
    ],
)
def test_from_kwargs_rejects_unsupported(data_dir, key, value, match):
    kw = _kwargs(data_dir)
    kw[key] = value
    with pytest.raises(ValueError, match=match):
        NetConfig.from_kwargs(kw)


def test_from_kwargs_ignores_training_only_keys(data_dir):
    kw = _kwargs(data_dir)
    kw.update(repa_encoder_index=3, zero_init_lq=False, train_lq_proj_only=True, num_text_blocks=9)
    kw.update(ed_compress_ratio=4, ed_hidden_size=64)  # ignored while enable_ed is false
    assert NetConfig.from_kwargs(kw) == NetConfig()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tiny_keeps_the_code_path_and_runs(variant):
    big, small = VARIANTS[variant], tiny(VARIANTS[variant])
    same = (
        "lq_latent_channels",
        "lq_latent_unpatchify_factor",
        "latent_spatial_down_factor",
        "sr_scale",
        "lq_gate_type",
        "lq_conv_padding_mode",
        "lq_aux_rgb_head",
        "pit_lq_inject",
        "rope_mode",
        "lq_ratio",
        "patch_size",
    )
    assert all(getattr(big, k) == getattr(small, k) for k in same)
    assert (small.hidden_size, small.num_groups, small.txt_embed_dim, small.lq_hidden_dim) == (
        32,
        2,
        24,
        16,
    )
    assert small.rope_ref_h == big.rope_ref_h // 16
    net = PidNet(small).eval()
    assert sum(p.numel() for p in net.parameters()) < 3_000_000
    f = small.lq_ratio * small.lq_latent_unpatchify_factor * 16
    H, W = 2 * f, f
    with torch.no_grad():
        out = net(
            torch.randn(1, 3, H, W),
            torch.full((1,), 866.0),
            torch.randn(1, 8, 24),
            torch.randn(1, small.lq_latent_channels, 2, 1),
            torch.full((1,), 0.2),
        )
    assert out.shape == (1, 3, H, W) and torch.isfinite(out).all()


def test_registry_has_the_ten_released_pairs():
    assert len(REGISTRY) == 10
    assert set(BACKBONES) == {b for b, _ in REGISTRY}
    assert {c for _, c in REGISTRY} == set(CKPT_TYPES)
    for (backbone, ckpt_type), spec in REGISTRY.items():
        assert (spec.backbone, spec.ckpt_type) == (backbone, ckpt_type)
        assert spec.net_config is VARIANTS[spec.variant]
        assert spec.experiment.startswith("PiD_") and spec.experiment.endswith("_distill_4step")
        assert spec.t_list == (0.999, 0.866, 0.634, 0.342, 0.0) and spec.steps == 4
    assert [b for b in BACKBONES.values() if b.noise_frame == "vp"] == [BACKBONES["sdxl"]]
    assert {b for (b, _), s in REGISTRY.items() if s.fixed_hw} == {"dinov2", "siglip"}
    assert {b.name for b in BACKBONES.values() if b.is_rae} == {"dinov2", "siglip"}


@pytest.mark.parametrize(
    "backbone, ckpt_type, experiment",
    [
        ("flux", "2k", "PiD_res2k_sr4x_official_flux_distill_4step"),
        ("ZImage-Turbo", "2kto4k_v1pt5", "PiD_v1pt5_res2kto4k_sr4x_official_flux_distill_4step"),
        ("flux2-klein-9b", "2k", "PiD_res2k_sr4x_official_flux2_distill_4step"),
        ("qwenimage-2512", None, "PiD_v1pt5_res2kto4k_sr4x_official_qwenimage_distill_4step"),
        ("sd3", None, "PiD_res2kto4k_sr4x_official_sd3_distill_4step"),
        ("dinov2", None, "PiD_res2k_sr4x_official_dinov2_distill_4step"),
        ("siglip", "2K", "PiD_res2k_sr8x_official_siglip_distill_4step"),
        ("flux", None, "PiD_v1pt5_res2kto4k_sr4x_official_flux_distill_4step"),
    ],
)
def test_resolve_checkpoint(backbone, ckpt_type, experiment):
    spec = resolve_checkpoint(backbone, ckpt_type)
    assert spec.experiment == experiment
    assert spec.filename == f"checkpoints/{experiment}/model_ema_bf16.pth"


def test_aliases_resolve_to_canonical_backbones():
    assert set(ALIASES.values()) <= set(BACKBONES)
    for alias, canonical in ALIASES.items():
        assert resolve_checkpoint(alias) is resolve_checkpoint(canonical)


@pytest.mark.parametrize(
    "backbone, ckpt_type", [("sdxl", "2k"), ("dinov2", "2kto4k"), ("sd15", None)]
)
def test_unknown_pairs_list_the_valid_ones(backbone, ckpt_type):
    with pytest.raises(ValueError) as err:
        resolve_checkpoint(backbone, ckpt_type)
    msg = str(err.value)
    assert repr(backbone) in msg
    for b, c in REGISTRY:
        assert f"{b}/{c}" in msg


@pytest.mark.parametrize(
    "backbone, hw, out",
    [("flux", (64, 64), (2048, 2048)), ("flux2", (32, 24), (2048, 1536)), ("siglip", (16, 16), (2048, 2048)),
     ("dinov2", (32, 32), (2048, 2048)), ("sdxl", (54, 96), (1728, 3072))],
)  # fmt: skip
def test_output_hw(backbone, hw, out):
    spec = resolve_checkpoint(backbone)
    assert spec.output_hw(*hw) == out
    cfg = spec.net_config
    # The output patch grid is exactly latent grid x unpatchify x ratio (docs/model.md#resolution).
    f = cfg.lq_latent_unpatchify_factor * cfg.lq_ratio * cfg.patch_size
    assert f == spec.vae_scale * spec.sr_scale
    assert (out[0] // f, out[1] // f) == hw


def test_checkpoint_spec_validates_against_variant():
    with pytest.raises(ValueError, match="reads 16 channels at 4x; backbone 'flux2' has 128 at 4x"):
        CheckpointSpec("flux2", "2k", "x", "v1_sr4x_c16")
    with pytest.raises(ValueError, match="unknown variant 'v9'"):
        CheckpointSpec("flux", "2k", "x", "v9")
