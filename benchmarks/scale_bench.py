"""Control-plane cost at 10^4..10^7 samples, tar merge memory, and a >= 100k-sample run.

Three parts, each phase in a fresh child process so its peak RSS is its own:

  control  synthetic outputs (input shard files, done markers, compacted timing tables and
           open shards' timing parts; no decode) on local disk or a loopback S3 (moto):
           plan time of a fresh output and of one 90 % done (10 % of shards begun), summary
           time over all N rows, peak RSS, objects written.
  tar      staged tar parts of 2 MB images (a 2048² JPEG q95) totalling 1 GB / 4 GB, merged
           by writer.assemble_tar: time, peak RSS against one part.
  run      pipeline.run over N samples (fake decoder pid_batch.fake.SleepDecoder, tiny latents,
           tar layout) with the driver's and every Ray process's RSS sampled over time.

Cost per sample is printed side by side for every size.

    python benchmarks/scale_bench.py control --samples 10000 100000 1000000 --backend local s3
    python benchmarks/scale_bench.py tar --gb 1 4
    python benchmarks/scale_bench.py run --samples 100000
    python benchmarks/scale_bench.py --smoke          # all three, small, in a minute or so
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback-only local Ray
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MB = 2**20


def peak_rss_mb() -> float:
    """This process's peak resident set so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


# ---------------------------------------------------------------------------------------------
# Child phases (run as `scale_bench.py _phase <name> <json args>`)


def _timing_template(rows: int):
    """One shard's worth of realistic timing rows (all columns filled), reused per shard."""
    import numpy as np
    import pyarrow as pa

    from pid_batch import timing
    from pid_batch.config import PAPER_GB200_MS_PER_2048

    t0 = 1.7e9
    base = timing.timing_table(
        [
            {
                "id": f"x{i:07d}",
                "shard": "k",
                "index": i,
                "status": "ok" if i % 50 else "error",
                "error": None if i % 50 else f"decode failed: sample 'x{i}': out of memory",
                "backbone": "flux",
                "variant": "v1p5_sr4x_c16",
                "checkpoint": "pid-flux-2k",
                "height": 2048,
                "width": 2048,
                "steps": 4,
                "seed": i,
                "read_ms": 1.0,
                "queue_ms": 3.0 + i % 7,
                "decode_ms": PAPER_GB200_MS_PER_2048 + i % 13,
                "encode_ms": 12.0,
                "write_ms": 2.0,
                "bytes": 2_000_000,
                "node": "10.0.0.1",
                "accelerator": "gb200",
                "actor": "node:1234",
                "micro_batch": 8,
                "started_at": t0 + i,
                "finished_at": t0 + i + 0.3,
                "output": f"shards/k-*.tar:x{i:07d}.jpg",
                "input_fingerprint": "fp",
            }
            for i in range(rows)
        ]
    )
    return base, np, pa


def _with_shard(base, key: str, np, pa):
    col = base.schema.get_field_index("shard")
    return base.set_column(col, "shard", pa.array(np.full(base.num_rows, key, dtype=object)))


def phase_make(a: dict) -> dict:
    """Write a synthetic input and output: `done` shards finished (marker + compacted table),
    `open_` shards begun (two timing parts each), the rest fresh."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.parquet as pq

    from pid_batch import storage
    from pid_batch.stages.layout import mark_done
    from pid_batch.timing import timing_dir, timing_uri

    inp, out, shards, per = a["input"], a["output"], a["shards"], a["per_shard"]
    base, np, pa = _timing_template(per)
    keys = [f"shard-{s:07d}.safetensors" for s in range(shards)]
    done = int(shards * a["done_fraction"])
    open_ = min(shards - done, a.get("open", max(1, shards // 10)))
    if not a.get("output_only"):
        storage.write_bytes_atomic(storage.join(inp, keys[0]), b"x")  # listed, never read

    def one(s: int) -> int:
        key, n = keys[s], 0
        if not a.get("output_only") and s:
            storage.write_bytes_atomic(storage.join(inp, key), b"x")
            n += 1
        if s < done + open_:
            buf = io.BytesIO()
            pq.write_table(_with_shard(base, key, np, pa), buf, compression="zstd")
            if s < done:
                storage.write_bytes_atomic(timing_uri(out, key), buf.getvalue())
                mark_done(out, key, None)
                n += 2
            else:
                for p in ("a", "b"):
                    storage.write_bytes_atomic(
                        storage.join(timing_dir(out, key), f"part-{p}.parquet"), buf.getvalue()
                    )
                n += 2
        return n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        objects = sum(pool.map(one, range(shards))) + (0 if a.get("output_only") else 1)
    return {"objects": objects, "make_s": round(time.perf_counter() - t0, 1), "done": done,
            "open": open_}  # fmt: skip


def _job(inp: str, out: str):
    from pid_batch.job import JobConfig, ModelConfig, OutputConfig

    return JobConfig(
        input=inp,
        output=out,
        model=ModelConfig(backbone="flux", ckpt_type="2k", preset="tiny", fake_latency_ms=0),
        images=OutputConfig(layout="tar", image_format="jpeg"),
    )


def phase_plan(a: dict) -> dict:
    from pid_batch.stages import resume

    before = rss_mb()
    t0 = time.perf_counter()
    plan = resume.plan_shards(_job(a["input"], a["output"]))
    s = time.perf_counter() - t0
    return {"plan_s": round(s, 3), "todo": len(plan.todo), "skipped": plan.skipped,
            "rss_before_mb": round(before, 1), "peak_rss_mb": round(peak_rss_mb(), 1)}  # fmt: skip


def phase_summary(a: dict) -> dict:
    from pid_batch import summary

    before = rss_mb()
    t0 = time.perf_counter()
    s = summary.summarize_output(a["output"])
    took = time.perf_counter() - t0
    return {"summary_s": round(took, 3), "rows": s["samples"], "ok": s["ok"],
            "rss_before_mb": round(before, 1), "peak_rss_mb": round(peak_rss_mb(), 1)}  # fmt: skip


def phase_stage(a: dict) -> dict:
    """Stage `parts` tar parts of `per_part` images of `image_mb` MB (random bytes + JSON)."""
    from pid_batch import codecs, storage
    from pid_batch.stages.layout import staging_uri

    payload = os.urandom(int(a["image_mb"] * MB))
    total = 0
    for p in range(a["parts"]):
        members = []
        for j in range(a["per_part"]):
            sid = f"p{p:04d}-{j:03d}"
            members += codecs.sample_members(sid, "jpg", payload, {"id": sid})
        data = codecs.build_tar(members)
        storage.write_bytes_atomic(staging_uri(a["output"], a["key"], f"part{p:05d}"), data)
        total += len(data)
        part_bytes = len(data)
    return {"staged_bytes": total, "part_bytes": part_bytes}


def phase_merge(a: dict) -> dict:
    from types import SimpleNamespace

    from pid_batch.stages import writer

    job = SimpleNamespace(
        output=a["output"], images=SimpleNamespace(layout="tar", tar_max_bytes=a["cap"])
    )
    before = rss_mb()
    t0 = time.perf_counter()
    members = writer.assemble_tar(job, a["key"])
    took = time.perf_counter() - t0
    return {"merge_s": round(took, 2), "members": members, "rss_before_mb": round(before, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1)}  # fmt: skip


PHASES = {
    "make": phase_make,
    "plan": phase_plan,
    "summary": phase_summary,
    "stage": phase_stage,
    "merge": phase_merge,
}


def child(name: str, args: dict, env: dict[str, str] | None = None) -> dict:
    """Run one phase in a fresh Python; its JSON result."""
    r = subprocess.run(
        [sys.executable, __file__, "_phase", name, json.dumps(args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)},
        timeout=3600,
    )
    if r.returncode:
        raise RuntimeError(f"phase {name} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Loopback S3


class LoopbackS3:
    """A moto S3 server on 127.0.0.1 with one bucket; env() for child processes."""

    def __enter__(self):
        import logging

        import boto3
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}  # fmt: skip
        os.environ.update(creds)
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.vars = {**creds, "AWS_ENDPOINT_URL": self.endpoint}
        boto3.client("s3", endpoint_url=self.endpoint).create_bucket(Bucket="bench")
        return self

    def __exit__(self, *exc):
        self.server.stop()


# ---------------------------------------------------------------------------------------------
# Parts


def control(sizes: list[int], backends: list[str], per_shard: int, work: Path) -> list[dict]:
    """Plan (fresh and half done) and summary cost per size and backend."""
    rows = []
    for backend in backends:
        s3 = LoopbackS3().__enter__() if backend == "s3" else None
        try:
            for n in sizes:
                shards = max(1, n // per_shard)
                tag = f"{backend}-{n}"
                base = f"s3://bench/{tag}" if s3 else str(work / tag)
                env = s3.vars if s3 else None
                inp, out = f"{base}/in", f"{base}/out"
                fresh = child("make", {"input": inp, "output": out, "shards": shards,
                                       "per_shard": per_shard, "done_fraction": 0.0,
                                       "output_only": False, "open": 0}, env)  # fmt: skip
                plan_fresh = child("plan", {"input": inp, "output": out}, env)
                made = child("make", {"input": inp, "output": out, "shards": shards,
                                      "per_shard": per_shard, "done_fraction": 0.9,
                                      "output_only": True}, env)  # fmt: skip
                plan_resume = child("plan", {"input": inp, "output": out}, env)
                summ = child("summary", {"output": out}, env)
                rows.append(
                    {
                        "backend": backend,
                        "samples": n,
                        "shards": shards,
                        "objects_written": fresh["objects"] + made["objects"],
                        "plan_fresh_s": plan_fresh["plan_s"],
                        "plan_fresh_peak_rss_mb": plan_fresh["peak_rss_mb"],
                        "plan_resume_s": plan_resume["plan_s"],
                        "plan_resume_todo": plan_resume["todo"],
                        "plan_resume_peak_rss_mb": plan_resume["peak_rss_mb"],
                        "summary_rows": summ["rows"],
                        "summary_s": summ["summary_s"],
                        "summary_peak_rss_mb": summ["peak_rss_mb"],
                        "summary_rss_before_mb": summ["rss_before_mb"],
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
                if s3:
                    _s3_delete_prefix(s3.endpoint, f"{tag}/")
                else:
                    shutil.rmtree(work / tag, ignore_errors=True)
        finally:
            if s3:
                s3.__exit__(None, None, None)
    return rows


def _s3_delete_prefix(endpoint: str, prefix: str) -> None:
    import boto3

    c = boto3.client("s3", endpoint_url=endpoint)
    for page in c.get_paginator("list_objects_v2").paginate(Bucket="bench", Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            c.delete_objects(Bucket="bench", Delete={"Objects": keys})


def tar_merge(gbs: list[float], work: Path, image_mb: float = 2.0, per_part: int = 64) -> list:
    """Stage `gb` GB as parts of `per_part` images and merge them: peak RSS vs one part."""
    rows = []
    for gb in gbs:
        out = str(work / f"tar-{gb}")
        parts = max(1, math.ceil(gb * 1e9 / (image_mb * MB * per_part)))
        staged = child("stage", {"output": out, "key": "s.safetensors", "parts": parts,
                                 "per_part": per_part, "image_mb": image_mb})  # fmt: skip
        merged = child("merge", {"output": out, "key": "s.safetensors", "cap": 10**9})
        part_mb = staged["part_bytes"] / MB
        tars = sorted(p.stat().st_size for p in (Path(out) / "shards").glob("*.tar"))
        rows.append(
            {
                "shard_gb": round(staged["staged_bytes"] / 1e9, 2),
                "parts": parts,
                "part_mb": round(part_mb, 1),
                "tars": len(tars),
                "largest_tar_gb": round(tars[-1] / 1e9, 3),
                "members": merged["members"],
                "merge_s": merged["merge_s"],
                "rss_before_mb": merged["rss_before_mb"],
                "peak_rss_mb": merged["peak_rss_mb"],
                "target_mb": round(2 * part_mb + 64, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return rows


class _ProgressLog(io.TextIOBase):
    """The run's progress stream: records (samples done, driver RSS MB, seconds) per update."""

    def __init__(self):
        self.points: list[tuple[int, float, float]] = []
        self.t0 = time.time()

    def write(self, s: str) -> int:
        import re

        for m in re.finditer(r"\[pid-batch\] (\d+) samples", s):
            self.points.append((int(m.group(1)), rss_mb(), time.time() - self.t0))
            n, r, t = self.points[-1]
            if len(self.points) % 30 == 1:  # a trace while it runs (long runs on busy boxes)
                print(f"progress {n} samples, driver {r:.1f} MB, {t:.0f} s", file=sys.stderr,
                      flush=True)  # fmt: skip
        return len(s)


def pipeline_run(
    samples: int,
    per_shard: int,
    work: Path,
    object_store_mb: int = 200,
    batch_size: int = 256,
    encode_batch_size: int = 256,
) -> dict:
    """pipeline.run over `samples` tiny latents, tar layout, ~0 ms fake decode."""
    sys.path.insert(0, str(HERE))
    import load_bench  # MemorySampler, spilled, write_shards
    import numpy as np
    import ray
    from harness import spilled_total

    from pid_batch import pipeline
    from pid_batch.job import JobConfig, ModelConfig, OutputConfig, ResourceConfig

    inp, out = work / "run-in", work / "run-out"
    load_bench.write_shards(inp, samples, per_shard)
    job = JobConfig(
        input=str(inp),
        output=str(out),
        model=ModelConfig(backbone="flux", ckpt_type="2k", preset="tiny", fake_latency_ms=0.01),
        images=OutputConfig(image_format="jpeg", layout="tar"),
        resources=ResourceConfig(batch_size=batch_size, encode_batch_size=encode_batch_size),
    )
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             object_store_memory=object_store_mb * MB, log_to_driver=False)  # fmt: skip
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    sampler = load_bench.MemorySampler(every_s=1.0)
    sampler.start()
    log = _ProgressLog()
    t0 = time.time()
    result = pipeline.run(job, log=log)
    run_s = time.time() - t0
    sampler.stop()
    spill, spill_lines = load_bench.spilled(session)
    spill_total = spilled_total()
    ray.shutdown()
    driver_end = rss_mb()
    early_n = min(10_000, samples // 10)  # the driver's RSS once this many samples are back
    early = next(((n, rss) for n, rss, _ in log.points if n >= early_n), None)
    over_time = [
        {"samples": n, "driver_rss_mb": round(r, 1), "t_s": round(t, 1)}
        for n, r, t in log.points[:: max(1, len(log.points) // 12)]
    ]
    totals = np.array(sampler.totals, dtype=np.float64) / MB
    objects = sum(1 for p in out.rglob("*") if p.is_file())
    report = {
        "samples": samples,
        "batch_size": batch_size,
        "encode_batch_size": encode_batch_size,
        "object_store_mb": object_store_mb,
        "shards": -(-samples // per_shard),
        "ok": result.summary.get("ok"),
        "error": result.summary.get("error"),
        "run_s": round(run_s, 1),
        "samples_per_s": round(result.processed / run_s, 1),
        "spilled_bytes_total": spill_total,  # over the run
        "spilled_bytes": spill,  # still on disk at the end
        "raylet_spill_log": spill_lines,
        "driver_rss_early_at_samples": early[0] if early else None,
        "driver_rss_early_mb": round(early[1], 1) if early else None,
        "driver_rss_end_mb": round(driver_end, 1),
        "driver_peak_rss_mb": round(peak_rss_mb(), 1),
        "tree_rss_peak_mb": round(float(totals.max()), 1) if totals.size else None,
        "driver_over_time": over_time,
        "largest_processes": load_bench._per_process(sampler),
        "output_objects": objects,
    }
    shutil.rmtree(inp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return report


# ---------------------------------------------------------------------------------------------


def side_by_side(rows: list[dict]) -> str:
    """Cost per sample at each size, one line per (backend, size)."""
    lines = [
        f"{'backend':<7} {'samples':>9} {'objects':>8} {'plan fresh':>11} {'us/sample':>9} "
        f"{'plan resume':>11} {'us/sample':>9} {'summary':>8} {'us/sample':>9} {'peak MB':>8}"
    ]
    for r in rows:
        n = r["samples"]
        lines.append(
            f"{r['backend']:<7} {n:>9} {r['objects_written']:>8} {r['plan_fresh_s']:>10.2f}s "
            f"{r['plan_fresh_s'] / n * 1e6:>9.1f} {r['plan_resume_s']:>10.2f}s "
            f"{r['plan_resume_s'] / n * 1e6:>9.1f} {r['summary_s']:>7.2f}s "
            f"{r['summary_s'] / n * 1e6:>9.1f} {r['summary_peak_rss_mb']:>8.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", nargs="?", choices=["control", "tar", "run"], default=None)
    p.add_argument("--samples", type=int, nargs="+", default=None)
    p.add_argument("--backend", nargs="+", choices=["local", "s3"], default=["local", "s3"])
    p.add_argument("--per-shard", type=int, default=None)
    p.add_argument("--gb", type=float, nargs="+", default=[1.0, 4.0])
    p.add_argument("--batch-size", type=int, default=256, help="run: decode batch")
    p.add_argument("--encode-batch-size", type=int, default=256, help="run: encode batch")
    p.add_argument("--object-store-mb", type=int, default=200, help="run: Ray's object store")
    p.add_argument("--work-dir", default=None, help="default: a temp dir, removed afterwards")
    p.add_argument("--smoke", action="store_true", help="every part, small (CI)")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="pid-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {}
    try:
        if args.smoke or args.part == "control":
            sizes = args.samples or ([1000, 4000] if args.smoke else [10**4, 10**5, 10**6])
            per = args.per_shard or (100 if args.smoke else 1000)
            report["control"] = control(sizes, args.backend, per, work)
            print(side_by_side(report["control"]))
        if args.smoke or args.part == "tar":
            report["tar"] = tar_merge([0.2] if args.smoke else args.gb, work,
                                      per_part=32 if args.smoke else 64)  # fmt: skip
        if args.smoke or args.part == "run":
            n = (args.samples or [2000 if args.smoke else 100_000])[0]
            report["run"] = pipeline_run(
                n,
                args.per_shard or 100,
                work,
                object_store_mb=args.object_store_mb,
                batch_size=args.batch_size,
                encode_batch_size=args.encode_batch_size,
            )
            print(json.dumps(report["run"], indent=2))
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_phase":
        print(json.dumps(PHASES[sys.argv[2]](json.loads(sys.argv[3]))), flush=True)
        os._exit(0)  # skip interpreter teardown: pyarrow's S3 client can abort at exit
    else:
        main()
