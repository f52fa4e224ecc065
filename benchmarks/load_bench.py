"""Load run: many tiny samples through the local pipeline with a bounded object store.

The decoder is `pid_batch.fake.SleepDecoder` (`model.fake_latency_ms`), so the run measures the
pipeline, not the network. Reports throughput, whether Ray spilled objects to disk, and the
resident memory of the driver and of every Ray process over the run (sampled from /proc).

    python benchmarks/load_bench.py [--samples 10000] [--per-shard 100] [--object-store-mb 200]
        [--latency-ms 2] [--batch-size 32] [--encode-batch-size 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback-only local Ray
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid → (ppid, rss bytes, name) of every process."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            rss = int((d / "statm").read_text().split()[1]) * PAGE
            name = (d / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        out[int(d.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), rss, name)
    return out


def _tree_rss(root: int) -> dict[int, tuple[int, str]]:
    """pid → (RSS bytes, name) for root and all its descendants."""
    table = _proc_table()
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        kids.setdefault(ppid, []).append(pid)
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            _, rss, name = table[pid]
            # An actor's title gains ".submit" / ".__init__" while busy: keep the class part.
            out[pid] = (rss, name.split(").")[0] + ")" if ")." in name else Path(name).name)
            todo += kids.get(pid, [])
    return out


class MemorySampler(threading.Thread):
    """Samples the RSS of this process and every descendant every `every_s` seconds."""

    def __init__(self, every_s: float = 0.5):
        super().__init__(daemon=True)
        self.every_s = every_s
        self.totals: list[int] = []  # whole tree, per sample
        self.series: dict[int, list[int]] = {}  # pid → RSS per sample it was alive for
        self.names: dict[int, str] = {}
        self._stop_evt = threading.Event()

    def run(self) -> None:
        while not self._stop_evt.wait(self.every_s):
            tree = _tree_rss(os.getpid())
            self.totals.append(sum(rss for rss, _ in tree.values()))
            for pid, (rss, name) in tree.items():
                self.series.setdefault(pid, []).append(rss)
                if name.startswith("ray::") or pid not in self.names:
                    self.names[pid] = name

    def stop(self) -> None:
        self._stop_evt.set()
        self.join()


def _per_process(sampler: MemorySampler, top: int = 5) -> list[dict]:
    """The `top` processes by peak RSS: name, peak, and the median RSS (MB) of each quarter of
    their life (flat quarters = bounded)."""
    rows = []
    for pid, series in sampler.series.items():
        mb = np.array(series, dtype=np.float64) / 2**20
        quarters = [round(float(np.median(p)), 1) for p in np.array_split(mb, 4) if p.size]
        rows.append(
            {
                "pid": pid,
                "name": sampler.names[pid],
                "peak_mb": round(float(mb.max()), 1),
                "quarters_mb": quarters,
            }
        )
    return sorted(rows, key=lambda r: -r["peak_mb"])[:top]


def write_shards(root: Path, samples: int, per_shard: int) -> None:
    from pid_batch import codecs

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in range(0, samples, per_shard):
        n = min(per_shard, samples - s)
        lat = rng.standard_normal((n, 16, 2, 3)).astype(np.float32)
        ids = [f"x{s + i:07d}" for i in range(n)]
        (root / f"shard-{s // per_shard:05d}.safetensors").write_bytes(
            codecs.write_safetensors_shard(lat, ids, backbone="flux")
        )


def spilled(session_dir: Path) -> tuple[int, list[str]]:
    """Bytes in Ray's spill directory, and the raylet's "Spilled ..." log lines."""
    spill = sum(
        p.stat().st_size for p in session_dir.rglob("ray_spilled_objects*/*") if p.is_file()
    )
    lines = []
    for log in (session_dir / "logs").glob("raylet*.out"):
        lines += [
            ln.strip()[-160:]
            for ln in log.read_text(errors="replace").splitlines()
            if "Spilled " in ln
        ]
    return spill, lines[-3:]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=10_000)
    p.add_argument("--per-shard", type=int, default=100)
    p.add_argument("--object-store-mb", type=int, default=200)
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--latency-ms", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--encode-batch-size", type=int, default=64)
    p.add_argument("--work-dir", default=None, help="default: a temp dir, removed afterwards")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)

    import ray

    from pid_batch import pipeline
    from pid_batch.job import JobConfig, ModelConfig, OutputConfig, ResourceConfig

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="pid-load-"))
    inp, out = work / "in", work / "out"
    t0 = time.time()
    write_shards(inp, args.samples, args.per_shard)
    write_s = time.time() - t0
    job = JobConfig(
        input=str(inp),
        output=str(out),
        model=ModelConfig(
            backbone="flux", ckpt_type="2k", preset="tiny", fake_latency_ms=args.latency_ms
        ),
        images=OutputConfig(image_format="png"),
        resources=ResourceConfig(
            batch_size=args.batch_size, encode_batch_size=args.encode_batch_size
        ),
    )
    ray.init(
        address="local",
        num_cpus=args.num_cpus,
        include_dashboard=False,
        object_store_memory=args.object_store_mb * 2**20,
        log_to_driver=False,
    )
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    sampler = MemorySampler()
    sampler.start()
    t1 = time.time()
    result = pipeline.run(job, log=None)
    run_s = time.time() - t1
    sampler.stop()
    spill, spill_lines = spilled(session)
    ray.shutdown()

    rss = np.array(sampler.totals, dtype=np.float64) / 2**20
    q = max(1, len(rss) // 4)
    report = {
        "samples": args.samples,
        "shards": -(-args.samples // args.per_shard),
        "object_store_mb": args.object_store_mb,
        "fake_latency_ms": args.latency_ms,
        "batch_size": args.batch_size,
        "encode_batch_size": args.encode_batch_size,
        "ok": result.summary.get("ok"),
        "error": result.summary.get("error"),
        "processed": result.processed,
        "write_inputs_s": round(write_s, 1),
        "run_s": round(run_s, 1),
        "samples_per_s": round(result.processed / run_s, 1),
        "spilled_bytes": spill,
        "raylet_spill_log": spill_lines,
        "rss_tree_mb": {
            "peak": round(float(rss.max()), 1) if rss.size else None,
            "median_first_quarter": round(float(np.median(rss[:q])), 1) if rss.size else None,
            "median_last_quarter": round(float(np.median(rss[-q:])), 1) if rss.size else None,
        },
        "processes_seen": len(sampler.series),
        "largest_processes": _per_process(sampler),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return report


if __name__ == "__main__":
    r = main()
    sys.exit(
        0
        if r["ok"] == r["samples"] and r["spilled_bytes"] == 0 and not r["raylet_spill_log"]
        else 1
    )
