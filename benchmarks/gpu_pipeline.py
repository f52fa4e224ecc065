"""Pipeline efficiency on one GPU: the full-size decoder alone vs. the whole pid-batch pipeline.

  1. write a random full-size bf16 checkpoint (pid_batch.checkpoint.save_checkpoint, official
     `net.<key>` layout) for the chosen backbone/ckpt_type, and N random latents at the output size
  2. a  decode only:  the Decoder the pipeline's actor builds (stages.decode._real_decoder: same
        checkpoint load, dtype, torch.compile, micro-batch), `Decoder.decode` over batches of
        `--batch-size` back to back; the first batch (compile, warm-up) is timed apart
  3. b  pipeline:     `pipeline.run` on a local Ray with 1 GPU, latent shards in / JPEG q95 out on
        local disk, one decode actor; busy from the timing table (harness.actor_calls) and
        from the in-actor probe (harness.DecodeProbe) that also records peak GPU memory
  4. print a table and write JSON: steady img/s of a and b, b/a, busy, peak GPU memory, card

Steady = after each decoder's first call (compilation). No text encoder: null text (the cached
null-caption embedding, as with `model.text_encoder: null` for the tiny preset). `--max-seconds`
bounds the whole run (default 540): b gets only as many images as the time left allows, and a
watchdog writes what was measured and exits with code 3 if the budget still runs out.

    python benchmarks/gpu_pipeline.py --json gpu_pipeline.json             # on a GPU machine
    python benchmarks/gpu_pipeline.py --smoke --json /tmp/smoke.json        # CPU, tiny, < 2 min
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness, when loaded by a test
from harness import (  # noqa: E402
    DecodeProbe,
    bench_env,
    busy_from_calls,
    machine,
    print_table,
    probe_busy,
    run_probed,
    start_ray,
    write_shards,
)

FORMAT, QUALITY = "jpeg", 95


def model_config(args, checkpoint: str):
    """ModelConfig for the run: preset 'full' (GPU) or 'tiny' (--smoke), random-weight checkpoint.

    No Gemma here: `null_text` gives the full preset the same NullTextEncoder (null-caption
    embedding) as every tiny-preset job; the text encoder's cost is not part of this benchmark.
    """
    from pid_batch.job import ModelConfig

    full = not args.smoke
    return ModelConfig(
        backbone=args.backbone,
        ckpt_type=args.ckpt_type,
        checkpoint=checkpoint,
        preset="full" if full else "tiny",
        null_text=full,
        compile=args.compile,
    )


def job_config(args, model, inp: str, out: str):
    from pid_batch.job import JobConfig, OutputConfig, ResourceConfig

    gpu = not args.smoke
    return JobConfig(
        input=inp,
        output=out,
        model=model,
        images=OutputConfig(image_format=FORMAT, quality=QUALITY),
        resources=ResourceConfig(
            batch_size=args.batch_size,
            micro_batch=args.micro_batch,
            gpus_per_actor=1.0 if gpu else 0.0,
            cpus_per_actor=1.0,
        ),
    )


def write_checkpoint(args, path: Path) -> dict[str, Any]:
    """A random checkpoint in the official layout (bf16 `net.<key>`), built on the GPU if any."""
    import torch

    from pid_batch.backbones import resolve_checkpoint
    from pid_batch.checkpoint import save_checkpoint
    from pid_batch.model import PidNet
    from pid_batch.sample_checks import net_config_for

    cfg = net_config_for(resolve_checkpoint(args.backbone, args.ckpt_type), _preset(args))
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        net = PidNet(cfg).to(torch.bfloat16)
    save_checkpoint(net, path, dtype=torch.bfloat16)
    params = sum(p.numel() for p in net.parameters())
    del net
    if device == "cuda":
        torch.cuda.empty_cache()
    return {
        "params": params,
        "file_gib": path.stat().st_size / 2**30,
        "write_s": time.perf_counter() - t0,
    }


def _preset(args) -> str:
    return "tiny" if args.smoke else "full"


def latent_hw(args) -> tuple[int, int]:
    """Backbone latent side for the output size (flux: output / 32)."""
    from pid_batch.backbones import resolve_checkpoint
    from pid_batch.sample_checks import net_config_for

    cfg = net_config_for(resolve_checkpoint(args.backbone, args.ckpt_type), _preset(args))
    f = cfg.lq_ratio * cfg.lq_latent_unpatchify_factor * cfg.patch_size
    if args.size % f:
        raise ValueError(f"--size={args.size} must be a multiple of {f} for {args.backbone}")
    return args.size // f, args.size // f


def mode_a(job, lat: list, batch: int, loop_s: float, deadline: float) -> dict[str, Any]:
    """Decode only, with the actor's own Decoder; the timed loop stops after `loop_s` seconds
    (or at `deadline`, time.monotonic) even if latents are left."""
    import torch

    from pid_batch import latents
    from pid_batch.stages import decode

    cuda = torch.cuda.is_available() and job.resources.gpus_per_actor > 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    dec = decode._real_decoder(job)
    load_s = time.perf_counter() - t0
    lq = [latents.to_pid(x, job.model.spec.backbone, "pid", 0.0)[0] for x in lat]

    def run(part: list, first: int, dec=dec) -> Any:
        res = dec.decode(part, [0.0] * len(part), list(range(first, first + len(part))))
        if cuda:
            torch.cuda.synchronize()
        return res

    t1 = time.perf_counter()
    warm = run(lq[:batch], 0)  # compile + warm-up on the steady batch shape
    warm_s = time.perf_counter() - t1
    n, t2 = 0, time.perf_counter()
    stop = min(deadline, time.monotonic() + loop_s)
    for s in range(batch, len(lq), batch):
        if time.monotonic() > stop:
            break
        part = lq[s : s + batch]
        run(part, s)
        n += len(part)
    wall = time.perf_counter() - t2
    out = {
        "images": n,
        "steady_s": wall,
        "img_per_s": n / wall if n else None,
        "ms_per_image": 1000 * wall / n if n else None,
        "busy": 1.0,  # back to back by construction
        "load_s": load_s,
        "first_batch_s": warm_s,
        "compile_s": warm.compile_ms / 1000,
        "micro_batch": warm.micro_batch,
        "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "device": dec.accelerator,
    }
    del dec, warm
    if cuda:  # free the weights before the pipeline's actor loads its own copy
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
    return out


def steady(calls: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """An actor's calls after its first (compilation); all of them if it made only one."""
    return calls[1:] if len(calls) > 1 else calls


def mode_b(job, probe_dir: str) -> dict[str, Any]:
    """pid-batch's pipeline, local disk in and out, one decode actor; busy as in busy_bench.py."""
    probe = DecodeProbe(probe_dir)
    t0, t1, calls, result = run_probed(job, probe)
    whole = {a: busy_from_calls(c) for a, c in calls.items()}
    st = {a: busy_from_calls(steady(c)) for a, c in calls.items()}
    images = sum(p["images"] for p in st.values())
    span = max(p["last_end"] for p in st.values()) - min(p["first_start"] for p in st.values())
    actors = probe.actors().values()
    last_calls = [a["calls"][-1] for a in actors if a["calls"]]
    in_actor = probe_busy(probe)
    first = min(p["first_start"] for p in whole.values())
    return {
        "images": images,
        "images_total": result.processed,
        "steady_s": span,
        "img_per_s": images / span if span > 0 else None,
        "ms_per_image": 1000 * span / images if images else None,
        "busy": statistics.mean(p["busy"] for p in st.values()),
        "busy_whole": statistics.mean(p["busy"] for p in whole.values()),
        "busy_probe": statistics.mean(in_actor) if in_actor else None,
        "actor_startup_s": statistics.mean(a["init"]["startup_s"] for a in actors)
        if actors
        else None,
        "startup_s": first - t0,
        "tail_s": t1 - max(p["last_end"] for p in whole.values()),
        "run_wall_s": t1 - t0,
        "run_img_per_s": result.processed / (t1 - t0),
        "peak_gpu_mem_gib": max(
            (c.get("peak_gpu_mem_gib") or 0.0 for c in last_calls), default=None
        )
        or None,
        "device": next((c["device"] for c in last_calls if c.get("device")), "cpu"),
    }


def _watchdog(deadline: float, report: dict[str, Any], json_path: str | None) -> threading.Timer:
    """At the hard deadline: write what was measured, then exit(3) without waiting on Ray."""

    def fire() -> None:
        report["error"] = "max-seconds exceeded"
        print(json.dumps(report, indent=1, default=str), file=sys.stderr)
        if json_path:
            Path(json_path).write_text(json.dumps(report, indent=1, default=str))
        os._exit(3)

    t = threading.Timer(max(0.0, deadline - time.monotonic()), fire)
    t.daemon = True
    t.start()
    return t


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--backbone", default="flux", choices=["flux"], help="16-channel latents")
    ap.add_argument("--ckpt-type", default="2kto4k_v1pt5", help="2kto4k_v1pt5 = v1p5_sr4x_c16")
    ap.add_argument("--size", type=int, default=None, help="output side (2048; smoke 128)")
    ap.add_argument("--images", type=int, default=None, help="latents written (96; smoke 12)")
    ap.add_argument("--shard-size", type=int, default=None, help="(16; smoke 12: one shard)")
    ap.add_argument("--batch-size", type=int, default=None, help="rows per actor call (16; 4)")
    ap.add_argument("--micro-batch", type=int, default=0, help="0: sized from free GPU memory")
    ap.add_argument("--no-compile", dest="compile", action="store_false", default=None)
    ap.add_argument("--max-seconds", type=float, default=540.0)
    ap.add_argument("--a-share", type=float, default=0.2, help="budget fraction for a's timed loop")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny preset, small: < 2 min")
    ap.add_argument("--tmp-dir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    small = args.smoke
    for key, gpu, cpu in (("size", 2048, 128), ("images", 96, 12), ("shard_size", 16, 12),
                          ("batch_size", 16, 4), ("compile", True, False)):  # fmt: skip
        if getattr(args, key) is None:
            setattr(args, key, cpu if small else gpu)
    return args


def main(argv: list[str] | None = None) -> int:
    t_start = time.monotonic()
    args = parse_args(argv)
    deadline = t_start + args.max_seconds
    bench_env(threads=1 if args.smoke else None)

    import numpy as np
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or use --smoke", file=sys.stderr)
        return 2
    report: dict[str, Any] = {"machine": machine(), "args": vars(args)}
    watchdog = _watchdog(deadline, report, args.json)
    h, w = latent_hw(args)
    tmp = tempfile.mkdtemp(prefix="pid-gpu-pipeline-", dir=args.tmp_dir)
    try:
        ckpt = Path(tmp, "model_ema_bf16.pth")
        report["checkpoint"] = write_checkpoint(args, ckpt)
        model = model_config(args, str(ckpt))
        report["variant"] = model.variant_label
        rng = np.random.default_rng(0)
        lat = [rng.standard_normal((16, h, w)).astype(np.float32) for _ in range(args.images)]
        probe_job = job_config(args, model, str(Path(tmp, "in")), str(Path(tmp, "out-a")))
        gpus = 0 if args.smoke else 1
        report["card"] = torch.cuda.get_device_name() if gpus else "cpu"
        t0 = time.monotonic()
        loop_s = args.a_share * args.max_seconds
        report["a"] = a = mode_a(probe_job, lat, args.batch_size, loop_s, deadline)
        a_total = time.monotonic() - t0
        print(f"a: {a['img_per_s']} img/s ({a_total:.0f} s)", file=sys.stderr)
        # b: as many whole shards as fit the time left (start-up ~ a's load + compile + 30 s).
        left = deadline - time.monotonic() - (a["load_s"] + a["first_batch_s"] + 30) * 1.5
        fit = int(left / (a["ms_per_image"] / 1000)) if a["ms_per_image"] else args.images
        n_b = max(2 * args.batch_size, min(args.images, fit))
        n_b = -(-n_b // args.shard_size) * args.shard_size
        write_shards(str(Path(tmp, "in")), n_b, args.shard_size, (h, w))
        ray_s = start_ray(
            num_cpus=min(os.cpu_count() or 2, 16) if not args.smoke else 2,
            object_store_mb=1024 if args.smoke else 8192,
            num_gpus=gpus,
        )
        job = dataclasses.replace(probe_job, output=str(Path(tmp, "out-b")))
        probe_dir = tempfile.mkdtemp(prefix="probe-", dir=tmp)
        t0 = time.monotonic()
        report["b"] = b = mode_b(job, probe_dir)
        print(f"b: {b['img_per_s']} img/s ({time.monotonic() - t0:.0f} s)", file=sys.stderr)
        report["ray_init_s"] = ray_s
        report["ratio_b_over_a"] = (
            b["img_per_s"] / a["img_per_s"] if a["img_per_s"] and b["img_per_s"] else None
        )
        report["output_hw"] = [args.size, args.size]
        report["total_s"] = time.monotonic() - t_start
    finally:
        import ray

        ray.shutdown()
        watchdog.cancel()
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"\n{report['variant']} on {report['card']}, {args.size}² {FORMAT} q{QUALITY}, "
        f"batch {args.batch_size}, compile {args.compile}; total {report['total_s']:.0f} s"
    )
    cols = ["images", "img_per_s", "ms_per_image", "busy", "busy_probe", "peak_gpu_mem_gib"]
    print_table(
        ["mode", *cols],
        [
            [m, *(_fmt(report[k].get(c)) for c in cols)]
            for m, k in (("a decode only", "a"), ("b pipeline", "b"))
        ],
    )
    print(f"\nb/a steady throughput: {_fmt(report['ratio_b_over_a'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 0


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else str(v))


if __name__ == "__main__":
    sys.exit(main())
