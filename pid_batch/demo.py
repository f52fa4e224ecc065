"""The embedded default job: sample latent shards written locally, a tiny preset, a local Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pid_batch import codecs, storage
from pid_batch.job import JobConfig, ModelConfig, OutputConfig, ResourceConfig, SamplingConfig

RANDOM_WEIGHTS_NOTICE = (
    "NOTE: the demo decodes with a tiny PiD network of the same architecture and RANDOM "
    "weights, so its images are noise, not pictures. To decode real latents, download the "
    "official checkpoint (HF repo nvidia/PiD, checkpoints/<experiment>/model_ema_bf16.pth, "
    "non-commercial licence) and Gemma-2-2b-it yourself, then run a job spec from "
    "jobs/examples/ with model.checkpoint and model.text_encoder pointing at them."
)

CAPTIONS = (
    "a lighthouse on a rocky coast at dusk",
    "a bowl of ripe figs on a wooden table",
    "",
    "a red tram crossing a bridge in the rain",
)


def write_demo_shards(
    root: str, shards: int = 2, per_shard: int = 4, hw: tuple[int, int] = (16, 16), seed: int = 0
) -> list[str]:
    """Write `shards` safetensors shards of FLUX-shaped PiD latents [16, h, w]; return URIs."""
    rng = np.random.default_rng(seed)
    uris = []
    for s in range(shards):
        lat = rng.standard_normal((per_shard, 16, *hw), dtype=np.float32)
        ids = [f"demo-{s:02d}-{i:03d}" for i in range(per_shard)]
        caps = [CAPTIONS[(s * per_shard + i) % len(CAPTIONS)] for i in range(per_shard)]
        data = codecs.write_safetensors_shard(
            lat, ids, captions=caps, backbone="flux", latent_format="pid"
        )
        uri = storage.join(root, f"shard-{s:05d}.safetensors")
        storage.write_bytes_atomic(uri, data)
        uris.append(uri)
    return uris


def demo_job(output: str, input_uri: str | None = None) -> JobConfig:
    """The demo's job spec: tiny preset, random weights, JPEG files, one CPU actor."""
    out = str(Path(output).absolute()) if "://" not in output else output
    return JobConfig(
        input=input_uri or storage.join(out, "_demo_latents"),
        output=storage.join(out, "decoded"),
        model=ModelConfig(backbone="flux", ckpt_type="2k", preset="tiny"),
        sampling=SamplingConfig(steps=4, seed=0),
        images=OutputConfig(layout="files", image_format="jpeg"),
        resources=ResourceConfig(min_actors=1, max_actors=1, batch_size=4, encode_batch_size=4),
    )
