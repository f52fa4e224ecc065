"""Math and primitive layers of PiD: norms, embeddings, RoPE, attention, MLPs.

The math: docs/model.md#primitives, #timestep-embedding, #rope and #pixel-blocks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# RoPE positions are linspace(0, 16, n), not integer indices (docs/model.md#rope).
ROPE_POS_RANGE = 16.0
TABLE_CACHE_SIZE = 64  # constant tables kept (5 per resolution); oldest evicted first
ROPE_THETA = 10000.0
TIMESTEP_MAX_PERIOD = 10.0  # not 10000 (docs/model.md#timestep-embedding)
TIMESTEP_FREQ_DIM = 256
PIXEL_SINCOS_BASE = 10000.0

_TABLE_CACHE: dict[tuple, Tensor] = {}


def cached(key: tuple, build) -> Tensor:
    """Memoise a constant table per key (grid, device, ...); built fresh while compiling."""
    if torch.compiler.is_compiling():
        return build()
    table = _TABLE_CACHE.get(key)
    if table is None:
        if len(_TABLE_CACHE) >= TABLE_CACHE_SIZE:
            del _TABLE_CACHE[next(iter(_TABLE_CACHE))]
        # A table built under inference_mode (a decoder) could not later be saved for backward
        # (a trainer's forward): build every table as a normal tensor.
        with torch.inference_mode(False):
            table = _TABLE_CACHE[key] = build()
    return table


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation `x * (1 + scale) + shift`."""
    return x * (1 + scale) + shift


class RMSNorm(nn.Module):
    """RMSNorm with learned scale; statistics in fp32, scale multiplied in the weight's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def timestep_embedding(t: Tensor, dim: int = TIMESTEP_FREQ_DIM) -> Tensor:
    """[B] net-facing timesteps (t * TIMESCALE) -> [B, dim] `[cos, sin]` features, max period 10."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(TIMESTEP_MAX_PERIOD)
        * torch.arange(half, dtype=torch.float32, device=t.device)
        / half
    )
    args = t.float()[:, None] * freqs[None]  # [B, half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, dim]


def ntk_theta(n: int, n_ref: int, head_dim: int, mode: str) -> float:
    """Per-axis RoPE base: 10000, rescaled by `(n / n_ref)^(a / (a - 2))`, a = d/2, for ntk_aware."""
    if mode == "original":
        return ROPE_THETA
    a = head_dim / 2
    if a <= 2:
        return ROPE_THETA
    return ROPE_THETA * (n / n_ref) ** (a / (a - 2))


def rope_2d_angles(
    hs: int, ws: int, head_dim: int, ref_hw: tuple[int, int], mode: str, device: torch.device
) -> Tensor:
    """[hs*ws, head_dim/2] angles, interleaved x, y, x, y... over the normalised patch grid.

    Positions, frequencies and the NTK-aware base: docs/model.md#rope.
    """
    n = head_dim // 4
    exponents = torch.arange(0, head_dim, 4, dtype=torch.float32, device=device)[:n] / head_dim
    omega_y = 1.0 / (ntk_theta(hs, ref_hw[0], head_dim, mode) ** exponents)  # [n]
    omega_x = 1.0 / (ntk_theta(ws, ref_hw[1], head_dim, mode) ** exponents)  # [n]
    pos_y = torch.linspace(0, ROPE_POS_RANGE, hs, dtype=torch.float32, device=device)
    pos_x = torch.linspace(0, ROPE_POS_RANGE, ws, dtype=torch.float32, device=device)
    ang_y = pos_y[:, None, None] * omega_y[None, None, :]  # [hs, 1, n]
    ang_x = pos_x[None, :, None] * omega_x[None, None, :]  # [1, ws, n]
    ang = torch.stack([ang_x.expand(hs, ws, n), ang_y.expand(hs, ws, n)], dim=-1)  # [hs, ws, n, 2]
    return ang.reshape(hs * ws, 2 * n)


def rope_1d_angles(length: int, head_dim: int, theta: float, device: torch.device) -> Tensor:
    """[length, head_dim/2] text RoPE angles `pos * theta^(-2m/d)`, positions 0..length-1."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    omega = 1.0 / (theta**exponents)  # [d/2]
    pos = torch.arange(length, dtype=torch.float32, device=device)
    return pos[:, None] * omega[None, :]


def rope_table(angles: Tensor) -> Tensor:
    """Angles [N, d/2] -> fp32 [N, d/2, 2] table of (cos, sin)."""
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)


def rope_2d_table(
    hs: int, ws: int, head_dim: int, ref_hw: tuple[int, int], mode: str, device: torch.device
) -> Tensor:
    """Cached fp32 [hs*ws, head_dim/2, 2] (cos, sin) table of the 2-D image RoPE."""
    key = ("rope2d", hs, ws, head_dim, ref_hw, mode, device)
    return cached(key, lambda: rope_table(rope_2d_angles(hs, ws, head_dim, ref_hw, mode, device)))


def rope_1d_table(length: int, head_dim: int, theta: float, device: torch.device) -> Tensor:
    """Cached fp32 [length, head_dim/2, 2] (cos, sin) table of the 1-D text RoPE."""
    key = ("rope1d", length, head_dim, theta, device)
    return cached(key, lambda: rope_table(rope_1d_angles(length, head_dim, theta, device)))


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate adjacent feature pairs (2m, 2m+1) of x [B, heads, N, d] by table [N, d/2, 2], in fp32."""
    xf = x.float().unflatten(-1, (-1, 2))  # [B, heads, N, d/2, 2]
    a, b = xf[..., 0], xf[..., 1]
    cos, sin = table[..., 0], table[..., 1]  # [N, d/2]
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return out.flatten(-2).type_as(x)


def split_heads(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """[B, N, 3*W] -> q, k, v each [B, N, heads, W/heads] (q/k/v index 0/1/2)."""
    b, n, _ = qkv.shape
    q, k, v = qkv.view(b, n, 3, heads, -1).unbind(dim=2)
    return q, k, v


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """SDPA over [B, heads, N, d] without mask -> merged heads [B, Nq, heads*d]."""
    out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, Nq, d]
    return out.transpose(1, 2).flatten(2)


def pixel_sincos_half(n: int, dim: int, device: torch.device) -> Tensor:
    """fp32 [n, dim] `[sin(u nu_k), cos(u nu_k)]` of integer coordinates u (float64 compute).

    See docs/model.md#pixel-blocks (pixel embedding).
    """
    q = dim // 2
    nu = PIXEL_SINCOS_BASE ** (-torch.arange(q, dtype=torch.float64, device=device) / q)  # [q]
    ang = torch.arange(n, dtype=torch.float64, device=device)[:, None] * nu[None]  # [n, q]
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1).float()


class SwiGLU(nn.Module):
    """Bias-free SwiGLU FF `w2(silu(w1 x) * w3 x)`, hidden `int(2 * int(4 D) / 3)`."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GeluMLP(nn.Module):
    """PiT per-pixel MLP `fc2(gelu(fc1 x))`, hidden 4C, exact (erf) GELU."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TimestepEmbedder(nn.Module):
    """`t_embedder`: 256 sinusoidal features -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(TIMESTEP_FREQ_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t))  # [B, D]


class TextEmbedder(nn.Module):
    """`y_embedder`: caption embeddings -> Linear -> RMSNorm (position table added by the net)."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, hidden)
        self.norm = RMSNorm(hidden)

    def forward(self, y: Tensor) -> Tensor:
        return self.norm(self.proj(y))  # [B, Lt, D]


class PatchEmbedder(nn.Module):
    """`s_embedder`: channel-major flattened 16x16 patches -> Linear (its norm is identity)."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, hidden)

    def forward(self, patches: Tensor) -> Tensor:
        return self.proj(patches)  # [B, L, D]
