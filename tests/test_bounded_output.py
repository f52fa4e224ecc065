"""Issue 15: tars streamed at a size cap, timing compaction, one-listing planning, Arrow summary.

No Ray: the write side's functions are called directly, on local disk and a loopback S3.
"""

from __future__ import annotations

import json
import os
import tarfile
import tracemalloc
from types import SimpleNamespace

import boto3
import numpy as np
import pytest

from pid_batch import codecs, pipeline, storage, summary, timing
from pid_batch.stages import resume, writer
from pid_batch.stages.layout import (
    claim_uri,
    legacy_tar_uri,
    mark_done,
    staging_uri,
    tar_uri,
)
from pid_batch.timing import timing_dir


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "root")
    return f"s3://{request.getfixturevalue('s3_bucket')}/root"


def _job(out: str, cap: int = 10**9):
    return SimpleNamespace(output=out, images=SimpleNamespace(layout="tar", tar_max_bytes=cap))


def _stage(out: str, key: str, part: str, ids: list[str], payload: int = 1000) -> None:
    members = []
    for i in ids:
        members += codecs.sample_members(i, "png", i.encode().ljust(payload, b"x"), {"id": i})
    storage.write_bytes_atomic(staging_uri(out, key, part), codecs.build_tar(members))


def _tars(out: str) -> list[str]:
    return storage.list_files(storage.join(out, "shards"), suffixes=(".tar",))


def _all_members(out: str) -> list[str]:
    return [n for t in _tars(out) for n in codecs.read_tar(storage.read_bytes(t))]


# ---------------------------------------------------------------------------------------------
# Storage: an object written in pieces, created only if absent


def test_new_object_is_whole_created_once_and_abortable(root, monkeypatch):
    uri = storage.join(root, "big.bin")
    data = os.urandom(12 << 20)  # three 5 MiB-or-less S3 parts
    w = storage.NewObject(uri, chunk_bytes=5 << 20)
    for i in range(0, len(data), 1 << 20):
        w.write(data[i : i + (1 << 20)])
    assert not storage.exists(uri)  # nothing visible before commit
    assert w.commit()
    assert storage.read_bytes(uri) == data
    again = storage.NewObject(uri, chunk_bytes=5 << 20)
    again.write(b"other" * (2 << 20))
    assert not again.commit()  # the name was taken: nothing written
    assert storage.read_bytes(uri) == data
    gone = storage.NewObject(storage.join(root, "gone.bin"), chunk_bytes=5 << 20)
    gone.write(os.urandom(11 << 20))
    gone.abort()
    assert not storage.exists(storage.join(root, "gone.bin"))
    if root.startswith("s3://"):  # no multipart upload left behind
        bucket = root[5:].split("/", 1)[0]
        ups = boto3.client("s3").list_multipart_uploads(Bucket=bucket).get("Uploads")
        assert not ups
    else:  # no temp file left either
        assert sorted(os.listdir(root)) == ["big.bin"]


# ---------------------------------------------------------------------------------------------
# Tars: cut at a size cap, never rewritten, every member once


def test_tars_are_cut_at_the_cap_and_a_rerun_only_adds_tars(root):
    wds = pytest.importorskip("webdataset")
    out, key = root, "s.safetensors"
    for p in range(5):  # 5 parts of 2 samples
        _stage(out, key, f"p{p}", [f"a{p}-{j}" for j in range(2)])
    cap = 2 * storage.size(staging_uri(out, key, "p0"))  # two parts a tar
    writer.finish_shard(_job(out, cap=cap), key, "fp", all_ok=False)
    tars = _tars(out)
    assert [t.rsplit("/", 1)[1] for t in tars] == [f"{key}-{n:06d}.tar" for n in range(3)]
    assert all(storage.size(t) <= cap for t in tars)
    assert sorted(_all_members(out)) == sorted(
        f"a{p}-{j}.{e}" for p in range(5) for j in range(2) for e in ("png", "json")
    )
    before = {t: (storage.read_bytes(t), storage.version(t)) for t in tars}
    _stage(out, key, "q0", ["b0", "b1"])  # a rerun decoded two more samples
    writer.finish_shard(_job(out, cap=cap), key, "fp", all_ok=True)
    assert {t: (storage.read_bytes(t), storage.version(t)) for t in tars} == before
    assert len(_tars(out)) == 4 and len(_all_members(out)) == 24
    assert storage.list_files(storage.join(out, "_staging")) == []
    if root.startswith("s3://"):
        return
    seen = []
    for t in _tars(out):  # each tar a WebDataset shard of its own
        for s in wds.WebDataset(t, shardshuffle=False):
            assert json.loads(s["json"])["id"] == s["__key__"]
            seen.append(s["__key__"])
    assert sorted(seen) == sorted([f"a{p}-{j}" for p in range(5) for j in range(2)] + ["b0", "b1"])


def test_a_sample_staged_twice_is_written_once(tmp_path):
    out, key = str(tmp_path / "out"), "s.safetensors"
    _stage(out, key, "p0", ["x", "y"])
    _stage(out, key, "p1", ["y", "z"])  # a crashed run's part and the rerun's
    writer.finish_shard(_job(out, cap=5000), key, "fp", all_ok=True)  # two tars
    assert len(_tars(out)) == 2
    assert sorted(_all_members(out)) == sorted(f"{i}.{e}" for i in "xyz" for e in ("png", "json"))


def test_a_finisher_that_died_is_completed_by_the_next(tmp_path):
    out, key = str(tmp_path / "out"), "s.safetensors"
    _stage(out, key, "p0", ["a"])
    _stage(out, key, "p1", ["b"])
    # Died after claiming tar 0 (p0), before writing it.
    storage.create_exclusive(claim_uri(out, key, 0), json.dumps(["p0"]).encode())
    # Died after writing tar 1 (p1), before deleting its part.
    storage.create_exclusive(claim_uri(out, key, 1), json.dumps(["p1"]).encode())
    writer._write_tar(out, key, 1, ["p1"], set())
    tar1 = storage.read_bytes(tar_uri(out, key, 1))
    writer.finish_shard(_job(out), key, "fp", all_ok=True)
    assert storage.read_bytes(tar_uri(out, key, 1)) == tar1  # not rewritten
    assert sorted(_all_members(out)) == ["a.json", "a.png", "b.json", "b.png"]
    assert storage.list_files(storage.join(out, "_staging")) == []


def test_tar_merge_memory_is_one_chunk_not_the_shard(tmp_path):
    """64 MB of staged images: Python allocations while merging stay under 8 MB (the old merge
    held the shard twice: ~130 MB)."""
    out, key = str(tmp_path / "out"), "s.safetensors"
    for p in range(8):
        _stage(out, key, f"p{p:02d}", [f"s{p}-{j}" for j in range(4)], payload=2 << 20)
    tracemalloc.start()
    try:
        writer.assemble_tar(_job(out), key)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(_all_members(out)) == 64
    assert peak < 8 << 20, peak


# ---------------------------------------------------------------------------------------------
# Timing compaction


def _rows(key: str, ids: list[str], status: str = "ok", t: float = 1.0) -> list[dict]:
    return [
        {
            "id": i,
            "shard": key,
            "index": n,
            "status": status,
            "error": None if status == "ok" else "decode failed: boom",
            "started_at": t,
            "finished_at": t + n,
            "decode_ms": 5.0 + n,
            "bytes": 10,
            "accelerator": "cpu",
            "height": 8,
            "width": 8,
            "input_fingerprint": "fp",
        }
        for n, i in enumerate(ids)
    ]


def _part(out: str, key: str, name: str, rows: list[dict]) -> None:
    timing.write_part(out, key, name, timing.timing_table(rows))


def _sorted(t):
    return t.sort_by([("shard", "ascending"), ("index", "ascending")]).to_pylist()


def test_compaction_crash_before_the_deletes_reads_as_the_same_table(root):
    out, key = root, "s.safetensors"
    _part(out, key, "part-a.parquet", _rows(key, ["x0", "x1"], "error"))
    _part(out, key, "part-b.parquet", _rows(key, ["x0", "x1"], t=5.0))
    want = _sorted(timing.latest_per_id(timing.read_timing_parts(out)))
    saved = {u: storage.read_bytes(u) for u in storage.list_files(timing_dir(out, key))}
    assert timing.compact(out, key) == 2
    assert storage.list_files(storage.join(out, "timing")) == [
        storage.join(out, "timing", f"{key}.parquet")
    ]
    assert timing.read_timing_parts(out).num_rows == 4
    for u, data in saved.items():  # a crash between the table and the deletes
        storage.write_bytes_atomic(u, data)
    assert timing.read_timing_parts(out).num_rows == 4  # absorbed parts are skipped
    assert _sorted(timing.latest_per_id(timing.read_timing_parts(out))) == want
    # The next finish folds the leftovers without counting them twice.
    _part(out, key, "part-c.parquet", _rows(key, ["x2"]))
    timing.compact(out, key)
    assert timing.read_timing_parts(out).num_rows == 5
    assert len(storage.list_files(storage.join(out, "timing"))) == 1
    assert resume.done_ids(out, key, "fp") == (["x0", "x1", "x2"], False)


# ---------------------------------------------------------------------------------------------
# Planning and summary


def _input(tmp_path, shards: int, per: int = 2):
    from pid_batch.job import JobConfig, ModelConfig, OutputConfig

    inp = tmp_path / "in"
    inp.mkdir()
    for s in range(shards):
        lat = np.zeros((per, 16, 2, 3), np.float32)
        ids = [f"s{s}-{i}" for i in range(per)]
        (inp / f"s{s:03d}.safetensors").write_bytes(codecs.write_safetensors_shard(lat, ids))
    return JobConfig(
        input=str(inp),
        output=str(tmp_path / "out"),
        model=ModelConfig(backbone="flux", ckpt_type="2k", preset="tiny", fake_latency_ms=1),
        images=OutputConfig(layout="tar", image_format="png"),
    )


def test_planning_lists_each_prefix_once_and_reads_only_open_shards(tmp_path, monkeypatch):
    job = _input(tmp_path, shards=12)
    plan = resume.plan_shards(job)
    out = job.output
    for s in plan.shards[:4]:  # 4 finished shards, 4 begun, 4 fresh
        mark_done(out, s.key, s.fingerprint)
        _part(
            out,
            s.key,
            "part-a.parquet",
            [r | {"input_fingerprint": s.fingerprint} for r in _rows(s.key, ["i0", "i1"])],
        )
    for s in plan.shards[4:8]:
        _part(
            out,
            s.key,
            "part-a.parquet",
            [r | {"input_fingerprint": s.fingerprint} for r in _rows(s.key, ["i0"])],
        )
    listed, read = [], []
    real_list, real_read = storage.list_entries, storage.read_bytes
    monkeypatch.setattr(
        storage, "list_entries", lambda uri, *a, **k: listed.append(uri) or real_list(uri, *a, **k)
    )
    monkeypatch.setattr(storage, "read_bytes", lambda uri: read.append(uri) or real_read(uri))
    plan = resume.plan_shards(job)
    assert sorted(listed) == sorted(
        [job.input, storage.join(out, "_done"), storage.join(out, "timing")]
    )
    assert plan.skipped == 4 and len(plan.todo) == 8
    assert [t["done_ids"] for t in plan.todo] == [["i0"]] * 4 + [[]] * 4
    timing_reads = [u for u in read if "/timing/" in u]
    assert sorted(timing_reads) == sorted(
        storage.join(timing_dir(out, s.key), "part-a.parquet") for s in plan.shards[4:8]
    )


def test_summary_of_an_output_matches_the_whole_table_summary(tmp_path):
    out = str(tmp_path / "out")
    for s in range(5):
        key = f"k{s}"
        _part(out, key, "part-a.parquet", _rows(key, [f"{key}-{i}" for i in range(4)], "error"))
        _part(out, key, "part-b.parquet", _rows(key, [f"{key}-{i}" for i in range(3)], t=9.0))
        if s % 2:
            timing.compact(out, key)
    _part(out, "gone", "part-a.parquet", _rows("gone", ["g"]))
    current = {f"k{s}": "fp" for s in range(5)}
    raw = timing.read_timing_parts(out)
    want = summary.summarize(
        timing.latest_per_id(raw, current), orphans=timing.orphans(raw, current)
    )
    got = summary.summarize_output(out, current)
    assert got == want
    assert (got["samples"], got["ok"], got["error"]) == (20, 15, 5)
    assert got["errors_by_reason"] == {"decode failed: boom": 5}  # timing.error_reason
    assert got["orphaned"] == {"rows": 1, "shards": 1}


def test_run_result_keeps_counts_and_a_capped_list_of_failed_ids():
    r = pipeline.RunResult(summary={})
    r.failed([f"id{i}" for i in range(pipeline.MAX_ERROR_IDS + 50)])
    r.failed(["late"])
    assert r.errors == pipeline.MAX_ERROR_IDS + 51
    assert r.error_ids == [f"id{i}" for i in range(pipeline.MAX_ERROR_IDS)]


# ---------------------------------------------------------------------------------------------
# An output written by the one-tar-per-shard layout resumes


def test_an_output_of_the_previous_layout_resumes(tmp_path):
    from test_exactly_once_write import _decoded_rows

    from pid_batch.report import _read_output

    job, rows = _decoded_rows(tmp_path, "tar")
    out, key = job.output, "s.safetensors"
    ids = [str(i) for i in rows["id"]]
    fp = str(rows["fingerprint"][0])
    # What the previous layout left: shards/<key>.tar holding the first sample, its ok row in a
    # timing part pointing into that tar, no marker (the run stopped before the shard's end).
    member = f"{codecs.tar_key(ids[0])}.png"
    legacy = codecs.build_tar(codecs.sample_members(ids[0], "png", b"old-png", {"id": ids[0]}))
    storage.write_bytes_atomic(legacy_tar_uri(out, key), legacy)
    old_row = _rows(key, [ids[0]])[0] | {
        "output": f"shards/{key}.tar:{member}",
        "input_fingerprint": fp,
    }
    _part(out, key, "part-old.parquet", [old_row])
    (todo,) = resume.plan_shards(job).todo
    assert todo["done_ids"] == [ids[0]]
    rest = {k: v[1:] for k, v in rows.items()}  # the rerun decodes the other two
    assert list(writer.encode_write(rest, job)["status"]) == ["ok", "ok"]
    writer.finish_shard(job, key, fp, all_ok=True)
    assert storage.read_bytes(legacy_tar_uri(out, key)) == legacy  # never rewritten
    assert storage.exists(tar_uri(out, key, 0))
    names = _all_members(out)
    assert sorted(names) == sorted(f"{codecs.tar_key(i)}.{e}" for i in ids for e in ("png", "json"))
    s = summary.summarize_output(out, {key: fp})
    assert (s["samples"], s["ok"]) == (3, 3)
    assert resume.plan_shards(job).todo == []  # done
    table = timing.read_timing(out)
    outputs = dict(zip(table.column("id").to_pylist(), table.column("output").to_pylist()))
    assert _read_output(storage.join(out, outputs[ids[0]])) == b"old-png"
    for i in ids[1:]:
        assert outputs[i].startswith(f"shards/{key}-*.tar:")
        assert _read_output(storage.join(out, outputs[i])).startswith(b"\x89PNG")
    with tarfile.open(tar_uri(out, key, 0)) as t:
        assert len(t.getnames()) == 4
