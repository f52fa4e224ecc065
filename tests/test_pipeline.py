"""End to end on a local Ray: shards in → images + timing rows out, local folder and loopback S3."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pid_batch import codecs, pipeline, storage, timing
from pid_batch.job import (
    JobConfig,
    JobConfigError,
    ModelConfig,
    OutputConfig,
    ResourceConfig,
    SamplingConfig,
)
from pid_batch.timing import read_timing

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

LATENT_HW = (2, 3)  # → a 64×96 output image with FLUX's 8× VAE and PiD's 4×


def write_shards(root: str, shards: int, per_shard: int, bad: dict | None = None) -> list[str]:
    """Write FLUX-shaped PiD latents; `bad` maps (shard, index) → a replacement latent array."""
    rng = np.random.default_rng(0)
    ids = []
    for s in range(shards):
        lat = rng.standard_normal((per_shard, 16, *LATENT_HW)).astype(np.float32)
        for (bs, bi), arr in (bad or {}).items():
            if bs == s:
                lat[bi] = arr
        sid = [f"s{s}-{i}" for i in range(per_shard)]
        data = codecs.write_safetensors_shard(
            lat, sid, captions=["a cat"] * per_shard, backbone="flux"
        )
        storage.write_bytes_atomic(storage.join(root, f"shard-{s:03d}.safetensors"), data)
        ids += sid
    return ids


def tiny_job(inp: str, out: str, **res) -> JobConfig:
    return JobConfig(
        input=inp,
        output=out,
        model=ModelConfig(backbone="flux", ckpt_type="2k", preset="tiny"),
        images=OutputConfig(image_format="png"),
        resources=ResourceConfig(**{"batch_size": 4, **res}),
    )


def list_images(out: str) -> list[str]:
    try:
        return storage.list_files(storage.join(out, "images"))
    except FileNotFoundError:
        return []


def all_timing_rows(out: str) -> int:
    parts = storage.list_files(storage.join(out, "timing"), suffixes=(".parquet",))
    return sum(pq.read_table(io.BytesIO(storage.read_bytes(p))).num_rows for p in parts)


def test_local_end_to_end_then_rerun_writes_nothing(shared_ray, tmp_path):
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    ids = write_shards(inp, shards=3, per_shard=3)
    result = pipeline.run(tiny_job(inp, out), log=None)
    assert result.exit_code == 0
    assert result.processed == len(ids)
    images = list_images(out)
    assert sorted(u.rsplit("/", 1)[1] for u in images) == sorted(f"{i}.png" for i in ids)
    table = read_timing(out)
    assert table.schema.equals(timing.TIMING_SCHEMA, check_metadata=False)
    assert sorted(table.column("id").to_pylist()) == sorted(ids)
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert set(zip(table.column("height").to_pylist(), table.column("width").to_pylist())) == {
        (64, 96)
    }
    assert min(table.column("decode_ms").to_pylist()) > 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["ok"] == len(ids) and summary["error"] == 0
    assert len(storage.list_files(storage.join(out, "_done"))) == 3

    before = {u: storage.size(u) for u in images}
    rows_before = all_timing_rows(out)
    again = pipeline.run(tiny_job(inp, out), log=None)
    assert again.processed == 0 and again.shards_skipped == 3
    assert all_timing_rows(out) == rows_before
    assert {u: storage.size(u) for u in list_images(out)} == before


def test_partial_output_resumes_only_missing_samples(shared_ray, tmp_path):
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    ids = write_shards(inp, shards=2, per_shard=4)
    pipeline.run(tiny_job(inp, out), log=None)
    # Simulate a run killed mid-shard: drop one shard's marker and all but two of its timing
    # rows (left as a part, as before the shard's rows were compacted into one table).
    key = "shard-001.safetensors"
    storage.delete(storage.join(out, "_done", f"{key}.json"))
    compacted = storage.join(out, "timing", f"{key}.parquet")
    rows = pq.read_table(io.BytesIO(storage.read_bytes(compacted))).slice(0, 2)
    buf = io.BytesIO()
    pq.write_table(rows.replace_schema_metadata(None), buf)
    storage.write_bytes_atomic(storage.join(out, "timing", key, "part-x.parquet"), buf.getvalue())
    storage.delete(compacted)
    kept = rows.column("id").to_pylist()
    again = pipeline.run(tiny_job(inp, out), log=None)
    assert again.processed == 4 - len(kept)
    table = read_timing(out)
    assert sorted(table.column("id").to_pylist()) == sorted(ids)  # each id exactly once
    assert again.summary["ok"] == len(ids)


def test_corrupt_latent_gives_exactly_one_error_row(shared_ray, tmp_path):
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    nan = np.full((16, *LATENT_HW), np.nan, np.float32)
    ids = write_shards(inp, shards=2, per_shard=3, bad={(1, 1): nan})
    result = pipeline.run(tiny_job(inp, out), log=None)
    assert result.exit_code == 1
    table = read_timing(out)
    assert table.num_rows == len(ids)
    errors = table.filter(pc.equal(table.column("status"), "error")).to_pylist()
    assert [e["id"] for e in errors] == ["s1-1"]
    assert "s1-1" in errors[0]["error"] or "nan" in errors[0]["error"].lower()
    assert len(list_images(out)) == len(ids) - 1
    # The shard with the bad sample gets no done marker; a rerun retries only that sample.
    assert len(storage.list_files(storage.join(out, "_done"))) == 1
    again = pipeline.run(tiny_job(inp, out), log=None)
    assert (
        again.processed == 1 and again.summary["error"] == 1 and again.summary["ok"] == len(ids) - 1
    )


def test_s3_end_to_end(shared_ray, s3_bucket):
    inp, out = f"s3://{s3_bucket}/latents", f"s3://{s3_bucket}/out/run-1"
    ids = write_shards(inp, shards=2, per_shard=2)
    result = pipeline.run(tiny_job(inp, out), log=None)
    assert result.exit_code == 0
    assert len(list_images(out)) == len(ids)
    table = read_timing(out)
    assert sorted(table.column("id").to_pylist()) == sorted(ids)
    assert storage.read_json(storage.join(out, "summary.json"))["ok"] == len(ids)
    again = pipeline.run(tiny_job(inp, out), log=None)
    assert again.processed == 0


def test_gpu_scheduling_path_with_logical_gpu(shared_ray, tmp_path):
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    ids = write_shards(inp, shards=2, per_shard=2)
    result = pipeline.run(tiny_job(inp, out, gpus_per_actor=0.5, max_actors=2), log=None)
    assert result.exit_code == 0 and result.processed == len(ids)
    table = read_timing(out)
    assert set(table.column("accelerator").to_pylist()) == {"cpu"}  # no CUDA here


def test_output_written_with_other_settings_is_refused(shared_ray, tmp_path):
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    write_shards(inp, shards=1, per_shard=1)
    pipeline.run(tiny_job(inp, out), log=None)
    other = JobConfig(
        input=inp,
        output=out,
        model=ModelConfig(backbone="flux", ckpt_type="2k", preset="tiny"),
        images=OutputConfig(image_format="jpeg"),
    )
    with pytest.raises(JobConfigError, match="image_format"):
        pipeline.run(other, log=None)


@pytest.fixture(scope="module")
def tiny_flux_vae(tmp_path_factory):
    from pid_batch.backbones.vae import make_tiny_vae

    return str(make_tiny_vae(tmp_path_factory.mktemp("vae"), "flux"))


def write_images(root: str, n: int, size=(70, 53)) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(1)
    ids = []
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        storage.write_bytes_atomic(storage.join(root, "sub", f"img{i}.png"), buf.getvalue())
        ids.append(f"sub__img{i}")
    return ids


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_image_inputs_encode_decode_with_baseline(
    shared_ray, tmp_path, s3_bucket, tiny_flux_vae, backend
):
    root = str(tmp_path) if backend == "local" else f"s3://{s3_bucket}"
    inp, out = storage.join(root, "archive"), storage.join(root, "out")
    ids = write_images(inp, 3)
    job = JobConfig(
        input=inp,
        output=out,
        input_kind="images",
        images_per_shard=2,
        model=ModelConfig(backbone="flux", ckpt_type="2k", preset="tiny", vae=tiny_flux_vae),
        images=OutputConfig(image_format="png", baseline=True),
        resources=ResourceConfig(batch_size=4, cpus_per_actor=0.5),
    )
    result = pipeline.run(job, log=None)
    assert result.exit_code == 0, result.summary
    table = read_timing(out)
    assert sorted(table.column("id").to_pylist()) == sorted(ids)
    rows = table.to_pylist()
    # 70×53 is centre-cropped to 64×48 (multiples of 8) → latent 8×6 → PiD output 256×192.
    assert {(r["crop"], r["width"], r["height"]) for r in rows} == {("3,2,67,50", 256, 192)}
    assert all(r["vae_encode_ms"] > 0 and r["baseline_ms"] > 0 for r in rows)
    from PIL import Image

    for sid in ids:
        pid = Image.open(io.BytesIO(storage.read_bytes(storage.join(out, "images", f"{sid}.png"))))
        base = Image.open(
            io.BytesIO(storage.read_bytes(storage.join(out, "baseline", f"{sid}.png")))
        )
        assert pid.size == (256, 192) and base.size == (64, 48)
    assert pipeline.run(job, log=None).processed == 0


def test_image_inputs_target_long_side_lands_exactly(shared_ray, tmp_path, tiny_flux_vae):
    """70×53 archives at images.target_long_side 640: encoded at 160×121 (crop 160×120), decoded
    by PiD 4× to 640×480, which fits no tiny trained size: the decode is tiled and says so."""
    inp, out = str(tmp_path / "archive"), str(tmp_path / "out")
    ids = write_images(inp, 2)
    job = JobConfig(
        input=inp,
        output=out,
        input_kind="images",
        model=ModelConfig(backbone="flux", ckpt_type="2k", preset="tiny", vae=tiny_flux_vae),
        sampling=SamplingConfig(steps=2),
        images=OutputConfig(image_format="png", target_long_side=640),
        resources=ResourceConfig(batch_size=4, cpus_per_actor=0.5, micro_batch=4),
    )
    result = pipeline.run(job, log=None)
    assert result.exit_code == 0, result.summary
    rows = read_timing(out).to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(ids)
    for r in rows:
        assert (r["resize"], r["crop"], r["width"], r["height"]) == (
            "160x121",
            "0,0,160,120",
            640,
            480,
        )
        assert r["tiles"] > 1 and r["tile_overlap"] == 128
        assert r["tile_width"] < 640 or r["tile_height"] < 480
    from PIL import Image

    for sid in ids:
        img = Image.open(io.BytesIO(storage.read_bytes(storage.join(out, "images", f"{sid}.png"))))
        assert max(img.size) == 640 and img.size == (640, 480)


def test_target_long_side_is_checked_before_work():
    base = dict(
        input="in", output="out", model=ModelConfig(backbone="flux", preset="tiny", vae="v")
    )
    with pytest.raises(JobConfigError, match=r"multiple of 32 px.*e.g. 608 or 640"):
        JobConfig(**base, input_kind="images", images=OutputConfig(target_long_side=620))
    with pytest.raises(JobConfigError, match="image inputs"):
        JobConfig(**base, images=OutputConfig(target_long_side=640))


def test_image_inputs_need_a_vae():
    with pytest.raises(JobConfigError, match="model.vae"):
        JobConfig(
            input="in",
            output="out",
            input_kind="images",
            model=ModelConfig(backbone="flux", preset="tiny"),
        )


def test_tar_layout_one_tar_per_shard_and_rerun(shared_ray, tmp_path):
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    ids = write_shards(inp, shards=2, per_shard=3)
    job = JobConfig(
        input=inp,
        output=out,
        model=ModelConfig(backbone="flux", ckpt_type="2k", preset="tiny"),
        images=OutputConfig(image_format="png", layout="tar"),
        resources=ResourceConfig(batch_size=2, encode_batch_size=2),
    )
    assert pipeline.run(job, log=None).exit_code == 0
    tars = storage.list_files(storage.join(out, "shards"))
    assert [t.rsplit("/", 1)[1] for t in tars] == [
        "shard-000.safetensors-000000.tar",
        "shard-001.safetensors-000000.tar",
    ]
    names = set()
    for t in tars:
        members = codecs.read_tar(storage.read_bytes(t))
        names |= set(members)
        for name, data in members.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                assert meta["height"] == 64 and meta["width"] == 96 and meta["steps"] == 4
    assert names == {f"{i}.png" for i in ids} | {f"{i}.json" for i in ids}
    assert not storage.exists(storage.join(out, "_staging")) or not storage.list_files(
        storage.join(out, "_staging")
    )
    assert list_images(out) == []  # no per-image objects in this layout
    table = read_timing(out)
    assert all(o.startswith("shards/") for o in table.column("output").to_pylist())
    from pid_batch.report import write_report

    page = storage.read_bytes(write_report(out)).decode()
    assert page.count('alt="PiD s') == len(ids) and "Unreadable images" not in page

    # A crash after the tar but before its marker: the rerun re-merges nothing and marks it done.
    storage.delete(storage.join(out, "_done", "shard-001.safetensors.json"))
    before = {t: storage.read_bytes(t) for t in tars}
    again = pipeline.run(job, log=None)
    assert again.processed == 0
    assert storage.exists(storage.join(out, "_done", "shard-001.safetensors.json"))
    assert {t: storage.read_bytes(t) for t in tars} == before


def test_tar_layout_on_s3_leaves_no_directory_markers(shared_ray, s3_server, s3_bucket):
    """After a tar run the bucket holds objects only: no 0-byte `…/` markers (`_staging/<shard>/`)."""
    import boto3

    inp, out = f"s3://{s3_bucket}/latents", f"s3://{s3_bucket}/out/run-tar"
    ids = write_shards(inp, shards=2, per_shard=3)
    job = JobConfig(
        input=inp,
        output=out,
        model=ModelConfig(backbone="flux", ckpt_type="2k", preset="tiny"),
        images=OutputConfig(image_format="png", layout="tar"),
        resources=ResourceConfig(batch_size=2, encode_batch_size=2),
    )
    assert pipeline.run(job, log=None).exit_code == 0
    pages = boto3.client("s3", endpoint_url=s3_server).get_paginator("list_objects_v2")
    keys = [o["Key"] for page in pages.paginate(Bucket=s3_bucket) for o in page.get("Contents", [])]
    assert [k for k in keys if k.endswith("/")] == []
    assert not [k for k in keys if "/_staging/" in k]  # every staged part was merged and deleted
    assert sum(k.endswith(".tar") for k in keys) == 2 and len(ids) == 6


def test_actor_pool_grows_under_load(shared_ray, tmp_path):
    """min_actors=1, max_actors=2: with a queue of shards the pool starts its second actor."""
    # Each shard is one batch, so one decode task (8 × 300 ms). The pool grows once its first actor is busy;
    # the second must start before the other 5 shards have all gone to the first (~12 s;
    # starting an actor took 4.5-7 s on a loaded 2-core box).
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    ids = write_shards(inp, shards=6, per_shard=8)
    job = JobConfig(
        input=inp,
        output=out,
        model=ModelConfig(backbone="flux", ckpt_type="2k", preset="tiny", fake_latency_ms=300),
        images=OutputConfig(image_format="jpeg"),
        resources=ResourceConfig(batch_size=8, min_actors=1, max_actors=2, cpus_per_actor=0.25),
    )
    result = pipeline.run(job, log=None)
    assert result.exit_code == 0 and result.processed == len(ids)
    actors = set(read_timing(out).column("actor").to_pylist())
    assert len(actors) == 2, actors


def _harness():
    """benchmarks/harness.py: the benchmarks' library (not a script: importing it runs nothing)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "harness.py"
    spec = importlib.util.spec_from_file_location("harness", path)
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    return harness


def _spilled_bytes_total() -> int:
    return _harness().spilled_total()


def test_decoder_faster_than_encoders_does_not_spill(shared_ray, tmp_path):
    """Decoded images wait for the encoders inside Ray Data's object-store budget: 400 MB of
    decoder output through a 300 MB store spills nothing. (With per-operator reservations off
    nothing bounded the decoder's output: this test spilled, and the 100k-sample run of
    scale_bench.py spilled 1.67 GB.)"""
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    rng = np.random.default_rng(0)
    for s in range(8):  # 8 × 64 latents → 512² images of 0.79 MB: 403 MB decoded in all
        lat = rng.standard_normal((64, 16, 32, 32)).astype(np.float32)
        ids = [f"s{s}-{i}" for i in range(64)]
        data = codecs.write_safetensors_shard(lat, ids, backbone="flux")
        storage.write_bytes_atomic(storage.join(inp, f"shard-{s:03d}.safetensors"), data)
    job = JobConfig(
        input=inp,
        output=out,
        model=ModelConfig(backbone="flux", ckpt_type="2k", preset="tiny", fake_latency_ms=0.01),
        images=OutputConfig(image_format="jpeg", layout="tar"),
        resources=ResourceConfig(batch_size=16, encode_batch_size=16),
    )
    before = _spilled_bytes_total()
    result = pipeline.run(job, log=None)
    assert result.exit_code == 0 and result.processed == 512
    assert _spilled_bytes_total() - before == 0


def test_shards_are_cut_into_batch_blocks_inside_the_read_task(shared_ray):
    """Decode tasks are one batch, not one shard; the cut costs no extra task (fused)."""
    from ray.data._internal.logical.optimizers import get_execution_plan

    job = tiny_job("/nowhere/in", "/nowhere/out", batch_size=4)
    ds = pipeline.build_dataset(job, [{"shard": "/nowhere/in/a.safetensors", "key": "a"}])
    op, names = get_execution_plan(ds._logical_plan)[0].dag, []
    while op is not None:
        names.append(op.name)
        op = op.input_dependencies[0] if op.input_dependencies else None
    assert names[::-1] == [
        "Input",
        "MapBatches(read_shard)->StreamingRepartition[num_rows_per_block=4,strict=False]",
        "MapBatches(DecodeActor)",
        "MapBatches(encode_write)",
    ]


def test_local_ray_keeps_idle_workers_between_bursts():
    """A Ray that run() starts keeps idle task workers while an actor holds most CPUs: the
    second burst of tasks after a pause runs in the same processes. (Ray's default keeps only
    as many idle workers as there are free CPUs, here 0.5, and kills the rest after 1 s: both
    are new processes, measured.)"""
    import subprocess
    import sys

    code = """
import os, time
from pid_batch import pipeline
from pid_batch.job import JobConfig, ModelConfig
import ray
job = JobConfig(input="in", output="out", model=ModelConfig(preset="tiny"))
pipeline.ensure_ray(job, num_cpus=2, object_store_memory=80 * 2**20)

@ray.remote(num_cpus=1.5)
class Hold:  # a decode actor's CPU share
    def ping(self):
        return os.getpid()

@ray.remote(num_cpus=0.25)
def pid():
    time.sleep(1.0)
    return os.getpid()

hold = Hold.remote()
ray.get(hold.ping.remote())
first = set(ray.get([pid.remote() for _ in range(2)]))
time.sleep(4)
second = set(ray.get([pid.remote() for _ in range(2)]))
print(len(first), len(second - first))
"""
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    for k in ("RAY_ADDRESS", *pipeline.LOCAL_RAY_ENV):  # a fresh local Ray with run()'s settings
        env.pop(k, None)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0, out.stderr[-2000:]
    started, new = map(int, out.stdout.split()[-2:])
    assert started == 2 and new == 0, out.stdout


@pytest.mark.parametrize(
    ("job_address", "env_address", "expected"),
    [(None, None, "local"), ("auto", None, "auto"), (None, "ray://h:10001", "ray://h:10001")],
)
def test_ensure_ray_starts_a_private_ray_unless_told(
    monkeypatch, job_address, env_address, expected
):
    """Without an address Ray would attach to any `ray start` cluster on the machine."""
    import ray

    seen: dict = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if env_address:
        monkeypatch.setenv("RAY_ADDRESS", env_address)
    model = ModelConfig(backbone="flux", ckpt_type="2k", preset="tiny")
    job = JobConfig(input="x", output="y", model=model, ray_address=job_address)
    pipeline.ensure_ray(job)
    assert seen["address"] == expected


def test_a_probe_sees_every_decode_actor_through_run(shared_ray, tmp_path):
    """run(probe=...) hands the probe to each decode actor: benchmarks measure through it
    (benchmarks/harness.DecodeProbe) instead of replacing the actor class."""
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    ids = write_shards(inp, shards=2, per_shard=4)
    probe = _harness().DecodeProbe(str(tmp_path))
    result = pipeline.run(tiny_job(inp, out, batch_size=2), log=None, probe=probe)
    assert result.exit_code == 0 and result.processed == len(ids)
    actors = probe.actors()
    assert actors and all(a["init"]["init_end"] >= a["init"]["init_start"] for a in actors.values())
    calls = [c for a in actors.values() for c in a["calls"]]
    assert sum(c["n"] for c in calls) == len(ids)
    assert all(0 < c["busy"] <= c["end"] - c["start"] for c in calls)
    table_actors = set(read_timing(out).column("actor").to_pylist())  # "node:pid"
    assert {a.rsplit(":", 1)[-1] for a in table_actors} == set(actors)
