"""pid-batch over a multi-node Ray on one machine: a CPU head, "rtx" and "gb200" GPU nodes.

`ray.cluster_utils.Cluster` starts each node as its own raylet with its own object store,
logical GPUs and the node label `pid-batch/accelerator` set to its class (as cluster.yaml sets
it on a real cluster). The decoder is `pid_batch.fake.SleepDecoder` sleeping each class's
per-image latency: the paper's anchors (RTX 5090 <= 1 s, and the GB200 figure; `plan.PAPER_LATENCY_MS`)
times --scale, so a 2-core box can feed them. The job spec gives each class its own micro-batch
(`resources.micro_batch: {rtx: 1, gb200: 8}`) and latency (`model.fake_latency_ms: {...}`).

Scenarios, each on a fresh cluster, the evidence read from the timing table:
  steady  all nodes up: steady throughput (from the moment every actor has started to the
          moment the first one runs out of work) ÷ the sum of the node rates
          (logical GPUs × 1000 / latency_ms)
  lose    a GPU worker node removed mid-job (what a spot preemption does): lost and duplicated
          samples; the batches the node held decoded elsewhere
  grow    a GPU node added mid-job: the actor pool grows onto it

    python benchmarks/multinode_bench.py [--scale 0.2] [--samples 4096] \\
        [--scenarios steady,lose,grow] [--json out.json]

tests/test_multinode.py runs the same scenarios CI-sized (seconds of fake decode per actor).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness, when loaded by a test
from harness import actor_calls, bench_env, machine, print_table, write_shards  # noqa: E402

from pid_batch.plan import PAPER_LATENCY_MS as PAPER_MS  # noqa: E402  ms per 2048² image

MICRO_BATCH = {"rtx": 1, "gb200": 8}
GPUS = {"rtx": 1, "gb200": 2}  # logical GPUs per node (a real GB200 node has 4; 2 cores here)
WORKERS = ("rtx", "rtx", "gb200")
LATENT_HW = (2, 3)  # FLUX latents [16, 2, 3] → 64×96 images: the CPU stages stay cheap
HEAD_CPUS, NODE_CPUS, ACTOR_CPUS = 2, 1, 0.25  # logical; every node shares the same 2 cores
OBJECT_STORE_MB = 100  # per node


def node_rate(kind: str, scale: float) -> float:
    """Images per second one node of this kind decodes at full use (all its GPUs)."""
    return GPUS[kind] * 1000.0 / (PAPER_MS[kind] * scale)


class LocalCluster:
    """A multi-node Ray on this machine, driver connected. Call stop() in a finally block."""

    def __init__(self, workers: tuple[str, ...] = WORKERS):
        import ray
        from ray.cluster_utils import Cluster

        from pid_batch.pipeline import LOCAL_RAY_ENV

        for k, v in LOCAL_RAY_ENV.items():  # raylets read them from the environment they start in
            os.environ.setdefault(k, v)
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        self.nodes: dict[str, tuple[str, Any]] = {}  # Ray node id → (kind, node handle)
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": HEAD_CPUS,
                "object_store_memory": OBJECT_STORE_MB * 2**20,
                "include_dashboard": False,
            },
        )
        try:
            for kind in workers:
                self.add(kind)
            ray.init(address=self.cluster.address, include_dashboard=False, log_to_driver=False)
            ray.data.DataContext.get_current().enable_progress_bars = False
        except BaseException:
            self.stop()
            raise

    def add(self, kind: str) -> str:
        """Start a worker node of this kind; returns its Ray node id."""
        from pid_batch.pipeline import ACCELERATOR_LABELS

        node = self.cluster.add_node(
            num_cpus=NODE_CPUS,
            num_gpus=GPUS[kind],
            labels={ACCELERATOR_LABELS[0]: kind},
            object_store_memory=OBJECT_STORE_MB * 2**20,
        )
        self.nodes[node.node_id] = (kind, node)
        return node.node_id

    def remove(self, node_id: str) -> None:
        """Kill a worker node's raylet and every process on it (a preempted spot node)."""
        self.cluster.remove_node(self.nodes[node_id][1])

    def stop(self) -> None:
        import ray

        try:
            ray.shutdown()
        finally:
            self.cluster.shutdown()


def make_job(inp: str, out: str, scale: float, batch_size: int, min_actors: int, max_actors: int):
    """The job: tiny FLUX latents, SleepDecoder at the paper's latencies × scale per class."""
    from pid_batch.job import JobConfig, ModelConfig, OutputConfig, ResourceConfig

    return JobConfig(
        input=inp,
        output=out,
        model=ModelConfig(
            backbone="flux",
            ckpt_type="2k",
            preset="tiny",
            fake_latency_ms={k: ms * scale for k, ms in PAPER_MS.items()},
        ),
        images=OutputConfig(image_format="jpeg"),
        resources=ResourceConfig(
            min_actors=min_actors,
            max_actors=max_actors,
            gpus_per_actor=1.0,
            cpus_per_actor=ACTOR_CPUS,
            batch_size=batch_size,
            micro_batch=dict(MICRO_BATCH),
        ),
    )


class TimingWatch:
    """Timing rows per Ray node as they land (new parts only): what a chaos thread acts on."""

    def __init__(self, out: str):
        self.out, self.seen, self.per_node = out, set(), Counter()

    def poll(self) -> Counter:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from pid_batch import storage

        try:
            parts = storage.list_files(storage.join(self.out, "timing"), suffixes=(".parquet",))
        except FileNotFoundError:
            return self.per_node
        for uri in sorted(set(parts) - self.seen):
            self.seen.add(uri)
            data = pa.BufferReader(storage.read_bytes(uri))
            col = pq.read_table(data, columns=["node_id"]).column(0)
            self.per_node.update(v for v in col.to_pylist() if v)
        return self.per_node


@dataclass
class Event:
    """What the chaos thread did, and when (epoch s)."""

    action: str  # "remove" | "add"
    node_id: str
    kind: str
    at: float
    rows_before: int = 0  # timing rows landed by then, all nodes
    samples_left: int = 0


@dataclass
class Chaos:
    """Once `ready(rows per Ray node so far)` holds, `act()` once (it returns the Event).

    Acts from the main thread: Cluster.add_node installs signal handlers, which only the main
    thread may do; the job runs in a thread beside it.
    """

    ready: Callable[[Counter], bool]
    act: Callable[[Counter], Event]
    events: list[Event] = field(default_factory=list)


def run_job(job, total: int, chaos: Chaos | None = None) -> tuple[Any, float, float]:
    """pipeline.run in a thread, chaos acting from this one; (result, start, end epoch s)."""
    from pid_batch import pipeline

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = pipeline.run(job, log=None)
        except BaseException as e:  # re-raised below, in the caller's thread
            box["error"] = e
        box["end"] = time.time()

    t0 = time.time()
    thread = threading.Thread(target=target, daemon=True, name="pipeline.run")
    thread.start()
    watch = TimingWatch(job.output)
    while thread.is_alive():
        thread.join(0.2)
        if chaos and not chaos.events:
            rows = watch.poll()
            if chaos.ready(rows):
                ev = chaos.act(rows)
                ev.rows_before = sum(rows.values())
                ev.samples_left = total - ev.rows_before
                chaos.events.append(ev)
    if "error" in box:
        raise box["error"]
    return box["result"], t0, box["end"]


# -- what the timing table shows ---------------------------------------------------------------


def audit(out: str, ids: list[str]) -> dict[str, Any]:
    """Exactly-once accounting: each input id is one of {image + ok row, error row}.

    lost: input ids with no row, or an ok row whose image is missing. duplicated: samples with
    more than one row in the raw timing parts (one sample decoded or written twice), or an
    image object no ok row accounts for.
    """
    import pyarrow.compute as pc

    from pid_batch import storage
    from pid_batch.stages.layout import relative
    from pid_batch.timing import latest_per_id, read_timing_parts

    raw = read_timing_parts(out)
    table = latest_per_id(raw)
    ok = table.filter(pc.equal(table.column("status"), "ok"))
    ok_ids = ok.column("id").to_pylist()
    try:
        images = storage.list_files(storage.join(out, "images"))
    except FileNotFoundError:
        images = []
    have = {relative(out, u) for u in images}
    outputs = set(ok.column("output").to_pylist())
    rows_per_sample = Counter(zip(raw.column("shard").to_pylist(), raw.column("index").to_pylist()))
    rowed = set(table.column("id").to_pylist())
    return {
        "samples": len(ids),
        "ok": len(ok_ids),
        "error": table.num_rows - len(ok_ids),
        "lost": len(set(ids) - rowed) + len(outputs - have),
        "duplicated": sum(1 for n in rows_per_sample.values() if n > 1) + len(have - outputs),
        "raw_rows": raw.num_rows,
        "images": len(have),
    }


def per_node(out: str) -> list[dict[str, Any]]:
    """Ok rows grouped by (node id, host, accelerator class, micro-batch): where work ran."""
    import pyarrow.compute as pc

    from pid_batch.timing import read_timing

    t = read_timing(out)
    t = t.filter(pc.equal(t.column("status"), "ok"))
    keys = zip(
        t.column("node_id").to_pylist(),
        t.column("node").to_pylist(),
        t.column("accelerator_class").to_pylist(),
        t.column("micro_batch").to_pylist(),
        t.column("actor").to_pylist(),
    )
    groups: dict[tuple, dict[str, Any]] = {}
    for node_id, host, cls, micro, actor in keys:
        g = groups.setdefault(
            (node_id, host, cls, micro),
            {
                "node_id": node_id,
                "host": host,
                "class": cls,
                "micro_batch": micro,
                "rows": 0,
                "actors": set(),
            },
        )
        g["rows"] += 1
        g["actors"].add(actor)
    return [{**g, "actors": len(g["actors"])} for g in groups.values()]


def steady_throughput(out: str, scale: float, cluster_kinds: dict[str, str]) -> dict[str, Any]:
    """Images decoded per second while every actor had work, ÷ the sum of the nodes' rates.

    The window runs from the start of the last actor's first call to the end of the first
    actor's last call; calls overlapping an edge count in proportion. Node rates: the rate of
    each node that ran decode actors (kinds from cluster_kinds: Ray node id → kind).
    """
    from pid_batch.timing import read_timing

    t = read_timing(out)
    calls = actor_calls(t)  # actor → [(start s, busy s, rows)]
    first = max(c[0][0] for c in calls.values())
    last = min(max(st + b for st, b, _ in c) for c in calls.values())
    images = 0.0
    for c in calls.values():
        for st, busy, n in c:
            end = st + busy
            overlap = max(0.0, min(end, last) - max(st, first))
            images += n * overlap / max(busy, 1e-9)
    window = max(1e-9, last - first)
    nodes = {n for n in t.column("node_id").to_pylist() if n}
    ideal = sum(node_rate(cluster_kinds[n], scale) for n in nodes if cluster_kinds[n] in GPUS)
    return {
        "window_s": round(window, 2),
        "images_in_window": round(images, 1),
        "img_per_s": round(images / window, 2),
        "sum_node_rates": round(ideal, 2),
        "ratio": round(images / window / ideal, 3),
        "actors": len(calls),
        "nodes": len(nodes),
    }


# -- scenarios ---------------------------------------------------------------------------------


def gpu_slots(workers: tuple[str, ...]) -> int:
    return sum(GPUS[k] for k in workers)


def scenario(
    name: str,
    root: str,
    samples: int,
    per_shard: int,
    scale: float,
    batch_size: int,
    workers: tuple[str, ...] | None = None,
    joins: str = "rtx",
) -> dict[str, Any]:
    """One scenario on a fresh cluster of `workers` (default: WORKERS; for grow, WORKERS less
    the node of kind `joins` that joins mid-job); returns what it measured."""
    inp, out = os.path.join(root, name, "in"), os.path.join(root, name, "out")
    ids = write_shards(inp, samples, per_shard, LATENT_HW, prefix=name)
    if workers is None:
        workers = WORKERS
        if name == "grow":
            i = WORKERS.index(joins)
            workers = WORKERS[:i] + WORKERS[i + 1 :]
    slots = gpu_slots(workers)
    cluster = LocalCluster(workers)
    try:
        chaos = None
        if name == "steady":
            job = make_job(inp, out, scale, batch_size, slots, slots)
        elif name == "lose":
            job = make_job(inp, out, scale, batch_size, slots, slots)
            rtx = [n for n, (k, _) in cluster.nodes.items() if k == "rtx"]

            def remove(rows: Counter) -> Event:
                victim = max(rtx, key=lambda n: rows[n])
                cluster.remove(victim)
                return Event("remove", victim, "rtx", time.time())

            # Once an rtx node's first call has landed its rows: its next batch (queued on the
            # actor behind that call, resources.prefetch_batches) is then mid-call.
            chaos = Chaos(lambda rows: max(rows[n] for n in rtx) >= batch_size, remove)
        else:  # grow
            job = make_job(inp, out, scale, batch_size, slots, slots + GPUS[joins])

            def add(rows: Counter) -> Event:
                node_id = cluster.add(joins)
                return Event("add", node_id, joins, time.time())

            # Once every starting actor has landed rows: the pool is as big as the cluster allows.
            chaos = Chaos(
                lambda rows: len(rows) >= len(workers) and sum(rows.values()) >= batch_size * slots,
                add,
            )
        result, t0, t1 = run_job(job, samples, chaos)
        kinds = {n: k for n, (k, _) in cluster.nodes.items()}
        kinds[cluster.cluster.head_node.node_id] = "head"
    finally:
        cluster.stop()
    report: dict[str, Any] = {
        "scenario": name,
        "exit_code": result.exit_code,
        "wall_s": round(t1 - t0, 2),
        "audit": audit(out, ids),
        "per_node": [{**g, "kind": kinds.get(g["node_id"])} for g in per_node(out)],
        "events": [vars(e) for e in (chaos.events if chaos else [])],
    }
    if name == "steady":
        report["steady"] = steady_throughput(out, scale, kinds)
    first_call = actor_first_calls(out)
    for ev in report["events"]:
        rows = [g for g in report["per_node"] if g["node_id"] == ev["node_id"]]
        ev["rows_on_node"] = sum(g["rows"] for g in rows)
        # Rows of actor processes that began after the event on other nodes: after a loss, Ray
        # may restart the lost actor elsewhere (then it retries the batches it held there first)
        # or hand them to the surviving actors (then this is 0); both were seen here.
        later = [
            (st, n)
            for st, node, n in first_call.values()
            if st > ev["at"] and node != ev["node_id"]
        ]
        ev["replacement_rows"] = sum(n for _, n in later)
        on_node = [st for st, node, _ in first_call.values() if node == ev["node_id"]]
        if ev["action"] == "add":
            ev["first_call_on_node_s"] = round(min(on_node) - ev["at"], 2) if on_node else None
        ev["replacement_first_call_s"] = (
            round(min(st for st, _ in later) - ev["at"], 2) if later else None
        )
    return report


def actor_first_calls(out: str) -> dict[str, tuple[float, str, int]]:
    """Per actor process (host:pid): (its first call's start epoch s, its Ray node id, ok rows)."""
    from pid_batch.timing import read_timing

    t = read_timing(out)
    first: dict[str, tuple[float, str, int]] = {}
    for actor, node, st in zip(
        t.column("actor").to_pylist(),
        t.column("node_id").to_pylist(),
        t.column("started_at").cast("int64").to_pylist(),
    ):
        if actor is None:
            continue
        s0, _, n = first.get(actor, (float("inf"), node, 0))
        first[actor] = (min(s0, st / 1000), node, n + 1)
    return first


def print_report(r: dict[str, Any]) -> None:
    print(f"\n### {r['scenario']}  (exit {r['exit_code']}, {r['wall_s']} s)\n")
    print_table(
        ["node id", "kind", "label class", "micro-batch", "actors", "ok rows"],
        [
            [g["node_id"][:12], g["kind"], g["class"], g["micro_batch"], g["actors"], g["rows"]]
            for g in sorted(r["per_node"], key=lambda g: (str(g["kind"]), g["node_id"]))
        ],
    )
    a = r["audit"]
    print(
        f"\nsamples {a['samples']}: ok {a['ok']}, error {a['error']}, lost {a['lost']}, "
        f"duplicated {a['duplicated']} (raw timing rows {a['raw_rows']}, images {a['images']})"
    )
    for ev in r["events"]:
        if "first_call_on_node_s" in ev:
            print(f"first call on the new node {ev['first_call_on_node_s']} s after it was added")
        print(
            f"{ev['action']} {ev['kind']} node {ev['node_id'][:12]} with {ev['samples_left']} "
            f"samples left; rows it decoded: {ev['rows_on_node']}; rows of actors that "
            f"started after it elsewhere: {ev['replacement_rows']} (first call "
            f"{ev['replacement_first_call_s']} s after it)"
        )
    if "steady" in r:
        s = r["steady"]
        print(
            f"steady: {s['img_per_s']} img/s over {s['window_s']} s "
            f"({s['actors']} actors on {s['nodes']} nodes) vs sum of node rates "
            f"{s['sum_node_rates']} img/s → ratio {s['ratio']}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=float, default=0.2, help="× the paper's per-image latencies")
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--per-shard", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--scenarios", default="steady,lose,grow")
    ap.add_argument("--timeout", type=int, default=900, help="seconds for all scenarios")
    ap.add_argument("--json", help="write everything measured here")
    args = ap.parse_args(argv)
    bench_env()

    def too_long(signum, frame):
        raise TimeoutError(f"multinode_bench ran past --timeout {args.timeout} s")

    signal.signal(signal.SIGALRM, too_long)
    signal.alarm(args.timeout)
    reports = []
    with tempfile.TemporaryDirectory(prefix="multinode-") as root:
        for name in args.scenarios.split(","):
            r = scenario(name, root, args.samples, args.per_shard, args.scale, args.batch_size)
            print_report(r)
            reports.append(r)
    signal.alarm(0)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "machine": machine(), "runs": reports}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
