"""Simulated scale: N fake accelerators (SleepDecoder, paper GB200 ms/image) on a local Ray; busy?

For N = 1, 4, 8, 16 decode actors (`model.fake_latency_ms`, `resources.min_actors = max_actors
= N`, `cpus_per_actor` small so 16 fit beside the read and encode tasks on 2 cores) this runs
`pipeline.run` over enough samples for `--duration` seconds of device time per actor and reports:

* busy (whole run) = Σ time in decode ÷ (N × pipeline.run wall time), start-up included;
* busy (steady) = per actor, time in decode ÷ (last decode end − first decode start);
* where each actor slot's remaining time went: waiting for its process (raylet starts workers
  a few at a time), process start + imports, DecodeStage init, waiting for the first batch,
  per-call overhead inside the actor, idle gaps between calls (starved), and the tail after its
  last call (other actors still finishing, last encode/write, done markers, summary).

In-actor times come from harness.DecodeProbe, which pipeline.run hands every decode actor
(`probe=`): one JSON line per event to a local file (process create time, __init__ start/end,
call start/end, time in the decoder); it changes nothing else. Variants (`--variants`) patch the graph or Ray settings to test fixes.

    python benchmarks/sim_scale.py [--actors 1,4,8,16] [--duration 120] [--quick] [--json out.json]
    python benchmarks/sim_scale.py --actors 16 --variants base,enc64+ecpu0.5,enc64+ecpu0.5+pwrite
    python benchmarks/sim_scale.py --actors 16 --variants raydata,base    # vs bare Ray Data

Variant "raydata" runs the same N sleeping actors in a bare Ray Data script (no storage, no
encode, no timing rows, blocks of one batch): the busy fraction any Ray Data pipeline can reach
on this machine; the script prints pipeline / raydata for each N measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import (
    DecodeProbe,
    actor_calls,
    bench_env,
    busy_from_calls,
    machine,
    make_bucket,
    print_table,
    spread,
    start_ray,
    start_s3,
    write_shards,
)

from pid_batch.fake import DEFAULT_LATENCY_MS as LATENCY_MS

# -- variants -----------------------------------------------------------------------------------
# "raydata" is not the pipeline: the same N sleeping actors in a bare Ray Data script
# (run_reference), the reference the pipeline's busy fraction is compared with.
# Any other variant is tokens joined by "+": base (pipeline as is) | enc<N> (encode_batch_size N) |
# ecpu<X> (encode_cpus X) | bs<N> (actor batch_size N) | read<X> (read tasks at X CPUs; the
# pipeline hard-codes it) | pwrite (encode_write with its object writes on 8 threads; timing
# part still written after them). ("light", a torch-free copy of the fake actor, is gone: the
# SleepDecoder actor itself imports no torch since session 2.) read/pwrite rewrite the
# matching map_batches calls of pipeline.build_dataset while it builds the graph.


def _variant(name: str) -> tuple[dict[str, Any], Any]:
    """(ResourceConfig overrides, build_dataset patch or None) for a variant name."""
    res: dict[str, Any] = {}
    read_cpus, pwrite = None, False
    for tok in name.split("+"):
        if tok == "base":
            continue
        if tok.startswith("enc"):
            res["encode_batch_size"] = int(tok[3:])
        elif tok.startswith("ecpu"):
            res["encode_cpus"] = float(tok[4:])
        elif tok.startswith("bs"):
            res["batch_size"] = int(tok[2:])
        elif tok.startswith("read"):
            read_cpus = float(tok[4:])
        elif tok == "pwrite":
            pwrite = True
        else:
            raise ValueError(f"unknown variant token {tok!r} in {name!r}")
    patch = _graph_copy(read_cpus, pwrite) if (read_cpus or pwrite) else None
    return res, patch


def _encode_write_pwrite(batch, job):
    """stages.writer.encode_write with image writes on a thread pool, joined before the timing part.

    (Its rows' write_ms then measure submission only.)
    """
    from concurrent.futures import ThreadPoolExecutor

    from pid_batch import storage
    from pid_batch.stages import writer

    real = storage.write_bytes_atomic
    pool = ThreadPoolExecutor(8)
    futures = []

    def deferred(uri, data):
        if "/timing/" in uri:  # rows only after every image of the batch is written
            for f in futures:
                f.result()
            return real(uri, data)
        futures.append(pool.submit(real, uri, data))

    storage.write_bytes_atomic = deferred
    try:
        return writer.encode_write(batch, job)
    finally:
        storage.write_bytes_atomic = real
        pool.shutdown(wait=True)
        for f in futures:
            f.result()


def _graph_copy(read_cpus: float | None, pwrite: bool = False):
    """pipeline.build_dataset as it is, with some of its map_batches calls rewritten.

    Wraps Dataset.map_batches while the graph is built, so the variant follows the pipeline's
    current graph: the read stage's num_cpus and the encode function.
    """

    def patch(pipeline, probe_dir: str):
        import ray

        from pid_batch.stages import reader, writer

        real_build = pipeline.build_dataset
        reads = {reader.read_shard, reader.read_images}

        def build_dataset(job, todo, *args, **kwargs):
            real_map = ray.data.Dataset.map_batches

            def map_batches(self, fn, *args, **kwargs):
                if fn in reads and read_cpus is not None:
                    kwargs["num_cpus"] = read_cpus
                elif fn is writer.encode_write and pwrite:
                    fn = _encode_write_pwrite
                return real_map(self, fn, *args, **kwargs)

            ray.data.Dataset.map_batches = map_batches
            try:
                return real_build(job, todo, *args, **kwargs)
            finally:
                ray.data.Dataset.map_batches = real_map

        return build_dataset

    return patch


def run_once(
    n_actors: int,
    variant: str,
    images: int,
    args: argparse.Namespace,
    url: str | None,
) -> dict[str, Any]:
    """Fresh Ray, write shards, one pipeline.run with N fake actors; analyse timing + probes."""
    import ray

    from pid_batch import pipeline
    from pid_batch.job import JobConfig, ModelConfig, OutputConfig, ResourceConfig
    from pid_batch.timing import read_timing

    res_kw, patch = _variant(variant)
    tmp = tempfile.mkdtemp(prefix="pidsim-")
    root = f"s3://{make_bucket(url)}" if url else tmp
    inp, out = f"{root}/in", f"{root}/out"
    h, w = args.latent
    write_shards(inp, images, args.shard_size, (h, w))
    res = {
        "min_actors": n_actors,
        "max_actors": n_actors,
        "cpus_per_actor": args.cpus_per_actor,
        "batch_size": args.batch_size,
        **{
            k: v
            for k, v in (
                ("encode_cpus", args.encode_cpus),
                ("encode_batch_size", args.encode_batch_size),
            )
            if v is not None
        },
        **res_kw,
    }
    job = JobConfig(
        input=inp,
        output=out,
        model=ModelConfig(
            backbone="flux", ckpt_type="2k", preset="tiny", fake_latency_ms=args.latency_ms
        ),
        images=OutputConfig(image_format="jpeg"),
        resources=ResourceConfig(**res),
    )
    probe_dir = tempfile.mkdtemp(prefix="pidprobe-")
    ray_s = start_ray()
    saved = pipeline.build_dataset
    if patch is not None:  # a variant of the graph, not of the actor
        pipeline.build_dataset = patch(pipeline, probe_dir)
    try:
        t0 = time.time()
        result = pipeline.run(job, log=None, probe=DecodeProbe(probe_dir))
        t1 = time.time()
    finally:
        pipeline.build_dataset = saved
        ray.shutdown()
    if result.exit_code or result.processed != images:
        raise RuntimeError(f"run failed: processed {result.processed}/{images}, {result.summary}")
    table = read_timing(out)
    if not url:
        shutil.rmtree(tmp, ignore_errors=True)
    return analyse(table, probe_dir, t0, t1, n_actors) | {
        "variant": variant,
        "actors": n_actors,
        "images": images,
        "ray_init_s": ray_s,
        "resources": res,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


class _SleepUDF:
    """The reference's actor: sleeps latency_ms per row, logs as DecodeProbe does, nothing else."""

    def __init__(self, probe_dir: str, latency_ms: float):
        import psutil

        t0 = time.time()
        self._log = Path(probe_dir, f"{os.getpid()}.jsonl")
        self._s = latency_ms / 1000
        self._emit(ev="init", created=psutil.Process().create_time(), init_start=t0, init_end=t0)

    def _emit(self, **rec):
        with open(self._log, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def __call__(self, batch):
        t0 = time.time()
        time.sleep(self._s * len(batch["id"]))
        t1 = time.time()
        self._emit(ev="call", start=t0, end=t1, busy=t1 - t0, n=len(batch["id"]))
        return {"id": batch["id"]}


def run_reference(n_actors: int, images: int, args: argparse.Namespace) -> dict[str, Any]:
    """The same N sleeping actors in a bare Ray Data script: no storage, no encode, no timing
    rows, blocks of one batch, a fixed pool. What any Ray Data pipeline can reach here."""
    import ray

    probe_dir = tempfile.mkdtemp(prefix="pidprobe-")
    ray_s = start_ray()
    try:
        ds = ray.data.range(images, override_num_blocks=max(1, images // args.batch_size))
        ds = ds.map_batches(
            _SleepUDF,
            batch_size=args.batch_size,
            compute=ray.data.ActorPoolStrategy(size=n_actors),
            fn_constructor_args=(probe_dir, args.latency_ms),
            num_cpus=args.cpus_per_actor,
        )
        t0 = time.time()
        rows = sum(len(b["id"]) for b in ds.iter_batches(batch_size=None))
        t1 = time.time()
    finally:
        ray.shutdown()
    if rows != images:
        raise RuntimeError(f"reference run returned {rows}/{images} rows")
    return analyse(None, probe_dir, t0, t1, n_actors) | {
        "variant": "raydata",
        "actors": n_actors,
        "images": images,
        "ray_init_s": ray_s,
        "resources": {"cpus_per_actor": args.cpus_per_actor, "batch_size": args.batch_size},
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def analyse(table, probe_dir: str, t0: float, t1: float, n_actors: int) -> dict[str, Any]:
    """Busy fractions and where each actor slot's time went (seconds summed over actors)."""
    wall = t1 - t0
    probes: dict[str, list[dict]] = {}
    for p in Path(probe_dir).glob("*.jsonl"):
        probes[p.stem] = [json.loads(line) for line in p.read_text().splitlines()]
    parts = dict.fromkeys(
        (
            "wait_process",
            "process_start",
            "stage_init",
            "wait_first_batch",
            "call_overhead",
            "gaps",
            "tail",
            "busy",
        ),
        0.0,
    )
    steady = []
    for recs in probes.values():
        init = next(r for r in recs if r["ev"] == "init")
        calls = sorted((r for r in recs if r["ev"] == "call"), key=lambda r: r["start"])
        created = max(t0, init["created"])
        parts["wait_process"] += created - t0
        parts["process_start"] += max(0.0, init["init_start"] - created)
        parts["stage_init"] += init["init_end"] - init["init_start"]
        if not calls:
            parts["tail"] += t1 - init["init_end"]
            continue
        parts["wait_first_batch"] += calls[0]["start"] - init["init_end"]
        busy = sum(c["busy"] for c in calls)
        parts["busy"] += busy
        parts["call_overhead"] += sum(c["end"] - c["start"] for c in calls) - busy
        parts["gaps"] += sum(calls[i + 1]["start"] - calls[i]["end"] for i in range(len(calls) - 1))
        parts["tail"] += t1 - calls[-1]["end"]
        steady.append(busy / (calls[-1]["end"] - calls[0]["start"]))
    # Actors that never started (no probe file) lose the whole run.
    parts["never_started"] = (n_actors - len(probes)) * wall
    slot_s = n_actors * wall
    out = {
        "wall_s": wall,
        "busy_whole": parts["busy"] / slot_s,
        "busy_steady_mean": statistics.mean(steady) if steady else 0.0,
        "busy_steady_min": min(steady) if steady else 0.0,
        "actors_seen": len(probes),
        "slot_fractions": {k: v / slot_s for k, v in parts.items()},
        "img_per_s": sum(r["n"] for recs in probes.values() for r in recs if r["ev"] == "call")
        / wall,
        "ideal_img_per_s": n_actors * 1000 / LATENCY_MS,
        "first_decode_after_s": min(
            (r["start"] for recs in probes.values() for r in recs if r["ev"] == "call"),
            default=t1,
        )
        - t0,
        "last_decode_end_after_s": max(
            (r["end"] for recs in probes.values() for r in recs if r["ev"] == "call"),
            default=t0,
        )
        - t0,
        "last_actor_ready_after_s": max(
            (r["init_end"] for recs in probes.values() for r in recs if r["ev"] == "init"),
            default=t1,
        )
        - t0,
    }
    if table is None:  # the bare Ray Data reference writes no timing rows
        return out
    # The timing table's own view (no probe): busy from started_at + decode_ms per actor.
    tt = [busy_from_calls(c) for c in actor_calls(table).values()]
    col = {
        c: table.column(c).to_numpy(zero_copy_only=False)
        for c in ("read_ms", "queue_ms", "encode_ms", "write_ms")
    }
    return out | {
        "busy_timing_table": statistics.mean(b["busy"] for b in tt) if tt else 0.0,
        # CPU-seconds the other stages spent per second of run (one core = 1.0).
        "stage_load": {
            k[:-3]: float(v.sum()) / 1000 / wall for k, v in col.items() if k != "queue_ms"
        },
        "queue_ms_p50": float(statistics.median(col["queue_ms"].tolist())),
        "last_row_finished_after_s": max(
            v.timestamp() for v in table.column("finished_at").to_pylist()
        )
        - t0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--actors", default="1,4,8,16")
    ap.add_argument("--variants", default="base")
    ap.add_argument("--duration", type=float, default=120.0, help="device seconds per actor")
    ap.add_argument("--quick", action="store_true", help="--duration 20")
    ap.add_argument("--latency-ms", type=float, default=LATENCY_MS)
    ap.add_argument("--latent", default="2x2", help="h x w of the latent; 2x2 → 64² images")
    ap.add_argument("--shard-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--cpus-per-actor", type=float, default=0.05)
    ap.add_argument("--encode-cpus", type=float, help="default: ResourceConfig's")
    ap.add_argument("--encode-batch-size", type=int, help="default: ResourceConfig's")
    ap.add_argument("--storage", choices=("local", "s3"), default="local")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.quick:
        args.duration = 20.0
    args.latent = tuple(int(x) for x in args.latent.lower().split("x"))
    bench_env(threads=1)
    server, url = start_s3() if args.storage == "s3" else (None, None)
    results = []
    try:
        for rep in range(args.repeats):
            for variant in args.variants.split(","):
                for n in (int(x) for x in args.actors.split(",")):
                    images = int(round(args.duration * 1000 / args.latency_ms * n))
                    if variant == "raydata":
                        r = run_reference(n, images, args) | {"repeat": rep}
                    else:
                        r = run_once(n, variant, images, args, url) | {"repeat": rep}
                    results.append(r)
                    sf = r["slot_fractions"]
                    print(
                        f"{variant} N={n} rep {rep}: whole {r['busy_whole']:.3f} steady "
                        f"{r['busy_steady_mean']:.3f} wall {r['wall_s']:.1f} s; "
                        + " ".join(f"{k} {v:.3f}" for k, v in sf.items() if k != "busy")
                        + f" (load {r['load_avg_1m']})",
                        file=sys.stderr,
                    )
    finally:
        if server is not None:
            server.stop()
    keys = (
        "wait_process",
        "process_start",
        "stage_init",
        "wait_first_batch",
        "call_overhead",
        "gaps",
        "tail",
    )
    rows = []
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in results:
        groups.setdefault((r["variant"], r["actors"]), []).append(r)
    for (variant, n), rs in groups.items():
        rows.append(
            [
                variant,
                n,
                rs[0]["images"],
                spread([r["wall_s"] for r in rs]),
                spread([r["busy_whole"] for r in rs]),
                spread([r["busy_steady_mean"] for r in rs]),
                *(f"{statistics.mean(r['slot_fractions'][k] for r in rs):.3f}" for k in keys),
                spread([r["img_per_s"] for r in rs]),
            ]
        )
    print(
        f"\nSleepDecoder {args.latency_ms:g} ms/image, latent [16, {args.latent[0]}, "
        f"{args.latent[1]}], batch {args.batch_size}, shards of {args.shard_size}, "
        f"cpus/actor {args.cpus_per_actor}, storage {args.storage}, {args.repeats} repeat(s)"
    )
    print_table(
        ["variant", "N", "images", "run s", "busy whole", "busy steady", *keys, "img/s"], rows
    )
    ref = {n: rs for (v, n), rs in groups.items() if v == "raydata"}
    for (variant, n), rs in groups.items():
        if variant != "raydata" and n in ref:
            mine = statistics.mean(r["busy_whole"] for r in rs)
            base = statistics.mean(r["busy_whole"] for r in ref[n])
            print(
                f"N={n}: busy whole {variant} / raydata = {mine:.3f} / {base:.3f} = {mine / base:.3f}"
            )
    if args.json:
        out = {
            "machine": machine(),
            "args": {**vars(args), "latent": list(args.latent)},
            "results": results,
        }
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
