"""What the benchmarks in this folder share: environment, loopback S3, synthetic shards, a local
Ray, the probe of the decode actors, timing-table analysis and report formatting.

A library, not a benchmark: the scripts import it (`from harness import ...`; a script's own
folder is first on sys.path), and so do tests. The probe goes in through pipeline.run's own
seam (`probe=`, pipeline.DecodeProbe): the pipeline runs as it is, nothing is patched.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

BENCH_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # local Ray on 127.0.0.1 only (before import ray)
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def bench_env(threads: int | None = 1) -> None:
    """Loopback-only Ray and fake AWS credentials; one torch/OpenMP thread per process if asked."""
    for k, v in BENCH_ENV.items():
        os.environ.setdefault(k, v)
    if threads is not None:
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[k] = str(threads)


def start_s3() -> tuple[Any, str]:
    """A moto S3 server on 127.0.0.1 (random port); sets AWS_ENDPOINT_URL. Returns (server, url)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    os.environ["AWS_ENDPOINT_URL"] = url
    return server, url


def make_bucket(url: str) -> str:
    import boto3

    name = f"bench-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=url).create_bucket(Bucket=name)
    return name


def start_ray(num_cpus: int = 2, object_store_mb: int = 1024, **kwargs: Any) -> float:
    """A local Ray (loopback, no dashboard); returns the seconds ray.init took."""
    import ray

    from pid_batch.pipeline import LOCAL_RAY_ENV

    for k, v in LOCAL_RAY_ENV.items():  # as a Ray that pipeline.run starts itself
        os.environ.setdefault(k, v)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        object_store_memory=object_store_mb * 2**20,
        log_to_driver=False,
        **kwargs,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    return time.perf_counter() - t0


def spilled_total() -> int:
    """Bytes the connected Ray has spilled since it started (`ray memory --stats-only`)."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    state = get_state_from_address(ray.get_runtime_context().gcs_address)
    return int(get_memory_info_reply(state).store_stats.spilled_bytes_total)


def write_shards(
    root: str,
    images: int,
    per_shard: int,
    latent_hw: tuple[int, int],
    seed: int = 0,
    prefix: str = "img",
) -> list[str]:
    """FLUX-shaped PiD latents [16, h, w] in safetensors shards under `root`; returns the ids."""
    import numpy as np

    from pid_batch import codecs, storage

    rng = np.random.default_rng(seed)
    ids: list[str] = []
    for s in range(0, images, per_shard):
        n = min(per_shard, images - s)
        sid = [f"{prefix}-{s + i:06d}" for i in range(n)]
        lat = rng.standard_normal((n, 16, *latent_hw)).astype(np.float32)
        data = codecs.write_safetensors_shard(lat, sid, captions=["a cat"] * n, backbone="flux")
        storage.write_bytes_atomic(
            storage.join(root, f"shard-{s // per_shard:05d}.safetensors"), data
        )
        ids += sid
    return ids


# -- the probe of the decode actors -------------------------------------------------------------


class DecodeProbe:
    """pipeline.DecodeProbe for benchmarks: one JSON line per event, per actor process, in
    `directory`/<pid>.jsonl. Events:

      init    created (process start, epoch s), init_start, init_end, startup_s, load_s
      call    start, end, cpu_s, n rows, busy (time inside the decoder in this call), and the
              stage's running counters busy_s, first_call_at, last_call_end; torch_threads,
              peak_gpu_mem_gib and device where the actor has torch / CUDA
      decode  (decoder_calls=True) one per Decoder.decode call: start, end, latent shape, n,
              compile_ms and the frames torch._dynamo compiled during it

    Adds no work to a call beyond the file append; reads nothing from the job.
    """

    def __init__(self, directory: str, decoder_calls: bool = False):
        self.directory, self.decoder_calls = directory, decoder_calls

    def started(self, stage: Any, began: float) -> None:
        import psutil

        self._busy = stage.busy_s
        self._emit(
            ev="init",
            created=psutil.Process().create_time(),
            init_start=began,
            init_end=time.time(),
            startup_s=stage.startup_s,
            load_s=getattr(stage.decoder, "load_s", None),
        )
        if self.decoder_calls:
            self._log_decoder_calls(stage.decoder)

    def called(self, stage: Any, batch: dict, began: float, cpu_s: float) -> None:
        torch = sys.modules.get("torch")  # a fake decoder's actor never imports torch
        rec: dict[str, Any] = {
            "ev": "call",
            "start": began,
            "end": time.time(),
            "cpu_s": cpu_s,
            "n": len(batch["id"]),
            "busy": stage.busy_s - self._busy,
            "busy_s": stage.busy_s,
            "first_call_at": stage.first_call_at,
            "last_call_end": stage.last_call_end,
            "torch_threads": torch.get_num_threads() if torch else None,
        }
        self._busy = stage.busy_s
        if torch is not None and torch.cuda.is_available():
            rec["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            rec["device"] = torch.cuda.get_device_name()
        self._emit(**rec)

    def _log_decoder_calls(self, dec: Any) -> None:
        inner = dec.decode

        def decode(latents, *args, **kwargs):
            from torch._dynamo.utils import counters

            frames0 = counters["frames"]["ok"]
            t = time.time()
            res = inner(latents, *args, **kwargs)
            self._emit(
                ev="decode",
                start=t,
                end=time.time(),
                shape=list(latents[0].shape),
                n=len(latents),
                compile_ms=res.compile_ms,
                frames=counters["frames"]["ok"] - frames0,
            )
            return res

        dec.decode = decode

    def _emit(self, **rec: Any) -> None:
        with open(Path(self.directory, f"{os.getpid()}.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")

    def actors(self) -> dict[str, dict[str, Any]]:
        """Per actor process (pid): its init event, its calls and decodes in order."""
        out = {}
        for p in sorted(Path(self.directory).glob("*.jsonl")):
            recs = [json.loads(line) for line in p.read_text().splitlines()]
            out[p.stem] = {
                "init": next((r for r in recs if r["ev"] == "init"), None),
                "calls": sorted((r for r in recs if r["ev"] == "call"), key=lambda r: r["start"]),
                "decodes": sorted(
                    (r for r in recs if r["ev"] == "decode"), key=lambda r: r["start"]
                ),
            }
        return out


def run_probed(job, probe: DecodeProbe, **run_kwargs: Any) -> tuple[float, float, dict, Any]:
    """pipeline.run with `probe` in every decode actor; (start, end, per-actor calls from the
    timing table, result). Raises if the run failed."""
    from pid_batch import pipeline
    from pid_batch.timing import read_timing

    t0 = time.time()
    result = pipeline.run(job, log=None, probe=probe, **run_kwargs)
    t1 = time.time()
    if result.exit_code:
        raise RuntimeError(f"pipeline run failed: {result.summary.get('errors_by_reason')}")
    return t0, t1, actor_calls(read_timing(job.output)), result


def probe_busy(probe: DecodeProbe) -> list[float]:
    """Per actor, the in-actor busy fraction: time in the decoder ÷ (last call end − first)."""
    out = []
    for a in probe.actors().values():
        if a["calls"]:
            last = a["calls"][-1]
            out.append(last["busy_s"] / (last["last_call_end"] - last["first_call_at"]))
    return out


def probe_cpu_share(probe: DecodeProbe) -> float | None:
    """The decode actors' thread CPU time ÷ wall time inside their calls."""
    calls = [c for a in probe.actors().values() for c in a["calls"]]
    wall = sum(c["end"] - c["start"] for c in calls)
    return sum(c["cpu_s"] for c in calls) / wall if wall else None


# -- the timing table's view ---------------------------------------------------------------------


def actor_calls(table) -> dict[str, list[tuple[float, float, int]]]:
    """Per actor: its decode calls as (start epoch s, seconds inside decode, rows), in order.

    Rows of one actor call share `started_at`; the call's decoder time is the sum of its rows'
    decode_ms + text_ms (each row holds its share of the micro-batch time).
    """
    import pyarrow.compute as pc

    ok = table.filter(pc.equal(table.column("status"), "ok"))
    acc: dict[tuple[str, float], list[float]] = defaultdict(lambda: [0.0, 0])
    started = ok.column("started_at").cast("int64").to_pylist()  # ms since epoch
    for actor, st, dec, txt in zip(
        ok.column("actor").to_pylist(),
        started,
        ok.column("decode_ms").to_pylist(),
        ok.column("text_ms").to_pylist(),
    ):
        cell = acc[(actor, st / 1000)]
        cell[0] += ((dec or 0.0) + (txt or 0.0)) / 1000
        cell[1] += 1
    calls: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
    for (actor, st), (busy, n) in sorted(acc.items(), key=lambda kv: kv[0][1]):
        calls[actor].append((st, busy, int(n)))
    return dict(calls)


def busy_from_calls(calls: list[tuple[float, float, int]]) -> dict[str, float]:
    """Busy fraction of one actor between its first decode start and its last decode end."""
    first = calls[0][0]
    last_end = max(st + b for st, b, _ in calls)
    busy = sum(b for _, b, _ in calls)
    return {
        "first_start": first,
        "last_end": last_end,
        "busy_s": busy,
        "span_s": last_end - first,
        "busy": busy / max(1e-9, last_end - first),
        "images": sum(n for *_, n in calls),
        "calls": len(calls),
    }


# -- reports -------------------------------------------------------------------------------------


def spread(values: list[float]) -> str:
    """'mean (min–max)' of repeated measurements."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    """A Markdown table on stdout."""
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")


def machine() -> dict[str, Any]:
    import platform

    return {
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
