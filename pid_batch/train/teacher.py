"""Stage 2: the PiD teacher — pixel-space flow matching conditioned on the latent and its sigma.

For a high-resolution crop x0 the condition is the demo autoencoder's latent of the 4x-downscaled
crop, noised to a per-sample degrade sigma (75 % of samples, sigma ~ U[0, 0.8]; see
docs/model.md#degrade-sigma). The network is the inference `PidNet` (demo preset of
`v1_sr4x_c16`) predicting v = eps - x0 at x_t = (1 - t) x0 + t eps, fed t * TIMESCALE
(docs/model.md#network).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pid_batch.checkpoint import load_net, save_checkpoint
from pid_batch.config import TIMESCALE, NetConfig
from pid_batch.model.demo_ae import DemoAutoencoder
from pid_batch.model.pid_net import PidNet
from pid_batch.train.common import (
    Clock,
    Ema,
    Log,
    augment_latent,
    logit_normal_t,
    null_caption,
    restore_state,
    save_if_due,
)
from pid_batch.train.data import CropSampler, downscale


@dataclass(frozen=True)
class TeacherTraining:
    """Hyper-parameters of stage 2."""

    steps: int = 2500
    batch: int = 8
    lr: float = 3e-4
    warmup: int = 100
    hr_size: int = 128  # crop side of the first phase (cheap: 64 patch tokens)
    # Second phase at the demo's output size: RoPE positions are normalised to the image extent
    # (docs/model.md#rope), so a net trained only on 8x8 patch grids drifted in colour on 16x16
    # grids (held-out 256² PSNR 11.2 dB vs 13.7 dB at 128², measured at step 1200).
    late_from: int = 1300
    late_hr_size: int = 256
    late_batch: int = 4
    ema_decay: float = 0.998
    seed: int = 0
    save_every: int = 100


def make_condition(
    ae: DemoAutoencoder, hr: Tensor, gen: torch.Generator, augment: bool = True
) -> tuple[Tensor, Tensor]:
    """HR batch [B, 3, H, W] -> (PiD latent [B, 16, H/32, W/32], degrade sigma [B])."""
    with torch.no_grad():
        lq = ae.encode(downscale(hr))
    if not augment:
        return lq, torch.zeros(hr.shape[0])
    return augment_latent(lq, gen)


def flow_matching_loss(
    net: PidNet, x0: Tensor, lq: Tensor, sigma: Tensor, gen: torch.Generator
) -> Tensor:
    """MSE between net(x_t, t) and v = eps - x0 at t ~ logit-normal."""
    b = x0.shape[0]
    t = logit_normal_t(b, gen)
    eps = torch.randn(x0.shape, generator=gen)
    x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
    v = net(x_t, t * TIMESCALE, null_caption(net.cfg, b), lq, sigma)
    return F.mse_loss(v, eps - x0)


@torch.no_grad()
def euler_sample(
    net: PidNet, lq: Tensor, sigma: Tensor, hw: tuple[int, int], steps: int, gen: torch.Generator
) -> Tensor:
    """Deterministic Euler ODE from t = 1 to 0 (the teacher's own sampler) -> [B, 3, H, W] in [-1, 1]."""
    b = lq.shape[0]
    x = torch.randn((b, 3, *hw), generator=gen)
    ts = torch.linspace(1.0, 0.0, steps + 1)
    y = null_caption(net.cfg, b)
    for t, t_next in zip(ts[:-1], ts[1:]):
        v = net(x, (t * TIMESCALE).expand(b), y, lq, sigma)
        x = x + (t_next - t) * v
    return x.clamp(-1, 1)


@torch.no_grad()
def init_for_training(net: PidNet) -> PidNet:
    """DiT-style start: Xavier linears, zero biases, zero adaLN and output layers (blocks = identity)."""
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for block in net.patch_blocks:
        for mod in (block.adaLN_modulation_img[0], block.adaLN_modulation_txt[0]):
            nn.init.zeros_(mod.weight)
            nn.init.zeros_(mod.bias)
    for block in net.pixel_blocks:
        nn.init.zeros_(block.adaLN_modulation[0].weight)
        nn.init.zeros_(block.adaLN_modulation[0].bias)
    nn.init.zeros_(net.final_layer.linear.weight)
    nn.init.zeros_(net.final_layer.linear.bias)
    return net


def lr_lambda(warmup: int):
    return lambda step: min(1.0, (step + 1) / warmup)


def train_teacher(
    cfg: NetConfig,
    ae: DemoAutoencoder,
    images: list[Tensor],
    work: Path,
    hp: TeacherTraining = TeacherTraining(),
    max_minutes: float | None = None,
    log: Log = print,
) -> Path | None:
    """Train (resuming from work/state.pt); write the EMA weights as work/teacher.safetensors."""
    work.mkdir(parents=True, exist_ok=True)
    final = work / "teacher.safetensors"
    if final.exists():
        return final
    torch.manual_seed(hp.seed)
    net = init_for_training(PidNet(cfg))
    ema = Ema(net, hp.ema_decay)
    opt = torch.optim.AdamW(net.parameters(), lr=hp.lr, weight_decay=0.0, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(hp.warmup))
    crops = CropSampler(images, hp.hr_size, seed=hp.seed + 1)
    late_crops = CropSampler(images, hp.late_hr_size, seed=hp.seed + 3)
    gen = torch.Generator().manual_seed(hp.seed + 2)
    parts = {
        "model": net,
        "ema": ema.module,
        "opt": opt,
        "sched": sched,
        "crop_gen": crops.gen,
        "late_crop_gen": late_crops.gen,
        "gen": gen,
    }
    state_path = work / "state.pt"
    scalars = restore_state(state_path, parts)
    step = scalars["step"] if scalars else 0
    if scalars:
        ema.updates = scalars["ema_updates"]
        log(f"teacher: resumed at step {step}")
    clock = Clock(max_minutes)
    net.train()
    running = None
    while step < hp.steps:
        if step < hp.late_from:
            x0 = crops.batch(hp.batch)  # [B, 3, S, S]
        else:
            x0 = late_crops.batch(hp.late_batch)
        lq, sigma = make_condition(ae, x0, gen)
        loss = flow_matching_loss(net, x0, lq, sigma, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update(net)
        step += 1
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 25 == 0:
            log(f"teacher step {step}/{hp.steps} loss {running:.4f} ({clock.elapsed():.0f}s)")
        if save_if_due(
            state_path, parts, step, hp.steps, hp.save_every, clock, ema_updates=ema.updates
        ):
            log(f"teacher: time budget reached at step {step}; rerun to resume")
            return None
    save_checkpoint(ema.module, final, dtype=torch.float32)
    log(f"teacher: wrote {final}")
    return final


def load_teacher(path: Path, cfg: NetConfig) -> PidNet:
    """The teacher's weights in the inference network (strict load, fp32)."""
    return load_net(path, cfg).requires_grad_(False)
