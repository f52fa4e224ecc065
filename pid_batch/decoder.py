"""The warm decoder a worker holds: weights loaded once, batch of PiD latents → uint8 images.

No Ray here: the pipeline's actor is a thin adapter around `Decoder`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from pid_batch.backbones import CheckpointSpec
from pid_batch.backbones.tensors import to_uint8
from pid_batch.checkpoint import load_net
from pid_batch.model import PidNet
from pid_batch.model.flops import count_decode_flops
from pid_batch.sample_checks import DecodeOutput, check_batch, net_config_for
from pid_batch.sampling import (
    initial_noise,
    per_sample_generators,
    sample,
    student_t_list,
)
from pid_batch.tiled import TiledNet
from pid_batch.tiles import DEFAULT_MAX_OUTPUT_MEGAPIXELS, TILING_MODES, TilePlan, choose_tiling

# Paper anchor (PiD, RTX 5090): 13 GB peak at a 2048² output with batch 1, of which ~2.8 GB are
# bf16 weights; the rest scales with the number of output pixels.
_ACTIVATION_BYTES_PER_PIXEL = (13.0 - 2.8) * 2**30 / 2048**2
# Headroom left for the allocator, the text encoder and fragmentation.
_MEMORY_HEADROOM = 0.80
_MAX_AUTO_MICRO_BATCH = 16


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """CUDA when present, else CPU (or what the caller names)."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def accelerator_name(device: torch.device) -> str:
    """A human-readable accelerator label for timing rows, e.g. 'NVIDIA H100 80GB HBM3' or 'cpu'."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def _memory_budget(device: torch.device, weight_bytes: int) -> float:
    """Bytes left for activations on a CUDA device (free memory less headroom and weights)."""
    free, _total = torch.cuda.mem_get_info(device)
    return free * _MEMORY_HEADROOM - weight_bytes


def auto_micro_batch(device: torch.device, height: int, width: int, weight_bytes: int) -> int:
    """Largest batch expected to fit the accelerator at this output size (1 on CPU)."""
    if device.type != "cuda":
        return 1
    per_image = _ACTIVATION_BYTES_PER_PIXEL * height * width
    budget = _memory_budget(device, weight_bytes)
    return int(max(1, min(_MAX_AUTO_MICRO_BATCH, budget // per_image)))


def fits_memory(device: torch.device, height: int, width: int, weight_bytes: int) -> bool:
    """Whether one image of this size is expected to fit the accelerator (always on CPU)."""
    if device.type != "cuda":
        return True
    return _ACTIVATION_BYTES_PER_PIXEL * height * width <= _memory_budget(device, weight_bytes)


class Decoder:
    """A PiD network, its text encoder and sampler settings, loaded once and kept warm."""

    def __init__(
        self,
        spec: CheckpointSpec,
        *,
        preset: str = "full",
        checkpoint: str | Path | None = None,
        checkpoint_sha256: str | None = None,
        text_encoder=None,
        steps: int | None = None,
        device: str | torch.device | None = None,
        dtype: str = "auto",
        compile: bool = False,
        compile_mode: str | None = None,
        micro_batch: int = 0,
        init_seed: int = 0,
        tiling: str = "auto",
        tile_overlap: int | None = None,
        tile_size: tuple[int, int] | None = None,
        max_output_megapixels: float = DEFAULT_MAX_OUTPUT_MEGAPIXELS,
    ):
        if tiling not in TILING_MODES:
            raise ValueError(f"tiling={tiling!r}; valid: {TILING_MODES}")
        self.spec = spec
        self.preset = preset
        self.cfg = net_config_for(spec, preset)
        self.device = pick_device(device)
        self.steps = steps or spec.steps
        self.t_list = student_t_list(spec.t_list, self.steps)
        self.micro_batch = micro_batch
        # Tiling (pid_batch.tiles): mode, minimum overlap (None: the preset's default), an
        # explicit tile size (H, W) instead of the trained sizes, and the output-pixel ceiling.
        self.tiling = tiling
        self.tile_overlap = tile_overlap
        self.tile_size = tile_size
        self.max_output_megapixels = max_output_megapixels
        self._tile_plans: dict[tuple[int, int], TilePlan | None] = {}
        # `auto`: on CUDA bf16 weights under bf16 autocast (the released file is bf16; norms and
        # RoPE still run in fp32), fp32 on CPU. `float32`: fp32 weights, no autocast (reference).
        self.autocast_dtype = None
        weight_dtype = torch.float32
        if dtype == "auto":
            if self.device.type == "cuda":
                weight_dtype = self.autocast_dtype = torch.bfloat16
        elif dtype == "float32":
            pass
        elif dtype in ("bfloat16", "float16"):
            # Half-precision weights: the net's norms and RoPE expect autocast around them.
            weight_dtype = self.autocast_dtype = getattr(torch, dtype)
        else:
            raise ValueError(f"dtype={dtype!r}; valid: auto, float32, bfloat16, float16")
        self.weight_dtype = weight_dtype

        t0 = time.perf_counter()
        if checkpoint is not None:
            self.net = load_net(
                checkpoint,
                self.cfg,
                device=self.device,
                dtype=weight_dtype,
                sha256=checkpoint_sha256,
            )
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(init_seed)
                self.net = PidNet(self.cfg).to(device=self.device, dtype=weight_dtype)
        self.net.eval().requires_grad_(False)
        self.load_s = time.perf_counter() - t0
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.net.parameters())
        self.text_encoder = text_encoder
        self.compile = compile
        self.compile_mode = compile_mode  # e.g. "reduce-overhead" (CUDA graphs), "max-autotune"
        if compile:  # one dynamo frame per (H, W, batch) bucket; the default limit (8) is small
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self._compiled: dict[tuple[int, int, int], Callable] = {}
        self.accelerator = accelerator_name(self.device)

    # -- public ---------------------------------------------------------------------------

    def micro_batch_for(self, height: int, width: int) -> int:
        """Micro-batch for this output size: the configured one, or sized from free memory."""
        if self.micro_batch:
            return self.micro_batch
        return auto_micro_batch(self.device, height, width, self.weight_bytes)

    def tile_plan(self, height: int, width: int) -> TilePlan | None:
        """The tiles an output of this size is decoded in; None: decoded whole (cached per size)."""
        key = (height, width)
        if key not in self._tile_plans:
            self._tile_plans[key] = choose_tiling(
                self.spec,
                self.preset,
                height,
                width,
                self.tiling,
                cost=lambda h, w: count_decode_flops(self.cfg, h, w, self.steps).total,
                overlap=self.tile_overlap,
                tile_size=self.tile_size,
                fits_memory=lambda h, w: fits_memory(self.device, h, w, self.weight_bytes),
            )
        return self._tile_plans[key]

    @torch.inference_mode()
    def decode(
        self,
        latents: Sequence[np.ndarray | torch.Tensor],
        sigmas: Sequence[float],
        seeds: Sequence[int],
        captions: Sequence[str] | None = None,
        caption_embs: torch.Tensor | None = None,
        ids: Sequence[str] | None = None,
    ) -> DecodeOutput:
        """Decode same-shape PiD latents [C, h, w] to images; one noise stream per seed."""
        n = len(latents)
        ids, height, width = check_batch(
            self.spec,
            self.cfg,
            self.preset,
            latents,
            sigmas,
            seeds,
            ids,
            tiling=self.tiling,
            max_output_megapixels=self.max_output_megapixels,
        )
        tiles = self.tile_plan(height, width)

        t0 = time.perf_counter()
        if caption_embs is None:
            if self.text_encoder is None:
                raise ValueError("no text encoder loaded and no caption_embs given")
            caption_embs = self.text_encoder.encode(
                [c if c is not None else "" for c in (captions or [""] * n)]
            )
        text_ms = (time.perf_counter() - t0) * 1000 / n

        if tiles is None:
            micro = chunk = self.micro_batch_for(height, width)
        else:  # `chunk` tiles per network call; whole samples per micro-batch
            chunk = self.micro_batch_for(tiles.tile_h, tiles.tile_w)
            micro = max(1, chunk // tiles.count)
        images = np.empty((n, height, width, 3), np.uint8)
        decode_ms = [0.0] * n
        compile_ms = 0.0
        for start in range(0, n, micro):
            stop = min(start + micro, n)
            t1 = time.perf_counter()
            out, c_ms = self._decode_micro(
                latents[start:stop],
                sigmas[start:stop],
                seeds[start:stop],
                caption_embs[start:stop],
                height,
                width,
                micro,
                tiles,
                chunk,
            )
            images[start:stop] = out
            compile_ms += c_ms
            per = ((time.perf_counter() - t1) * 1000 - c_ms) / (stop - start)
            decode_ms[start:stop] = [per] * (stop - start)
        return DecodeOutput(images, [text_ms] * n, decode_ms, compile_ms, micro, tiles)

    # -- internals ------------------------------------------------------------------------

    def _net_for(self, height: int, width: int, batch: int) -> tuple[Callable, bool]:
        """The network callable for a bucket; compiled once per (H, W, batch) when enabled."""
        if not self.compile:
            return self.net, False
        key = (height, width, batch)
        fresh = key not in self._compiled
        if fresh:
            self._compiled[key] = CompiledNet(self.net, fullgraph=True, mode=self.compile_mode)
        return self._compiled[key], fresh

    def _decode_micro(self, latents, sigmas, seeds, embs, height, width, micro, tiles, chunk):
        b = len(latents)
        lq = torch.stack([torch.as_tensor(np.asarray(x, np.float32)) for x in latents])
        lq = lq.to(self.device)  # [b, C, h, w]
        sigma = torch.tensor(list(sigmas), dtype=torch.float32, device=self.device)  # [b]
        embs = embs.to(self.device, torch.float32)  # [b, Lt, txt_dim]
        seeds = list(seeds)
        # Whole images: pad the samples; tiles: TiledNet pads its last chunk of tiles instead.
        pad = micro - b if self.compile and b < micro and tiles is None else 0
        if pad:  # keep one compiled shape per bucket: pad the last micro-batch, drop the extra
            lq = torch.cat([lq, lq[-1:].expand(pad, *lq.shape[1:])])
            sigma = torch.cat([sigma, sigma[-1:].expand(pad)])
            embs = torch.cat([embs, embs[-1:].expand(pad, *embs.shape[1:])])
            seeds = seeds + [seeds[-1]] * pad
        gens = per_sample_generators(seeds, self.device)
        noise = initial_noise(gens, (3, height, width), self.device)  # [b, 3, H, W]
        if tiles is None:
            net, fresh = self._net_for(height, width, len(seeds))
        else:  # one compiled bucket per (tile size, chunk), shared by every tiled output size
            inner, fresh = self._net_for(tiles.tile_h, tiles.tile_w, chunk)
            net = TiledNet(inner, tiles, self.spec.latent_cell, chunk, pad=self.compile)
        t0 = time.perf_counter()
        with torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        ):
            if fresh:  # first call of a compiled bucket: trigger compilation, time it apart
                # t laid out as sampling.sample passes it ((t * timescale).expand(B), stride 0):
                # a contiguous t fails dynamo's stride guard and the bucket would compile twice.
                t_warm = torch.tensor(999.0, device=self.device).expand(len(seeds))
                net.step(noise, t_warm, net.condition(embs, lq, height, width), sigma)
                compile_ms = (time.perf_counter() - t0) * 1000
            else:
                compile_ms = 0.0
            x = sample(net, noise, embs, lq, sigma, self.t_list, generator=gens)
        return to_uint8(x[:b]), compile_ms


class CompiledNet:
    """A `PidNet`'s `condition` and `step`, each compiled as one graph (what `sample` calls)."""

    def __init__(self, net: PidNet, fullgraph: bool = True, mode: str | None = None):
        self.net = net
        self.condition = torch.compile(net.condition, dynamic=False, fullgraph=fullgraph, mode=mode)
        self.step = torch.compile(net.step, dynamic=False, fullgraph=fullgraph, mode=mode)

    def __call__(self, x, t, caption_embs, lq_latent, degrade_sigma):
        cond = self.condition(caption_embs, lq_latent, x.shape[-2], x.shape[-1])
        return self.step(x, t, cond, degrade_sigma)


__all__ = [
    "CompiledNet",
    "Decoder",
    "accelerator_name",
    "auto_micro_batch",
    "fits_memory",
    "pick_device",
]
