"""Tiled decoding: a PiD network seen through overlapping tiles, as one net for the sampler.

`TiledNet` has the `condition` / `step` pair `sampling.sample` calls, so the sampler, its noise
and its update stay as they are: the sampler holds ONE noise tensor for the whole image (drawn
from the sample's seed), and at every step `step` crops the current image into tiles, runs the
network on them in batches, and blends the tiles' velocities with weights that fall smoothly
(raised cosine) to zero across each tile's interior borders, normalised to sum to one at every
pixel. The update `x0 = x - t * v` is linear in v, so blending the velocity is the same as
averaging the tiles' denoised predictions, as MultiDiffusion (Bar-Tal et al. 2023) does. Each
tile is decoded as an image of its own from its crop of the latent; caption and degrade sigma
are the sample's. Conditioning runs once per decode, per tile.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from pid_batch.tiles import TilePlan


def axis_window(length: int, start: int, side: int, ramp: int) -> Tensor:
    """1-D tile weights [length]: 1 inside, sin² ramps of `ramp` px toward borders interior to
    the image (none at the image's own edges); never 0, so every pixel has some weight."""
    w = torch.ones(length, dtype=torch.float64)
    ramp = min(ramp, length)
    if ramp:
        rise = torch.sin(math.pi / 2 * (torch.arange(ramp, dtype=torch.float64) + 0.5) / ramp) ** 2
        if start > 0:
            w[:ramp] = rise
        if start + length < side:
            w[-ramp:] = torch.minimum(w[-ramp:], rise.flip(0))
    return w


class TiledNet:
    """`condition` / `step` of a PiD net (or a CompiledNet) over the tiles of `plan`.

    `cell`: output pixels per latent cell (tile origins are multiples of it). `chunk`: tiles per
    network call; with `pad` the last call is padded to `chunk` so a compiled net sees one shape.
    Tiles are ordered sample-major, then row-major over the grid.
    """

    def __init__(self, net, plan: TilePlan, cell: int, chunk: int, pad: bool = False):
        if chunk < 1:
            raise ValueError(f"chunk={chunk} must be >= 1")
        for y, x in plan.boxes:
            if y % cell or x % cell or plan.tile_h % cell or plan.tile_w % cell:
                raise ValueError(
                    f"tile ({y}, {x}) {plan.tile_w}x{plan.tile_h} is off the {cell}-px latent grid"
                )
        self.net, self.plan, self.cell, self.chunk, self.pad = net, plan, cell, chunk, pad
        self._weights: Tensor | None = None  # [n, th, tw] on the decode's device

    def _tile_weights(self, device: torch.device) -> Tensor:
        """Each tile's window divided by the windows' sum over the image (a partition of one)."""
        if self._weights is None or self._weights.device != device:
            p = self.plan
            wy = {y: axis_window(p.tile_h, y, p.height, p.overlap) for y in p.ys}
            wx = {x: axis_window(p.tile_w, x, p.width, p.overlap) for x in p.xs}
            w = torch.stack([wy[y][:, None] * wx[x][None, :] for y, x in p.boxes])  # [n, th, tw]
            total = torch.zeros(p.height, p.width, dtype=torch.float64)
            for k, (y, x) in enumerate(p.boxes):
                total[y : y + p.tile_h, x : x + p.tile_w] += w[k]
            for k, (y, x) in enumerate(p.boxes):
                w[k] /= total[y : y + p.tile_h, x : x + p.tile_w]
            self._weights = w.float().to(device)
        return self._weights

    def _chunks(self, *tensors: Tensor) -> Iterator[tuple[Tensor, ...]]:
        """Slices of `chunk` tiles along dim 0 (the last padded with its final tile if `pad`)."""
        total = tensors[0].shape[0]
        for i in range(0, total, self.chunk):
            part = [t[i : i + self.chunk] for t in tensors]
            short = self.chunk - part[0].shape[0]
            if self.pad and short:
                part = [torch.cat([t, t[-1:].expand(short, *t.shape[1:])]) for t in part]
            yield tuple(part)

    def _crop(self, images: Tensor, scale: int) -> Tensor:
        """[B, C, H/scale, W/scale] → tiles [B*n, C, th/scale, tw/scale]."""
        p = self.plan
        th, tw = p.tile_h // scale, p.tile_w // scale
        tiles = [
            images[:, :, y // scale : y // scale + th, x // scale : x // scale + tw]
            for y, x in p.boxes
        ]
        return torch.stack(tiles, 1).flatten(0, 1)

    def condition(self, caption_embs: Tensor, lq_latent: Tensor, H: int, W: int) -> list:
        """Per-chunk conditionings of every tile: its latent crop, the sample's caption."""
        p = self.plan
        if (H, W) != (p.height, p.width):
            raise ValueError(f"tile plan is for {p.width}x{p.height}, asked for {W}x{H}")
        lq = self._crop(lq_latent, self.cell)  # [B*n, C, th/cell, tw/cell]
        embs = caption_embs.repeat_interleave(p.count, 0)  # [B*n, Lt, txt_dim]
        return [self.net.condition(e, z, p.tile_h, p.tile_w) for e, z in self._chunks(embs, lq)]

    def step(self, x: Tensor, t: Tensor, cond: list, degrade_sigma: Tensor) -> Tensor:
        """Velocity [B, 3, H, W] (fp32): the tiles' velocities blended by their weights."""
        p = self.plan
        B, n = x.shape[0], p.count
        weights = self._tile_weights(x.device)  # [n, th, tw]
        tiles = self._crop(x, 1)  # [B*n, 3, th, tw]
        ts, sigma = t.repeat_interleave(n), degrade_sigma.repeat_interleave(n)  # [B*n]
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        j = 0  # global tile index: sample j // n, box j % n
        for (xs, tt, ss), c in zip(self._chunks(tiles, ts, sigma), cond, strict=True):
            v = self.net.step(xs, tt, c, ss).float()  # [chunk, 3, th, tw]
            for v_tile in v[: B * n - j]:
                (y, x0), b = p.boxes[j % n], j // n
                out[b, :, y : y + p.tile_h, x0 : x0 + p.tile_w] += v_tile * weights[j % n]
                j += 1
        return out
