"""What a shard reader yields: samples, their sanity limits, and the error of an unreadable shard."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHARD_SUFFIXES = (".safetensors", ".parquet")


class ShardError(ValueError):
    """A whole shard is unreadable (truncated, not a tensor file, inconsistent metadata)."""

    def __init__(self, shard: str, reason: str):
        super().__init__(shard, reason)
        self.shard, self.reason = shard, reason

    def __str__(self) -> str:
        return f"shard {self.shard}: {self.reason}"


@dataclass(frozen=True)
class ShardLimits:
    """Per-sample sanity limits; anything beyond is an error record, not an allocation."""

    # 4 Mi elements (16 MiB as fp32): 5x the largest released latent (dinov2 768x32x32 = 0.79 Mi;
    # flux at a 4096² output 16x128x128 = 0.26 Mi). Beyond it, a sample is an error row.
    max_elements: int = 4 * 2**20
    max_channels: int = 4096
    max_caption_chars: int = (
        20_000  # longer captions are truncated (text encoders cut at 300 tokens)
    )


@dataclass(frozen=True)
class LatentSample:
    """One sample of a latent shard; `error` set (and latent None) when the sample is unusable."""

    id: str
    latent: np.ndarray | None  # float32 [C, h, w] or packed [seq, ch], owns its memory
    caption: str | None
    sigma: float | None
    seed: int | None
    backbone: str | None
    latent_format: str | None
    shard: str
    index: int
    error: str | None = None
    source_id: str | None = None  # the id as the shard gave it, before sanitising (None: none)
