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


@pytest.mark.parametrize("name", ["tiny_v1", "tiny_v1p5", "tiny_v1p5_flux2"])
def test_bf16_weight_images_vs_fp32_reference(data_dir, name):
    """uint8 images of bf16 weights under bf16 autocast (CUDA default) vs fp32 weights (reference)."""
    import json

    from safetensors.torch import load_file

    from pid_batch.backbones.tensors import to_uint8
    from pid_batch.model import build_net

    meta = json.loads((data_dir / f"{name}.json").read_text())
    T = load_file(str(data_dir / f"{name}.safetensors"))
    net = build_net(meta["effective_constructor_kwargs"]).eval()
    net.load_state_dict({k[4:]: v for k, v in T.items() if k.startswith("net.")}, strict=True)
    args = [T[f"inputs.{k}"] for k in ("caption_embs", "lq_latent", "degrade_sigma")]
    run = dict(step_noises=[T[f"sampler.step_noise.{k}"] for k in range(3)])
    run.update(timescale=meta["timescale"], t_list=T["sampler.t_list"].tolist())
    fp32 = to_uint8(sample(net, T["sampler.noise_init"], *args, **run))
    bf16_net = build_net(meta["effective_constructor_kwargs"]).eval().to(torch.bfloat16)
    bf16_net.load_state_dict(net.state_dict(), strict=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = to_uint8(sample(bf16_net, T["sampler.noise_init"], *args, **run))
    diff = abs(bf16.astype(int) - fp32.astype(int))
    print(f"{name}: bf16-weight vs fp32 uint8 max|d| = {diff.max()}, mean {diff.mean():.3f}")
    assert 0 < diff.max() <= 8  # measured 2, 4, 3 (tiny_v1, tiny_v1p5, tiny_v1p5_flux2)


def test_job_compile_mode_reaches_the_compiled_bucket(monkeypatch):
    """`model.compile_mode` (e.g. CUDA graphs) is what the decoder hands torch.compile."""
    from pid_batch.decoder import CompiledNet
    from pid_batch.job import JobConfig, JobConfigError, ModelConfig
    from pid_batch.stages import decode

    seen = []
    monkeypatch.setattr(
        CompiledNet, "__init__", lambda self, net, fullgraph=True, mode=None: seen.append(mode)
    )
    model = ModelConfig(preset="tiny", compile=True, compile_mode="reduce-overhead")
    decoder = decode._real_decoder(JobConfig(input="in", output="out", model=model))
    decoder._net_for(64, 64, 1)
    assert seen == ["reduce-overhead"]
    with pytest.raises(JobConfigError, match="compile_mode"):
        ModelConfig(preset="tiny", compile=True, compile_mode="fast")
