"""A stand-in decoder that sleeps a measured latency per image: the pipeline at scale without GPUs.

`SleepDecoder` has the interface `stages.decode.DecodeStage` uses of `decoder.Decoder` (without importing
torch, so simulated actors start like light workers); it validates the
same latent shapes, sleeps `latency_ms` per image (one device "busy" without using a CPU core) and
returns a constant image of the output size. Select it with `model.fake_latency_ms` in a job.
The default is the paper's GB200 figure for a 2048² image (`config.PAPER_GB200_MS_PER_2048`, also
what benchmarks/sim_scale.py simulates); pass a figure measured on your accelerator
(benchmarks/decode_bench.py) instead.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from pid_batch.backbones import CheckpointSpec
from pid_batch.config import PAPER_GB200_MS_PER_2048
from pid_batch.sample_checks import DecodeOutput, check_batch, net_config_for
from pid_batch.tiles import DEFAULT_MAX_OUTPUT_MEGAPIXELS

DEFAULT_LATENCY_MS = PAPER_GB200_MS_PER_2048
_FILL = 127  # mid-grey: a constant image compresses to almost nothing in every format


class SleepDecoder:
    """Decoder stand-in: same inputs and outputs as `Decoder.decode`, time spent in sleep()."""

    accelerator = "fake"

    def __init__(
        self,
        spec: CheckpointSpec,
        preset: str = "full",
        latency_ms: float = DEFAULT_LATENCY_MS,
        micro_batch: int = 1,
        tiling: str = "auto",
        max_output_megapixels: float = DEFAULT_MAX_OUTPUT_MEGAPIXELS,
    ):
        if latency_ms < 0:
            raise ValueError(f"latency_ms={latency_ms!r} must be >= 0")
        if micro_batch < 1:
            raise ValueError(f"micro_batch={micro_batch!r} must be >= 1")
        self.spec = spec
        self.preset = preset
        self.cfg = net_config_for(spec, preset)
        self.latency_ms = float(latency_ms)
        self.micro_batch = micro_batch
        self.limits = dict(tiling=tiling, max_output_megapixels=max_output_megapixels)
        self.device = "cpu"
        self.text_encoder = None
        self.load_s = 0.0

    def micro_batch_for(self, height: int, width: int) -> int:
        """The configured micro-batch (the sleep is per image, so it only labels rows)."""
        return self.micro_batch

    def decode(
        self,
        latents: Sequence[np.ndarray],
        sigmas: Sequence[float],
        seeds: Sequence[int],
        captions: Sequence[str] | None = None,
        caption_embs=None,
        ids: Sequence[str] | None = None,
    ) -> DecodeOutput:
        """Sleep latency_ms × len(latents); return constant [B, H, W, 3] uint8 images."""
        n = len(latents)
        _, height, width = check_batch(
            self.spec, self.cfg, self.preset, latents, sigmas, seeds, ids, **self.limits
        )
        t0 = time.perf_counter()
        time.sleep(self.latency_ms * n / 1000)
        images = np.full((n, height, width, 3), _FILL, np.uint8)
        per = (time.perf_counter() - t0) * 1000 / n
        return DecodeOutput(images, [0.0] * n, [per] * n, 0.0, self.micro_batch_for(height, width))


__all__ = ["DEFAULT_LATENCY_MS", "SleepDecoder"]
