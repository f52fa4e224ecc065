"""Exact FLOP count of one PiD forward (matmuls, convs, attention; 2 FLOPs per multiply-add)."""

from __future__ import annotations

from typing import NamedTuple

from pid_batch.config import TXT_MAX_LENGTH, NetConfig


class Flops(NamedTuple):
    """One forward's FLOPs, split by how they scale: with tokens (GEMMs, convs) or tokens²."""

    linear: int
    attention: int

    @property
    def total(self) -> int:
        return self.linear + self.attention


def count_condition_flops(cfg: NetConfig, H: int, W: int, txt_len: int = TXT_MAX_LENGTH) -> Flops:
    """FLOPs of `PidNet.condition` (LQ conv stack + output heads, y embedder): once per decode."""
    p = cfg.patch_size
    if H <= 0 or W <= 0 or H % p or W % p:
        raise ValueError(f"output size must be positive multiples of {p}; got {W}x{H}")
    L = (H // p) * (W // p)  # patch tokens
    Lt = min(txt_len, cfg.txt_max_length)
    D, Hq = cfg.hidden_size, cfg.lq_hidden_dim
    n_feats = cfg.num_lq_outputs + int(cfg.pit_lq_inject)
    lin = 2 * L * cfg.lq_in_channels * 9 * Hq
    lin += 2 * L * Hq * 9 * Hq * (1 + 2 * cfg.lq_num_res_blocks)  # LQ conv stack
    lin += n_feats * 2 * L * Hq * D  # LQ output heads
    lin += 2 * Lt * cfg.txt_embed_dim * D  # y embedder
    return Flops(lin, 0)


def count_decode_flops(
    cfg: NetConfig, H: int, W: int, steps: int = 4, txt_len: int = TXT_MAX_LENGTH
) -> Flops:
    """FLOPs of one `steps`-step decode: `steps` forwards, the conditioning counted once."""
    f, c = count_flops(cfg, H, W, txt_len), count_condition_flops(cfg, H, W, txt_len)
    return Flops(steps * f.linear - (steps - 1) * c.linear, steps * f.attention)


def count_flops(cfg: NetConfig, H: int, W: int, txt_len: int = TXT_MAX_LENGTH) -> Flops:
    """FLOPs of one forward for one H x W image (checked against torch's FlopCounterMode)."""
    p = cfg.patch_size
    if H <= 0 or W <= 0 or H % p or W % p:
        raise ValueError(f"output size must be positive multiples of {p}; got {W}x{H}")
    L = (H // p) * (W // p)  # patch tokens
    P = p * p  # pixels per patch
    Lt = min(txt_len, cfg.txt_max_length)
    D, C, A = cfg.hidden_size, cfg.pixel_hidden_size, cfg.pixel_attn_hidden_size
    FF = cfg.swiglu_hidden
    n_feats = cfg.num_lq_outputs + int(cfg.pit_lq_inject)

    def mm(m: int, k: int, n: int) -> int:
        return 2 * m * k * n

    def attn(nq: int, nk: int, width: int) -> int:
        return 2 * mm(nq, width, nk)  # q k^T and p v, summed over heads

    lin = count_condition_flops(cfg, H, W, txt_len).linear  # LQ convs + heads, y embedder
    lin += n_feats * mm(L, 2 * D, cfg.gate_width)  # gates
    lin += mm(L, cfg.in_channels * P, D) + mm(1, 256, D) + mm(1, D, D)  # s / t embedders
    att = 0
    for i in range(cfg.patch_depth):
        text_out = i < cfg.patch_depth - 1  # the last block's text stream is never used
        lin += 2 * mm(1, D, 6 * D) + mm(L, D, 3 * D) + mm(Lt, D, 3 * D)
        att += attn(L + Lt if text_out else L, L + Lt, D)
        lin += mm(L, D, D) + 3 * mm(L, D, FF)
        if text_out:
            lin += mm(Lt, D, D) + 3 * mm(Lt, D, FF)
    lin += mm(L * P, cfg.in_channels, C)  # pixel embedder
    per_pit = mm(L, D, 6 * C * P) + mm(L, P * C, A) + mm(L, A, 3 * A)
    per_pit += mm(L, A, A) + mm(L, A, P * C) + mm(L * P, C, 4 * C) + mm(L * P, 4 * C, C)
    lin += cfg.pixel_depth * per_pit + mm(L * P, C, cfg.in_channels)  # PiT blocks, final layer
    att += cfg.pixel_depth * attn(L, L, A)
    return Flops(lin, att)
