"""Backbone VAEs: image -> PiD-form latent and native baseline decode, on tiny random diffusers VAEs."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from pid_batch.backbones import backbone as convention
from pid_batch.backbones.tensors import denormalize_vae_latent, to_pid
from pid_batch.backbones.vae import VaeCodec, center_crop_box, load_vae, make_tiny_vae

VAE_BACKBONES = ("flux", "sd3", "sdxl", "flux2", "qwenimage")
H, W = 53, 75  # not a multiple of 8 or 16 on either side
# Expected centred crops (left, top, right, bottom): 8× VAEs keep 48×72, flux2 (16 px cells) 48×64.
EXPECTED_BOX = {8: (1, 2, 73, 50), 16: (5, 2, 69, 50)}


def _image(h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    """Smooth gradient plus noise, so crops and positions matter."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([yy * 255 / h, xx * 255 / w, (yy + xx) * 127 / (h + w)], axis=-1)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def vae_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vaes")
    return {b: make_tiny_vae(root, b) for b in VAE_BACKBONES}


@pytest.fixture(scope="module")
def codecs(vae_dirs):
    return {b: VaeCodec.from_path(vae_dirs[b], b) for b in VAE_BACKBONES}


def _reference_raw_mean(vae, backbone: str, crop: np.ndarray) -> torch.Tensor:
    """Posterior mean straight from diffusers (frame axis added by hand for Qwen-Image)."""
    x = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 127.5 - 1.0  # [1, 3, H, W]
    if backbone == "qwenimage":
        return vae.encode(x[:, :, None]).latent_dist.mean[:, :, 0]
    return vae.encode(x).latent_dist.mean


def _reference_normalise(vae, backbone: str, z: torch.Tensor) -> torch.Tensor:
    """The LDM-space latent as the diffusers pipelines compute it from the VAE's own config."""
    cfg = vae.config
    if backbone == "flux2":
        b, c, h, w = z.shape
        packed = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return vae.bn(packed.reshape(b, c * 4, h // 2, w // 2))  # eval-mode BN, running stats
    if backbone == "qwenimage":
        mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1)
        std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1)
        return (z - mean) / std
    return (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor


def _reference_decode(vae, backbone: str, z: torch.Tensor) -> torch.Tensor:
    if backbone == "qwenimage":
        return vae.decode(z[:, :, None]).sample[:, :, 0].clamp(-1, 1)
    return vae.decode(z).sample.clamp(-1, 1)


@pytest.mark.parametrize("backbone", VAE_BACKBONES)
def test_tiny_vae_is_small_and_of_the_right_class(vae_dirs, codecs, backbone):
    size = sum(f.stat().st_size for f in vae_dirs[backbone].rglob("*") if f.is_file())
    assert size < 1_000_000
    expected = {"flux2": "AutoencoderKLFlux2", "qwenimage": "AutoencoderKLQwenImage"}
    assert type(codecs[backbone].vae).__name__ == expected.get(backbone, "AutoencoderKL")


@pytest.mark.parametrize("backbone", VAE_BACKBONES)
def test_encode_crops_and_gives_pid_form(codecs, backbone):
    codec, conv = codecs[backbone], convention(backbone)
    assert codec.crop_multiple == (16 if backbone == "flux2" else 8)
    img = _image()
    [(lat, box)] = codec.encode([img])
    assert box == EXPECTED_BOX[codec.crop_multiple]
    left, top, right, bottom = box
    h, w = bottom - top, right - left
    assert lat.dtype == torch.float32 and lat.device.type == "cpu"
    assert tuple(lat.shape) == (conv.channels, h // conv.vae_scale, w // conv.vae_scale)
    pid, sigma = to_pid(lat, backbone, "pid")
    assert torch.equal(pid, lat) and sigma == 0.0
    # the crop box is the one actually encoded
    [(lat_crop, box_crop)] = codec.encode([np.ascontiguousarray(img[top:bottom, left:right])])
    assert box_crop == (0, 0, w, h)
    torch.testing.assert_close(lat_crop, lat, rtol=0, atol=1e-6)
    # decode gives an image of the cropped size
    [out] = codec.decode([lat])
    assert out.dtype == np.uint8 and out.shape == (h, w, 3)
    assert codec.last_encode_ms > 0 and codec.last_decode_ms > 0


@pytest.mark.parametrize("backbone", VAE_BACKBONES)
def test_encode_is_posterior_mean_normalised_like_diffusers(codecs, backbone):
    codec = codecs[backbone]
    img = _image(seed=3)
    [(lat, (left, top, right, bottom))] = codec.encode([img])
    [(again, _)] = codec.encode([img])
    assert torch.equal(lat, again)  # deterministic: the mean, never a sample
    with torch.inference_mode():
        raw = _reference_raw_mean(codec.vae, backbone, img[top:bottom, left:right])
        want = _reference_normalise(codec.vae, backbone, raw)[0]
        assert lat.abs().mean() > 1e-3  # the tiny VAE's latent is not trivially zero
        torch.testing.assert_close(lat, want, rtol=1e-5, atol=1e-5)
        # native decode of the PiD latent == raw VAE decode of the raw posterior mean
        want_img = _reference_decode(codec.vae, backbone, raw)[0]
    back = denormalize_vae_latent(lat, backbone, flux2_bn=codec.flux2_bn)
    torch.testing.assert_close(back, raw[0], rtol=1e-5, atol=1e-5)  # normalisation round trip
    [got_img] = codec.decode_float([lat])
    # the ~1e-7 round-trip error, amplified by the random decoder
    torch.testing.assert_close(got_img, want_img, rtol=0, atol=1e-4)
    want_u8 = ((want_img + 1) * 127.5).to(torch.uint8).permute(1, 2, 0).numpy()
    [got_u8] = codec.decode([lat])
    assert np.abs(got_u8.astype(int) - want_u8.astype(int)).max() <= 1


def test_flux2_bn_stats_are_used(codecs):
    codec = codecs["flux2"]
    mean, var = codec.flux2_bn
    assert mean.shape == (128,) and var.shape == (128,)
    assert torch.equal(mean, codec.vae.bn.running_mean) and not torch.all(mean == 0)
    assert not torch.allclose(var, torch.ones(128))


def test_mixed_sizes_batch_like_single_images(codecs):
    codec = codecs["flux"]
    images = [_image(seed=0), _image(40, 33, seed=1), _image(seed=2)]
    batched = codec.encode(images)
    for img, (lat, box) in zip(images, batched, strict=True):
        [(single, single_box)] = codec.encode([img])
        assert box == single_box
        torch.testing.assert_close(lat, single, rtol=1e-5, atol=1e-5)
    assert batched[1][1] == (0, 0, 32, 40)
    decoded = codec.decode([lat for lat, _ in batched])
    assert [d.shape for d in decoded] == [(48, 72, 3), (40, 32, 3), (48, 72, 3)]


def test_max_batch_splits_groups(vae_dirs):
    codec = VaeCodec.from_path(vae_dirs["sdxl"], "sdxl", max_batch=2)
    images = [_image(seed=s) for s in range(5)]
    got = codec.encode(images)
    ref = VaeCodec.from_path(vae_dirs["sdxl"], "sdxl").encode(images)
    for (a, _), (b, _) in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_crop_multiple_override(vae_dirs):
    codec = VaeCodec.from_path(vae_dirs["sd3"], "sd3", crop_multiple=16)
    [(lat, box)] = codec.encode([_image()])
    assert box == EXPECTED_BOX[16] and tuple(lat.shape) == (16, 6, 8)
    with pytest.raises(ValueError, match="crop_multiple must be a positive multiple of 16; got 8"):
        VaeCodec.from_path(vae_dirs["flux2"], "flux2", crop_multiple=8)


def test_center_crop_box():
    assert center_crop_box(53, 75, 8) == (1, 2, 73, 50)
    assert center_crop_box(64, 64, 16) == (0, 0, 64, 64)
    with pytest.raises(
        ValueError, match=r"image 7×100 \(H×W\) is smaller than the VAE's crop multiple 8"
    ):
        center_crop_box(7, 100, 8)


def test_bad_images_raise(codecs):
    codec = codecs["sdxl"]
    with pytest.raises(
        ValueError, match=r"image 1: expected an H×W×3 uint8 array; got dtype float32"
    ):
        codec.encode([_image(), _image().astype(np.float32)])
    with pytest.raises(ValueError, match=r"shape \(16, 16, 4\)"):
        codec.encode([np.zeros((16, 16, 4), np.uint8)])
    with pytest.raises(ValueError, match="smaller than the VAE's crop multiple"):
        codec.encode([np.zeros((4, 16, 3), np.uint8)])
    with pytest.raises(ValueError, match=r"sdxl decode needs \[4, h, w\]; got shape \(16, 6, 8\)"):
        codec.decode([torch.zeros(16, 6, 8)])


@pytest.mark.parametrize("backbone", ["dinov2", "siglip"])
def test_rae_backbones_have_no_vae(tmp_path, backbone):
    with pytest.raises(ValueError, match="RAE.*not available for RAE backbones"):
        load_vae(tmp_path, backbone)
    with pytest.raises(ValueError, match="not available for RAE backbones"):
        VaeCodec(None, backbone)
    with pytest.raises(ValueError, match="not available for RAE backbones"):
        make_tiny_vae(tmp_path, backbone)


def test_pipeline_folder_and_alias(vae_dirs, tmp_path):
    shutil.copytree(vae_dirs["flux"], tmp_path / "pipe" / "vae")
    vae = load_vae(tmp_path / "pipe", "zimage")  # zimage uses the Flux1 VAE
    assert type(vae).__name__ == "AutoencoderKL" and vae.config.latent_channels == 16
    with pytest.raises(ValueError, match="no diffusers VAE at .*expected config.json"):
        load_vae(tmp_path / "empty", "flux")


def test_wrong_vae_for_backbone(vae_dirs):
    with pytest.raises(
        ValueError, match="_class_name is 'AutoencoderKLFlux2'; the flux VAE is 'AutoencoderKL'"
    ):
        load_vae(vae_dirs["flux2"], "flux")
    with pytest.raises(ValueError, match="latent_channels is 4, but the sd3 convention needs 16"):
        load_vae(vae_dirs["sdxl"], "sd3")
    with pytest.raises(
        ValueError, match="scaling_factor is 0.3611, but the sd3 convention needs 1.5305"
    ):
        load_vae(vae_dirs["flux"], "sd3")


def test_bf16_keeps_flux2_bn_stats_fp32(vae_dirs, codecs):
    codec = VaeCodec.from_path(vae_dirs["flux2"], "flux2", dtype=torch.bfloat16)
    assert codec.dtype == torch.bfloat16
    assert codec.vae.bn.running_mean.dtype == torch.float32
    assert torch.equal(codec.flux2_bn[0], codecs["flux2"].flux2_bn[0])
    [(lat, _)] = codec.encode([_image()])
    [(ref, _)] = codecs["flux2"].encode([_image()])
    assert lat.dtype == torch.float32
    torch.testing.assert_close(lat, ref, rtol=0.05, atol=0.05)
