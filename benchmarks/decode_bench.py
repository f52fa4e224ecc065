"""Decoder benchmark: ms/image of the 4-step sampler, peak memory, MFU, and checkpoint-load RSS.

CPU: the tiny preset (batch 1 and 4). CUDA (if present): a full-size variant with random bf16
weights built on the GPU, bf16 autocast, eager vs torch.compile, batch 1 and the largest power of
two that fits. `--load-rss` writes a full-size random bf16 .pth and measures the peak RSS of
`load_net` in a fresh subprocess.

    python benchmarks/decode_bench.py [--variant v1p5_sr4x_c16] [--size 2048] [--json out.json]
    python benchmarks/decode_bench.py --load-rss [--tmp-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from pid_batch.checkpoint import load_net
from pid_batch.config import VARIANTS, NetConfig, tiny
from pid_batch.model import PidNet, flops
from pid_batch.sampling import sample, student_t_list

# Dense bf16 tensor-core peak (no sparsity), from the vendor datasheets.
PEAK_BF16_FLOPS = {
    "H200": 989.4e12,
    "H100": 989.4e12,
    "A100": 312e12,
    "L40S": 362.1e12,
    "A10G": 70e12,
}


def make_inputs(cfg: NetConfig, batch: int, H: int, W: int, device, seed: int = 0):
    """Random (noise, caption_embs, lq_latent, degrade_sigma) for a batch."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    f = cfg.lq_ratio * cfg.lq_latent_unpatchify_factor * cfg.patch_size
    noise = torch.randn(batch, cfg.in_channels, H, W, generator=g)
    caption = torch.randn(batch, cfg.txt_max_length, cfg.txt_embed_dim, generator=g)
    lq = torch.randn(batch, cfg.lq_latent_channels, H // f, W // f, generator=g)
    sigma = torch.zeros(batch)
    return [t.to(device) for t in (noise, caption, lq, sigma)]


def time_sampler(net, cfg, batch, H, W, device, repeats, warmup, autocast):
    """Median seconds per 4-step sample() call over `repeats` timed runs."""
    inputs = make_inputs(cfg, batch, H, W, device)
    t_list = student_t_list()
    gen = torch.Generator(device=device).manual_seed(0)

    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            sample(net, *inputs, t_list, generator=gen)
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_cpu(args) -> list[dict]:
    cfg = tiny(VARIANTS[args.variant])
    torch.manual_seed(0)
    net = PidNet(cfg).eval()
    rows = []
    for batch in (1, 4):
        sec = time_sampler(net, cfg, batch, args.tiny_size, args.tiny_size, torch.device("cpu"),
                           args.repeats, 1, autocast=False)  # fmt: skip
        rows.append(
            dict(device="cpu", preset=f"tiny({args.variant})", size=args.tiny_size, batch=batch,
                 mode="eager fp32", ms_per_image=1e3 * sec / batch, threads=torch.get_num_threads())
        )  # fmt: skip
    return rows


def _largest_batch(net, cfg, size, device, limit) -> int:
    best, batch = 0, 1
    while batch <= limit:
        try:
            time_sampler(net, cfg, batch, size, size, device, 1, 0, autocast=True)
            best, batch = batch, batch * 2
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    return best


def bench_cuda(args) -> list[dict]:
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = VARIANTS[args.variant]
    with torch.device(device):
        net = PidNet(cfg).to(torch.bfloat16).eval()  # random weights, no checkpoint file
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    for key, value in PEAK_BF16_FLOPS.items():
        if peak is None and key in name:
            peak = value
    flops_per_image = flops.count_decode_flops(cfg, args.size, args.size, args.steps_flops).total
    largest = _largest_batch(net, cfg, args.size, device, args.max_batch)
    rows = []
    for mode in ("eager", "compile"):
        model = net if mode == "eager" else torch.compile(net, dynamic=False)
        for batch in sorted({1, largest} - {0}):
            row = dict(device=name, preset=args.variant, size=args.size, batch=batch,
                       mode=f"{mode} bf16-autocast")  # fmt: skip
            torch.cuda.reset_peak_memory_stats()
            try:  # first call (includes compilation), then the timed calls
                first = time_sampler(model, cfg, batch, args.size, args.size, device, 1, 0, True)
                sec = time_sampler(
                    model, cfg, batch, args.size, args.size, device, args.repeats, 0, True
                )
            except torch.cuda.OutOfMemoryError:
                rows.append(dict(row, error="OOM"))
                torch.cuda.empty_cache()
                continue
            rows.append(
                dict(row, ms_per_image=1e3 * sec / batch, first_call_s=first,
                     peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30,
                     tflops_per_image=flops_per_image / 1e12,
                     mfu=(flops_per_image * batch / sec / peak) if peak else None)
            )  # fmt: skip
    return rows


def _rss_kib(*fields: str) -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in fields:
            out[name] = int(rest.split()[0])
    return out


def measure_load(path: str, variant: str, dtype: str) -> dict:
    """Load `path` with load_net and report RSS, split into anonymous and file-backed (fresh process)."""
    peaks = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def poll():
        while not done.wait(0.02):
            for k, v in _rss_kib(*peaks).items():
                peaks[k] = max(peaks[k], v)

    before = _rss_kib("VmRSS")["VmRSS"]
    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    net = load_net(path, VARIANTS[variant], dtype=getattr(torch, dtype))
    sec = time.perf_counter() - t0
    total = sum(p.float().sum().item() for p in net.parameters())  # touch every weight page
    done.set()
    watcher.join()
    gib = 2**20
    now = _rss_kib("VmHWM", "VmRSS")
    return dict(dtype=dtype, load_s=sec, rss_before_gib=before / gib,
                peak_rss_gib=now["VmHWM"] / gib, peak_anon_gib=peaks["RssAnon"] / gib,
                peak_file_gib=peaks["RssFile"] / gib, rss_end_gib=now["VmRSS"] / gib,
                weights_finite=math.isfinite(total))  # fmt: skip


def bench_load_rss(args) -> list[dict]:
    cfg = VARIANTS[args.variant]
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in PidNet(cfg).state_dict().items()}
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp_dir) as tmp:
        path = Path(tmp) / "model_ema_bf16.pth"
        state = {
            f"net.{k}": torch.empty(s, dtype=torch.bfloat16).normal_() for k, s in shapes.items()
        }
        torch.save(state, path)
        del state
        size = path.stat().st_size
        for dtype in ("bfloat16", "float32"):
            cmd = [sys.executable, __file__, "--_measure-load", str(path), "--variant", args.variant,
                   "--_dtype", dtype]  # fmt: skip
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            growth = row["peak_rss_gib"] - row["rss_before_gib"]
            row.update(variant=args.variant, file_gib=size / 2**30,
                       peak_over_file=row["peak_rss_gib"] * 2**30 / size,
                       growth_over_file=growth * 2**30 / size)  # fmt: skip
            rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    fmt = [(k, max(len(k), *(len(_cell(r.get(k))) for r in rows))) for k in keys]
    print("  ".join(k.ljust(w) for k, w in fmt))
    for r in rows:
        print("  ".join(_cell(r.get(k)).ljust(w) for k, w in fmt))


def _cell(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else str(v))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--variant", default="v1p5_sr4x_c16", choices=sorted(VARIANTS))
    ap.add_argument("--size", type=int, default=2048, help="CUDA output side in pixels")
    ap.add_argument("--tiny-size", type=int, default=256, help="CPU tiny-preset output side")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument(
        "--steps-flops",
        type=int,
        default=4,
        help="sampler steps per image (MFU; conditioning counted once)",
    )
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the GPU peak")
    ap.add_argument("--no-cuda", action="store_true")
    ap.add_argument("--load-rss", action="store_true", help="only the checkpoint-load RSS test")
    ap.add_argument("--tmp-dir", default=None)
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--_measure-load", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_dtype", default="bfloat16", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._measure_load:
        print(json.dumps(measure_load(args._measure_load, args.variant, args._dtype)))
        return
    if args.load_rss:
        rows = bench_load_rss(args)
    else:
        rows = bench_cpu(args)
        if torch.cuda.is_available() and not args.no_cuda:
            rows += bench_cuda(args)
    print_table(rows)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
