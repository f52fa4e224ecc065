"""Cold start: job submit → first image written, split into its parts; compile once per bucket?

Runs `pipeline.run` on a job whose Ray is not started yet (run() starts it), with the tiny PiD
preset loaded from a real .pth checkpoint (random weights written by save_checkpoint), for each
configuration:

  eager          model.compile false
  compile-cold   model.compile true, empty TORCHINDUCTOR_CACHE_DIR
  compile-warm   model.compile true, the cache directory compile-cold left behind

Parts (seconds from pipeline.run being called): plan (run.json, listing, resume scan) → Ray
start (ray.init inside run) → actor start (raylet spawns the worker; Python, Ray, pid_batch and
torch import; actor class load) → weight load (DecodeStage init: checkpoint fetch + load_net +
text encoder) → first batch wait (read task) → first compile (DecodeOutput.compile_ms of the
first call) → first decode (rest of the first call) → encode + write of the first image (its
timing row's finished_at).

Inputs hold two resolution buckets (latent 2×2 and 3×3 → 64² and 96²) over several shards, so
every actor meets each bucket several times: the probe (harness.DecodeProbe, handed to the
actors by pipeline.run's `probe=`, with decoder_calls on) logs compile_ms and torch._dynamo's
compiled-frame counter per `Decoder.decode` call, and the script checks that dynamo compiled
exactly one frame per (actor, bucket) and none after the bucket's first call. (The warm-up fix
that made it so is in decoder.py since commit d0a2f3d; `--fix-warmup`, which applied it in the
actor before then, is gone.)

    python benchmarks/cold_start.py [--configs eager,compile-cold,compile-warm] [--actors 1]
        [--storage local|s3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from harness import (
    DecodeProbe,
    bench_env,
    machine,
    make_bucket,
    print_table,
    spread,
    start_s3,
    write_shards,
)

BUCKETS = ((2, 2), (3, 3))


def write_checkpoint(path: Path) -> None:
    """Random tiny-preset weights in the released layout (bf16 .pth, `net.` prefix)."""
    import torch

    from pid_batch.checkpoint import save_checkpoint
    from pid_batch.job import ModelConfig
    from pid_batch.model import PidNet
    from pid_batch.sample_checks import net_config_for

    spec = ModelConfig(backbone="flux", ckpt_type="2k", preset="tiny").spec
    torch.manual_seed(0)
    save_checkpoint(PidNet(net_config_for(spec, "tiny")), path)


def run_config(name: str, args, root: str, ckpt: str, cache_dir: str) -> dict[str, Any]:
    from pid_batch import pipeline
    from pid_batch.job import JobConfig, ModelConfig, OutputConfig, ResourceConfig
    from pid_batch.timing import read_timing

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir  # before Ray starts: workers inherit it
    out = f"{root}/out-{name}"
    job = JobConfig(
        input=f"{root}/in",
        output=out,
        model=ModelConfig(
            backbone="flux",
            ckpt_type="2k",
            preset="tiny",
            checkpoint=ckpt,
            compile=name != "eager",
        ),
        images=OutputConfig(image_format="jpeg"),
        resources=ResourceConfig(
            min_actors=args.actors,
            max_actors=args.actors,
            cpus_per_actor=1.0 / args.actors,
            batch_size=args.batch_size,
        ),
    )
    probe = DecodeProbe(tempfile.mkdtemp(prefix="pidprobe-"), decoder_calls=True)
    marks: dict[str, float] = {}
    real_ensure = pipeline.ensure_ray

    def ensure_ray(job, **kw):
        marks["ray_start"] = time.time()
        started = real_ensure(job, **kw)
        marks["ray_ready"] = time.time()
        return started

    saved = pipeline.ensure_ray  # only to time ray.init inside run()
    pipeline.ensure_ray = ensure_ray
    import ray

    try:
        t0 = time.time()
        result = pipeline.run(
            job,
            log=None,
            probe=probe,
            num_cpus=2,
            object_store_memory=512 * 2**20,
        )
        t1 = time.time()
    finally:
        pipeline.ensure_ray = saved
        ray.shutdown()
    if result.exit_code:
        raise RuntimeError(f"{name}: run failed {result.summary.get('errors_by_reason')}")
    table = read_timing(out)
    first_image = min(v.timestamp() for v in table.column("finished_at").to_pylist())
    actors = probe.actors()
    # The actor that decoded first defines the critical path to the first image.
    lead = min(actors.values(), key=lambda a: a["decodes"][0]["start"])
    init, first = lead["init"], lead["decodes"][0]
    first_call_end = first["end"]
    parts = {
        "plan": marks["ray_start"] - t0,
        "ray_start": marks["ray_ready"] - marks["ray_start"],
        "actor_start": init["init_start"] - marks["ray_ready"],
        "weight_load": init["init_end"] - init["init_start"],
        "first_batch_wait": first["start"] - init["init_end"],
        "first_compile": first["compile_ms"] / 1000,
        "first_decode": first["end"] - first["start"] - first["compile_ms"] / 1000,
        "encode_write_first": first_image - first_call_end,
    }
    # Compile once per (actor, bucket): torch._dynamo compiles exactly one frame per bucket
    # (counters["frames"]["ok"] over the actor's calls of that bucket), none in later calls.
    compiles: dict[str, dict[str, int]] = {}
    warmups: dict[str, dict[str, int]] = {}
    later_frames = 0
    for pid, a in actors.items():
        per: dict[str, int] = defaultdict(int)
        warm: dict[str, int] = defaultdict(int)
        seen: set[str] = set()
        for d in a["decodes"]:
            key = "x".join(str(x) for x in d["shape"][1:])
            per[key] += d["frames"]
            warm[key] += int(d["compile_ms"] > 0)
            if key in seen:
                later_frames += d["frames"]  # dynamo work on an already-compiled bucket
            seen.add(key)
        compiles[pid], warmups[pid] = dict(per), dict(warm)
    calls_per_bucket = {
        pid: {
            "x".join(map(str, b)): sum(1 for d in a["decodes"] if d["shape"][1:] == list(b))
            for b in BUCKETS
        }
        for pid, a in actors.items()
    }
    want = 1 if name != "eager" else 0
    ok = all(all(v == want for v in per.values()) for per in compiles.values())
    return {
        "config": name,
        "submit_to_first_image_s": first_image - t0,
        "parts_s": parts,
        "parts_sum_s": sum(parts.values()),
        "run_wall_s": t1 - t0,
        "load_s": init["load_s"],
        "dynamo_frames_per_actor_bucket": compiles,
        "warmup_compiles_per_actor_bucket": warmups,
        "calls_per_actor_bucket": calls_per_bucket,
        "dynamo_frames_after_first_call_per_bucket": later_frames,
        "compile_once_per_bucket": ok and later_frames == 0,
        "compile_ms_per_call": [
            [d["shape"], round(d["compile_ms"])]
            for a in actors.values()
            for d in a["decodes"]
            if d["compile_ms"] > 0
        ],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--configs", default="eager,compile-cold,compile-warm")
    ap.add_argument("--actors", type=int, default=1)
    ap.add_argument("--shards-per-bucket", type=int, default=3)
    ap.add_argument("--shard-size", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--storage", choices=("local", "s3"), default="local")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    bench_env(threads=1)
    tmp = Path(tempfile.mkdtemp(prefix="pidcold-"))
    os.environ["PID_BATCH_CACHE"] = str(tmp / "weight-cache")
    server = None
    if args.storage == "s3":
        server, url = start_s3()
        root = f"s3://{make_bucket(url)}"
    else:
        root = str(tmp / "data")
    ckpt_local = tmp / "tiny_flux_2k.pth"
    write_checkpoint(ckpt_local)
    ckpt = str(ckpt_local)
    if args.storage == "s3":
        from pid_batch import storage

        ckpt = f"{root}/weights/tiny_flux_2k.pth"
        storage.write_bytes_atomic(ckpt, ckpt_local.read_bytes())
    n = args.shards_per_bucket * args.shard_size
    for i, hw in enumerate(BUCKETS):
        write_shards(f"{root}/in/b{i}", n, args.shard_size, hw, seed=i, prefix=f"b{i}")
    results = []
    try:
        for rep in range(args.repeats):
            cache = str(tmp / f"inductor-{rep}")
            for name in args.configs.split(","):
                if name == "compile-cold":
                    shutil.rmtree(cache, ignore_errors=True)
                r = run_config(name, args, root, ckpt, cache) | {"repeat": rep}
                results.append(r)
                print(
                    f"{name} rep {rep}: first image after {r['submit_to_first_image_s']:.1f} s "
                    f"(compile once per bucket: {r['compile_once_per_bucket']})",
                    file=sys.stderr,
                )
                if args.repeats > 1:
                    _clear_output(root, name)
    finally:
        if server is not None:
            server.stop()
    keys = list(results[0]["parts_s"])
    rows = []
    for name in args.configs.split(","):
        rs = [r for r in results if r["config"] == name]
        rows.append(
            [
                name,
                spread([r["submit_to_first_image_s"] for r in rs]),
                *(spread([r["parts_s"][k] for r in rs]) for k in keys),
                spread([r["load_s"] for r in rs]),
                spread([r["run_wall_s"] for r in rs]),
                "yes" if all(r["compile_once_per_bucket"] for r in rs) else "NO",
            ]
        )
    print(
        f"\n{args.actors} actor(s), buckets {[f'{h * 32}x{w * 32}' for h, w in BUCKETS]}, "
        f"{args.shards_per_bucket} shards × {args.shard_size} per bucket, storage {args.storage}"
    )
    print_table(
        [
            "config",
            "submit→first image s",
            *keys,
            "(load_net s)",
            "run s",
            "compiled once per bucket",
        ],
        rows,
    )
    for r in results:
        if r["config"] != "eager":
            print(
                f"{r['config']} rep {r['repeat']}: warm-up compile ms per (actor, bucket) "
                f"{r['compile_ms_per_call']}; dynamo frames compiled per (actor, bucket) "
                f"{r['dynamo_frames_per_actor_bucket']}; calls per bucket "
                f"{r['calls_per_actor_bucket']}"
            )
    if args.json:
        out = {"machine": machine(), "args": vars(args), "results": results}
        Path(args.json).write_text(json.dumps(out, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _clear_output(root: str, name: str) -> None:
    from pid_batch import storage

    uri = f"{root}/out-{name}"
    if storage.is_local(uri):
        shutil.rmtree(uri, ignore_errors=True)
    else:
        for u in storage.list_files(uri):
            storage.delete(u)


if __name__ == "__main__":
    sys.exit(main())
