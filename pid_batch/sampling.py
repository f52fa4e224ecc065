"""The distilled PiD sampler: schedule functions, per-sample noise, the SDE loop.

The math: docs/model.md#sampler.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from pid_batch.config import DEFAULT_T_LIST, TIMESCALE

Generators = torch.Generator | Sequence[torch.Generator] | None


def student_t_list(t_list: Sequence[float] = DEFAULT_T_LIST, steps: int = 4) -> list[float]:
    """Times visited by an N-step student: `T[round(linspace(0, len-1, N+1))]`; N = 1 -> [1.0, 0.0].

    Rounding is half-to-even (N = 2 -> [0.999, 0.634, 0], N = 3 -> [0.999, 0.866, 0.342, 0]).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps == 1:
        return [1.0, 0.0]
    idx = torch.linspace(0, len(t_list) - 1, steps + 1, dtype=torch.float64).round().long()
    return [float(t_list[i]) for i in idx.tolist()]


def per_sample_generators(
    seeds: Sequence[int], device: torch.device | str
) -> list[torch.Generator]:
    """One seeded generator per sample, so a sample's noise does not depend on its batch."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def initial_noise(
    generators: Sequence[torch.Generator],
    shape_chw: Sequence[int],
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """First draw of each generator, stacked -> [B, C, H, W]."""
    return torch.stack(
        [torch.randn(tuple(shape_chw), generator=g, device=device, dtype=dtype) for g in generators]
    )


def _draw(like: Tensor, generator: Generators) -> Tensor:
    """N(0, I) shaped like `like`, from one generator, per-sample generators, or the global RNG."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    if len(generator) != like.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {like.shape[0]}")
    return initial_noise(generator, like.shape[1:], like.device, like.dtype)


@torch.no_grad()
def sample(
    net: Callable[..., Tensor],
    noise: Tensor,
    caption_embs: Tensor,
    lq_latent: Tensor,
    degrade_sigma: Tensor,
    t_list: Sequence[float],
    step_noises: Sequence[Tensor] | None = None,
    generator: Generators = None,
    callback: Callable[[int, float, Tensor], None] | None = None,
    timescale: float = TIMESCALE,
) -> Tensor:
    """SDE sampling from `noise` [B, 3, H, W] over `t_list` (ending in 0); returns clamp(x, -1, 1).

    Each step: `x0 = x - t * net(x, t * timescale, ...)` in float64, then, if `t' > 0`,
    `x = (1 - t') x0 + t' eps` with eps from `step_noises[k]`, the generator(s) or the global RNG.
    `callback(k, t, x)` runs after step k. A net with `condition(caption_embs, lq_latent, H, W)`
    and `step(x, t, cond, degrade_sigma)` methods has its conditioning computed once per call.
    """
    t_list = [float(t) for t in t_list]
    ts = torch.tensor(t_list, dtype=torch.float32, device=noise.device)
    n = len(t_list) - 1
    renoised = sum(t > 0 for t in t_list[1:])  # steps that mix in fresh noise
    if step_noises is not None and len(step_noises) < renoised:
        raise ValueError(f"need {renoised} step noises for t_list {t_list}, got {len(step_noises)}")
    x = noise
    B = x.shape[0]
    # A net with `condition`/`step` (PidNet) gets its step-invariant work done once, not per step.
    split = callable(getattr(net, "condition", None)) and callable(getattr(net, "step", None))
    if split:
        cond = net.condition(caption_embs, lq_latent, x.shape[-2], x.shape[-1])
    for k in range(n):
        t, t_next = ts[k], ts[k + 1]
        if split:
            v = net.step(x, (t * timescale).expand(B), cond, degrade_sigma)
        else:
            v = net(x, (t * timescale).expand(B), caption_embs, lq_latent, degrade_sigma)
        x0 = (x.double() - t.double() * v.double()).to(x.dtype)
        if t_list[k + 1] > 0:
            eps = step_noises[k].to(x) if step_noises is not None else _draw(x, generator)
            x = (1 - t_next) * x0 + t_next * eps
        else:
            x = x0
        if callback is not None:
            callback(k, t_list[k], x)
    return x.clamp(-1, 1)
