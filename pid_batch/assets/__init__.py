"""Files shipped with the package: the demo decoder, its autoencoder and sample latents."""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).parent / "demo"
DEMO_FILES = {
    "student": "pid_demo_student.safetensors",  # 4-step PiD student, demo preset, bf16
    "autoencoder": "demo_autoencoder.safetensors",  # the demo latent space (encode + decode)
    "samples": "demo_samples.safetensors",  # sample latents (one shard) with ids and captions
    "quality": "quality.json",  # held-out PSNR/SSIM measured when the student was trained
}


def bundled(name: str) -> Path:
    """Path of a bundled demo file; FileNotFoundError says how to rebuild it."""
    if name not in DEMO_FILES:
        raise ValueError(f"unknown bundled file {name!r}; known: {sorted(DEMO_FILES)}")
    path = DEMO_DIR / DEMO_FILES[name]
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; rebuild the demo decoder with `python -m pid_batch.train all`"
        )
    return path
