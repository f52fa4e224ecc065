"""A corpus of bad inputs through one local run: each ends as the right error row (or a config
error before any work), nothing crashes the job, and nothing is written outside the output."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from faults import (
    flux_latents,
    image_ids,
    raw_timing_rows,
    tiny_job,
    write_flux_shards,
)
from safetensors.numpy import save as st_save

from pid_batch import codecs, pipeline, storage
from pid_batch.job import JobConfigError, load_job
from pid_batch.stages import reader
from pid_batch.timing import read_timing

HUGE_CAPTION = "a very long caption " * 50_000  # 1 MB


def _st(path: Path, tensors: dict, meta: dict | None = None) -> None:
    """A safetensors file written by the safetensors library (not by the code under test)."""
    path.write_bytes(st_save(tensors, metadata=meta))


def _absurd_header() -> bytes:
    """A header that claims a [1, 16, 100000, 100000] fp32 tensor (640 GB) over a 64-byte body."""
    head = json.dumps(
        {
            "latents": {
                "dtype": "F32",
                "shape": [1, 16, 100_000, 100_000],
                "data_offsets": [0, 64],
            },
            "__metadata__": {"ids": '["absurd"]'},
        }
    ).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + bytes(64)


def _row(sid, latent=None, **kw) -> dict:
    lat = flux_latents(1, seed=len(str(sid)))[0] if latent is None else latent
    return {"id": sid, "latent": lat, "caption": "a cat", "backbone": "flux", **kw}


def write_corpus(inp: Path) -> tuple[dict[str, str], list[str]]:
    """Bad shards and samples; returns {row id: expected error regex} and the ids expected ok."""
    inp.mkdir(parents=True)
    expect: dict[str, str] = {}
    ok: list[str] = []
    good = codecs.write_safetensors_shard(flux_latents(4), [f"t{i}" for i in range(4)])

    # -- whole shards that cannot be read: one error row named after the shard ---------------
    (inp / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    expect["truncated.safetensors"] = r"shard unreadable: .*(truncated|does not fit)"
    (inp / "not-a-tensor-file.safetensors").write_bytes(b"GIF89a this is not a tensor file")
    expect["not-a-tensor-file.safetensors"] = r"shard unreadable: .*does not fit"
    (inp / "not-parquet.parquet").write_bytes(os.urandom(300))
    expect["not-parquet.parquet"] = r"shard unreadable: .*unreadable Parquet"
    _st(inp / "int-latents.safetensors", {"latents": np.ones((2, 16, 2, 3), np.int32)})
    expect["int-latents.safetensors"] = r"shard unreadable: .*needs a float tensor"
    _st(inp / "empty.safetensors", {"latents": np.zeros((0, 16, 2, 3), np.float32)})
    expect["empty.safetensors"] = r"shard unreadable: .*no samples"
    _st(inp / "no-latents.safetensors", {"images": flux_latents(2)}, {"ids": '["x", "y"]'})
    expect["no-latents.safetensors"] = r"shard unreadable: .*needs a float tensor 'latents'"
    _st(inp / "ids-mismatch.safetensors", {"latents": flux_latents(2)}, {"ids": '["only-one"]'})
    expect["ids-mismatch.safetensors"] = r"shard unreadable: .*'ids' must be a JSON list of 2"
    (inp / "absurd-header.safetensors").write_bytes(_absurd_header())
    expect["absurd-header.safetensors"] = r"shard unreadable: .*bad or truncated entry"

    # -- per-sample problems in a Parquet shard (per-row dtype, shape, backbone) -------------
    nan = flux_latents(1)[0]
    nan[3, 1, 1] = np.nan
    inf = flux_latents(1)[0]
    inf[0, 0, 2] = -np.inf
    rows = [
        _row("p-ok"),
        {**_row("p-int8"), "latent": np.ones((16, 2, 3), np.int8)},
        _row("p-rank4", flux_latents(1)[0][None]),
        _row("p-4ch", np.ones((4, 2, 3), np.float32)),
        _row("p-nan", nan),
        _row("p-inf", inf),
        _row("p-empty", np.zeros((16, 0, 3), np.float32)),
        _row("p-unknown-backbone", backbone="dalle9"),
        _row("p-other-checkpoint", backbone="sd3"),
        _row("p-sigma", sigma=7.5),
    ]
    data = _parquet_rows(rows)
    (inp / "mixed.parquet").write_bytes(data)
    ok.append("p-ok")
    expect.update(
        {
            "p-int8": r"dtype must be one of",
            "p-rank4": r"must be \[C, h, w\] or packed",
            "p-4ch": r"must have 16 channels",
            "p-nan": r"NaN/Inf",
            "p-inf": r"NaN/Inf",
            "p-empty": r"latent is empty",
            "p-unknown-backbone": r"backbone 'dalle9' is not this job's backbone 'flux'",
            "p-other-checkpoint": r"backbone 'sd3' is not this job's backbone 'flux'",
            "p-sigma": r"sigma must be a number in \[0, 1\]",
        }
    )
    # Absurd dimensions in a Parquet row: the claimed shape is never allocated.
    absurd = pq.read_table(_pa_buffer(data)).slice(0, 1).to_pylist()[0]
    absurd.update(id="p-absurd", shape=[16, 100_000, 100_000])
    (inp / "absurd-row.parquet").write_bytes(_parquet_raw([absurd]))
    expect["p-absurd"] = r"latent has \d+ bytes, shape \[16, 100000, 100000\]"

    # -- captions, ids and metadata in a safetensors shard ---------------------------------
    raw_ids = ["c-ok", "c-int-caption", "c-huge-caption", 12345, "../../../escape", "/abs/x"]
    raw_ids += ["a/b/../../c", "nul\x00id", ""]
    captions = ["ok", 42, HUGE_CAPTION, "ok", "ok", "ok", "ok", "ok", "ok"]
    _st(
        inp / "captions-ids.safetensors",
        {"latents": flux_latents(len(raw_ids), seed=3)},
        {"ids": json.dumps(raw_ids), "captions": json.dumps(captions), "backbone": "flux"},
    )
    expect["c-int-caption"] = r"caption must be a string"
    expect[codecs.sanitize_id("captions-ids") + "-000003"] = r"id must be a string"
    ok += ["c-ok", "c-huge-caption"]  # a huge caption is cut to ShardLimits, not an error
    ok += [codecs.sanitize_id(r) for r in raw_ids[4:]]  # hostile ids: sanitised, then decoded
    # Missing metadata: no ids, captions or backbone → ids from the file name, job defaults.
    _st(inp / "no-meta.safetensors", {"latents": flux_latents(2, seed=4)})
    ok += ["no-meta-000000", "no-meta-000001"]
    return expect, ok


def _pa_buffer(data: bytes):
    import pyarrow as pa

    return pa.BufferReader(data)


def _parquet_rows(rows: list[dict]) -> bytes:
    """Parquet rows as codecs' schema (int8 latents forced through as raw bytes + dtype)."""
    fixed = []
    for r in rows:
        lat = np.asarray(r["latent"])
        fixed.append(
            {
                **{k: r.get(k) for k in codecs.PARQUET_SHARD_SCHEMA.names},
                "latent": lat.tobytes(),
                "shape": list(lat.shape),
                "dtype": lat.dtype.name,
            }
        )
    return _parquet_raw(fixed)


def _parquet_raw(rows: list[dict]) -> bytes:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=codecs.PARQUET_SHARD_SCHEMA), sink)
    return sink.getvalue().to_pybytes()


def test_read_shard_ids_agrees_with_read_shard(tmp_path):
    """The cheap id listing (a duplicate check's input) gives read_shard's ids, header only."""
    write_corpus(tmp_path / "in")
    checked = 0
    for path in sorted((tmp_path / "in").iterdir()):
        data = path.read_bytes()
        try:
            want = [s.id for s in codecs.read_shard(data, path.name)]
        except codecs.ShardError:
            want = None
        if path.suffix == ".safetensors" and want is not None:
            data = data[: codecs.safetensors_header_bytes(data[:8], path.name)]  # header only
        try:
            got = codecs.read_shard_ids(data, path.name)
        except codecs.ShardError:
            got = None
        if want is not None:
            assert got == want, path.name
            checked += 1
    assert checked == 4  # mixed, absurd-row, captions-ids, no-meta (the rest are unreadable)


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_bad_input_corpus(shared_ray, tmp_path):
    inp, out = tmp_path / "data" / "in", tmp_path / "data" / "runs" / "out"
    expect, ok = write_corpus(inp)
    before = _tree(tmp_path)
    result = pipeline.run(tiny_job(str(inp), str(out)), log=None)

    assert result.exit_code == 1  # the job finished and says that samples failed
    table = read_timing(str(out))
    rows = {r["id"]: r for r in table.to_pylist()}
    assert sorted(r["id"] for r in table.to_pylist() if r["status"] == "ok") == sorted(ok)
    for sid, pattern in expect.items():
        assert sid in rows, f"no row for {sid!r}"
        assert rows[sid]["status"] == "error", (sid, rows[sid])
        assert re.search(pattern, rows[sid]["error"]), (sid, rows[sid]["error"])
    assert set(rows) == set(expect) | set(ok)
    # Exactly one image per ok sample, all inside <out>/images, no path tricks in their names.
    assert image_ids(str(out)) == sorted(ok)
    assert all(
        "/" not in i and ".." not in i and not i.startswith(".") for i in image_ids(str(out))
    )
    new = _tree(tmp_path) - before
    outside = [p for p in new if not p.startswith("data/runs/out/")]
    assert not outside, f"written outside the output prefix: {outside}"
    assert _tree(tmp_path / "data" / "in") == {p[len("data/in/") :] for p in before}
    summary = storage.read_json(str(out / "summary.json"))
    assert summary["ok"] == len(ok) and summary["error"] == len(expect)
    # Only the shard whose every sample was fine is marked done.
    assert [Path(u).name for u in storage.list_files(str(out / "_done"))] == [
        "no-meta.safetensors.json"
    ]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_duplicate_ids_are_error_rows_and_counted(shared_ray, tmp_path):
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    write_flux_shards(inp, shards=1, per_shard=2, prefix="d")  # d0-0, d0-1
    # shard-001 repeats both ids of shard-000 (other latents) and one of its own.
    data = codecs.write_safetensors_shard(flux_latents(3, seed=5), ["d0-0", "d0-1", "d0-1"])
    storage.write_bytes_atomic(storage.join(inp, "shard-001.safetensors"), data)
    result = pipeline.run(tiny_job(inp, out), log=None)
    assert result.exit_code == 1
    # Within a shard the repeat is already an error row, but it shares the id of the first
    # occurrence, so the summary (one row per id) hides it.
    raw = [(r["shard"], r["index"], r["status"]) for r in raw_timing_rows(out)]
    assert ("shard-001.safetensors", 2, "error") in raw
    # Across shards nothing is detected today: shard-001's images overwrite shard-000's.
    errors = [r for r in raw_timing_rows(out) if r["status"] == "error"]
    assert {(r["shard"], r["index"]) for r in errors} == {
        ("shard-001.safetensors", 0),
        ("shard-001.safetensors", 1),
        ("shard-001.safetensors", 2),
    }
    assert all("duplicate id" in r["error"] for r in errors)
    summary = storage.read_json(storage.join(out, "summary.json"))
    assert (summary["samples"], summary["ok"], summary["error"]) == (5, 2, 3)
    assert image_ids(out) == ["d0-0", "d0-1"]
    assert all(
        r["shard"] == "shard-000.safetensors"
        for r in read_timing(out).to_pylist()
        if r["status"] == "ok"
    )


def test_absurd_but_real_latent_is_refused_before_decode(tmp_path):
    """Read stage only (no Ray): a real 4 MB latent whose output would be 8192x8192."""
    inp = tmp_path / "in"
    inp.mkdir()
    lat = np.zeros((1, 16, 256, 256), np.float32)
    (inp / "big.safetensors").write_bytes(codecs.write_safetensors_shard(lat, ["big"]))
    job = tiny_job(str(inp), str(tmp_path / "out"))
    batch = {
        "shard": np.array([str(inp / "big.safetensors")], dtype=object),
        "key": np.array(["big.safetensors"], dtype=object),
        "fingerprint": np.array(["f0"], dtype=object),
        "done_ids": np.array([None], dtype=object),
    }
    rows = reader.read_shard(batch, job)
    assert list(rows["status"]) == ["error"]
    assert "8192" in rows["error"][0]


def test_per_sample_backbone_must_be_the_jobs(tmp_path):
    """Read stage only (no Ray): a sample naming another backbone is an error row that names
    its id and both backbones; the job's own name, an alias or another case decodes."""
    inp = tmp_path / "in"
    inp.mkdir()
    given = {"own": "flux", "alias": "ZImage", "none": None}
    given |= {"other-release": "sd3", "no-2k-release": "sdxl", "unknown": "dalle9"}
    rows = [_row(sid, backbone=b) for sid, b in given.items()]
    (inp / "b.parquet").write_bytes(_parquet_rows(rows))
    job = tiny_job(str(inp), str(tmp_path / "out"))  # flux, ckpt_type 2k
    batch = {
        "shard": np.array([str(inp / "b.parquet")], dtype=object),
        "key": np.array(["b.parquet"], dtype=object),
        "fingerprint": np.array(["f0"], dtype=object),
        "done_ids": np.array([None], dtype=object),
    }
    out = reader.read_shard(batch, job)
    status = dict(zip(out["id"], out["status"]))
    error = dict(zip(out["id"], out["error"]))
    assert {i for i, s in status.items() if s == "pending"} == {"own", "alias", "none"}
    for sid in ("other-release", "no-2k-release", "unknown"):
        assert status[sid] == "error"
        assert error[sid].startswith(f"sample {sid!r}: backbone {given[sid]!r} ")
        assert "job's backbone 'flux'" in error[sid], error[sid]


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"model": {"backbone": "dalle9"}}, "not a released PiD backbone"),
        ({"model": {"backbone": "sdxl", "ckpt_type": "2k"}}, "no released checkpoint"),
        ({"model": {"preset": "tiny", "checkpoint_sha256": "abc"}}, "64 hex digits"),
        ({"model": {"preset": "tiny"}, "output": "IN"}, "must differ from input"),
        ({"model": {"preset": "tiny"}, "images": {"image_format": "bmp"}}, "image_format"),
        ({"model": {"preset": "tiny"}, "resources": {"batch_size": "8"}}, "must be int"),
        ({"model": {"preset": "tiny"}, "sampling": {"caption": 5}}, "must be str"),
        ({"model": {"preset": "tiny"}, "surprise": 1}, "unknown key"),
        ({"model": {"preset": "tiny"}, "resources": {"prefetch_batches": 7}}, "prefetch_batches"),
    ],
)
def test_config_errors_before_any_work(tmp_path, spec, match):
    inp = tmp_path / "in"
    write_flux_shards(str(inp), shards=1, per_shard=1)
    data = {"input": str(inp), "output": str(tmp_path / "out"), **spec}
    if data["output"] == "IN":
        data["output"] = str(inp)
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(data))  # JSON is YAML
    with pytest.raises(JobConfigError, match=match):
        load_job(path)
    assert not (tmp_path / "out").exists()
