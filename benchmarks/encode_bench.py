"""Image encoders for a 2048² RGB decode: ms/image and bytes, smooth vs textured content.

Pillow paths go through `pid_batch.codecs.encode_image` (the pipeline's encoder); others are
measured when importable: imagecodecs (libpng, libspng, libjpeg-turbo, libwebp), simplejpeg
(libjpeg-turbo) and pyvips (libvips, pinned to one thread with VIPS_CONCURRENCY=1 so every row is
one core's work, like one encode task). Each result is checked by decoding it with Pillow:
lossless rows must round-trip exactly, lossy rows report PSNR.

    pip install --no-deps --target /tmp/bench-enc imagecodecs simplejpeg pyvips pyvips-binary
    PYTHONPATH=/tmp/bench-enc python benchmarks/encode_bench.py [--size 2048] [--json out.json]

smooth:   a 64² random field upscaled bicubically (a photo-like image: gradients, soft edges)
textured: the same plus Gaussian grain (σ 24) and a fine 3-pixel stripe pattern (foliage, hair)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("VIPS_CONCURRENCY", "1")

import numpy as np  # noqa: E402
from harness import machine, print_table  # noqa: E402
from PIL import Image  # noqa: E402

from pid_batch import codecs  # noqa: E402
from pid_batch.codecs import images  # noqa: E402


def test_images(size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The smooth and the textured [size, size, 3] uint8 images described in the docstring."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB")
    smooth = np.asarray(small.resize((size, size), Image.BICUBIC), dtype=np.uint8)
    grain = rng.normal(0.0, 24.0, (size, size, 3))
    stripes = 20.0 * np.sin(np.arange(size) * 2 * np.pi / 3)[None, :, None]
    textured = np.clip(smooth.astype(np.float64) + grain + stripes, 0, 255).astype(np.uint8)
    return {"smooth": smooth, "textured": textured}


def _pillow_jpeg_420(img: np.ndarray) -> bytes:
    """codecs.encode_image with its chroma subsampling switched to 4:2:0 for this call."""
    saved = images.JPEG_SUBSAMPLING  # read by encode_image from its own module
    images.JPEG_SUBSAMPLING = 2
    try:
        return codecs.encode_image(img, "jpeg", 95)
    finally:
        images.JPEG_SUBSAMPLING = saved


def encoders() -> tuple[dict[str, tuple[str, Callable[[np.ndarray], bytes], bool]], list[str]]:
    """name → (format, encode function, lossless); plus notes on encoders that are missing."""
    enc: dict[str, tuple[str, Callable[[np.ndarray], bytes], bool]] = {
        "Pillow PNG level 1": ("png", lambda im: codecs.encode_image(im, "png"), True),
        "Pillow PNG level 6": (
            "png",
            lambda im: codecs.encode_image(im, "png", png_compress_level=6),
            True,
        ),
        "Pillow JPEG q95 4:4:4": ("jpeg", lambda im: codecs.encode_image(im, "jpeg", 95), False),
        "Pillow JPEG q95 4:2:0": ("jpeg", _pillow_jpeg_420, False),
        "Pillow WebP q90 m0": ("webp", lambda im: codecs.encode_image(im, "webp", 90), False),
        "Pillow WebP lossless": (
            "webp",
            lambda im: codecs.encode_image(im, "webp", lossless=True),
            True,
        ),
    }
    missing = []
    try:
        import imagecodecs as ic

        enc |= {
            "imagecodecs PNG level 1": ("png", lambda im: ic.png_encode(im, level=1), True),
            "imagecodecs PNG level 1 RLE+SUB": (
                "png",
                lambda im: ic.png_encode(im, level=1, strategy=3, filter=16),
                True,
            ),
            "imagecodecs PNG level 6": ("png", lambda im: ic.png_encode(im, level=6), True),
            "imagecodecs spng level 1": ("png", lambda im: ic.spng_encode(im, level=1), True),
            "imagecodecs JPEG q95 4:4:4": (
                "jpeg",
                lambda im: ic.jpeg8_encode(im, level=95, subsampling="444"),
                False,
            ),
            "imagecodecs JPEG q95 4:2:0": (
                "jpeg",
                lambda im: ic.jpeg8_encode(im, level=95, subsampling="420"),
                False,
            ),
            # lossless=False is required: level alone silently gives lossless output.
            "imagecodecs WebP q90 m0": (
                "webp",
                lambda im: ic.webp_encode(im, level=90, lossless=False, method=0),
                False,
            ),
            "imagecodecs WebP lossless m0": (
                "webp",
                lambda im: ic.webp_encode(im, level=0, lossless=True, method=0),
                True,
            ),
        }
    except ImportError as e:
        missing.append(f"imagecodecs: {e}")
    try:
        import simplejpeg

        enc |= {
            "simplejpeg q95 4:4:4": (
                "jpeg",
                lambda im: simplejpeg.encode_jpeg(im, 95, "RGB", "444"),
                False,
            ),
            "simplejpeg q95 4:2:0": (
                "jpeg",
                lambda im: simplejpeg.encode_jpeg(im, 95, "RGB", "420"),
                False,
            ),
        }
    except ImportError as e:
        missing.append(f"simplejpeg: {e}")
    try:
        import pyvips

        def vips(im: np.ndarray) -> pyvips.Image:
            h, w, c = im.shape
            return pyvips.Image.new_from_memory(np.ascontiguousarray(im).data, w, h, c, "uchar")

        enc |= {
            "pyvips PNG level 1": (
                "png",
                lambda im: vips(im).pngsave_buffer(compression=1),
                True,
            ),
            "pyvips JPEG q95 4:4:4": (
                "jpeg",
                lambda im: vips(im).jpegsave_buffer(Q=95, subsample_mode="off"),
                False,
            ),
            "pyvips JPEG q95 4:2:0": (
                "jpeg",
                lambda im: vips(im).jpegsave_buffer(Q=95, subsample_mode="on"),
                False,
            ),
            "pyvips WebP q90 effort 0": (
                "webp",
                lambda im: vips(im).webpsave_buffer(Q=90, effort=0),
                False,
            ),
            "pyvips WebP lossless effort 0": (
                "webp",
                lambda im: vips(im).webpsave_buffer(lossless=True, effort=0),
                True,
            ),
        }
    except (ImportError, OSError) as e:
        missing.append(f"pyvips: {e}")
    return enc, missing


def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    """PSNR in dB; None when the images are identical (lossless)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return None if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def measure(fn: Callable[[np.ndarray], bytes], img: np.ndarray, budget_s: float) -> dict:
    """Median ms over repeated encodes (at least 3, more while under budget_s) and the bytes."""
    data = bytes(fn(img))  # warm-up
    times = []
    t_end = time.perf_counter() + budget_s
    while len(times) < 3 or (time.perf_counter() < t_end and len(times) < 15):
        t0 = time.perf_counter()
        fn(img)
        times.append((time.perf_counter() - t0) * 1000)
    back = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return {
        "ms": statistics.median(times),
        "ms_min": min(times),
        "ms_max": max(times),
        "reps": len(times),
        "bytes": len(data),
        "psnr": psnr(img, back),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--budget-s", type=float, default=2.0, help="timing budget per cell")
    ap.add_argument("--only", help="substring filter on encoder names")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    images = test_images(args.size)
    enc, missing = encoders()
    results: dict[str, dict[str, dict]] = {}
    for name, (fmt, fn, lossless) in enc.items():
        if args.only and args.only.lower() not in name.lower():
            continue
        results[name] = {"format": fmt, "lossless": lossless}
        for kind, img in images.items():
            r = measure(fn, img, args.budget_s)
            if lossless and r["psnr"] is not None:
                raise AssertionError(f"{name} is not lossless on {kind}: PSNR {r['psnr']:.1f} dB")
            results[name][kind] = r
            print(f"{name} {kind}: {r['ms']:.1f} ms, {r['bytes'] / 1e6:.2f} MB", file=sys.stderr)
    rows = []
    for name, r in results.items():
        row = [name]
        for kind in images:
            c = r[kind]
            q = "lossless" if c["psnr"] is None else f"{c['psnr']:.1f} dB"
            row += [
                f"{c['ms']:.0f} ({c['ms_min']:.0f}–{c['ms_max']:.0f})",
                f"{c['bytes'] / 1e6:.2f}",
                q,
            ]
        rows.append(row)
    raw_mb = args.size * args.size * 3 / 1e6
    print(f"\n{args.size}² RGB ({raw_mb:.1f} MB raw), median ms (min–max), one thread")
    print_table(
        [
            "encoder",
            "smooth ms",
            "smooth MB",
            "smooth quality",
            "textured ms",
            "textured MB",
            "textured quality",
        ],
        rows,
    )
    for m in missing:
        print(f"not measured: {m}")
    if args.json:
        versions = {}
        for mod in ("PIL", "imagecodecs", "simplejpeg", "pyvips"):
            try:
                versions[mod] = __import__(mod).__version__
            except Exception:  # noqa: BLE001 - optional encoders
                versions[mod] = None
        out = {
            "machine": machine(),
            "args": vars(args),
            "versions": versions,
            "missing": missing,
            "results": results,
        }
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
