"""Stage 1: train the demo autoencoder on low-resolution crops, then fix its latent normalisation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from pid_batch.model.demo_ae import AutoencoderConfig, DemoAutoencoder, save_autoencoder
from pid_batch.train.common import Clock, Log, restore_state, save_if_due
from pid_batch.train.data import CropSampler, downscale


@dataclass(frozen=True)
class AutoencoderTraining:
    """Hyper-parameters of stage 1."""

    steps: int = 800
    batch: int = 16
    lr: float = 5e-4  # 2e-3 diverged within 20 steps (no norms in the net)
    lr_size: int = 64  # low-resolution crop side the autoencoder sees
    stats_batches: int = 32  # batches used for the latent mean/std
    seed: int = 0
    save_every: int = 250


def ae_loss(ae: DemoAutoencoder, lr_images: torch.Tensor) -> torch.Tensor:
    """L1 + MSE reconstruction of [B, 3, h, w] images through the raw latent."""
    rec = ae.decode_raw(ae.encode_raw(lr_images))
    return F.l1_loss(rec, lr_images) + F.mse_loss(rec, lr_images)


def train_autoencoder(
    images: list[torch.Tensor],
    work: Path,
    hp: AutoencoderTraining = AutoencoderTraining(),
    max_minutes: float | None = None,
    log: Log = print,
) -> Path | None:
    """Train (resuming from work/state.pt); return the final file, or None if the budget ran out."""
    work.mkdir(parents=True, exist_ok=True)
    final = work / "autoencoder.safetensors"
    if final.exists():
        return final
    torch.manual_seed(hp.seed)
    ae = DemoAutoencoder(AutoencoderConfig())
    opt = torch.optim.AdamW(ae.parameters(), lr=hp.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, hp.steps, eta_min=hp.lr * 0.05)
    crops = CropSampler(images, hp.lr_size * 4, seed=hp.seed)
    parts = {"model": ae, "opt": opt, "sched": sched, "gen": crops.gen}
    state_path = work / "state.pt"
    scalars = restore_state(state_path, parts)
    step = scalars["step"] if scalars else 0
    if scalars:
        log(f"autoencoder: resumed at step {step}")
    clock = Clock(max_minutes)
    ae.train()
    while step < hp.steps:
        with torch.no_grad():
            lr_images = downscale(crops.batch(hp.batch))  # [B, 3, 64, 64]
        loss = ae_loss(ae, lr_images)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        if step % 50 == 0:
            log(
                f"autoencoder step {step}/{hp.steps} loss {loss.item():.4f} ({clock.elapsed():.0f}s)"
            )
        if save_if_due(state_path, parts, step, hp.steps, hp.save_every, clock):
            log(f"autoencoder: time budget reached at step {step}; rerun to resume")
            return None
    set_latent_stats(ae, crops, hp)
    save_autoencoder(ae, final)
    log(f"autoencoder: wrote {final}")
    return final


@torch.no_grad()
def set_latent_stats(ae: DemoAutoencoder, crops: CropSampler, hp: AutoencoderTraining) -> None:
    """Per-channel mean/std of raw latents over fresh crops -> the autoencoder's normalisation."""
    ae.eval()
    z = torch.cat(
        [ae.encode_raw(downscale(crops.batch(hp.batch))) for _ in range(hp.stats_batches)]
    )  # [N, C, h, w]
    ae.latent_mean.copy_(z.mean(dim=(0, 2, 3)))
    ae.latent_std.copy_(z.std(dim=(0, 2, 3)).clamp_min(1e-6))
