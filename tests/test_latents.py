"""Per-backbone latent conventions: conversions cross-checked against diffusers' own pack/unpack code."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

from pid_batch import backbones as B
from pid_batch.backbones import backbone as convention
from pid_batch.backbones.arrays import dinov2_sigma, output_hw, sigma_out_of_distribution
from pid_batch.backbones.tensors import (
    denormalize_vae_latent,
    flux2_unpatchify,
    noise_latent,
    normalize_vae_latent,
    to_pid,
)


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _bn_stats(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(128, generator=g), torch.rand(128, generator=g) * 3 + 0.01


# ---------------------------------------------------------------- names and table


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("zimage", "flux"),
        ("zimage-turbo", "flux"),
        ("flux2-klein-4b", "flux2"),
        ("flux2-klein-9b", "flux2"),
        ("qwenimage-2512", "qwenimage"),
        ("SDXL", "sdxl"),
        ("siglip", "siglip"),
    ],
)
def test_aliases_resolve(alias, name):
    assert convention(alias).name == name


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(ValueError, match="unknown backbone 'sd15'.*flux2-klein-4b.*qwenimage"):
        convention("sd15")


def test_convention_table():
    got = {n: (c.channels, c.vae_scale, c.noise_frame, c.sr_scale) for n, c in B.BACKBONES.items()}
    assert got == {
        "flux": (16, 8, "flow", 4),
        "flux2": (128, 16, "flow", 4),
        "sd3": (16, 8, "flow", 4),
        "sdxl": (4, 8, "vp", 4),
        "qwenimage": (16, 8, "flow", 4),
        "dinov2": (768, 16, "flow", 4),
        "siglip": (1152, 16, "flow", 8),
    }
    assert convention("flux").packed_channels == 64
    assert convention("qwenimage").packed_channels == 64
    assert convention("flux2").packed_channels == 128
    assert convention("dinov2").fixed_hw == (32, 32)
    assert convention("siglip").fixed_hw == (16, 16)


# ---------------------------------------------------------------- diffusers packing


def test_flux_packed_matches_diffusers():
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    x = _rand(16, 6, 10)  # non-square latent: 48×80 px LDM image
    packed = FluxPipeline._pack_latents(x[None], 1, 16, 6, 10)[0]
    assert packed.shape == (15, 64)
    lq, sigma = to_pid(packed, "zimage", "diffusers", height=48, width=80)
    assert torch.equal(lq, x) and sigma == 0.0
    ref = FluxPipeline._unpack_latents(packed[None], 48, 80, 8)[0]
    assert torch.equal(lq, ref)
    # diffusers floors the pixel size to multiples of 16; so do we
    assert torch.equal(to_pid(packed, "flux", "diffusers", height=50, width=95)[0], x)


def test_flux_packed_square_without_size():
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    x = _rand(16, 8, 8)
    packed = FluxPipeline._pack_latents(x[None], 1, 16, 8, 8)[0]
    assert torch.equal(to_pid(packed, "flux", "diffusers")[0], x)
    non_square = FluxPipeline._pack_latents(_rand(16, 4, 8)[None], 1, 16, 4, 8)[0]
    with pytest.raises(ValueError, match="8 tokens, not a square grid; pass height and width"):
        to_pid(non_square, "flux", "diffusers")
    with pytest.raises(ValueError, match="16 tokens but height=48, width=48 give a 3×3 = 9"):
        to_pid(FluxPipeline._pack_latents(_rand(16, 4, 16)[None], 1, 16, 4, 16)[0], "flux",
               "diffusers", height=48, width=48)  # fmt: skip


def test_qwenimage_packed_and_frame_axis_match_diffusers():
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline

    x = _rand(16, 4, 6)
    packed = QwenImagePipeline._pack_latents(x[None, None], 1, 16, 4, 6)[0]
    lq, _ = to_pid(packed, "qwenimage-2512", "diffusers", height=32, width=48)
    assert torch.equal(lq, x)
    unpacked = QwenImagePipeline._unpack_latents(packed[None], 32, 48, 8)[0]  # [16, 1, 4, 6]
    assert unpacked.shape == (16, 1, 4, 6)
    assert torch.equal(to_pid(unpacked, "qwenimage", "diffusers")[0], x)
    assert torch.equal(to_pid(x, "qwenimage", "diffusers")[0], x)


def test_flux2_packed_matches_diffusers_ids():
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

    x = _rand(128, 3, 5)  # PiD form, BN-normalised; LDM image 48×80 px
    packed = Flux2Pipeline._pack_latents(x[None])[0]
    lq, _ = to_pid(packed, "flux2", "diffusers", height=48, width=80)
    assert torch.equal(lq, x)
    ids = Flux2Pipeline._prepare_latent_ids(x[None])
    assert torch.equal(Flux2Pipeline._unpack_latents_with_ids(packed[None], ids)[0], lq)
    # row-major token order: token i·w + j holds cell (i, j)
    assert torch.equal(packed[1 * 5 + 3], x[:, 1, 3])


def test_flux2_raw_klein_latent_pack_and_bn():
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline

    mean, var = _bn_stats()
    z = _rand(32, 6, 8, seed=3)  # raw klein output for a 48×64 px image
    lq, _ = to_pid(z, "flux2-klein-4b", "diffusers", flux2_bn=(mean, var), height=48, width=64)
    assert lq.shape == (128, 3, 4)
    ref = (Flux2KleinPipeline._patchify_latents(z[None])[0] - mean.view(-1, 1, 1)) / torch.sqrt(
        var.view(-1, 1, 1) + 1e-4
    )
    torch.testing.assert_close(lq, ref, rtol=0, atol=1e-6)
    # element position: channel c·4 + a·2 + b at (i, j) comes from raw (c, 2i+a, 2j+b)
    c, a, b, i, j = 7, 1, 0, 2, 3
    k = c * 4 + a * 2 + b
    manual = (z[c, 2 * i + a, 2 * j + b] - mean[k]) / math.sqrt(float(var[k]) + 1e-4)
    assert abs(float(lq[k, i, j]) - float(manual)) < 1e-6
    # klein's final output is unpatchify(x·std + mean): to_pid must invert it
    std = torch.sqrt(var.view(-1, 1, 1) + 1e-4)
    raw = Flux2KleinPipeline._unpatchify_latents((lq * std + mean.view(-1, 1, 1))[None])[0]
    torch.testing.assert_close(to_pid(raw, "flux2", "diffusers", flux2_bn=(mean, var))[0], lq)
    torch.testing.assert_close(
        flux2_unpatchify(lq), Flux2KleinPipeline._unpatchify_latents(lq[None])[0]
    )


def test_flux2_raw_without_bn_stats_says_where_to_get_them():
    with pytest.raises(ValueError, match=r"flux2_bn=\(vae.bn.running_mean, vae.bn.running_var\)"):
        to_pid(_rand(32, 4, 4), "flux2", "diffusers", sample_id="k1")
    with pytest.raises(ValueError, match="running_var must be 128 finite values"):
        to_pid(_rand(32, 4, 4), "flux2", "diffusers", flux2_bn=(torch.zeros(128), torch.ones(64)))


def test_flux2_packed_accepts_unpacked_form_and_rejects_raw_in_pid_format():
    x = _rand(128, 2, 2)
    assert torch.equal(to_pid(x, "flux2", "diffusers")[0], x)
    with pytest.raises(
        ValueError,
        match=r"flux2 latent must have 128 channels \[128, h, w\]; got shape \(32, 4, 4\)",
    ):
        to_pid(_rand(32, 4, 4), "flux2", "pid")


@pytest.mark.parametrize(("backbone", "c"), [("sd3", 16), ("sdxl", 4), ("zimage-turbo", 16)])
def test_unpacked_backbones_pass_through(backbone, c):
    x = _rand(c, 6, 8).to(torch.bfloat16)
    lq, sigma = to_pid(x, backbone, "diffusers", height=48, width=64)
    assert lq.dtype == torch.float32 and torch.equal(lq, x.float()) and sigma == 0.0
    x32 = x.float()
    out = to_pid(x32, backbone, "pid")[0]
    assert torch.equal(out, x32) and out.data_ptr() != x32.data_ptr()  # a copy, not an alias


def test_height_width_must_match_unpacked_latent():
    with pytest.raises(ValueError, match="pass both height and width"):
        to_pid(_rand(16, 4, 4), "sd3", "diffusers", height=32)
    with pytest.raises(ValueError, match="latent is 5×7 but height=64, width=56 imply 8×7"):
        to_pid(_rand(16, 5, 7), "sd3", "diffusers", height=64, width=56)


# ---------------------------------------------------------------- sigma frames


def test_sdxl_euler_to_vp_tensor_and_sigma():
    x = _rand(4, 3, 3)
    lq, sigma = to_pid(x, "sdxl", "diffusers", 3.0, sigma_frame="euler")
    assert math.isclose(sigma, 3.0 / math.sqrt(10.0), rel_tol=1e-12)
    torch.testing.assert_close(lq, x / math.sqrt(10.0), rtol=0, atol=1e-7)
    lq0, sigma0 = to_pid(x, "sdxl", "diffusers", 0.0, sigma_frame="euler")
    assert torch.equal(lq0, x) and sigma0 == 0.0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy copy= notice inside diffusers
def test_sdxl_euler_matches_scheduler_scale_model_input():
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    sched.set_timesteps(30)
    k = 26
    x = _rand(4, 4, 4, seed=5)
    lq, sigma = to_pid(x, "sdxl", "diffusers", sched.sigmas[k], sigma_frame="euler")
    ref = sched.scale_model_input(x, sched.timesteps[k])
    torch.testing.assert_close(lq, ref, rtol=1e-6, atol=1e-7)
    s_eu = float(sched.sigmas[k])
    assert math.isclose(sigma, s_eu / math.sqrt(s_eu**2 + 1), rel_tol=1e-9)
    assert 0 < sigma < 1


def test_sdxl_intermediate_needs_explicit_frame():
    with pytest.raises(
        ValueError, match="sample 'q': sdxl: intermediate SDXL latents need sigma_frame"
    ):
        to_pid(_rand(4, 2, 2), "sdxl", "diffusers", 0.3, sample_id="q")
    lq, sigma = to_pid(_rand(4, 2, 2), "sdxl", "diffusers", 0.3, sigma_frame="vp")
    assert sigma == 0.3
    assert to_pid(_rand(4, 2, 2), "sdxl", "pid", 0.3)[1] == 0.3  # pid form is VP already


def test_sigma_frame_must_match_backbone():
    with pytest.raises(ValueError, match=r"flux: sigma_frame must be one of \('flow',\)"):
        to_pid(_rand(16, 2, 2), "flux", "pid", 0.5, sigma_frame="euler")


def test_flow_sigma_passes_through_scheduler_tensor():
    sigmas = torch.linspace(1, 0, 29)
    lq, sigma = to_pid(_rand(16, 2, 2), "sd3", "diffusers", sigmas[24])
    assert sigma == float(sigmas[24])
    assert to_pid(_rand(16, 2, 2), "sd3", "pid", np.float32(0.25))[1] == 0.25


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf")])
def test_sigma_out_of_range(bad):
    with pytest.raises(ValueError, match="sample 's7': flux"):
        to_pid(_rand(16, 2, 2), "flux", "pid", bad, sample_id="s7")


def test_sigma_non_scalar_or_text_rejected():
    for bad in ("0.5", True, torch.tensor([0.1, 0.2])):
        with pytest.raises(ValueError, match="sigma must be"):
            to_pid(_rand(16, 2, 2), "flux", "pid", bad)


def test_sigma_above_training_range_is_allowed_but_flagged():
    assert to_pid(_rand(16, 2, 2), "flux", "pid", 0.9)[1] == 0.9
    assert sigma_out_of_distribution(0.9) and not sigma_out_of_distribution(0.8)
    assert not sigma_out_of_distribution(0.0)


def test_dinov2_sigma_schedule():
    n = 50
    s = math.sqrt(768 * 32 * 32 / 4096)
    t = torch.linspace(0, 1 - 1 / 1000, n + 1, dtype=torch.float64)
    for k in (0, 1, 10, 25, 49):
        u = 1 - float(t[k])
        assert math.isclose(dinov2_sigma(k, n), s * u / (1 + (s - 1) * u), rel_tol=1e-12)
    assert dinov2_sigma(0, n) == pytest.approx(1.0)
    assert dinov2_sigma(n, n) == 0.0
    assert math.isclose(
        dinov2_sigma(25, 50), 13.856406460551018 * 0.5005 / (1 + 12.856406460551018 * 0.5005)
    )
    vals = [dinov2_sigma(k, n) for k in range(n + 1)]
    assert all(a > b for a, b in zip(vals[:-1], vals[1:], strict=True))
    for bad in ((-1, n), (n + 1, n), (0, 0), (1.5, n)):
        with pytest.raises(ValueError):
            dinov2_sigma(*bad)


# ---------------------------------------------------------------- RAE features


@pytest.mark.parametrize(("backbone", "c", "hw"), [("dinov2", 768, 32), ("siglip", 1152, 16)])
def test_rae_features_pid_form_and_tokens(backbone, c, hw):
    x = _rand(c, hw, hw)
    assert torch.equal(to_pid(x, backbone)[0], x)
    tokens = x.permute(1, 2, 0).reshape(hw * hw, c)  # row-major token sequence
    lq, _ = to_pid(tokens.numpy(), backbone)
    assert torch.equal(lq, x)
    assert torch.equal(lq[5, 2, 3], tokens[2 * hw + 3, 5])
    with pytest.raises(
        ValueError, match=rf"{backbone} latent must have {c} channels \[{c}, {hw}, {hw}\]"
    ):
        to_pid(_rand(c, hw * 2, hw * 2), backbone, sample_id="r")
    with pytest.raises(ValueError, match="'diffusers' does not apply to RAE backbones"):
        to_pid(x, backbone, "diffusers")


# ---------------------------------------------------------------- validation messages


def test_wrong_channels_message():
    msg = r"sample 'abc': flux latent must have 16 channels \[16, h, w\] \(or packed \[seq, 64\]\); got shape \(4, 64, 64\)"
    with pytest.raises(ValueError, match=msg):
        to_pid(_rand(4, 64, 64), "flux", "diffusers", sample_id="abc")


@pytest.mark.parametrize(
    ("latent", "match"),
    [
        (
            _rand(16, 8),
            r"sample 'x': sd3 latent must have 16 channels \[16, h, w\]; got shape \(16, 8\)",
        ),
        (_rand(1, 16, 4, 4), r"got shape \(1, 16, 4, 4\)"),
        (torch.zeros(16, 0, 4), r"got shape \(16, 0, 4\)"),
        (torch.full((16, 2, 2), float("nan")), "sample 'x': sd3 latent contains NaN or inf"),
        (torch.ones(16, 2, 2, dtype=torch.int64), "floating-point tensor; got dtype torch.int64"),
    ],
)
def test_invalid_latents(latent, match):
    with pytest.raises(ValueError, match=match):
        to_pid(latent, "sd3", sample_id="x")


def test_packed_wrong_last_dim():
    with pytest.raises(
        ValueError,
        match=r"qwenimage latent must have 16 channels .*packed \[seq, 64\].*\(16, 128\)",
    ):
        to_pid(_rand(16, 128), "qwenimage", "diffusers")


def test_bad_latent_format():
    with pytest.raises(ValueError, match="latent_format must be one of"):
        to_pid(_rand(16, 2, 2), "flux", "packed")


# ---------------------------------------------------------------- VAE normalisation


def test_qwenimage_constants_exact_and_match_diffusers_defaults():
    from diffusers import AutoencoderKLQwenImage

    params = inspect.signature(AutoencoderKLQwenImage.__init__).parameters
    assert list(B.BACKBONES["qwenimage"].latents_mean) == params["latents_mean"].default
    assert list(B.BACKBONES["qwenimage"].latents_std) == params["latents_std"].default
    z = _rand(16, 2, 3)
    out = normalize_vae_latent(z, "qwenimage")
    c = 8
    assert float(out[c, 1, 2]) == pytest.approx((float(z[c, 1, 2]) - 0.4134) / 3.2687, rel=1e-6)


def test_scalar_normalisations():
    z = torch.tensor([0.1159, 1.0]).view(1, 1, 2).expand(16, 1, 2)
    torch.testing.assert_close(
        normalize_vae_latent(z, "flux")[0, 0], torch.tensor([0.0, 0.3611 * 0.8841])
    )
    torch.testing.assert_close(
        normalize_vae_latent(z, "sd3")[0, 0], torch.tensor([1.5305 * 0.055, 1.5305 * 0.9391])
    )
    torch.testing.assert_close(
        normalize_vae_latent(torch.ones(4, 1, 1), "sdxl"), torch.full((4, 1, 1), 0.13025)
    )


def test_flux2_normalize_matches_diffusers_encode_path():
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

    mean, var = _bn_stats(seed=9)
    z = _rand(2, 32, 4, 6)
    ref = (Flux2Pipeline._patchify_latents(z) - mean.view(1, -1, 1, 1)) / torch.sqrt(
        var.view(1, -1, 1, 1) + 1e-4
    )
    torch.testing.assert_close(
        normalize_vae_latent(z, "flux2", flux2_bn=(mean, var)), ref, rtol=0, atol=1e-6
    )
    with pytest.raises(ValueError, match="bn"):
        normalize_vae_latent(z, "flux2")


@pytest.mark.parametrize("backbone", ["flux", "flux2", "sd3", "sdxl", "qwenimage"])
def test_normalize_denormalize_round_trip(backbone):
    conv = convention(backbone)
    bn = _bn_stats() if backbone == "flux2" else None
    z = _rand(2, conv.raw_channels, 4, 6) * 2 + 0.3
    x = normalize_vae_latent(z, backbone, flux2_bn=bn)
    assert x.shape[-3] == conv.channels
    torch.testing.assert_close(
        denormalize_vae_latent(x, backbone, flux2_bn=bn), z, rtol=1e-5, atol=1e-5
    )


def test_normalize_rejects_rae_and_wrong_channels():
    with pytest.raises(ValueError, match="dinov2 features come normalised"):
        normalize_vae_latent(_rand(768, 2, 2), "dinov2")
    with pytest.raises(ValueError, match=r"sdxl raw VAE latent must be \[\.\.\., 4, H, W\]"):
        normalize_vae_latent(_rand(16, 2, 2), "sdxl")


# ---------------------------------------------------------------- noise and sizes


def test_noise_latent_frames():
    x0 = _rand(4, 3, 3)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(11))
    vp = noise_latent(x0, 0.6, "sdxl", torch.Generator().manual_seed(11))
    torch.testing.assert_close(vp, 0.8 * x0 + 0.6 * eps)
    x0 = _rand(16, 3, 3)
    flow = noise_latent(x0.to(torch.bfloat16), 0.25, "flux", torch.Generator().manual_seed(11))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(11))
    assert flow.dtype == torch.float32
    torch.testing.assert_close(flow, 0.75 * x0.to(torch.bfloat16).float() + 0.25 * eps)
    assert torch.equal(noise_latent(x0, 0.0, "sd3", torch.Generator().manual_seed(0)), x0)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        noise_latent(x0, 1.2, "flux")


def test_output_hw():
    assert output_hw((16, 64, 64), "flux", 4) == (2048, 2048)
    assert output_hw((2, 128, 27, 48), "flux2-klein-9b") == (1728, 3072)
    assert output_hw((1152, 16, 16), "siglip") == (2048, 2048)
    assert output_hw((768, 32, 32), "dinov2") == (2048, 2048)
    assert output_hw((4, 96, 128), "sdxl") == (3072, 4096)
    for shape, sr in (((16, 64, 64), 0), ((16, 0, 64), 4)):
        with pytest.raises(ValueError):
            output_hw(shape, "flux", sr)
