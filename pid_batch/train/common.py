"""Pieces the trainers share: resumable state files, EMA, the null caption, latent augmentation."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pid_batch.backbones import TRAINED_SIGMA_MAX
from pid_batch.config import NetConfig
from pid_batch.model.text import NullTextEncoder

P_AUGMENT = 0.75  # fraction of samples whose latent is noised


def null_caption(cfg: NetConfig, batch: int) -> Tensor:
    """The empty caption's embedding as the inference path builds it (NullTextEncoder) -> [B, L, D]."""
    enc = NullTextEncoder(cfg.txt_embed_dim, cfg.txt_max_length)
    return enc.encode([""]).expand(batch, -1, -1)


def augment_latent(
    lq: Tensor, gen: torch.Generator, sigma_max: float = TRAINED_SIGMA_MAX, p: float = P_AUGMENT
) -> tuple[Tensor, Tensor]:
    """Noise clean latents [B, C, h, w] to a per-sample sigma (flow frame) -> (latent, sigma [B])."""
    b = lq.shape[0]
    sigma = torch.rand(b, generator=gen) * sigma_max
    sigma = torch.where(torch.rand(b, generator=gen) < p, sigma, torch.zeros_like(sigma))
    eps = torch.randn(lq.shape, generator=gen)
    s = sigma[:, None, None, None]
    return (1 - s) * lq + s * eps, sigma


def logit_normal_t(b: int, gen: torch.Generator, lo: float = 1e-3, hi: float = 0.999) -> Tensor:
    """Flow-matching times t ~ sigmoid(N(0, 1)), clipped to [lo, hi] -> [B]."""
    return torch.sigmoid(torch.randn(b, generator=gen)).clamp(lo, hi)


def x0_from_velocity(x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
    """x0 = x_t - t v for x_t = (1 - t) x0 + t eps and v = eps - x0 (docs/model.md#steps)."""
    return x_t - t[:, None, None, None] * v


def x0_regression_loss(x0_pred: Tensor, x0: Tensor, grad_weight: float) -> Tensor:
    """Pixel MSE plus `grad_weight` x MSE of the steps between horizontal and vertical neighbours.

    The step term penalises an output that is flat inside a patch and jumps at its border (the
    demo decoder's mosaic) more than plain MSE does.
    """
    loss = F.mse_loss(x0_pred, x0)
    if grad_weight > 0:
        e = x0_pred - x0
        loss = loss + grad_weight * (
            e.diff(dim=-1).square().mean() + e.diff(dim=-2).square().mean()
        )
    return loss


class Ema:
    """Exponential moving average of a module's parameters (warm-up: decay min(d, (1+n)/(10+n)))."""

    def __init__(self, module: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, p in zip(self.module.parameters(), module.parameters()):
            e.lerp_(p.detach(), 1 - d)


Parts = dict  # name -> module / optimizer / scheduler / torch.Generator: what a state file holds


def save_state(path: Path, parts: Parts, **scalars) -> None:
    """Atomically write the parts' states plus scalars (step, counters) for resuming."""
    state = {
        k: v.get_state() if isinstance(v, torch.Generator) else v.state_dict()
        for k, v in parts.items()
    }
    tmp = path.with_suffix(".tmp")
    torch.save({**state, **scalars}, tmp)
    tmp.replace(path)


def load_state(path: Path) -> dict:
    """A state written by save_state (tensors, numbers and dicts only: weights_only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def restore_state(path: Path, parts: Parts) -> dict | None:
    """Load `path` into the parts (a part the file lacks keeps its fresh state); its scalars, or None."""
    if not path.exists():
        return None
    state = load_state(path)
    for k, obj in parts.items():
        if k not in state:
            continue
        if isinstance(obj, torch.Generator):
            obj.set_state(state[k])
        else:
            obj.load_state_dict(state[k])
    return {k: v for k, v in state.items() if k not in parts}


class Clock:
    """Wall-time budget of one run: `expired()` after max_minutes (None: never)."""

    def __init__(self, max_minutes: float | None):
        self.start = time.monotonic()
        self.max_s = None if max_minutes is None else max_minutes * 60

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def expired(self) -> bool:
        return self.max_s is not None and self.elapsed() >= self.max_s


Log = Callable[[str], None]


def save_if_due(
    path: Path, parts: Parts, step: int, total: int, every: int, clock: Clock, **scalars
) -> bool:
    """Save every `every` steps, at the end and when the budget runs out; True: stop here."""
    stop = clock.expired() and step < total
    if step % every == 0 or step == total or stop:
        save_state(path, parts, step=step, **scalars)
    return stop
