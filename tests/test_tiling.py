"""Tiled decoding: tile plans, blending weights, quality evidence and limits (decoder level, no Ray)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pid_batch import codecs, tiles
from pid_batch.assets import bundled
from pid_batch.backbones import TRAINED_SIZES_2K, resolve_checkpoint
from pid_batch.decoder import Decoder
from pid_batch.model.flops import count_decode_flops
from pid_batch.model.text import NullTextEncoder
from pid_batch.sample_checks import SampleError, validate_latent_shape
from pid_batch.tiled import TiledNet

FLUX = resolve_checkpoint("flux", "2k")
SDXL = resolve_checkpoint("sdxl", "2kto4k")


def make_decoder(spec=FLUX, preset="tiny", **kw) -> Decoder:
    d = Decoder(spec, preset=preset, device="cpu", **kw)
    d.text_encoder = NullTextEncoder(dim=d.cfg.txt_embed_dim, max_length=d.cfg.txt_max_length)
    return d


def demo_decoder(**kw) -> Decoder:
    return make_decoder(preset="demo", checkpoint=bundled("student"), **kw)


def demo_latents(n: int) -> list[np.ndarray]:
    """Bundled demo-autoencoder latents [16, 8, 8] of real photos (256² decodes)."""
    samples = codecs.read_shard(bundled("samples").read_bytes(), "demo_samples.safetensors")
    return [np.asarray(s.latent, np.float32) for s in samples[:n]]


def full_plan(spec, height, width, **kw) -> tiles.TilePlan | None:
    cfg = spec.net_config
    return tiles.choose_tiling(
        spec, "full", height, width, kw.pop("mode", "auto"),
        lambda h, w: count_decode_flops(cfg, h, w).total, **kw,
    )  # fmt: skip


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def seam_ratio(images: np.ndarray, plan: tiles.TilePlan, patch: int = 16) -> float:
    """Mean |step| between neighbouring pixels across tile borders ÷ mean |step| across the other
    lines of the patch grid, over all images. Tile borders lie on the patch grid, and a decoder
    may step more there than inside a patch (the demo decoder is blocky at its 16-px patches even
    when decoding whole), so those lines are the fair comparison."""
    x = images.astype(np.float64)  # [B, H, W, 3]
    border, other = [], []
    for axis, starts, tile, side in (
        (2, plan.xs, plan.tile_w, plan.width),
        (1, plan.ys, plan.tile_h, plan.height),
    ):
        d = np.abs(np.diff(x, axis=axis)).mean(axis=tuple(a for a in (0, 1, 2, 3) if a != axis))
        # d[i] is the step between pixel i and i + 1: a line at c lies between c - 1 and c
        cuts = {s for s in starts if s > 0} | {s + tile for s in starts if s + tile < side}
        is_cut = np.zeros(side - 1, bool)
        is_cut[[c - 1 for c in cuts]] = True
        on_grid = np.zeros(side - 1, bool)
        on_grid[patch - 1 :: patch] = True
        border.append(d[is_cut])
        other.append(d[on_grid & ~is_cut])
    return float(np.concatenate(border).mean() / np.concatenate(other).mean())


# -- plans -----------------------------------------------------------------------------------


def test_trained_sizes_per_checkpoint():
    assert FLUX.trained_sizes == TRAINED_SIZES_2K
    assert (1728, 2304) in FLUX.trained_sizes  # 2304×1728 (W×H), docs/model.md#resolution
    assert resolve_checkpoint("dinov2").trained_sizes == ((2048, 2048),)
    sizes = SDXL.trained_sizes
    assert {(2048, 2048), (3584, 3584), (2816, 4096), (4096, 2176)} <= set(sizes)
    assert max(max(s) for s in sizes) == 4096 and all(h % 64 == 0 and w % 64 == 0 for h, w in sizes)
    tiny = tiles.trained_sizes(SDXL, "tiny")
    assert all(h % 32 == 0 and w % 32 == 0 for h, w in tiny) and (512, 512) in tiny


@pytest.mark.parametrize(
    "side, tile, overlap", [(4864, 2688, 512), (3328, 1984, 512), (640, 160, 64), (256, 128, 0)]
)
def test_axis_starts_cover_on_grid_with_overlap(side, tile, overlap):
    starts = tiles.axis_starts(side, tile, overlap, 32)
    assert starts[0] == 0 and starts[-1] + tile == side
    assert all(s % 32 == 0 for s in starts)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert min(tile - g for g in gaps) >= overlap
    fewest = math.ceil((side - overlap) / (tile - overlap))  # with no grid to round to
    assert fewest <= len(starts) <= fewest + 1


def test_plans_for_real_sizes():
    # fits a trained size: decoded whole; 'never' never tiles
    assert full_plan(FLUX, 2048, 2048) is None and full_plan(FLUX, 1024, 1024) is None
    assert full_plan(FLUX, 8192, 8192, mode="never") is None
    # SDXL portrait archive, 832×1216 → 3328×4864: tiles of a trained size, on the latent grid
    p = full_plan(SDXL, 4864, 3328)
    assert (p.tile_h, p.tile_w) in SDXL.trained_sizes and p.count > 1
    assert all(y % 32 == 0 and x % 32 == 0 for y, x in p.boxes)
    assert p.ys[-1] + p.tile_h == 4864 and p.xs[-1] + p.tile_w == 3328
    # a 2k checkpoint at 2560²: trained-size tiles (not clipped ones) when any fits inside
    q = full_plan(FLUX, 2560, 2560)
    assert (q.tile_h, q.tile_w) in FLUX.trained_sizes
    # explicit tile size, 'always': an output that fits one tile is still decoded whole
    assert full_plan(FLUX, 2048, 2048, mode="always") is None
    r = full_plan(FLUX, 2048, 2048, mode="always", tile_size=(1024, 1024), overlap=256)
    assert (r.count, r.tile_h, r.overlap) == (9, 1024, 256)


def test_auto_tiles_what_does_not_fit_memory(monkeypatch):
    """A trained 4096×2816 bucket on a 24 GB card: tiles of a size that fits, not an OOM."""
    from pid_batch.decoder import fits_memory

    cuda, weights = torch.device("cuda"), int(2.8 * 2**30)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (24 * 2**30, 24 * 2**30))
    assert fits_memory(cuda, 2048, 2048, weights) and not fits_memory(cuda, 2816, 4096, weights)

    def fits(h, w):
        return fits_memory(cuda, h, w, weights)

    assert full_plan(SDXL, 2816, 4096) is None  # memory to spare: a trained size, decoded whole
    p = full_plan(SDXL, 2816, 4096, fits_memory=fits)
    assert p is not None and fits(p.tile_h, p.tile_w) and (p.tile_h, p.tile_w) in SDXL.trained_sizes
    assert full_plan(SDXL, 2816, 4096, mode="never", fits_memory=fits) is None
    assert fits_memory(torch.device("cpu"), 8192, 8192, weights)


def test_weights_are_a_partition_of_one():
    plan = tiles.TilePlan(256, 320, 160, 128, 64, (0, 96), (0, 96, 192))
    w = TiledNet(None, plan, 32, chunk=4)._tile_weights(torch.device("cpu"))
    total = torch.zeros(256, 320)
    for k, (y, x) in enumerate(plan.boxes):
        total[y : y + 160, x : x + 128] += w[k]
    torch.testing.assert_close(total, torch.ones(256, 320), rtol=0, atol=1e-6)
    assert float(w.min()) > 0


# -- limits ----------------------------------------------------------------------------------


def test_never_refuses_large_outputs_and_says_what_to_set():
    cfg = SDXL.net_config
    shape = (4, 152, 104)  # SDXL latent of an 832×1216 portrait
    assert validate_latent_shape(SDXL, cfg, shape, "p") == (4864, 3328)
    with pytest.raises(SampleError, match="sampling.tiling: auto") as e:
        validate_latent_shape(SDXL, cfg, shape, "p", tiling="never")
    assert "3328x4864" in str(e.value) and "'never'" in str(e.value)


def test_pixel_ceiling_is_configurable():
    cfg = FLUX.net_config
    with pytest.raises(
        SampleError, match=r"67.1 MP.*ceiling of 64 MP \(sampling.max_output_megapixels\)"
    ):
        validate_latent_shape(FLUX, cfg, (16, 256, 256), "big")  # 8192²
    assert validate_latent_shape(FLUX, cfg, (16, 256, 256), "big", max_output_megapixels=70) == (
        8192,
        8192,
    )
    with pytest.raises(SampleError, match="ceiling of 1 MP"):
        make_decoder(max_output_megapixels=1).decode(
            [np.zeros((16, 40, 40), np.float32)], sigmas=[0.0], seeds=[0]
        )


# -- quality evidence ------------------------------------------------------------------------


def test_single_tile_decode_is_the_untiled_decode_exactly():
    lat = [np.random.default_rng(0).standard_normal((16, 8, 8)).astype(np.float32)]
    args = dict(sigmas=[0.1], seeds=[5])
    never = make_decoder(tiling="never").decode(lat, **args)
    always = make_decoder(tiling="always").decode(lat, **args)  # 256² fits one tiny tile
    exact = make_decoder(tiling="always", tile_size=(256, 256)).decode(lat, **args)
    assert always.tiles is None and exact.tiles is None
    np.testing.assert_array_equal(never.images, always.images)
    np.testing.assert_array_equal(never.images, exact.images)


@pytest.mark.slow
def test_tiled_demo_decode_is_close_to_untiled_and_seam_free():
    """Demo decoder, three 256² photos decoded whole, in 2×2 overlapping tiles, in naive tiles."""
    lat = demo_latents(3)
    args = dict(sigmas=[0.0] * 3, seeds=[0, 1, 2])
    whole = demo_decoder(tiling="never").decode(lat, **args).images
    reseeded = demo_decoder(tiling="never").decode(lat, sigmas=[0.0] * 3, seeds=[10, 11, 12])
    wide = demo_decoder(tiling="always", tile_size=(192, 192), tile_overlap=128).decode(lat, **args)
    tiled = demo_decoder(tiling="always", tile_size=(160, 160), tile_overlap=64).decode(lat, **args)
    naive = demo_decoder(tiling="always", tile_size=(128, 128), tile_overlap=0).decode(lat, **args)
    assert [o.tiles.count for o in (wide, tiled, naive)] == [4, 4, 4]
    assert (tiled.tiles.xs, naive.tiles.xs) == ((0, 96), (0, 128))

    def mean_psnr(images):
        return float(np.mean([psnr(a, b) for a, b in zip(images, whole)]))

    p = {k: mean_psnr(o.images) for k, o in (("wide", wide), ("tiled", tiled), ("naive", naive))}
    p["reseeded"] = mean_psnr(reseeded.images)
    seams = {k: seam_ratio(o.images, o.tiles) for k, o in (("tiled", tiled), ("naive", naive))}
    seams["whole"] = seam_ratio(whole, tiled.tiles)  # the same lines in the untiled decode
    print(f"mean PSNR vs the whole decode (dB): {p}; seam ratios: {seams}")
    # Tiles (overlap half a tile) change an image less than drawing its noise again does; less
    # overlap, less close; naive tiles least.
    assert p["wide"] > p["reseeded"] + 1.0 and p["wide"] > p["tiled"] > p["naive"]
    assert seams["tiled"] <= 1.1 < seams["naive"]


@pytest.mark.slow
def test_tiled_samples_do_not_depend_on_their_batch():
    d = make_decoder(tiling="always", tile_size=(128, 128), tile_overlap=64)
    rng = np.random.default_rng(3)
    lat = [rng.standard_normal((16, 6, 8)).astype(np.float32) for _ in range(3)]  # 192×256
    args = dict(sigmas=[0.0, 0.3, 0.1], seeds=[11, 22, 33], captions=["x", "y", "z"])
    together = d.decode(lat, **args)
    assert together.tiles.count == 6
    d.micro_batch = 12  # 12 tiles per call: two samples' tiles share each network call
    chunked = d.decode(lat, **args)
    assert chunked.micro_batch == 2
    chunked = chunked.images
    alone = d.decode([lat[1]], sigmas=[0.3], seeds=[22], captions=["y"]).images[0]
    for a, b in ((together.images, chunked), (together.images[1], alone)):
        diff = np.abs(a.astype(int) - b.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    other = d.decode([lat[1]], sigmas=[0.3], seeds=[23], captions=["y"]).images[0]
    assert np.abs(other.astype(int) - alone.astype(int)).mean() > 1


@pytest.mark.slow
def test_sdxl_portrait_latent_decodes_to_3328x4864_tiled():
    """The SDXL latent of an 832×1216 image, tiny preset, auto tiling (1 step keeps it short)."""
    d = make_decoder(SDXL, steps=1, micro_batch=8)
    lat = np.random.default_rng(0).standard_normal((4, 152, 104)).astype(np.float32)
    out = d.decode([lat], sigmas=[0.0], seeds=[7])
    assert out.images.shape == (1, 4864, 3328, 3)
    p = out.tiles
    assert p is not None and (p.tile_h, p.tile_w) in tiles.trained_sizes(SDXL, "tiny")
    assert out.images.std() > 10  # a picture of noise, not a constant


@pytest.mark.parametrize(
    "sampling, match",
    [
        ({"tiling": "sometimes"}, "sampling.tiling='sometimes'; valid"),
        ({"tile_overlap": -1}, "tile_overlap=-1 must be an int >= 0"),
        ({"tile_size": "abc"}, "must be WxH"),
        ({"tile_size": "100x100"}, "multiples of the latent cell, 32 px for sdxl"),
        ({"max_output_megapixels": 0}, "max_output_megapixels=0 must be a number > 0"),
    ],
)
def test_tiling_options_are_checked_before_work(sampling, match):
    from pid_batch.job import JobConfigError, job_from_dict

    spec = {"input": "a", "output": "b", "model": {"backbone": "sdxl", "preset": "tiny"}}
    with pytest.raises(JobConfigError, match=match):
        job_from_dict({**spec, "sampling": sampling})
    ok = job_from_dict({**spec, "sampling": {"tiling": "always", "tile_size": "256x192"}})
    assert ok.sampling.tile_hw == (192, 256)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tiled_compile_is_one_bucket_per_tile_size():
    """6 tiles, 4 per call: the last call is padded, so one compiled shape serves both."""
    kw = dict(tiling="always", tile_size=(128, 128), tile_overlap=64, micro_batch=4)
    lat = [np.random.default_rng(4).standard_normal((16, 6, 8)).astype(np.float32)]  # 192×256
    d = make_decoder(compile=True, **kw)
    out = d.decode(lat, sigmas=[0.0], seeds=[1])
    assert out.tiles.count == 6 and out.compile_ms > 0 and list(d._compiled) == [(128, 128, 4)]
    again = d.decode(lat, sigmas=[0.0], seeds=[1])
    assert again.compile_ms == 0 and len(d._compiled) == 1
    eager = make_decoder(**kw).decode(lat, sigmas=[0.0], seeds=[1])
    assert np.abs(out.images.astype(int) - eager.images.astype(int)).max() <= 2
