"""Where tiles go when an output is decoded in overlapping tiles (torch-free: read workers and the
planner use it; `pid_batch.tiled` runs the tiles).

An output that fits one tile of a size the checkpoint was trained at is decoded whole. A larger
one (or one that does not fit the accelerator) is covered by a grid of equal tiles of one trained
size, origins on the latent grid (which is also the 16-px patch grid), neighbours overlapping by
at least `overlap` pixels; of the trained sizes the one whose cover costs the fewest FLOPs wins.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pid_batch.backbones import CheckpointSpec

TILING_MODES = ("auto", "always", "never")
# Minimum overlap between neighbouring tiles of a full-size checkpoint: a quarter of a 2048 tile
# (32 patch tokens, 16 latent cells), the width over which tile weights ramp down.
DEFAULT_TILE_OVERLAP = 512
# The tiny preset runs the tiled path at CPU sizes: trained sizes and overlap divided by this.
TINY_SIZE_DIVISOR = 4
# The demo decoder (pid_batch.train) was trained on 256² crops.
DEMO_TRAINED_SIZES = ((256, 256),)
# Largest side a decode without tiles may have: the largest size a released checkpoint was
# trained at or shown at (docs/model.md#resolution: 2K-4K buckets, README demos at 4096 px).
MAX_UNTILED_SIDE = 4096
# Ceiling on output pixels (tiled or not), checked before any allocation: an output this large
# is either a mistake or an attempt to exhaust the decoder's (and the encoder's) memory.
DEFAULT_MAX_OUTPUT_MEGAPIXELS = 64.0


@dataclass(frozen=True)
class TilePlan:
    """Tiles of one output size: origins per axis (row-major grid), tile size, minimum overlap."""

    height: int
    width: int
    tile_h: int
    tile_w: int
    overlap: int  # minimum overlap of neighbours in px; the width of each tile's weight ramp
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.ys) * len(self.xs)

    @property
    def boxes(self) -> list[tuple[int, int]]:
        """Tile origins (y, x), row-major."""
        return [(y, x) for y in self.ys for x in self.xs]

    @property
    def pixel_factor(self) -> float:
        """Pixels decoded per output pixel (1 + the overlap's share)."""
        return self.count * self.tile_h * self.tile_w / (self.height * self.width)


def trained_sizes(spec: CheckpointSpec, preset: str) -> tuple[tuple[int, int], ...]:
    """Tile sizes (H, W) of a job's network: the checkpoint's trained sizes, scaled for presets."""
    if preset == "full":
        return spec.trained_sizes
    if preset == "demo":
        return DEMO_TRAINED_SIZES
    if preset == "tiny":
        cell = spec.latent_cell
        scaled = {
            (max(cell, h // TINY_SIZE_DIVISOR // cell * cell),
             max(cell, w // TINY_SIZE_DIVISOR // cell * cell))
            for h, w in spec.trained_sizes
        }  # fmt: skip
        return tuple(sorted(scaled))
    raise ValueError(f"preset={preset!r}; valid: ('full', 'tiny', 'demo')")


def default_overlap(spec: CheckpointSpec, preset: str) -> int:
    """DEFAULT_TILE_OVERLAP scaled like the preset's tile sizes (a multiple of the latent cell)."""
    side = max(h for h, _ in trained_sizes(spec, preset))
    full = max(h for h, _ in spec.trained_sizes)
    scaled = DEFAULT_TILE_OVERLAP * side // full
    return max(spec.latent_cell, scaled // spec.latent_cell * spec.latent_cell)


def fits_one_tile(height: int, width: int, sizes: Sequence[tuple[int, int]]) -> bool:
    """True when some tile size covers the whole output."""
    return any(height <= h and width <= w for h, w in sizes)


def axis_starts(side: int, tile: int, overlap: int, unit: int) -> tuple[int, ...]:
    """Origins of the fewest tiles of length `tile` covering `side`, spread evenly on the `unit`
    grid, with neighbours overlapping by at least `overlap`."""
    if tile >= side:
        return (0,)
    if side % unit or tile % unit:
        raise ValueError(f"side {side} and tile {tile} must be multiples of the grid unit {unit}")
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap {overlap} must lie in [0, tile side {tile})")
    n = max(2, math.ceil((side - overlap) / (tile - overlap)))
    while True:
        starts = [(i * (side - tile) // (n - 1)) // unit * unit for i in range(n)]
        if min(tile - (b - a) for a, b in zip(starts, starts[1:])) >= overlap:
            return tuple(starts)
        n += 1


def plan_tiles(
    height: int,
    width: int,
    sizes: Sequence[tuple[int, int]],
    overlap: int,
    unit: int,
    cost: Callable[[int, int], float],
) -> TilePlan:
    """The cheapest cover of height × width by tiles of one of `sizes`; `cost(h, w)` is one tile's
    decode cost. Ties go to the larger tile (more context). Sizes that fit inside the output come
    first; only when none does are tiles clipped to it (e.g. a strip lower than every size)."""
    inside = [(h, w) for h, w in sizes if h <= height and w <= width]
    best: tuple[float, int, TilePlan] | None = None
    for th, tw in inside or sizes:
        th, tw = min(th, height), min(width, tw)
        ys = axis_starts(height, th, overlap, unit)
        xs = axis_starts(width, tw, overlap, unit)
        p = TilePlan(height, width, th, tw, overlap, ys, xs)
        key = (p.count * cost(th, tw), -th * tw)
        if best is None or key < best[:2]:
            best = (*key, p)
    if best is None:
        raise ValueError("no tile sizes to choose from")
    return best[2]


def parse_size(text: str, where: str) -> tuple[int, int]:
    """'WxH' → (H, W), both positive ints."""
    try:
        w, h = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise ValueError(f"{where}={text!r} must be WxH, e.g. '2048x2048'") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"{where}={text!r} must be positive")
    return h, w


def choose_tiling(
    spec: CheckpointSpec,
    preset: str,
    height: int,
    width: int,
    mode: str,
    cost: Callable[[int, int], float],
    *,
    overlap: int | None = None,
    tile_size: tuple[int, int] | None = None,
    fits_memory: Callable[[int, int], bool] = lambda h, w: True,
) -> TilePlan | None:
    """The tiles a decode of height × width uses, or None to decode it whole (today's path).

    `never`: always whole. `auto`: tiles when the output fits no tile size (the trained sizes, or
    `tile_size` (H, W) when given) or does not fit memory at micro-batch 1. `always`: tiles
    whenever the output is larger than one tile. An output that one tile covers is decoded whole.
    """
    if mode not in TILING_MODES:
        raise ValueError(f"tiling={mode!r}; valid: {TILING_MODES}")
    if mode == "never":
        return None
    sizes = [tile_size] if tile_size is not None else list(trained_sizes(spec, preset))
    unit = spec.latent_cell
    for h, w in sizes:
        if h % unit or w % unit:
            raise ValueError(f"tile size {w}x{h} must be a multiple of the latent cell {unit} px")
    if mode == "auto" and fits_one_tile(height, width, sizes) and fits_memory(height, width):
        return None
    if tile_size is None:  # tiles that do not fit memory are no help
        sizes = [s for s in sizes if fits_memory(*s)] or [min(sizes, key=lambda s: s[0] * s[1])]
    if overlap is None:
        overlap = default_overlap(spec, preset)
    p = plan_tiles(height, width, sizes, overlap, unit, cost)
    return None if p.count == 1 else p
