"""Exactly once when conventions break: shard keys, nested prefixes, two drivers, changed inputs.

Each case audits the raw outputs (timing parts, images, tars), not only the summary.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pid_batch import codecs, lease, pipeline, storage, timing
from pid_batch.job import JobConfig, JobConfigError, ModelConfig, OutputConfig, ResourceConfig
from pid_batch.stages import resume
from pid_batch.stages.layout import shard_key
from pid_batch.timing import latest_per_id, read_timing_parts

HW = (2, 3)
REPO = Path(__file__).resolve().parents[1]


def put_shard(path: Path, n: int, ids: list[str] | None = None, seed: int = 0, nan_at=None):
    lat = np.random.default_rng(seed).standard_normal((n, 16, *HW)).astype(np.float32)
    if nan_at is not None:
        lat[nan_at] = np.nan
    path.parent.mkdir(parents=True, exist_ok=True)
    if ids is None:  # a shard without ids: its samples get '<stem>-<index>'
        from safetensors.numpy import save

        path.write_bytes(save({"latents": lat}))
        return
    path.write_bytes(codecs.write_safetensors_shard(lat, ids, backbone="flux"))


def job_for(inp, out, layout="files", **kw) -> JobConfig:
    return JobConfig(
        input=str(inp),
        output=str(out),
        model=ModelConfig(backbone="flux", ckpt_type="2k", preset="tiny", fake_latency_ms=1.0),
        images=OutputConfig(layout=layout, image_format="png"),
        resources=ResourceConfig(batch_size=4),
        **kw,
    )


def raw_rows(out) -> list[dict]:
    parts = storage.list_files(storage.join(str(out), "timing"), suffixes=(".parquet",))
    return [r for p in parts for r in pq.read_table(io.BytesIO(storage.read_bytes(p))).to_pylist()]


def tar_members(out) -> list[str]:
    names = []
    for uri in storage.list_files(storage.join(str(out), "shards"), suffixes=(".tar",)):
        with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(uri))) as t:
            names += t.getnames()
    return names


def cli_spec(tmp_path: Path, inp: Path, out: Path, latency_ms: int, batch: int) -> Path:
    """A job spec file for `pid-batch run` with the sleeping stand-in decoder."""
    spec = tmp_path / "job.yaml"
    model = {"backbone": "flux", "ckpt_type": "2k", "preset": "tiny", "fake_latency_ms": latency_ms}
    spec.write_text(
        json.dumps(
            {
                "input": str(inp),
                "output": str(out),
                "model": model,
                "images": {"image_format": "png"},
                "resources": {"batch_size": batch, "encode_batch_size": batch},
            }
        )
    )
    return spec


# ---------------------------------------------------------------------------------------------
# Without Ray


def test_shard_keys_are_injective_over_adversarial_paths():
    rng = random.Random(0)
    alphabet = ["a", "b", "_", "__", "/", ".", "-", "--", " ", "é", "..x", "k"]
    rels = {"k/c.safetensors", "k__c.safetensors", "k_c.safetensors", "k/c--0.safetensors"}
    while len(rels) < 3000:
        name = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8))).strip("/")
        if name and "//" not in name:
            rels.add(name + rng.choice([".safetensors", ".parquet"]))
    keys = {}
    for rel in rels:
        key = shard_key("s3://bkt/in", f"s3://bkt/in/{rel}")
        assert "/" not in key and not key.startswith(".") and ".." not in key, key
        assert keys.setdefault(key, rel) == rel, f"{rel!r} and {keys[key]!r} share key {key!r}"
    assert shard_key("/x/in", "/x/in/plain.safetensors") == "plain.safetensors"  # unchanged


def test_same_name_idless_shards_in_two_folders_get_distinct_ids(tmp_path):
    for d in ("a", "b"):
        put_shard(tmp_path / "in" / d / "shard-000.safetensors", 3)
    plan = resume.plan_shards(job_for(tmp_path / "in", tmp_path / "out"))
    ids = [resume.shard_ids(s.uri, s.key) for s in plan.shards]
    assert len(set(ids[0]) | set(ids[1])) == 6


@pytest.mark.parametrize("nest", ["output_in_input", "input_in_output"])
def test_nested_prefixes_are_refused(tmp_path, nest):
    a, b = tmp_path / "x", tmp_path / "x" / "y"
    inp, out = (a, b) if nest == "output_in_input" else (b, a)
    with pytest.raises(JobConfigError, match="must not overlap"):
        job_for(inp, out)
    with pytest.raises(JobConfigError, match="must not overlap"):
        job_for(f"file://{inp}/", f"{out}/")
    with pytest.raises(JobConfigError, match="must not overlap"):
        job_for("s3://bkt/in", "s3://bkt//in/out")
    job_for("s3://bkt/in", "s3://bkt/in-out")  # a shared name prefix is not nesting


def test_empty_input_writes_nothing(tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(JobConfigError, match="no input shards"):
        pipeline.run(job_for(tmp_path / "in", tmp_path / "out"), log=None)
    assert not (tmp_path / "out").exists()


def test_second_driver_is_refused_and_a_dead_ones_lease_is_taken(tmp_path):
    out = str(tmp_path / "out")
    put_shard(tmp_path / "in" / "a.safetensors", 1, ["a"])
    with lease.hold(out):
        with pytest.raises(JobConfigError, match=f"pid {os.getpid()}"):
            lease.Lease(out).acquire()
        with pytest.raises(JobConfigError, match="another driver"):
            pipeline.run(job_for(tmp_path / "in", out), log=None)
    assert not os.path.exists(os.path.join(out, "_lease.json"))  # released
    # A lease left by a process that no longer runs on this machine is taken at once.
    dead = lease.Lease(out)
    dead.acquire()
    body = (
        (tmp_path / "out" / "_lease.json")
        .read_text()
        .replace(f'"pid": {os.getpid()}', '"pid": 999999999')
    )
    (tmp_path / "out" / "_lease.json").write_text(body)
    lease.Lease(out).acquire()
    dead.renew()
    assert dead.lost.is_set()  # the old holder learns it lost the lease


def test_latest_per_id_keeps_current_content_and_drops_read_shard_errors():
    def row(shard, index, status, t, fp):
        return {
            "id": f"{shard}-{index}",
            "shard": shard,
            "index": index,
            "status": status,
            "error": None if status == "ok" else "x",
            "finished_at": t,
            "started_at": t,
            "input_fingerprint": fp,
        }

    t = timing.timing_table(
        [
            row("a", 0, "ok", 1, "old"),  # superseded by the new content's error
            row("a", 0, "error", 2, "new"),
            row("a", -1, "error", 1.5, "new"),  # shard unreadable once, then read
            row("a", 1, "ok", 3, "new"),
            row("gone", 0, "ok", 1, "g"),
        ]
    )
    cur = latest_per_id(t, current={"a": "new"})
    assert sorted(zip(cur.column("index").to_pylist(), cur.column("status").to_pylist())) == [
        (0, "error"),
        (1, "ok"),
    ]
    assert latest_per_id(t).num_rows == 3  # without the input listing: latest content per shard


# ---------------------------------------------------------------------------------------------
# End to end on a local Ray (fake decoder)


def run(job) -> dict:
    return pipeline.run(job, log=None).summary


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_colliding_names_each_reach_their_own_tar(tmp_path, shared_ray):
    put_shard(tmp_path / "in" / "k" / "c.safetensors", 6, [f"n{i}" for i in range(6)])
    put_shard(tmp_path / "in" / "k__c.safetensors", 6, [f"f{i}" for i in range(6)], seed=1)
    s = run(job_for(tmp_path / "in", tmp_path / "out", layout="tar"))
    assert (s["samples"], s["ok"]) == (12, 12)
    members = [m for m in tar_members(tmp_path / "out") if m.endswith(".png")]
    assert len(members) == len(set(members)) == 12
    assert len(os.listdir(tmp_path / "out" / "_done")) == 2
    assert not storage.list_files(str(tmp_path / "out" / "_staging"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_changed_deleted_and_fixed_inputs(tmp_path, shared_ray):
    inp, out = tmp_path / "in", tmp_path / "out"
    put_shard(inp / "done.safetensors", 4, [f"d{i}" for i in range(4)])
    put_shard(inp / "open.safetensors", 4, [f"o{i}" for i in range(4)], nan_at=3)
    put_shard(inp / "gone.safetensors", 2, ["g0", "g1"])
    (inp / "trunc.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    s = run(job_for(inp, out))
    assert (s["samples"], s["ok"], s["error"]) == (11, 9, 2), s["errors_by_reason"]  # NaN, shard

    # Replace a finished shard, break a sample of the unfinished one, delete one, fix one.
    put_shard(inp / "done.safetensors", 3, [f"d{i}" for i in range(3)], seed=7)
    put_shard(inp / "open.safetensors", 4, [f"o{i}" for i in range(4)], nan_at=0)
    os.remove(inp / "gone.safetensors")
    put_shard(inp / "trunc.safetensors", 2, ["t0", "t1"])
    with pytest.raises(JobConfigError, match="changed since they were decoded"):
        pipeline.run(job_for(inp, out, changed_inputs="refuse"), log=None)
    s = run(job_for(inp, out))
    assert (s["samples"], s["ok"], s["error"]) == (9, 8, 1)
    assert s["errors_by_reason"] and "NaN" in next(iter(s["errors_by_reason"]))
    assert s["orphaned"]["shards"] == 1  # gone.safetensors, reported apart
    # Raw audit: images are exactly the ok samples of the current inputs.
    images = sorted(p.stem for p in (out / "images").iterdir())
    assert images == ["d0", "d1", "d2", "g0", "g1", "o1", "o2", "o3", "t0", "t1"]
    rows = [r for r in raw_rows(out) if r["shard"] != "gone.safetensors"]
    cur = {r["id"] for r in rows if r["status"] == "ok"}
    assert cur == {"d0", "d1", "d2", "o1", "o2", "o3", "t0", "t1"}
    assert not any(r["id"] == "d3" for r in rows)  # the replaced shard's old rows are gone
    # A rerun with nothing changed decodes nothing and reports the same.
    again = pipeline.run(job_for(inp, out), log=None)
    assert again.summary["samples"] == 9 and again.shards_done == 1  # only the open shard


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_cleanly_and_the_rerun_completes_exactly_once(tmp_path, sig, code):
    inp, out = tmp_path / "in", tmp_path / "out"
    ids = [f"s{s}-{i}" for s in range(4) for i in range(4)]
    for s in range(4):
        put_shard(inp / f"shard-{s}.safetensors", 4, ids[4 * s : 4 * s + 4], seed=s)
    spec = cli_spec(tmp_path, inp, out, latency_ms=400, batch=2)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION": "0.02",
    }
    cmd = [sys.executable, "-m", "pid_batch.cli", "run", str(spec)]
    driver = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.time() + 180
        while time.time() < deadline and driver.poll() is None:
            if (out / "images").is_dir() and any((out / "images").iterdir()):
                break
            time.sleep(0.05)
        assert driver.poll() is None, "run finished before it could be interrupted"
        driver.send_signal(sig)
        stdout, stderr = driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
    err = stderr.decode()
    assert driver.returncode == code, err[-2000:]
    assert "Traceback" not in err and "*** SIGTERM" not in err, err[-2000:]
    assert re.search(r"interrupted after \d+ samples; rerun the same command to resume\s*$", err)
    assert not (out / "_lease.json").exists()  # released on the way out
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    ok = [
        r["id"]
        for r in latest_per_id(read_timing_parts(str(out))).to_pylist()
        if r["status"] == "ok"
    ]
    assert sorted(ok) == sorted(ids)
    assert sorted(p.stem for p in (out / "images").iterdir()) == sorted(ids)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_full_disk_ends_with_a_summary_and_the_rerun_completes(tmp_path):
    """The output on a small tmpfs that fills mid-run: the driver survives, prints a summary and
    exits non-zero; once space is freed, the same command completes every id exactly once."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("mounting a tmpfs is not allowed here")
    try:
        inp, out = tmp_path / "in", mnt / "out"
        ids = [f"s{s}-{i}" for s in range(4) for i in range(10)]
        for s in range(4):
            put_shard(inp / f"shard-{s}.safetensors", 10, ids[10 * s : 10 * s + 10], seed=s)
        filler = mnt / "filler"
        # Leaves ~150 KB: less than the 40 images plus their timing (parts are compacted as each
        # shard finishes, so the run holds fewer bytes at once than it writes).
        filler.write_bytes(os.urandom(3 * 2**20 + 870 * 2**10))
        spec = cli_spec(tmp_path, inp, out, latency_ms=5, batch=4)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env["RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION"] = "0.02"
        cmd = [sys.executable, "-m", "pid_batch.cli", "run", str(spec)]
        first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=300)
        err, summary = first.stderr.decode(), first.stdout.decode()
        assert first.returncode == 1, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        assert "No space left on device" in summary and "this run: " in summary, summary
        filler.unlink()
        rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr.decode()[-3000:]
        table = latest_per_id(read_timing_parts(str(out)))
        assert sorted(table.column("id").to_pylist()) == sorted(ids)
        assert set(table.column("status").to_pylist()) == {"ok"}
        assert sorted(p.stem for p in (out / "images").iterdir()) == sorted(ids)
    finally:
        subprocess.run(["umount", "-l", str(mnt)])
