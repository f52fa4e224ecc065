"""How busy does pid-batch keep its decoder? Four ways to decode the same shards, measured in one run.

  a  decode only     `Decoder.decode` over pre-loaded batches in a tight loop (the device's speed)
  b  pid-batch       `pipeline.run` on a local Ray, shards in / images out on loopback S3 (moto)
  c  sequential      the loop a user writes first: GET → parse → decode → JPEG → PUT, one process
  d  naive Ray Data  read_binary_files → one map_batches actor doing parse+decode+encode+write

Same tiny PiD preset (flux 2k, random weights), same latents, the model on one torch thread
everywhere (OMP_NUM_THREADS=1 for every Ray worker, torch.set_num_threads(1) in this process);
the second core is left for reading, encoding, writing, Ray and the S3 server.

Busy fraction = time inside Decoder.decode ÷ (last decode end − first decode start), per actor.
For b it comes from the timing table (per row: actor, started_at of its batch, decode_ms share)
and, as a cross-check, from DecodeStage's own counters (busy_s, first_call_at, last_call_end),
read by harness.DecodeProbe, which pipeline.run hands every decode actor (its `probe=`).

    python benchmarks/busy_bench.py [--images 192] [--repeats 2] [--modes abcd] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from harness import (
    DecodeProbe,
    bench_env,
    busy_from_calls,
    machine,
    make_bucket,
    print_table,
    probe_busy,
    probe_cpu_share,
    run_probed,
    spread,
    start_ray,
    start_s3,
    write_shards,
)

FORMAT, QUALITY = "jpeg", 95


def _tiny_model():
    from pid_batch.job import ModelConfig

    return ModelConfig(backbone="flux", ckpt_type="2k", preset="tiny")


def _new_decoder():
    import torch

    from pid_batch.decoder import Decoder
    from pid_batch.model import text

    torch.set_num_threads(1)
    m = _tiny_model()
    dec = Decoder(m.spec, preset="tiny", device="cpu")
    dec.text_encoder = text.NullTextEncoder(
        dim=dec.cfg.txt_embed_dim, max_length=dec.cfg.txt_max_length
    )
    return dec


def mode_a(lat, batch: int) -> dict[str, Any]:
    """Decode only: pre-loaded batches through Decoder.decode, back to back."""
    dec = _new_decoder()
    dec.decode(lat[:1], [0.0], [0])  # warm-up (allocator, first-call costs)
    t0, c0 = time.perf_counter(), time.thread_time()
    for s in range(0, len(lat), batch):
        part = lat[s : s + batch]
        dec.decode(part, [0.0] * len(part), list(range(s, s + len(part))))
    wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
    return {
        "images": len(lat),
        "steady_s": wall,
        "img_per_s": len(lat) / wall,
        "busy": 1.0,
        "decoder_ms_per_image": 1000 * wall / len(lat),
        "decoder_cpu_share": cpu / wall,
    }


def mode_b(
    bucket: str, rep: int, batch: int, probe_dir: str, prefetch: int | None = None
) -> dict[str, Any]:
    """pid-batch's pipeline, loopback S3 in and out; busy from the timing table and the probe."""
    from pid_batch.job import JobConfig, OutputConfig, ResourceConfig

    job = JobConfig(
        input=f"s3://{bucket}/in",
        output=f"s3://{bucket}/out-b-{rep}",
        model=_tiny_model(),
        images=OutputConfig(image_format=FORMAT, quality=QUALITY),
        resources=ResourceConfig(batch_size=batch)
        if prefetch is None
        else ResourceConfig(batch_size=batch, prefetch_batches=prefetch),
    )
    probe = DecodeProbe(probe_dir)
    t0, t1, calls, _ = run_probed(job, probe)
    per_actor = {a: busy_from_calls(c) for a, c in calls.items()}
    first = min(p["first_start"] for p in per_actor.values())
    last = max(p["last_end"] for p in per_actor.values())
    images = sum(p["images"] for p in per_actor.values())
    in_actor = probe_busy(probe)
    threads = {c["torch_threads"] for a in probe.actors().values() for c in a["calls"]}
    # Call-to-call gaps: from the end of one call's decoding to the start of the next call.
    gaps = []
    for c in calls.values():
        gaps += [c[i + 1][0] - (c[i][0] + c[i][1]) for i in range(len(c) - 1)]
    return {
        "images": images,
        "steady_s": last - first,
        "img_per_s": images / (last - first),
        "busy": statistics.mean(p["busy"] for p in per_actor.values()),
        "busy_probe": statistics.mean(in_actor) if in_actor else None,
        "torch_threads": sorted(threads),
        "startup_s": first - t0,  # run() called → first decode starts (plan, actor start, read)
        "tail_s": t1 - last,  # last decode ends → run() returns (encode/write, markers, summary)
        "run_wall_s": t1 - t0,
        "gap_ms_p50": 1000 * statistics.median(gaps) if gaps else None,
        "gap_ms_max": 1000 * max(gaps) if gaps else None,
        "decoder_ms_per_image": 1000 * sum(p["busy_s"] for p in per_actor.values()) / images,
        "decoder_cpu_share": probe_cpu_share(probe),
    }


def _put(s3, bucket: str, key: str, data: bytes) -> None:
    s3.put_object(Bucket=bucket, Key=key, Body=data)


def mode_c(bucket: str, rep: int, dec, batch: int) -> dict[str, Any]:
    """The bare loop: GET a shard, parse, decode in batches, encode JPEG, PUT each image."""
    import boto3

    from pid_batch import codecs, latents

    s3 = boto3.client("s3")
    keys = sorted(
        o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="in/").get("Contents", [])
    )
    busy = cpu = 0.0
    n = 0
    t0 = time.perf_counter()
    for key in keys:
        data = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        samples = codecs.read_shard(data, key)
        lq = [latents.to_pid(s.latent, "flux", "pid", 0.0)[0] for s in samples]
        for s in range(0, len(lq), batch):
            part = lq[s : s + batch]
            t1, c1 = time.perf_counter(), time.thread_time()
            res = dec.decode(part, [0.0] * len(part), [0] * len(part))
            busy += time.perf_counter() - t1
            cpu += time.thread_time() - c1
            for j, img in enumerate(res.images):
                out = codecs.encode_image(img, FORMAT, QUALITY)
                _put(s3, bucket, f"out-c-{rep}/{samples[s + j].id}.jpg", out)
                n += 1
    wall = time.perf_counter() - t0
    return {
        "images": n,
        "steady_s": wall,
        "img_per_s": n / wall,
        "busy": busy / wall,
        "decoder_ms_per_image": 1000 * busy / n,
        "decoder_cpu_share": cpu / busy,
    }


class _NaiveDecode:
    """What a first Ray Data script does: one class that parses, decodes, encodes and uploads."""

    def __init__(self, bucket: str, rep: int):
        import boto3

        self.decoder = _new_decoder()
        self.s3 = boto3.client("s3")
        self.bucket, self.rep = bucket, rep

    def __call__(self, batch):
        import numpy as np

        from pid_batch import codecs

        starts, busys, counts, cpus = [], [], [], []
        for data, path in zip(batch["bytes"], batch["path"]):
            samples = codecs.read_shard(bytes(data), str(path))
            lq = [s.latent for s in samples]
            t0, c0 = time.time(), time.thread_time()
            res = self.decoder.decode(lq, [0.0] * len(lq), [0] * len(lq))
            starts.append(t0)
            busys.append(time.time() - t0)
            cpus.append(time.thread_time() - c0)
            counts.append(len(lq))
            for s, img in zip(samples, res.images):
                out = codecs.encode_image(img, FORMAT, QUALITY)
                _put(self.s3, self.bucket, f"out-d-{self.rep}/{s.id}.jpg", out)
        return {
            "start": np.array(starts),
            "busy": np.array(busys),
            "n": np.array(counts),
            "cpu": np.array(cpus),
        }


def mode_d(bucket: str, rep: int, url: str) -> dict[str, Any]:
    """Naive Ray Data: defaults everywhere except one model copy (size=1) and an S3 filesystem."""
    import pyarrow.fs as pafs
    import ray

    fs = pafs.S3FileSystem(
        endpoint_override=url.split("://", 1)[1],
        scheme="http",
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
    )
    t0 = time.time()
    ds = ray.data.read_binary_files(f"{bucket}/in", filesystem=fs, include_paths=True)
    ds = ds.map_batches(
        _NaiveDecode,
        fn_constructor_kwargs={"bucket": bucket, "rep": rep},
        compute=ray.data.ActorPoolStrategy(size=1),
    )
    rows = ds.take_all()
    t1 = time.time()
    calls = sorted((r["start"], r["busy"], int(r["n"])) for r in rows)
    b = busy_from_calls(calls)
    # Steady state ends when the last image is written, not when its decode ends.
    return {
        "images": b["images"],
        "steady_s": b["span_s"],
        "img_per_s": b["images"] / b["span_s"],
        "busy": b["busy"],
        "startup_s": b["first_start"] - t0,
        "tail_s": t1 - b["last_end"],
        "run_wall_s": t1 - t0,
        "blocks_seen_by_actor": len(rows),
        "decoder_ms_per_image": 1000 * b["busy_s"] / b["images"],
        "decoder_cpu_share": sum(r["cpu"] for r in rows) / b["busy_s"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16, help="pipeline rows per actor call")
    ap.add_argument("--latent", default="4x4", help="latent h x w; 4x4 → 128² output (flux 32×)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--modes", default="abcd")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument(
        "--prefetch-batches", type=int, help="b: resources.prefetch_batches (default: the job's)"
    )
    args = ap.parse_args(argv)
    bench_env(threads=1)

    import numpy as np

    from pid_batch import storage

    h, w = (int(x) for x in args.latent.lower().split("x"))
    server, url = start_s3()
    bucket = make_bucket(url)
    write_shards(f"s3://{bucket}/in", args.images, args.shard_size, (h, w))
    rng = np.random.default_rng(0)
    lat = [rng.standard_normal((16, h, w)).astype(np.float32) for _ in range(args.images)]
    ray_s = start_ray()
    dec_c = _new_decoder() if "c" in args.modes else None
    if dec_c is not None:
        dec_c.decode(lat[:1], [0.0], [0])
    results: dict[str, list[dict[str, Any]]] = defaultdict(list)
    try:
        for rep in range(args.repeats):
            for m in args.modes if rep % 2 == 0 else args.modes[::-1]:
                probe_dir = tempfile.mkdtemp(prefix="pidprobe-")
                t = time.perf_counter()
                if m == "a":
                    r = mode_a(lat, args.batch_size)
                elif m == "b":
                    r = mode_b(bucket, rep, args.batch_size, probe_dir, args.prefetch_batches)
                elif m == "c":
                    r = mode_c(bucket, rep, dec_c, args.batch_size)
                else:
                    r = mode_d(bucket, rep, url)
                r["load_avg_1m"] = round(os.getloadavg()[0], 2)
                results[m].append(r)
                print(
                    f"rep {rep} mode {m}: {r['img_per_s']:.2f} img/s, busy {r['busy']:.3f} "
                    f"({time.perf_counter() - t:.0f} s, load {r['load_avg_1m']})",
                    file=sys.stderr,
                )
    finally:
        import ray

        ray.shutdown()
        server.stop()
    del storage
    out_hw = (h * 32, w * 32)
    names = {
        "a": "decode only",
        "b": "pid-batch pipeline",
        "c": "sequential loop",
        "d": "naive Ray Data",
    }
    rows = []
    for m in args.modes:
        rs = results[m]
        rows.append(
            [
                f"{m} {names[m]}",
                spread([r["img_per_s"] for r in rs]),
                spread([r["busy"] for r in rs]),
                spread([r.get("startup_s") for r in rs if r.get("startup_s") is not None]),
                spread([r.get("tail_s") for r in rs if r.get("tail_s") is not None]),
                spread([r["decoder_ms_per_image"] for r in rs]),
                spread([r["decoder_cpu_share"] for r in rs]),
            ]
        )
    print(
        f"\n{args.images} images, latent [16, {h}, {w}] → {out_hw[0]}×{out_hw[1]}, "
        f"batch {args.batch_size}, {FORMAT} q{QUALITY}, {args.repeats} repeats; "
        f"ray.init {ray_s:.1f} s"
    )
    print_table(
        [
            "mode",
            "steady img/s",
            "decoder busy",
            "start-up s",
            "tail s",
            "decode ms/img",
            "decoder CPU share",
        ],
        rows,
    )
    ratios = {}
    if "b" in args.modes:
        for o in "acd":
            if o in args.modes:
                per_rep = [
                    rb["img_per_s"] / ro["img_per_s"] for rb, ro in zip(results["b"], results[o])
                ]
                ratios[f"b/{o}"] = per_rep
        print()
        print_table(
            ["ratio", "per repeat", "mean"],
            [
                [k, ", ".join(f"{x:.3f}" for x in v), f"{statistics.mean(v):.3f}"]
                for k, v in ratios.items()
            ],
        )
        bs = results["b"]
        print(
            "\nb in-actor probe busy: "
            + spread([r["busy_probe"] for r in bs if r["busy_probe"] is not None])
            + f"; decoder threads {bs[0]['torch_threads']}; gap between calls p50 "
            + spread([r["gap_ms_p50"] for r in bs if r["gap_ms_p50"] is not None])
            + " ms, max "
            + spread([r["gap_ms_max"] for r in bs if r["gap_ms_max"] is not None])
            + " ms"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "args": vars(args),
                    "output_hw": out_hw,
                    "ray_init_s": ray_s,
                    "results": results,
                    "ratios": ratios,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
