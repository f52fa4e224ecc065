"""The PiD network: LQ projection + sigma-aware gates + MMDiT patch blocks + PiT blocks.

"LQ" (low quality) names the conditioning input — the generator's latent — as opposed to the
high-resolution output; `lq_proj` is the branch that reads it. Inference only. Module and
parameter names reproduce the official state-dict keys (docs/model.md#checkpoint-files); the
math of each part is in docs/model.md#network.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pid_batch.config import NetConfig
from pid_batch.model.layers import (
    GeluMLP,
    PatchEmbedder,
    RMSNorm,
    SwiGLU,
    TextEmbedder,
    TimestepEmbedder,
    apply_rope,
    attention,
    cached,
    modulate,
    pixel_sincos_half,
    rope_1d_table,
    rope_2d_table,
    split_heads,
)

LQ_GROUPNORM_GROUPS = 4  # not 32 (docs/model.md#latent-projection)


class Conditioning(NamedTuple):
    """Step-invariant inputs of one batch: LQ features per gate (+ PiT) and caption tokens."""

    lq: tuple[Tensor, ...]  # num_lq_outputs (+1) x [B, L, D]
    text: Tensor  # [B, Lt, D]


class SigmaGate(nn.Module):
    """Sigma-aware gate: `x + sigmoid(content_proj([x; u]) - exp(log_alpha) * sigma) * u`.

    See docs/model.md#gates.
    """

    def __init__(self, dim: int, gate_type: str):
        super().__init__()
        width = dim if gate_type == "sigma_aware_per_token_per_dim" else 1
        self.content_proj = nn.Linear(2 * dim, width)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(5.0)))

    def forward(self, x: Tensor, u: Tensor, sigma: Tensor) -> Tensor:
        logits = self.content_proj(torch.cat([x, u], dim=-1))  # [B, L, D or 1]
        gamma = torch.sigmoid(logits - self.log_alpha.exp() * sigma.view(-1, 1, 1))
        return x + gamma * u  # [B, L, D]


class LQResBlock(nn.Module):
    """`x + [GN(4) -> SiLU -> conv -> GN(4) -> SiLU -> conv](x)`."""

    def __init__(self, dim: int, padding_mode: str):
        super().__init__()
        self.block = nn.Sequential(
            nn.GroupNorm(LQ_GROUPNORM_GROUPS, dim, eps=1e-5),
            nn.SiLU(),
            nn.Conv2d(dim, dim, 3, padding=1, padding_mode=padding_mode),
            nn.GroupNorm(LQ_GROUPNORM_GROUPS, dim, eps=1e-5),
            nn.SiLU(),
            nn.Conv2d(dim, dim, 3, padding=1, padding_mode=padding_mode),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class LQProjection(nn.Module):
    """`lq_proj`: latent -> patch-grid conv features -> one token tensor per gate (+ PiT head).

    See docs/model.md#latent-projection.
    """

    def __init__(
        self,
        latent_channels: int,
        hidden_dim: int,
        out_dim: int,
        num_outputs: int,
        gate_type: str,
        ratio: int,
        unpatchify_factor: int = 1,
        num_res_blocks: int = 4,
        padding_mode: str = "zeros",
        pit_output: bool = False,
        aux_rgb_head: bool = False,
        aux_rgb_pixels: int = 16,
    ):
        super().__init__()
        self.ratio = ratio
        self.unpatchify_factor = unpatchify_factor
        cin = latent_channels // unpatchify_factor**2
        self.latent_proj = nn.Sequential(
            nn.Conv2d(cin, hidden_dim, 3, padding=1, padding_mode=padding_mode),
            nn.SiLU(),
            nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, padding_mode=padding_mode),
            *[LQResBlock(hidden_dim, padding_mode) for _ in range(num_res_blocks)],
        )
        self.output_heads = nn.ModuleList(
            nn.Linear(hidden_dim, out_dim) for _ in range(num_outputs)
        )
        self.gate_modules = nn.ModuleList(SigmaGate(out_dim, gate_type) for _ in range(num_outputs))
        self.pit_head = nn.Linear(hidden_dim, out_dim) if pit_output else None
        # Training-only auxiliary RGB head (docs/model.md#unused-parts): loaded, never run.
        self.lq_aux_rgb_head = (
            nn.Sequential(
                nn.LayerNorm(hidden_dim),
                nn.Linear(hidden_dim, hidden_dim),
                nn.SiLU(),
                nn.Linear(hidden_dim, 3 * aux_rgb_pixels),
            )
            if aux_rgb_head
            else None
        )

    @classmethod
    def from_config(cls, cfg: NetConfig) -> LQProjection:
        """The LQ projection of a full `PidNet`."""
        return cls(
            latent_channels=cfg.lq_latent_channels,
            hidden_dim=cfg.lq_hidden_dim,
            out_dim=cfg.hidden_size,
            num_outputs=cfg.num_lq_outputs,
            gate_type=cfg.lq_gate_type,
            ratio=cfg.lq_ratio,
            unpatchify_factor=cfg.lq_latent_unpatchify_factor,
            num_res_blocks=cfg.lq_num_res_blocks,
            padding_mode=cfg.lq_conv_padding_mode,
            pit_output=cfg.pit_lq_inject,
            aux_rgb_head=cfg.lq_aux_rgb_head,
            aux_rgb_pixels=(cfg.patch_size // cfg.sr_scale) ** 2,
        )

    def align(self, lq_latent: Tensor, hs: int, ws: int) -> Tensor:
        """Unpatchify (flux2-v1.5) and nearest-resize the latent to the patch grid -> [B, Cin, hs, ws]."""
        z = lq_latent
        f = self.unpatchify_factor
        if f > 1:
            b, c, h, w = z.shape
            z = z.view(b, c // (f * f), f, f, h, w)  # channel index c*f*f + a*f + b
            z = z.permute(0, 1, 4, 2, 5, 3).reshape(b, c // (f * f), h * f, w * f)
        h, w = z.shape[-2:]
        if (h * self.ratio, w * self.ratio) != (hs, ws):
            raise ValueError(
                f"LQ latent grid {tuple(lq_latent.shape[-2:])} (x{f} unpatchify, x{self.ratio} "
                f"upsample) does not match the {hs}x{ws} patch grid of the output image"
            )
        if self.ratio > 1:
            z = F.interpolate(z, size=(hs, ws), mode="nearest")
        return z

    def forward(self, lq_latent: Tensor, hs: int, ws: int) -> list[Tensor]:
        """[B, C, h, w] latent -> gate features F_0..F_{n-1} (+ F_pit), each [B, hs*ws, D]."""
        z = self.align(lq_latent, hs, ws)  # [B, Cin, hs, ws]
        z = self.latent_proj(z)  # [B, Hq, hs, ws]
        tokens = z.flatten(2).transpose(1, 2)  # [B, L, Hq]
        feats = [head(tokens) for head in self.output_heads]  # n x [B, L, D]
        if self.pit_head is not None:
            feats.append(self.pit_head(tokens))
        return feats


class JointAttention(nn.Module):
    """MMDiT joint attention over [text ; image] with per-stream qkv, q/k RMSNorm and RoPE."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        head_dim = dim // heads
        self.qkv_x = nn.Linear(dim, 3 * dim, bias=False)
        self.qkv_y = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm_x = RMSNorm(head_dim)
        self.k_norm_x = RMSNorm(head_dim)
        self.q_norm_y = RMSNorm(head_dim)
        self.k_norm_y = RMSNorm(head_dim)
        self.proj_x = nn.Linear(dim, dim)
        self.proj_y = nn.Linear(dim, dim)

    def forward(
        self, x: Tensor, y: Tensor, rope_x: Tensor, rope_y: Tensor | None, text_out: bool
    ) -> tuple[Tensor, Tensor | None]:
        L, Lt = x.shape[1], y.shape[1]
        qx, kx, vx = split_heads(self.qkv_x(x), self.heads)  # [B, L, h, d]
        qy, ky, vy = split_heads(self.qkv_y(y), self.heads)  # [B, Lt, h, d]
        qx = apply_rope(self.q_norm_x(qx).transpose(1, 2), rope_x)  # [B, h, L, d]
        kx = apply_rope(self.k_norm_x(kx).transpose(1, 2), rope_x)
        qy, ky = self.q_norm_y(qy).transpose(1, 2), self.k_norm_y(ky).transpose(1, 2)
        if rope_y is not None:
            qy, ky = apply_rope(qy, rope_y), apply_rope(ky, rope_y)  # [B, h, Lt, d]
        k = torch.cat([ky, kx], dim=2)  # [B, h, Lt+L, d], text first
        v = torch.cat([vy.transpose(1, 2), vx.transpose(1, 2)], dim=2)
        if not text_out:  # last block: text queries would never be used
            return self.proj_x(attention(qx, k, v)), None  # [B, L, D]
        out = attention(torch.cat([qy, qx], dim=2), k, v)  # [B, Lt+L, D]
        out_y, out_x = out.split([Lt, L], dim=1)
        return self.proj_x(out_x), self.proj_y(out_y)


class PatchBlock(nn.Module):
    """MMDiT block with separate image ("x") and text ("y") weights, adaLN-modulated by c."""

    def __init__(self, dim: int, heads: int, ff_hidden: int, text_out: bool = True):
        super().__init__()
        self.text_out = text_out
        self.norm_x1, self.norm_y1 = RMSNorm(dim), RMSNorm(dim)
        self.norm_x2, self.norm_y2 = RMSNorm(dim), RMSNorm(dim)
        self.attn = JointAttention(dim, heads)
        self.mlp_x = SwiGLU(dim, ff_hidden)
        self.mlp_y = SwiGLU(dim, ff_hidden)
        self.adaLN_modulation_img = nn.Sequential(nn.Linear(dim, 6 * dim))
        self.adaLN_modulation_txt = nn.Sequential(nn.Linear(dim, 6 * dim))

    def forward(
        self, s: Tensor, e: Tensor, c: Tensor, rope_x: Tensor, rope_y: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        mx = self.adaLN_modulation_img(c).chunk(6, dim=-1)  # 6 x [B, 1, D]
        my = self.adaLN_modulation_txt(c).chunk(6, dim=-1)  # 6 x [B, 1, D]
        xn = modulate(self.norm_x1(s), mx[0], mx[1])  # [B, L, D]
        yn = modulate(self.norm_y1(e), my[0], my[1])  # [B, Lt, D]
        ax, ay = self.attn(xn, yn, rope_x, rope_y, self.text_out)
        s = s + mx[2] * ax
        s = s + mx[5] * self.mlp_x(modulate(self.norm_x2(s), mx[3], mx[4]))  # [B, L, D]
        if ay is None:
            return s, e
        e = e + my[2] * ay
        e = e + my[5] * self.mlp_y(modulate(self.norm_y2(e), my[3], my[4]))  # [B, Lt, D]
        return s, e


class PixelAttention(nn.Module):
    """PiT self-attention over the patch tokens of each image, with 2-D RoPE."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = RMSNorm(dim // heads)
        self.k_norm = RMSNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, a: Tensor, rope: Tensor) -> Tensor:
        q, k, v = split_heads(self.qkv(a), self.heads)  # [B, L, h, d]
        q = apply_rope(self.q_norm(q).transpose(1, 2), rope)  # [B, h, L, d]
        k = apply_rope(self.k_norm(k).transpose(1, 2), rope)
        return self.proj(attention(q, k, v.transpose(1, 2)))  # [B, L, A]


class PixelBlock(nn.Module):
    """PiT block: per-pixel adaLN, patch-compressed attention, per-pixel GELU MLP.

    See docs/model.md#pixel-blocks.
    """

    def __init__(self, dim: int, pixels: int, attn_dim: int, heads: int, cond_dim: int):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.norm2 = RMSNorm(dim)
        self.compress_to_attn = nn.Linear(pixels * dim, attn_dim)
        self.expand_from_attn = nn.Linear(attn_dim, pixels * dim)
        self.attn = PixelAttention(attn_dim, heads)
        self.mlp = GeluMLP(dim)
        self.adaLN_modulation = nn.Sequential(nn.Linear(cond_dim, 6 * dim * pixels))

    def forward(self, z: Tensor, s_cond: Tensor, rope: Tensor, batch: int) -> Tensor:
        BL, P, C = z.shape
        m = self.adaLN_modulation(s_cond).view(BL, P, 6 * C).chunk(6, dim=-1)  # 6 x [BL, P, C]
        zn = modulate(self.norm1(z), m[0], m[1])  # [BL, P, C]
        a = self.compress_to_attn(zn.reshape(BL, P * C)).view(batch, BL // batch, -1)  # [B, L, A]
        a = self.attn(a, rope)  # [B, L, A]
        z = z + m[2] * self.expand_from_attn(a.reshape(BL, -1)).view(BL, P, C)
        return z + m[5] * self.mlp(modulate(self.norm2(z), m[3], m[4]))  # [BL, P, C]


class PixelEmbedder(nn.Module):
    """`pixel_embedder`: per-pixel Linear(3 -> C) + sin-cos table, grouped per patch -> [B*L, p*p, C]."""

    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(in_channels, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, _, H, W = x.shape
        p, C, dev = self.patch_size, self.proj.out_features, x.device
        emb = self.proj(x.permute(0, 2, 3, 1))  # [B, H, W, C]
        col = cached(("pixcol", W, C, dev), lambda: pixel_sincos_half(W, C // 2, dev))  # [W, C/2]
        row = cached(("pixrow", H, C, dev), lambda: pixel_sincos_half(H, C // 2, dev))  # [H, C/2]
        # Column (x) features first, then row (y) features (docs/model.md#pixel-blocks).
        emb = torch.cat([emb[..., : C // 2] + col, emb[..., C // 2 :] + row[:, None]], dim=-1)
        emb = emb.view(B, H // p, p, W // p, p, C).permute(0, 1, 3, 2, 4, 5)  # [B, hs, ws, p, p, C]
        return emb.reshape(B * (H // p) * (W // p), p * p, C)


class FinalLayer(nn.Module):
    """RMSNorm(C) -> Linear(C -> 3) per pixel."""

    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.linear = nn.Linear(dim, out_channels)

    def forward(self, z: Tensor) -> Tensor:
        return self.linear(self.norm(z))


class PidNet(nn.Module):
    """PiD decoder: `net(x_t, t * TIMESCALE, caption_embs, lq_latent, degrade_sigma) -> velocity`.

    Runs in fp32, or under `torch.autocast` (bf16) with fp32 or bf16 weights; inputs are upcast
    to fp32 like the reference. RoPE / sin-cos tables are cached per grid and device.
    """

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.cfg = cfg
        D, p = cfg.hidden_size, cfg.patch_size
        self.y_pos_embedding = nn.Parameter(torch.randn(1, cfg.txt_max_length, D) * 0.02)
        self.pixel_embedder = PixelEmbedder(cfg.in_channels, cfg.pixel_hidden_size, p)
        self.s_embedder = PatchEmbedder(cfg.in_channels * p * p, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = TextEmbedder(cfg.txt_embed_dim, D)
        self.patch_blocks = nn.ModuleList(
            PatchBlock(D, cfg.num_groups, cfg.swiglu_hidden, text_out=i < cfg.patch_depth - 1)
            for i in range(cfg.patch_depth)
        )
        self.pixel_blocks = nn.ModuleList(
            PixelBlock(
                cfg.pixel_hidden_size, p * p, cfg.pixel_attn_hidden_size, cfg.pixel_num_groups, D
            )
            for _ in range(cfg.pixel_depth)
        )
        self.final_layer = FinalLayer(cfg.pixel_hidden_size, cfg.in_channels)
        self.lq_proj = LQProjection.from_config(cfg)
        self.pit_lq_gate = SigmaGate(D, cfg.lq_gate_type) if cfg.pit_lq_inject else None

    def rope_tables(
        self, hs: int, ws: int, text_len: int, device: torch.device
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """(patch-level 2-D, text 1-D or None, PiT 2-D) RoPE tables for one patch grid (cached)."""
        cfg = self.cfg
        ref = (cfg.rope_ref_h // cfg.patch_size, cfg.rope_ref_w // cfg.patch_size)
        rope_x = rope_2d_table(hs, ws, cfg.head_dim, ref, cfg.rope_mode, device)
        rope_pit = rope_2d_table(hs, ws, cfg.pixel_head_dim, ref, cfg.rope_mode, device)
        rope_y = None
        if cfg.use_text_rope:
            rope_y = rope_1d_table(text_len, cfg.head_dim, cfg.text_rope_theta, device)
        return rope_x, rope_y, rope_pit

    def _check_dtype(self, device: torch.device) -> None:
        weight_dtype = self.s_embedder.proj.weight.dtype
        if weight_dtype != torch.float32 and not torch.is_autocast_enabled(device.type):
            raise ValueError(
                f"{weight_dtype} weights need torch.autocast (reference: fp32 weights, bf16 autocast)"
            )

    def condition(self, caption_embs: Tensor, lq_latent: Tensor, H: int, W: int) -> Conditioning:
        """The step-invariant part of a forward: LQ features and caption tokens, once per sample."""
        cfg = self.cfg
        p = cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of patch_size={p}")
        self._check_dtype(lq_latent.device)
        caption_embs, lq_latent = caption_embs.float(), lq_latent.float()
        Lt = min(caption_embs.shape[1], cfg.txt_max_length)
        lq = self.lq_proj(lq_latent, H // p, W // p)  # num_lq_outputs (+1) x [B, L, D]
        e = self.y_embedder(caption_embs[:, :Lt]) + self.y_pos_embedding[:, :Lt]  # [B, Lt, D]
        return Conditioning(tuple(lq), e)

    def step(self, x: Tensor, t: Tensor, cond: Conditioning, degrade_sigma: Tensor) -> Tensor:
        """The per-step part of a forward, given `condition(...)` of the same sample -> velocity."""
        cfg = self.cfg
        B, _, H, W = x.shape
        p = cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of patch_size={p}")
        hs, ws = H // p, W // p
        self._check_dtype(x.device)
        x = x.float()
        sigma = degrade_sigma.float()  # [B]
        lq, e = cond.lq, cond.text
        rope_x, rope_y, rope_pit = self.rope_tables(hs, ws, e.shape[1], x.device)

        patches = x.view(B, -1, hs, p, ws, p).permute(0, 2, 4, 1, 3, 5).reshape(B, hs * ws, -1)
        s = self.s_embedder(patches)  # [B, L, D]
        t_emb = self.t_embedder(t)[:, None]  # [B, 1, D]
        c = F.silu(t_emb)  # [B, 1, D]

        for i, block in enumerate(self.patch_blocks):
            if i % cfg.lq_interval == 0:
                k = i // cfg.lq_interval
                s = self.lq_proj.gate_modules[k](s, lq[k], sigma)  # [B, L, D]
            s, e = block(s, e, c, rope_x, rope_y)  # [B, L, D], [B, Lt, D]
        s = F.silu(t_emb + s)  # [B, L, D]
        if self.pit_lq_gate is not None:
            s = self.pit_lq_gate(s, lq[-1], sigma)  # [B, L, D]
        s_cond = s.reshape(B * hs * ws, -1)  # [B*L, D]

        z = self.pixel_embedder(x)  # [B*L, p*p, C]
        for block in self.pixel_blocks:
            z = block(z, s_cond, rope_pit, B)  # [B*L, p*p, C]
        out = self.final_layer(z)  # [B*L, p*p, 3]
        out = out.view(B, hs, ws, p, p, -1).permute(0, 5, 1, 3, 2, 4)  # [B, 3, hs, p, ws, p]
        return out.reshape(B, -1, H, W)  # [B, 3, H, W]

    def forward(
        self, x: Tensor, t: Tensor, caption_embs: Tensor, lq_latent: Tensor, degrade_sigma: Tensor
    ) -> Tensor:
        """One full forward: `step(x, t, condition(caption_embs, lq_latent), degrade_sigma)`."""
        cond = self.condition(caption_embs, lq_latent, x.shape[-2], x.shape[-1])
        return self.step(x, t, cond, degrade_sigma)
