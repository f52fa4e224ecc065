"""What tiling costs on this machine: one output size decoded whole and in tiles (tiny preset, CPU).

    python benchmarks/tile_bench.py --backbone flux --size 1024x768 --steps 4

Prints the tile plan, the wall time of each decode (best of --repeat) and the FLOP ratio the
planner uses, so the measured ratio can be set against the counted one.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from pid_batch.backbones import resolve_checkpoint
from pid_batch.decoder import Decoder
from pid_batch.model.flops import count_decode_flops
from pid_batch.model.text import NullTextEncoder
from pid_batch.tiles import parse_size


def best_ms(d: Decoder, lat: np.ndarray, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = d.decode([lat], sigmas=[0.0], seeds=[0])
        times.append((time.perf_counter() - t0) * 1000)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="flux")
    ap.add_argument("--ckpt-type", default=None)
    ap.add_argument("--size", default="1024x768", help="output WxH")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--micro-batch", type=int, default=4, help="tiles per network call")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    spec = resolve_checkpoint(args.backbone, args.ckpt_type)
    height, width = parse_size(args.size, "--size")
    cell = spec.latent_cell
    lat = (
        np.random.default_rng(0)
        .standard_normal((spec.latent_channels, height // cell, width // cell))
        .astype(np.float32)
    )
    res = {}
    for mode in ("never", "always"):
        d = Decoder(
            spec, preset="tiny", device="cpu", steps=args.steps, tiling=mode,
            micro_batch=args.micro_batch,
        )  # fmt: skip
        d.text_encoder = NullTextEncoder(dim=d.cfg.txt_embed_dim, max_length=d.cfg.txt_max_length)
        res[mode] = best_ms(d, lat, args.repeat)
    ms_whole, _ = res["never"]
    ms_tiled, out = res["always"]
    p = out.tiles
    print(f"{args.backbone} tiny, {width}x{height}, {args.steps} steps, CPU")
    if p is None:
        print("fits one tile: decoded whole either way")
        return
    cfg = d.cfg
    flops = p.count * count_decode_flops(cfg, p.tile_h, p.tile_w, args.steps).total
    whole = count_decode_flops(cfg, height, width, args.steps).total
    print(
        f"tiles: {p.count} of {p.tile_w}x{p.tile_h}, overlap >= {p.overlap} px, "
        f"{p.pixel_factor:.2f}x the pixels, {flops / whole:.2f}x the FLOPs"
    )
    print(f"whole {ms_whole:.0f} ms, tiled {ms_tiled:.0f} ms: {ms_tiled / ms_whole:.2f}x")


if __name__ == "__main__":
    main()
