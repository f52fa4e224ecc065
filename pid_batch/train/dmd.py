"""Stage 3: DMD2 distillation of the teacher into the released 4-step SDE sampler.

The sampler being distilled into: docs/model.md#sampler.

Per generator step (Yin et al., "Improved Distribution Matching Distillation", 2024):
1. pick a student time T_k of `[0.999, 0.866, 0.634, 0.342]`; reach x_{T_k} by running the student
   itself from noise for k steps without gradients ("backward simulation", so training sees the
   states inference visits);
2. the student predicts x0 from x_{T_k};
3. distribution matching: noise that x0 to a random t, ask the frozen teacher (real score) and the
   fake-score network (tracking the student's output distribution) for their x0 estimates, and
   move the student's x0 along (fake - real), normalised per sample by |x0 - real|;
4. the fake-score network is trained by flow matching on the student's (detached) outputs,
   `fake_updates` times per generator step (two time-scale update rule);
5. optionally (`reg_weight > 0`, off by default) regression of the same x0 on the crop whose
   latent conditioned it: pixel MSE plus the neighbour-step term of `x0_regression_loss`, the
   paired loss DMD2 allows.
An optional GAN term (`gan_weight > 0`) adds a small discriminator on noised images, real crops vs
student outputs. The student is the inference `PidNet` and is written in the checkpoint format.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pid_batch.checkpoint import save_checkpoint
from pid_batch.config import DEFAULT_T_LIST, TIMESCALE
from pid_batch.model.demo_ae import DemoAutoencoder
from pid_batch.model.pid_net import PidNet
from pid_batch.sampling import student_t_list
from pid_batch.train.common import (
    Clock,
    Ema,
    Log,
    null_caption,
    restore_state,
    save_if_due,
    x0_from_velocity,
    x0_regression_loss,
)
from pid_batch.train.data import CropSampler
from pid_batch.train.teacher import flow_matching_loss, make_condition


@dataclass(frozen=True)
class DistillTraining:
    """Hyper-parameters of stage 3."""

    steps: int = 400
    batch: int = 2
    hr_size: int = 256  # the demo's output size (see TeacherTraining.late_from)
    lr_student: float = 5e-5
    lr_fake: float = 1e-4
    fake_updates: int = 2  # fake-score updates per student update (TTUR)
    t_min: float = 0.02  # range of the DMD noise level
    t_max: float = 0.98
    # Generator loss: dmd_weight x DMD + reg_weight x regression (step 5 of the module docstring).
    dmd_weight: float = 1.0
    reg_weight: float = 0.0
    grad_weight: float = 1.0  # weight of the neighbour-step term inside the regression
    gan_weight: float = 0.0  # optional GAN term (0: off)
    ema_decay: float = 0.99
    seed: int = 0
    save_every: int = 25


class Discriminator(nn.Module):
    """Small conv classifier of noised images x_t (t given as an extra channel) -> logit [B]."""

    def __init__(self, width: int = 32):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(4, width, 3, padding=1)]
        for _ in range(4):
            layers += [nn.SiLU(), nn.Conv2d(width, width, 4, stride=2, padding=1)]
        layers += [nn.SiLU(), nn.Conv2d(width, 1, 3, padding=1)]
        self.body = nn.Sequential(*layers)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        tt = t[:, None, None, None].expand(-1, 1, *x_t.shape[-2:])
        return self.body(torch.cat([x_t, tt], dim=1)).mean(dim=(1, 2, 3))  # [B]


def noised(x0: Tensor, t: Tensor, gen: torch.Generator) -> Tensor:
    """(1 - t) x0 + t eps with eps ~ N(0, I) -> [B, 3, H, W]."""
    eps = torch.randn(x0.shape, generator=gen)
    tt = t[:, None, None, None]
    return (1 - tt) * x0 + tt * eps


def student_x0(
    student: PidNet, lq: Tensor, sigma: Tensor, hw: tuple[int, int], k: int, gen: torch.Generator
) -> Tensor:
    """Run the student's sampler k steps without grad, then predict x0 at T_k with grad."""
    ts = student_t_list(DEFAULT_T_LIST, 4)
    b = lq.shape[0]
    y = null_caption(student.cfg, b)
    x = torch.randn((b, 3, *hw), generator=gen)
    with torch.no_grad():
        for j in range(k):
            t = torch.full((b,), ts[j])
            x0 = x0_from_velocity(x, t, student(x, t * TIMESCALE, y, lq, sigma))
            x = (1 - ts[j + 1]) * x0 + ts[j + 1] * torch.randn(x.shape, generator=gen)
    t = torch.full((b,), ts[k])
    return x0_from_velocity(x, t, student(x, t * TIMESCALE, y, lq, sigma))


def dmd_loss(
    x0: Tensor,
    teacher: PidNet,
    fake: PidNet,
    lq: Tensor,
    sigma: Tensor,
    hp: DistillTraining,
    gen: torch.Generator,
) -> Tensor:
    """Distribution-matching loss whose gradient w.r.t. x0 is (fake - real) / mean|x0 - real|."""
    b = x0.shape[0]
    t = hp.t_min + (hp.t_max - hp.t_min) * torch.rand(b, generator=gen)
    y = null_caption(teacher.cfg, b)
    with torch.no_grad():
        x_t = noised(x0.detach(), t, gen)
        real = x0_from_velocity(x_t, t, teacher(x_t, t * TIMESCALE, y, lq, sigma))
        fake_x0 = x0_from_velocity(x_t, t, fake(x_t, t * TIMESCALE, y, lq, sigma))
        weight = 1.0 / (x0.detach() - real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-4)
        grad = (fake_x0 - real) * weight
    return 0.5 * F.mse_loss(x0, (x0 - grad).detach())


def train_student(
    teacher: PidNet,
    ae: DemoAutoencoder,
    images: list[Tensor],
    work: Path,
    hp: DistillTraining = DistillTraining(),
    max_minutes: float | None = None,
    log: Log = print,
) -> Path | None:
    """Distil (resuming from work/state.pt); write the student EMA as work/student.safetensors."""
    work.mkdir(parents=True, exist_ok=True)
    final = work / "student.safetensors"
    if final.exists():
        return final
    torch.manual_seed(hp.seed)
    teacher = teacher.eval().requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    fake = copy.deepcopy(teacher).train().requires_grad_(True)
    ema = Ema(student, hp.ema_decay)
    opt_s = torch.optim.AdamW(student.parameters(), lr=hp.lr_student, betas=(0.0, 0.99))
    opt_f = torch.optim.AdamW(fake.parameters(), lr=hp.lr_fake, betas=(0.0, 0.99))
    disc = Discriminator() if hp.gan_weight > 0 else None
    opt_d = torch.optim.AdamW(disc.parameters(), lr=1e-4, betas=(0.0, 0.99)) if disc else None
    crops = CropSampler(images, hp.hr_size, seed=hp.seed + 11)
    gen = torch.Generator().manual_seed(hp.seed + 12)
    parts = {
        "student": student,
        "fake": fake,
        "ema": ema.module,
        "opt_s": opt_s,
        "opt_f": opt_f,
        "crop_gen": crops.gen,
        "gen": gen,
    }
    if disc is not None:
        parts |= {"disc": disc, "opt_d": opt_d}
    state_path = work / "state.pt"
    scalars = restore_state(state_path, parts)
    step = scalars["step"] if scalars else 0
    if scalars:
        ema.updates = scalars["ema_updates"]
        log(f"student: resumed at step {step}")
    clock = Clock(max_minutes)
    hw = (hp.hr_size, hp.hr_size)
    run_dmd = run_reg = run_fake = None
    while step < hp.steps:
        real_x0 = crops.batch(hp.batch)
        lq, sigma = make_condition(ae, real_x0, gen)
        k = int(torch.randint(0, 4, (), generator=gen))
        x0 = student_x0(student, lq, sigma, hw, k, gen)  # [B, 3, S, S]
        dmd = dmd_loss(x0, teacher, fake, lq, sigma, hp, gen)
        reg = x0_regression_loss(x0, real_x0, hp.grad_weight)
        loss = hp.dmd_weight * dmd + hp.reg_weight * reg
        dmd_value, reg_value = dmd.item(), reg.item()
        if disc is not None:
            t = hp.t_min + (hp.t_max - hp.t_min) * torch.rand(hp.batch, generator=gen)
            loss = loss + hp.gan_weight * F.softplus(-disc(noised(x0, t, gen), t)).mean()
        opt_s.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt_s.step()
        ema.update(student)

        generated = x0.detach()
        for _ in range(hp.fake_updates):
            fake_loss = flow_matching_loss(fake, generated, lq, sigma, gen)
            opt_f.zero_grad(set_to_none=True)
            fake_loss.backward()
            torch.nn.utils.clip_grad_norm_(fake.parameters(), 1.0)
            opt_f.step()
        if disc is not None:
            t = hp.t_min + (hp.t_max - hp.t_min) * torch.rand(hp.batch, generator=gen)
            d_loss = F.softplus(disc(noised(generated, t, gen), t)).mean()
            d_loss = d_loss + F.softplus(-disc(noised(real_x0, t, gen), t)).mean()
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
        step += 1
        run_dmd = dmd_value if run_dmd is None else 0.95 * run_dmd + 0.05 * dmd_value
        run_reg = reg_value if run_reg is None else 0.95 * run_reg + 0.05 * reg_value
        f = fake_loss.item()
        run_fake = f if run_fake is None else 0.95 * run_fake + 0.05 * f
        if step % 10 == 0:
            log(
                f"student step {step}/{hp.steps} dmd {run_dmd:.5f} reg {run_reg:.4f} "
                f"fake {run_fake:.4f} ({clock.elapsed():.0f}s)"
            )
        if save_if_due(
            state_path, parts, step, hp.steps, hp.save_every, clock, ema_updates=ema.updates
        ):
            log(f"student: time budget reached at step {step}; rerun to resume")
            return None
    save_checkpoint(ema.module, final, dtype=torch.bfloat16)
    log(f"student: wrote {final}")
    return final
