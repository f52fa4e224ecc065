"""Write side of exactly-once (issue 13): tar finishing never loses a member."""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace

import pytest

from pid_batch import codecs, storage
from pid_batch.stages import writer
from pid_batch.stages.layout import marker_uri, staging_uri, tar_uri


def _stage(out: str, key: str, part: str, ids: list[str]) -> None:
    members = [m for i in ids for m in codecs.sample_members(i, "png", i.encode(), {"id": i})]
    storage.write_bytes_atomic(staging_uri(out, key, part), codecs.build_tar(members))


def _shard_tars(out: str, key: str) -> list[str]:
    return storage.list_files(storage.join(out, "shards"), suffixes=(".tar",))


def _members(out: str, key: str) -> list[str]:
    names = []
    for t in _shard_tars(out, key):
        names += list(codecs.read_tar(storage.read_bytes(t)))  # read_tar refuses repeats
    return names


@pytest.mark.timeout(60)
def test_concurrent_finishers_keep_every_member(tmp_path, monkeypatch):
    """Finisher A claims fewer parts and pauses before writing its tar; B finishes first (and
    completes A's claim); A's late write must neither drop nor repeat a member."""
    out, key = str(tmp_path / "out"), "k.safetensors"
    job = SimpleNamespace(output=out, images=SimpleNamespace(layout="tar", tar_max_bytes=10**9))
    _stage(out, key, "p1", ["a0", "a1"])
    a_claimed, b_done = threading.Event(), threading.Event()
    write_tar = writer._write_tar
    marker_saw: list[list[str]] = []
    write_json = storage.write_json_atomic

    def slow_write(*args):  # A pauses between claiming its parts and writing their tar
        if threading.current_thread().name == "A" and not a_claimed.is_set():
            a_claimed.set()
            assert b_done.wait(30)
        return write_tar(*args)

    def record_marker(uri, obj):  # what the shard's tars hold when a marker is written
        marker_saw.append(_members(out, key))
        write_json(uri, obj)

    monkeypatch.setattr(writer, "_write_tar", slow_write)
    monkeypatch.setattr(storage, "write_json_atomic", record_marker)
    errors: list[BaseException] = []

    def run_a():
        try:
            writer.finish_shard(job, key, "fp", all_ok=True)
        except BaseException as e:  # surfaced below
            errors.append(e)

    a = threading.Thread(target=run_a, name="A")
    a.start()
    assert a_claimed.wait(30)
    _stage(out, key, "p2", ["b0", "b1"])  # a later encode task's part, seen only by B
    writer.finish_shard(job, key, "fp", all_ok=True)
    b_done.set()
    a.join(30)
    assert not errors, errors
    want = {f"{i}.{ext}" for i in ("a0", "a1", "b0", "b1") for ext in ("png", "json")}
    final = _members(out, key)
    assert sorted(final) == sorted(want)  # every member once over the shard's tars
    got = {}
    for t in _shard_tars(out, key):
        got.update(codecs.read_tar(storage.read_bytes(t)))
    assert all(got[f"{i}.png"] == i.encode() for i in ("a0", "a1", "b0", "b1"))
    assert storage.list_files(storage.join(out, "_staging")) == []
    assert storage.exists(marker_uri(out, key))
    assert marker_saw and all(set(seen) >= {"a0.png", "a1.png"} for seen in marker_saw)
    assert set(marker_saw[-1]) == want


def test_webdataset_reads_every_sample_once(tmp_path):
    """Ids with dots ('img.001') must not merge into one WebDataset sample; the raw id is kept."""
    wds = pytest.importorskip("webdataset")
    ids = ["img.001", "img.002", "img_001", "a.b.c", "plain", "x" * 128 + ".y"]
    members = []
    for sid in ids:
        members += codecs.sample_members(sid, "png", sid.encode(), {"id": sid})
        members.append((f"{codecs.tar_key(sid)}.baseline.png", b"base-" + sid.encode()))
    path = tmp_path / "s.tar"
    path.write_bytes(codecs.build_tar(members))
    assert all("." not in name.split(".", 1)[0] for name in codecs.read_tar(path.read_bytes()))
    got = list(wds.WebDataset(str(path), shardshuffle=False))
    assert len(got) == len(ids)
    keys = [s["__key__"] for s in got]
    assert len(set(keys)) == len(ids)
    by_id = {json.loads(s["json"])["id"]: s for s in got}
    assert sorted(by_id) == sorted(ids)
    for sid, s in by_id.items():
        assert s["png"] == sid.encode() and s["baseline.png"] == b"base-" + sid.encode()


def _header_only_shard(n: int, per_sample: list[int], offsets: list[int]) -> bytes:
    head = json.dumps(
        {"latents": {"dtype": "F32", "shape": [n, *per_sample], "data_offsets": offsets}}
    ).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + b"\0" * offsets[1]


@pytest.mark.parametrize(
    "per_sample, offsets", [([4], [0, 16]), ([0], [0, 0])], ids=["too-big", "zero-size"]
)
def test_id_listing_refuses_declared_count_before_allocating(tmp_path, per_sample, offsets):
    """A tiny header declaring a million id-less samples must not allocate per sample."""
    import tracemalloc

    from pid_batch.stages import resume

    path = tmp_path / "evil.safetensors"
    path.write_bytes(_header_only_shard(1_000_000, per_sample, offsets))
    assert path.stat().st_size < 200
    for call in (
        lambda: resume.shard_ids(str(path)),
        lambda: codecs.read_shard(path.read_bytes(), path.name),
    ):
        tracemalloc.start()
        try:
            with pytest.raises(codecs.ShardError):
                call()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1_000_000, peak


def test_bad_header_error_quotes_no_file_bytes(tmp_path):
    """A shard that is really /etc/passwd: the error names the problem, not the file's bytes."""
    from pid_batch.stages import resume

    data = b"root:x:0:0:root:/root:/bin/bash\n" * 4
    path = tmp_path / "passwd.safetensors"
    path.write_bytes(data)
    n = str(int.from_bytes(data[:8], "little"))
    for call in (
        lambda: resume.shard_ids(str(path)),
        lambda: codecs.read_shard(data, path.name),
        lambda: codecs.read_shard_ids(data, path.name),
    ):
        with pytest.raises(codecs.ShardError) as err:
            call()
        msg = str(err.value)
        assert "header length" in msg
        assert n not in msg and "root" not in msg.replace(str(tmp_path), "")


def test_list_files_skips_symlinks_leaving_the_prefix(tmp_path):
    """A shard that links to /etc/passwd, or a linked folder outside, is not listed."""
    inp, outside = tmp_path / "in", tmp_path / "outside"
    inp.mkdir()
    outside.mkdir()
    (inp / "a.safetensors").write_bytes(b"a")
    (outside / "b.safetensors").write_bytes(b"b")
    (inp / "evil.safetensors").symlink_to("/etc/passwd")
    (inp / "up.safetensors").symlink_to(outside / "b.safetensors")
    (inp / "sub").symlink_to(outside, target_is_directory=True)
    (inp / "same.safetensors").symlink_to(inp / "a.safetensors")  # stays inside: kept
    got = storage.list_files(str(inp), suffixes=".safetensors")
    assert got == [str(inp / "a.safetensors"), str(inp / "same.safetensors")]
    assert storage.list_files(f"file://{inp}", suffixes=".safetensors") == [
        f"file://{inp}/a.safetensors",
        f"file://{inp}/same.safetensors",
    ]


def _decoded_rows(tmp_path, layout: str):
    """A 3-sample shard read and 'decoded' (blank images), ready for encode_write."""
    import numpy as np

    from pid_batch.job import JobConfig, ModelConfig, OutputConfig, ResourceConfig
    from pid_batch.stages import reader, resume
    from pid_batch.stages import rows as row_schema

    job = JobConfig(
        input=str(tmp_path / "in"),
        output=str(tmp_path / "out"),
        model=ModelConfig(backbone="flux", ckpt_type="2k", preset="tiny", fake_latency_ms=1),
        images=OutputConfig(image_format="png", layout=layout),
        resources=ResourceConfig(batch_size=4, encode_batch_size=4),
    )
    ids = ["w.0", "dir/name", "w.2"]
    lat = np.random.default_rng(0).standard_normal((3, 16, 2, 3)).astype(np.float32)
    data = codecs.write_safetensors_shard(lat, ids, captions=["a cat"] * 3, backbone="flux")
    storage.write_bytes_atomic(storage.join(job.input, "s.safetensors"), data)
    todo = resume.plan_shards(job).todo
    batch = {k: np.asarray([v], dtype=object) for k, v in todo[0].items()}
    rows = reader.read_shard(batch, job)
    decoded = row_schema.defaults("decode", 3)  # a stand-in decode: blank images
    decoded["image"] = [bytes(int(h) * int(w) * 3) for h, w in zip(rows["height"], rows["width"])]
    status = np.where(rows["status"] == "pending", "ok", rows["status"])
    return job, row_schema.stage_output(rows, "decode", status=status, **decoded)


def _enospc_on(monkeypatch, pattern: str) -> list[str]:
    import errno

    real, hits = storage.write_bytes_atomic, []

    def write(uri, data):
        if pattern in uri:
            hits.append(uri)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(uri, data)

    monkeypatch.setattr(storage, "write_bytes_atomic", write)
    return hits


@pytest.mark.parametrize("layout, failing", [("tar", "_staging"), ("files", "/timing/")])
def test_full_disk_makes_error_rows_not_a_crash(tmp_path, monkeypatch, layout, failing):
    """ENOSPC while writing a tar part or the timing part: encode_write returns error rows."""
    job, rows = _decoded_rows(tmp_path, layout)
    hits = _enospc_on(monkeypatch, failing)
    out = writer.encode_write(rows, job)
    assert hits, "the failing write was never attempted"
    assert list(out["status"]) == ["error"] * 3
    assert all("No space left on device" in e for e in out["error"])
    assert all("lost in the pipeline" not in e for e in out["error"])
    staged = storage.list_files(storage.join(job.output, "_staging"))
    timing = storage.list_files(storage.join(job.output, "timing"))
    if failing == "_staging":  # rows still written, saying why; no image claimed
        assert staged == [] and len(timing) == 1
        import pyarrow.parquet as pq

        table = pq.read_table(timing[0]).to_pylist()
        assert [r["status"] for r in table] == ["error"] * 3
        assert all("No space left on device" in r["error"] for r in table)
        assert all(r["output"] is None for r in table)
    else:
        assert timing == []


def test_original_id_kept_in_timing_and_tar_json(tmp_path):
    """'dir/name' is sanitised for keys; the timing row and the tar JSON keep it as given."""
    import pyarrow.parquet as pq

    from pid_batch import timing

    job, rows = _decoded_rows(tmp_path, "tar")
    out = writer.encode_write(rows, job)
    assert list(out["status"]) == ["ok"] * 3
    writer.finish_shard(job, "s.safetensors", "fp", all_ok=True)
    (part,) = storage.list_files(storage.join(job.output, "timing"))  # compacted at finish
    got = {r["id"]: r["source_id"] for r in pq.read_table(part).to_pylist()}
    assert got == {"w.0": "w.0", codecs.sanitize_id("dir/name"): "dir/name", "w.2": "w.2"}
    tar = codecs.read_tar(storage.read_bytes(tar_uri(job.output, "s.safetensors", 0)))
    metas = [json.loads(v) for k, v in tar.items() if k.endswith(".json")]
    assert sorted(m["source_id"] for m in metas) == ["dir/name", "w.0", "w.2"]
    old = pq.read_table(part).drop_columns(["source_id"])  # a part written before the column
    pq.write_table(old.set_column(0, "id", old.column("id")), part)
    assert timing.read_timing(job.output).num_rows == 3  # old parts stay readable
