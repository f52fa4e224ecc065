"""The decoder's hot path: conditioning counted once, one graph per variant, bf16 weights."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pid_batch.config import VARIANTS, tiny
from pid_batch.model import PidNet
from pid_batch.model.flops import count_decode_flops
from pid_batch.sampling import sample, student_t_list


def _inputs(cfg, B=2, H=128, W=256):
    f = cfg.lq_ratio * cfg.lq_latent_unpatchify_factor * cfg.patch_size
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(B, 3, H, W, generator=g),
        torch.randn(B, cfg.txt_max_length, cfg.txt_embed_dim, generator=g),
        torch.randn(B, cfg.lq_latent_channels, H // f, W // f, generator=g),
        torch.tensor([0.0, 0.4])[:B],
    )


@pytest.mark.parametrize("variant", ["v1_sr4x_c16", "v1p5_sr4x_c16", "v1_sr8x_c1152_siglip"])
def test_decode_flops_match_flop_counter_over_a_whole_sample(variant):
    cfg = tiny(VARIANTS[variant])
    torch.manual_seed(0)
    net = PidNet(cfg).eval()
    noise, caption, lq, sigma = _inputs(cfg)
    steps = 4
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        sample(net, noise, caption, lq, sigma, student_t_list(steps=steps))
    expected = counter.get_total_flops()
    assert noise.shape[0] * count_decode_flops(cfg, 128, 256, steps).total == expected


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_zero_graph_breaks_for_every_tiny_twin(variant):
    cfg = tiny(VARIANTS[variant])
    torch.manual_seed(0)
    net = PidNet(cfg).eval().requires_grad_(False)
    x, caption, lq, sigma = _inputs(cfg)
    t = torch.tensor(999.0).expand(x.shape[0])
    torch._dynamo.reset()
    cond_ex = torch._dynamo.explain(net.condition)(caption, lq, 128, 256)
    cond = net.condition(caption, lq, 128, 256)
    step_ex = torch._dynamo.explain(net.step)(x, t, cond, sigma)
    assert (cond_ex.graph_break_count, step_ex.graph_break_count) == (0, 0), (
        cond_ex.break_reasons + step_ex.break_reasons
    )
    assert (cond_ex.graph_count, step_ex.graph_count) == (1, 1)
