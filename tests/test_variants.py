"""Full-size variants on the meta device: exact key/shape maps and parameter counts; FLOP count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pid_batch.config import VARIANTS, NetConfig, tiny
from pid_batch.model import PidNet, build_net
from pid_batch.model.flops import count_flops

ROOT = Path(__file__).resolve().parents[1]


def test_all_seven_variants_have_key_files(data_dir):
    assert sorted(p.stem for p in (data_dir / "keys").glob("*.json")) == sorted(VARIANTS)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_keys_shapes_and_params(data_dir, variant):
    ref = json.loads((data_dir / "keys" / f"{variant}.json").read_text())
    cfg = VARIANTS[variant]
    assert NetConfig.from_kwargs(ref["effective_constructor_kwargs"]) == cfg
    assert NetConfig.from_kwargs(ref["constructor_kwargs"]) == cfg
    with torch.device("meta"):
        net = PidNet(cfg)
    keys = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert keys == ref["keys"]
    assert len(keys) == ref["num_keys"]
    assert sum(p.numel() for p in net.parameters()) == ref["total_params"]
    by_module: dict[str, int] = {}
    for name, p in net.named_parameters():
        top = name.split(".")[0]
        by_module[top] = by_module.get(top, 0) + p.numel()
    assert by_module == ref["params_by_top_level_module"]
    derived = ref["derived"]
    assert cfg.num_lq_outputs == derived["num_lq_outputs"]
    assert cfg.lq_ratio == derived["z_to_patch_ratio"]
    assert cfg.lq_in_channels == derived["latent_proj_in_channels"]
    assert [cfg.rope_ref_h // 16, cfg.rope_ref_w // 16] == derived["rope_ref_grid"]
    assert (cfg.head_dim, cfg.pixel_head_dim) == (
        derived["patch_head_dim"],
        derived["pixel_attn_head_dim"],
    )
    assert cfg.swiglu_hidden == derived["swiglu_hidden"]


def test_build_net_matches_variant(data_dir):
    ref = json.loads((data_dir / "keys" / "v1p5_sr4x_c128_flux2.json").read_text())
    with torch.device("meta"):
        net = build_net(ref["effective_constructor_kwargs"])
    assert net.cfg == VARIANTS["v1p5_sr4x_c128_flux2"]


@pytest.mark.parametrize("variant", ["v1_sr4x_c16", "v1p5_sr4x_c128_flux2", "v1_sr8x_c1152_siglip"])
def test_count_flops_matches_flop_counter(variant):
    cfg = tiny(VARIANTS[variant])
    torch.manual_seed(0)
    net = PidNet(cfg).eval()
    B, H, W = 2, 128, 256  # multiples of 128 (siglip: ratio 8 x patch 16)
    f = cfg.lq_ratio * cfg.lq_latent_unpatchify_factor * cfg.patch_size
    args = (
        torch.randn(B, 3, H, W),
        torch.full((B,), 999.0),
        torch.randn(B, cfg.txt_max_length, cfg.txt_embed_dim),
        torch.randn(B, cfg.lq_latent_channels, H // f, W // f),
        torch.zeros(B),
    )
    # The CPU fused SDPA kernel is not registered with FlopCounterMode; the math path is.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        net(*args)
    expected = counter.get_total_flops()
    assert B * count_flops(cfg, H, W, txt_len=300).total == expected


def test_count_flops_full_size_is_plausible():
    flops = count_flops(VARIANTS["v1p5_sr4x_c16"], 2048, 2048).total
    # ~2 * params * tokens for the patch stack alone: 2 * 1.19e9 * 16384 ≈ 39 TFLOP.
    assert 35e12 < flops < 80e12
