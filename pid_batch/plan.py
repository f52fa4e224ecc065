"""Capacity planning: wall time, GPU-hours and output bytes for N latents on a cluster.

Time model: a decode costs time proportional to its FLOPs, which are counted from the network
config (docs/model.md#network) as two terms — token-linear work (GEMMs, convs: ∝ pixels) and
attention (∝ tokens², tokens = pixels / 16²) — and calibrated by one measured point per
accelerator (ms per 2048² image). At 2048² attention is 57 % of the FLOPs; at 4096² 84 %, so
a 4× larger image costs ~10× the time, not 4×.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from pid_batch import codecs, storage
from pid_batch.backbones import REGISTRY, CheckpointSpec, resolve_checkpoint
from pid_batch.config import PAPER_GB200_MS_PER_2048, VARIANTS, NetConfig
from pid_batch.model.flops import count_decode_flops
from pid_batch.tiles import TilePlan, choose_tiling

REFERENCE_HW = (2048, 2048)
REFERENCE_STEPS = 4  # the released checkpoints are 4-step distilled students
# The paper's figures do not name the variant they were measured with; the v1 and v1.5 nets
# differ by < 3 % in FLOPs at 2048², so either is a fine reference.
REFERENCE_VARIANT = "v1p5_sr4x_c16"

# ms per 2048² output image (full 4-step decode, batch share) on one accelerator.
PAPER_LATENCY_MS: dict[str, float] = {"gb200": PAPER_GB200_MS_PER_2048, "rtx": 1000.0}
PAPER_SOURCES = {
    "gb200": f"PiD paper: {PAPER_GB200_MS_PER_2048:g} ms per 2048² image on one GB200",
    "rtx": "PiD paper: < 1 s per 2048² image on an RTX 5090; 1000 ms used as an upper bound "
    "(cluster.yaml's rtx nodes are g6e = L40S, not a 5090: measure and update)",
}

# Output bytes per pixel (low = smooth photo, high = texture-heavy), from the 2048² encoder
# measurements on the 2-core development machine (Pillow 13): JPEG q95 4:2:0
# 0.70 / 3.1 MB, PNG level 1 3.8 / 10.6 MB, WebP q90 method 0 0.29 / 2.2 MB, divided by 2048².
# pid-batch writes JPEG 4:4:4, which codecs/images.py measured at 1.3-1.5x the 4:2:0 bytes.
_PX = 2048 * 2048
BYTES_PER_PIXEL: dict[str, tuple[float, float]] = {
    "jpeg": (0.70e6 / _PX * 1.3, 3.1e6 / _PX * 1.5),
    "png": (3.8e6 / _PX, 10.6e6 / _PX),
    "webp": (0.29e6 / _PX, 2.2e6 / _PX),
}
# Share of wall time the decoders are busy in the streaming pipeline (measured on the development machine:
# 95-97.6 % with a stand-in decoder; rounded down).
DECODER_UTILIZATION = 0.95


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(label).lower()).strip("_")


def _net(variant: str) -> tuple[str, NetConfig]:
    """(variant name, config) for a variant name or a backbone name (newest checkpoint)."""
    name = variant.removeprefix("tiny:").removeprefix("demo:")
    if name in VARIANTS:
        return name, VARIANTS[name]
    try:
        name = resolve_checkpoint(variant).variant
    except ValueError:
        raise ValueError(
            f"unknown variant {variant!r}; known variants: {sorted(VARIANTS)} "
            "(or a backbone name such as 'flux', 'sd3', 'qwenimage')"
        ) from None
    return name, VARIANTS[name]


def _checkpoint(variant: str) -> CheckpointSpec:
    """The checkpoint a variant or backbone name stands for (its trained sizes decide tiling):
    a backbone's newest checkpoint, or the first released checkpoint of a variant."""
    name = variant.removeprefix("tiny:").removeprefix("demo:")
    for spec in REGISTRY.values():
        if spec.variant == name:
            return spec
    return resolve_checkpoint(name)


def decode_flops(
    cfg: NetConfig, height: int, width: int, steps: int = REFERENCE_STEPS
) -> tuple[float, float]:
    """(token-linear FLOPs, attention FLOPs) of one `steps`-step decode at height × width.

    The step-invariant conditioning (LQ conv stack, caption projection) is counted once.
    """
    f = count_decode_flops(cfg, height, width, steps, txt_len=cfg.txt_max_length)
    return float(f.linear), float(f.attention)


def image_flops(
    variant: str, height: int, width: int, steps: int = REFERENCE_STEPS, tiling: str = "auto"
) -> tuple[float, float, TilePlan | None]:
    """(linear, attention FLOPs, tiles or None) of decoding one height × width image the way a
    job with `sampling.tiling` would: whole, or as every tile of its plan (overlaps included)."""
    cfg = _net(variant)[1]
    tiles = choose_tiling(
        _checkpoint(variant),
        "full",
        height,
        width,
        tiling,
        cost=lambda h, w: sum(decode_flops(cfg, h, w, steps)),
    )
    if tiles is None:
        return (*decode_flops(cfg, height, width, steps), None)
    linear, attn = decode_flops(cfg, tiles.tile_h, tiles.tile_w, steps)
    return tiles.count * linear, tiles.count * attn, tiles


def time_scale(
    variant: str, height: int, width: int, steps: int = REFERENCE_STEPS, tiling: str = "never"
) -> float:
    """Decode time relative to a 2048² REFERENCE_VARIANT 4-step decode (FLOP ratio); with
    `tiling` other than 'never', of the decode a job with that setting runs (image_flops)."""
    ref = sum(decode_flops(VARIANTS[REFERENCE_VARIANT], *REFERENCE_HW))
    return sum(image_flops(variant, height, width, steps, tiling)[:2]) / ref


def _canonical(label: str, known: list[str]) -> str:
    """A device label as a table key: a known key it contains ('NVIDIA GB200' → 'gb200'), else a slug."""
    slug = _slug(label)
    for k in sorted(known, key=len, reverse=True):
        if k and k in slug.replace("_", ""):
            return k
    return slug


def latency_table_from_summary(
    summary: dict[str, Any],
    names: dict[str, str] | None = None,
    resolution: tuple[int, int] | None = None,
    variant: str | None = None,
    steps: int | None = None,
) -> dict[str, float]:
    """{accelerator: ms per 2048² reference image} from a run summary's per-accelerator decode p50.

    The run's resolution (width, height), variant and steps come from the summary when it has
    one resolution and a `run` record; pass them to override. `names` maps device labels (e.g.
    'NVIDIA L40S') to table keys (e.g. 'rtx'); otherwise labels containing a known key map to it.
    """
    run = summary.get("run") or {}
    variant = variant or run.get("variant") or REFERENCE_VARIANT
    if str(variant).startswith(("tiny:", "demo:")):
        raise ValueError(
            f"summary is from a small preset ({variant!r}); its timings say nothing about full-size decoding"
        )
    steps = int(steps or run.get("steps") or REFERENCE_STEPS)
    if resolution is None:
        res = summary.get("resolutions") or {}
        if len(res) != 1:
            raise ValueError(f"summary has resolutions {res}; pass resolution=(width, height)")
        resolution = tuple(int(v) for v in next(iter(res)).split("x"))  # "WxH"
    width, height = resolution
    scale = time_scale(str(variant), height, width, steps)
    names = names or {}
    out: dict[str, float] = {}
    for label, acc in (summary.get("per_accelerator") or {}).items():
        p50 = (acc.get("decode_ms") or {}).get("p50")
        if p50 is None or not math.isfinite(p50) or p50 <= 0:
            continue
        key = names.get(label) or _canonical(label, list(PAPER_LATENCY_MS))
        out[key] = round(float(p50) / scale, 3)
    if not out:
        raise ValueError("summary has no per_accelerator decode_ms p50 to learn from")
    return out


def load_latency_table(path: str) -> dict[str, float]:
    """A latency table from JSON/YAML: either {accelerator: ms per 2048²} or a `summary --json` output."""
    import yaml

    data = yaml.safe_load(storage.read_bytes(path))  # YAML ⊇ JSON
    if isinstance(data, dict) and "per_accelerator" in data:
        return latency_table_from_summary(data)
    if (
        isinstance(data, dict)
        and data
        and all(isinstance(v, (int, float)) and v > 0 for v in data.values())
    ):
        return {_slug(k): float(v) for k, v in data.items()}
    raise ValueError(
        f"{path}: expected {{accelerator: ms per 2048² image}} or a summary with per_accelerator, got {json.dumps(data)[:200]}"
    )


def cluster_accelerators(path: str, nodes: dict[str, int] | None = None) -> dict[str, int]:
    """{accelerator: GPU count} from a Ray cluster.yaml (resources accel_<name> per node type).

    `nodes` gives node counts per node type (default: each type's max_workers).
    """
    import yaml

    cfg = yaml.safe_load(storage.read_bytes(path)) or {}
    types = cfg.get("available_node_types") or {}
    if not isinstance(types, dict) or not types:
        raise ValueError(f"{path}: no available_node_types")
    if nodes is not None and (unknown := sorted(set(nodes) - set(types))):
        raise ValueError(f"unknown node types {unknown}; {path} has {sorted(types)}")
    counts = (
        nodes if nodes is not None else {t: int(v.get("max_workers", 0)) for t, v in types.items()}
    )
    total = 0
    out: dict[str, int] = {}
    for t, n in counts.items():
        limit = int(types[t].get("max_workers", n))
        if not isinstance(n, int) or n < 0 or n > limit:
            raise ValueError(
                f"node type {t!r}: count must be an int in [0, {limit}] (its max_workers), got {n!r}"
            )
        total += n
        for res, per_node in (types[t].get("resources") or {}).items():
            if res.startswith("accel_") and n:
                out[res.removeprefix("accel_")] = out.get(res.removeprefix("accel_"), 0) + n * int(
                    per_node
                )
    if "max_workers" in cfg and total > int(cfg["max_workers"]):
        raise ValueError(
            f"{total} worker nodes exceed the cluster's max_workers={cfg['max_workers']}"
        )
    return out


def plan(
    n: int,
    width: int,
    height: int,
    variant: str,
    cluster: dict[str, int] | str,
    table: dict | None = None,
    *,
    nodes: dict[str, int] | None = None,
    image_format: str = "jpeg",
    steps: int = REFERENCE_STEPS,
    tiling: str = "auto",
) -> dict[str, Any]:
    """Estimate wall time, GPU-hours and output bytes for n latents decoded to width × height.

    `cluster`: {accelerator: GPU count}, or a cluster.yaml path (node counts from `nodes`).
    `table`: {accelerator: ms per 2048² image}, merged over PAPER_LATENCY_MS.
    `tiling`: as the job's `sampling.tiling`; tiled sizes cost every tile, overlaps included.
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    fmt = codecs.image_format(image_format)  # the writer's formats and aliases
    name, cfg = _net(variant)
    gpus = cluster_accelerators(cluster, nodes) if isinstance(cluster, str) else dict(cluster)
    user = {_slug(k): float(v) for k, v in (table or {}).items()}
    if bad := {k: v for k, v in user.items() if not (math.isfinite(v) and v > 0)}:
        raise ValueError(f"latency table values must be positive ms per 2048² image, got {bad}")
    lat = {**PAPER_LATENCY_MS, **user}
    gpus = {_slug(k): v for k, v in gpus.items() if v}
    if unknown := sorted(set(gpus) - set(lat)):
        raise ValueError(
            f"no latency for accelerators {unknown}; known: {sorted(lat)} (pass table=)"
        )
    if not gpus or any(not isinstance(g, int) or g < 0 for g in gpus.values()):
        raise ValueError(f"cluster must give a positive GPU count per accelerator, got {gpus}")
    linear, attn, tiles = image_flops(name, height, width, steps, tiling)
    scale = time_scale(name, height, width, steps, tiling)
    whole = sum(decode_flops(cfg, height, width, steps))
    rate = {a: g * 1000.0 / (lat[a] * scale) for a, g in gpus.items()}  # images/s, all busy
    total_rate = sum(rate.values()) * DECODER_UTILIZATION
    wall_s = n / total_rate
    accs = {
        a: {
            "gpus": g,
            "ms_per_image": round(lat[a] * scale, 1),
            "ms_per_2048": lat[a],
            "images": round(n * rate[a] / sum(rate.values())),
            "source": PAPER_SOURCES.get(a, "user table") if a not in user else "user table",
        }
        for a, g in gpus.items()
    }
    busy_ms = sum(v["images"] * lat[a] * scale for a, v in accs.items())
    lo, hi = BYTES_PER_PIXEL[fmt]
    return {
        "n": n, "width": width, "height": height, "variant": name, "steps": steps,
        "image_format": fmt, "accelerators": accs,
        "images_per_s": round(total_rate, 3),
        "wall_s": round(wall_s, 1),
        "gpu_hours": round(wall_s * sum(gpus.values()) / 3600, 2),
        "gpu_hours_busy": round(busy_ms / 3.6e6, 2),
        "output_bytes": {"low": round(n * width * height * lo), "high": round(n * width * height * hi)},
        "time_vs_2048": round(scale, 3),
        "attention_share": round(attn / (attn + linear), 3),
        "tflops_per_image": round((attn + linear) / 1e12, 1),
        "tiling": None if tiles is None else {
            "tiles": tiles.count, "tile_width": tiles.tile_w, "tile_height": tiles.tile_h,
            "overlap": tiles.overlap, "pixel_factor": round(tiles.pixel_factor, 3),
            "flops_vs_whole": round((attn + linear) / whole, 3),
        },
        "assumptions": [
            *([f"tiled ({tiling}): {tiles.count} tiles of {tiles.tile_w}x{tiles.tile_h} overlapping "
               f"by >= {tiles.overlap} px decode {tiles.pixel_factor:.2f}x the output's pixels; "
               f"their FLOPs, overlaps included, are {(attn + linear) / whole:.2f}x a whole decode's "
               "(less attention over shorter sequences, more pixels)"] if tiles else []),
            f"decode time ∝ FLOPs = a·pixels + b·tokens² (tokens = pixels/{cfg.patch_size}²), "
            f"counted from the {name} config; attention is {attn / (attn + linear):.0%} of the "
            "FLOPs here; attention and GEMMs are assumed equally efficient, so small images "
            "(< 1024²) that under-fill a GPU are estimated optimistically",
            f"latency per accelerator = ms per 2048² {REFERENCE_VARIANT} {REFERENCE_STEPS}-step "
            f"decode × {scale:.3f} (this size/variant/steps)",
            *(f"{a}: {v['source']}" for a, v in accs.items()),
            f"decoders busy {DECODER_UTILIZATION:.0%} of the wall time (development-machine pipeline "
            "measurement); work is pulled dynamically, so faster GPUs take more images",
            "excludes cluster start-up (node launch, image pull, checkpoint download, actor "
            "warm-up ~minutes) and the optional caption encoder (Gemma-2-2b, ~1.6 TFLOP per "
            "caption: < 1 % of a 2048² decode)",
            f"{fmt} bytes/pixel {lo:.3f}-{hi:.3f} (smooth-textured 2048² images, "
            "development-machine encoder measurements)",
            "gpu_hours = wall × all GPUs held; gpu_hours_busy = decode time only",
        ],
    }  # fmt: skip


def _dur(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h" if s < 172800 else f"{s / 86400:.1f} days"


def format_plan(d: dict[str, Any]) -> str:
    """The plan as text: the answer first, then the assumptions it rests on."""
    b = d["output_bytes"]
    lines = [
        f"{d['n']:,} images at {d['width']}x{d['height']} ({d['variant']}, {d['steps']} steps, {d['image_format']})",
        f"  wall time   {_dur(d['wall_s'])}  ({d['images_per_s']:.2f} images/s)",
        f"  GPU-hours   {d['gpu_hours']:,.1f} held, {d['gpu_hours_busy']:,.1f} decoding",
        f"  output      {b['low'] / 1e9:,.1f}-{b['high'] / 1e9:,.1f} GB",
        f"  per image   {d['tflops_per_image']} TFLOP, {d['time_vs_2048']:.2f}x a 2048² decode",
    ]
    if t := d.get("tiling"):
        lines.append(
            f"  tiles       {t['tiles']} of {t['tile_width']}x{t['tile_height']} (overlap >= "
            f"{t['overlap']} px): {t['pixel_factor']:.2f}x the pixels, {t['flops_vs_whole']:.2f}x "
            "the FLOPs of a whole decode"
        )
    for a, v in d["accelerators"].items():
        lines.append(
            f"  {a:<8} {v['gpus']:>4} GPUs  {v['ms_per_image']:>8.1f} ms/image  ~{v['images']:,} images"
        )
    lines.append("assumptions:")
    lines += [f"  - {x}" for x in d["assumptions"]]
    return "\n".join(lines)
