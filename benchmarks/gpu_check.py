"""The whole GPU measurement in one command: full-size v1.5 decode, eager vs compiled, then the pipeline.

  1. decode: random-weight v1.5 (flux, 16-ch) Decoder at 2048², null text: eager, compiled
     (fullgraph) and compiled with CUDA graphs (`reduce-overhead`), at batch 1 and the largest
     micro-batch that fits; ms/image, peak memory, MFU from `count_decode_flops`, and the max
     |d| of the compiled images vs eager
  2. pipeline vs the bare decode loop on the same GPU (benchmarks/gpu_pipeline.py, reused)

`--budget-s` (default 480) drops the lowest-priority parts first (pipeline, then CUDA graphs,
then the large batch). Prints a table, writes JSON with everything plus the card name.

    python benchmarks/gpu_check.py --json gpu_check.json      # one H100/H200, < 8 min
    python benchmarks/gpu_check.py --smoke --json /tmp/s.json  # CPU, tiny preset
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_bench import PEAK_BF16_FLOPS  # noqa: E402

from pid_batch.backbones import resolve_checkpoint  # noqa: E402
from pid_batch.decoder import Decoder, accelerator_name, pick_device  # noqa: E402
from pid_batch.model.flops import count_decode_flops  # noqa: E402
from pid_batch.model.text import NullTextEncoder  # noqa: E402

# (name, compile, compile_mode, large batch), most important first
VARIANTS = [
    ("eager", False, None, False),
    ("compiled", True, None, False),
    ("eager", False, None, True),
    ("compiled", True, None, True),
    ("cudagraphs", True, "reduce-overhead", False),
]


def decode_row(args, dev, name, compile_, mode, batch) -> tuple[dict[str, Any], np.ndarray]:
    """Time `--repeats` decodes of `batch` latents after one warm-up (compile) call."""
    spec = resolve_checkpoint("flux", "2kto4k_v1pt5")
    d = Decoder(
        spec, preset=args.preset, device=dev, compile=compile_, compile_mode=mode, micro_batch=batch
    )
    d.text_encoder = NullTextEncoder(
        dim=d.cfg.txt_embed_dim, max_length=d.cfg.txt_max_length, device=dev
    )
    f = d.cfg.lq_ratio * d.cfg.lq_latent_unpatchify_factor * d.cfg.patch_size
    rng = np.random.default_rng(0)
    lat = [
        rng.standard_normal((d.cfg.lq_latent_channels, args.size // f, args.size // f)).astype(
            np.float32
        )
        for _ in range(batch)
    ]
    kw = dict(sigmas=[0.0] * batch, seeds=list(range(batch)))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    first = d.decode(lat, **kw)
    times = []
    for _ in range(args.repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        out = d.decode(lat, **kw)
        times.append(time.perf_counter() - t0)
    sec = float(np.median(times)) / batch
    flops = count_decode_flops(d.cfg, args.size, args.size, d.steps).total
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in d.accelerator), None)
    row = dict(
        mode=name,
        batch=batch,
        ms_per_image=sec * 1000,
        compile_ms=first.compile_ms,
        tflop_per_image=flops / 1e12,
        mfu=(flops / sec / peak) if peak else None,
        peak_mem_gib=(torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None),
        weight_gib=d.weight_bytes / 2**30,
    )
    return row, out.images


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny preset, 64²")
    ap.add_argument("--budget-s", type=float, default=480.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--large-batch", type=int, default=0, help="0: Decoder's auto micro-batch")
    ap.add_argument("--no-pipeline", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dev = torch.device("cpu") if args.smoke else pick_device()
    args.preset, args.size = ("tiny", 64) if args.smoke else ("full", 2048)
    start = time.perf_counter()
    report: dict[str, Any] = dict(card=accelerator_name(dev), size=args.size, rows=[], skipped=[])
    eager: dict[int, np.ndarray] = {}
    large = args.large_batch or (2 if args.smoke else 0)
    for name, compile_, mode, is_large in VARIANTS:
        if mode and dev.type != "cuda":
            report["skipped"].append(f"{name}: CUDA graphs need CUDA")
            continue
        if time.perf_counter() - start > args.budget_s * 0.6:
            report["skipped"].append(f"{name} large={is_large}: budget")
            continue
        batch = large if is_large else 1
        if is_large and not batch:
            from pid_batch.decoder import auto_micro_batch

            batch = auto_micro_batch(dev, args.size, args.size, 0)
        row, images = decode_row(args, dev, name, compile_, mode, batch)
        if name == "eager":
            eager[batch] = images
        elif batch in eager:
            row["max_abs_diff_vs_eager"] = int(np.abs(images.astype(int) - eager[batch]).max())
        report["rows"].append(row)
        print(json.dumps(row))
    if not args.no_pipeline and not args.smoke:
        left = args.budget_s - (time.perf_counter() - start)
        import gpu_pipeline

        out = "/tmp/gpu_check_pipeline.json"
        if left > 120:
            gpu_pipeline.main(["--max-seconds", str(int(left - 30)), "--json", out])
            report["pipeline"] = json.loads(Path(out).read_text())
        else:
            report["skipped"].append("pipeline: budget")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
