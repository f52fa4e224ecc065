"""The embedded default job: bundled sample latents, the bundled demo decoder, a local Ray.

The demo decoder (`pid_batch/assets/demo`, built by `python -m pid_batch.train all`) is a 4.5 M
parameter PiD network (demo preset of `v1_sr4x_c16`) distilled to the released 4-step sampler on
CPU; its latents come from a tiny demo autoencoder with FLUX's latent shape (16 ch, /8), not from
the FLUX VAE. `--random-weights` runs the old smoke path instead: tiny preset, random weights,
random latents.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pid_batch import codecs, storage
from pid_batch.assets import bundled
from pid_batch.job import JobConfig, ModelConfig, OutputConfig, ResourceConfig, SamplingConfig

DEMO_NOTICE = (
    "NOTE: the demo decodes latents of pid-batch's own tiny demo autoencoder with a small PiD "
    "decoder trained on 12 public-domain/CC0 photos on a CPU (pid_batch/assets/demo): real "
    "pictures, but far from the official models. To decode FLUX/SD3/... latents, download the "
    "official checkpoint (HF repo nvidia/PiD, checkpoints/<experiment>/model_ema_bf16.pth, "
    "non-commercial licence) and Gemma-2-2b-it yourself, then run a job spec from jobs/examples/ "
    "with model.checkpoint and model.text_encoder pointing at them."
)
RANDOM_WEIGHTS_NOTICE = (
    "NOTE: --random-weights decodes with a tiny PiD network of the same architecture and RANDOM "
    "weights, so its images are noise, not pictures (a smoke test of the pipeline)."
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
    """Write `shards` safetensors shards of random FLUX-shaped PiD latents [16, h, w]; return URIs."""
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
        _write_input(uri, data)
        uris.append(uri)
    return uris


def _write_input(uri: str, data: bytes) -> None:
    """Write a demo input shard unless it already holds these bytes: rewriting it would change
    its fingerprint (modification time) and make a rerun redo the finished output."""
    if storage.exists(uri) and storage.size(uri) == len(data) and storage.read_bytes(uri) == data:
        return
    storage.write_bytes_atomic(uri, data)


def write_bundled_samples(root: str) -> list[str]:
    """Copy the bundled sample latents (held-out and training photos) as one input shard."""
    uri = storage.join(root, "shard-00000.safetensors")
    _write_input(uri, bundled("samples").read_bytes())
    return [uri]


def demo_job(output: str, input_uri: str | None = None, random_weights: bool = False) -> JobConfig:
    """The demo's job spec: the bundled decoder (or tiny random weights), JPEG files, one actor."""
    out = str(Path(output).absolute()) if "://" not in output else output
    preset = "tiny" if random_weights else "demo"
    return JobConfig(
        input=input_uri or storage.join(out, "_demo_latents"),
        output=storage.join(out, "decoded"),
        model=ModelConfig(backbone="flux", ckpt_type="2k", preset=preset),
        sampling=SamplingConfig(steps=4, seed=0),
        images=OutputConfig(layout="files", image_format="jpeg"),
        resources=ResourceConfig(min_actors=1, max_actors=1, batch_size=4, encode_batch_size=4),
    )


def write_baselines(job: JobConfig) -> list[str]:
    """The demo autoencoder's own decode of every input latent -> <out>/baseline/<id>.png."""
    from pid_batch.model.demo_ae import load_autoencoder

    ae = load_autoencoder(bundled("autoencoder"))
    uris = []
    for shard in storage.list_files(job.input, (".safetensors",)):
        for s in codecs.read_shard(storage.read_bytes(shard), shard):
            lat = torch.as_tensor(np.asarray(s.latent, dtype=np.float32))[None]
            with torch.no_grad():
                img = ((ae.decode(lat)[0] + 1) * 127.5).to(torch.uint8).permute(1, 2, 0).numpy()
            uri = storage.join(job.output, "baseline", f"{codecs.sanitize_id(s.id)}.png")
            storage.write_bytes_atomic(uri, codecs.encode_image(img, "png"))
            uris.append(uri)
    return uris


def quality_lines() -> list[str]:
    """Held-out PSNR/SSIM/seam ratio of the bundled decoder, as measured when it was trained."""
    q = json.loads(bundled("quality").read_text())
    lines = [f"held-out quality ({', '.join(q['images'])}; {q['what']}):"]
    for name, m in q["methods"].items():
        line = f"  {name:18s} PSNR {m['mean_psnr_db']:6.2f} dB  SSIM {m['mean_ssim']:.4f}"
        if "worst_seam_ratio" in m:  # absent for rows measured before the seam ratio existed
            line += f"  worst seam ratio {m['worst_seam_ratio']:.2f}"
        lines.append(line)
    lines.append(f"  {'photo':18s} worst seam ratio {max(q['photo_seam_ratio']):.2f} (1: no grid)")
    return lines
