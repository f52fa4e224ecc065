"""Torch-free checks of one sample against a job's checkpoint (read workers run them without torch)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pid_batch.backbones import CheckpointSpec
from pid_batch.config import NetConfig, demo, tiny
from pid_batch.tiles import DEFAULT_MAX_OUTPUT_MEGAPIXELS, MAX_UNTILED_SIDE, TilePlan


class SampleError(ValueError):
    """A problem with one sample; the pipeline turns it into an error row and goes on."""

    def __init__(self, sample_id: str | None, reason: str):
        self.sample_id = sample_id
        self.reason = reason
        super().__init__(f"sample {sample_id!r}: {reason}" if sample_id is not None else reason)


def net_config_for(spec: CheckpointSpec, preset: str) -> NetConfig:
    """The network a job builds: the released variant, its tiny twin, or the demo decoder's size."""
    if preset == "full":
        return spec.net_config
    if preset == "tiny":
        return tiny(spec.net_config)
    if preset == "demo":
        return demo(spec.net_config)
    raise ValueError(f"preset={preset!r}; valid: ('full', 'tiny', 'demo')")


def validate_latent_shape(
    spec: CheckpointSpec,
    cfg: NetConfig,
    shape: Sequence[int],
    sample_id: str | None = None,
    preset: str = "full",
    *,
    tiling: str = "auto",
    max_output_megapixels: float = DEFAULT_MAX_OUTPUT_MEGAPIXELS,
) -> tuple[int, int]:
    """Check a PiD-form latent [C, h, w] against the checkpoint; return the output (H, W).

    The full preset decodes only what the checkpoint was trained at where that is one size
    (dinov2/siglip decode only 2048², docs/model.md#resolution); the tiny and demo presets, small
    stand-in networks, accept any size so tests can run those code paths at small sizes. This is
    the one place that rule lives (read stage, VAE stage and Decoder all call this function). Outputs above `max_output_megapixels` are refused for every preset,
    before any allocation; with `tiling='never'` so are sides above MAX_UNTILED_SIDE.
    """
    if len(shape) != 3:
        raise SampleError(sample_id, f"PiD latent must be [C, h, w]; got shape {tuple(shape)}")
    c, h, w = (int(s) for s in shape)
    if c != cfg.lq_latent_channels:
        raise SampleError(
            sample_id,
            f"{spec.backbone} latent must have {cfg.lq_latent_channels} channels "
            f"[{cfg.lq_latent_channels}, h, w]; got shape {tuple(shape)}",
        )
    if h < 1 or w < 1:
        raise SampleError(sample_id, f"empty latent of shape {tuple(shape)}")
    height, width = spec.output_hw(h, w)
    if height * width > max_output_megapixels * 1e6:
        raise SampleError(
            sample_id,
            f"output {width}x{height} ({height * width / 1e6:.1f} MP, latent shape "
            f"{tuple(shape)}) exceeds the ceiling of {max_output_megapixels:g} MP "
            "(sampling.max_output_megapixels)",
        )
    if tiling == "never" and max(height, width) > MAX_UNTILED_SIDE:
        raise SampleError(
            sample_id,
            f"output {width}x{height} exceeds {MAX_UNTILED_SIDE} px per side, the most a decode "
            "without tiles may have, and sampling.tiling is 'never': set sampling.tiling: auto "
            "to decode it in overlapping tiles of the checkpoint's trained sizes",
        )
    if height % cfg.patch_size or width % cfg.patch_size:
        raise SampleError(
            sample_id,
            f"output {height}x{width} is not a multiple of the patch size {cfg.patch_size}",
        )
    if preset == "full" and spec.fixed_hw and (h, w) != spec.fixed_hw:
        height, width = spec.output_hw(*spec.fixed_hw)
        raise SampleError(
            sample_id,
            f"{spec.backbone} decodes only {height}x{width} (latent [{c}, {spec.fixed_hw[0]}, "
            f"{spec.fixed_hw[1]}]); got shape {tuple(shape)}",
        )
    return height, width


def check_batch(
    spec: CheckpointSpec,
    cfg: NetConfig,
    preset: str,
    latents: Sequence,
    sigmas: Sequence[float],
    seeds: Sequence[int],
    ids: Sequence[str] | None,
    *,
    tiling: str = "auto",
    max_output_megapixels: float = DEFAULT_MAX_OUTPUT_MEGAPIXELS,
) -> tuple[list[str], int, int]:
    """Validate one decode call's arguments; return (ids, H, W) of its single shape bucket."""
    n = len(latents)
    if not (len(sigmas) == len(seeds) == n):
        raise ValueError(f"got {n} latents, {len(sigmas)} sigmas and {len(seeds)} seeds")
    if n == 0:
        raise ValueError("decode() needs at least one latent")
    ids = list(ids) if ids is not None else [str(i) for i in range(n)]
    shapes = {tuple(lat.shape) for lat in latents}
    if len(shapes) != 1:
        raise ValueError(f"decode() needs latents of one shape (bucket them); got {shapes}")
    height, width = validate_latent_shape(
        spec,
        cfg,
        next(iter(shapes)),
        ids[0],
        preset,
        tiling=tiling,
        max_output_megapixels=max_output_megapixels,
    )
    return ids, height, width


@dataclass
class DecodeOutput:
    """Images [B, H, W, 3] uint8 plus per-sample timing (ms; batch costs split evenly)."""

    images: np.ndarray
    text_ms: list[float]
    decode_ms: list[float]
    compile_ms: float
    micro_batch: int
    tiles: TilePlan | None = None  # the tiles of this shape bucket; None: decoded whole
