"""Write side (CPU tasks): encode and write images, timing rows, tar parts, per-shard finish.

Layout "files": one object per image. Layout "tar": each encode task stages its images of a
shard as one tar part; finish_shard streams the parts into new tars <out>/shards/<shard>-NNNNNN.tar
of at most images.tar_max_bytes (memory: one chunk, never the shard), compacts the shard's
timing parts into <out>/timing/<shard>.parquet, then writes the done marker. Torch-free: Ray's
encode/finish workers import only this.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import tarfile
import time
import uuid
from collections import defaultdict
from typing import Any

import numpy as np

from pid_batch import codecs, storage, timing
from pid_batch.job import JobConfig
from pid_batch.redaction import redact
from pid_batch.stages import rows
from pid_batch.stages.layout import (
    cell_str,
    claim_uri,
    image_uri,
    mark_done,
    staging_uri,
    tar_uri,
    unpack_image,
)
from pid_batch.stages.rows import Batch


def encode_write(batch: Batch, job: JobConfig, run_id: str | None = None) -> Batch:
    """Encode and write each ok image, then the batch's timing rows (rows last, after images).

    Layout "files": one object per image. Layout "tar": the batch's images of each shard go
    into one staged tar part, streamed into the shard's tars when the shard completes.
    run_id: this run's id; a task Ray retries names its parts as the first try did (the same
    run and ids), so a retry overwrites its parts instead of staging a sample twice.
    """
    out = job.output
    fmt, quality = job.images.image_format, job.images.quality
    ext = codecs.IMAGE_FORMATS[fmt]
    tar = job.images.layout == "tar"
    batch = rows.reaching_write(batch)
    n = len(batch["id"])
    timing_rows: list[dict[str, Any]] = []
    staged: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
    status = [str(v) for v in batch["status"]]
    error = [cell_str(v) for v in batch["error"]]
    for i in range(n):
        row = _timing_row(batch, i, job)
        sid, key = str(batch["id"][i]), str(batch["shard"][i])
        if status[i] == "ok":
            h, w = int(batch["height"][i]), int(batch["width"][i])
            try:
                t0 = time.perf_counter()
                img = np.frombuffer(batch["image"][i], np.uint8).reshape(h, w, 3)
                data = codecs.encode_image(img, fmt, quality)
                t1 = time.perf_counter()
                if tar:
                    staged[key] += codecs.sample_members(sid, ext, data, _member_meta(row))
                    output = f"{TAR_OUTPUT.format(key=key)}:{codecs.tar_key(sid)}.{ext}"
                else:
                    uri = image_uri(out, sid, fmt)
                    storage.write_bytes_atomic(uri, data)
                    output = uri[len(out.rstrip("/")) + 1 :]
                t2 = time.perf_counter()
            except Exception as e:
                status[i] = "error"
                error[i] = f"write failed: {type(e).__name__}: {redact(str(e))}"
            else:
                row.update(
                    encode_ms=(t1 - t0) * 1000,
                    write_ms=(t2 - t1) * 1000,
                    bytes=len(data),
                    output=output,
                )
        if status[i] == "ok" and len(batch["baseline"][i]):
            try:
                data = codecs.encode_image(unpack_image(batch["baseline"][i]), fmt, quality)
                if tar:
                    member = f"{codecs.tar_key(sid)}.baseline.{ext}"
                    staged[key].append((member, data))
                    row["baseline_output"] = f"{TAR_OUTPUT.format(key=key)}:{member}"
                else:
                    uri = storage.join(out, "baseline", f"{sid}.{ext}")
                    storage.write_bytes_atomic(uri, data)
                    row["baseline_output"] = uri[len(out.rstrip("/")) + 1 :]
                row["baseline_bytes"] = len(data)
            except Exception as e:  # the PiD image is written; report the missing baseline
                error[i] = f"baseline write failed: {redact(str(e))}"
        row["status"], row["error"] = status[i], error[i]
        row["finished_at"] = _ts(time.time())
        timing_rows.append(row)
    by_shard: dict[str, list[dict]] = defaultdict(list)
    for r in timing_rows:
        by_shard[r["shard"]].append(r)
    run = run_id if run_id is not None else uuid.uuid4().hex
    part = {k: _part_name(run, [r["id"] for r in rs]) for k, rs in by_shard.items()}
    for key, members in staged.items():  # staged tar parts first: rows must follow their images
        t0 = time.perf_counter()
        try:  # write_bytes_atomic retries transient errors; what is left is permanent
            storage.write_bytes_atomic(staging_uri(out, key, part[key]), codecs.build_tar(members))
        except Exception as e:
            _fail(timing_rows, status, error, key, f"write failed: {_reason(e)}")
            continue
        share = (time.perf_counter() - t0) * 1000 / max(1, len(members) // 2)
        for r in timing_rows:
            if r["shard"] == key and r["status"] == "ok":
                r["write_ms"] = share
    for key, part_rows in by_shard.items():
        table = timing.timing_table(part_rows)  # a bad row is a bug: raised, not an error row
        try:
            timing.write_part(out, key, f"part-{part[key]}.parquet", table)
        except Exception as e:  # no row on disk: the returned rows carry the reason instead
            _fail(timing_rows, status, error, key, f"timing write failed: {_reason(e)}", every=True)
            if key in staged:  # images without a row would reach a tar and be staged again
                try:
                    storage.delete(staging_uri(out, key, part[key]))
                except Exception:
                    pass  # left staged: merged as a duplicate name, which the tar keeps once
    cells = {"status": status, "error": error}
    return {c: rows.array(c, cells[c] if c in cells else batch[c]) for c in rows.DRIVER_COLUMNS}


# A tar-layout row's output: the member's name within the shard's tars ("<this>:<member>").
TAR_OUTPUT = "shards/{key}-*.tar"


def _part_name(run_id: str, ids: list[str]) -> str:
    """A staged/timing part's name: the same for a retried task (same run, same samples)."""
    h = hashlib.sha256(run_id.encode())
    for sid in sorted(ids):
        h.update(b"\0" + sid.encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {redact(str(exc))}"


def _fail(
    timing_rows: list[dict],
    status: list[str],
    error: list,
    key: str,
    reason: str,
    every: bool = False,
) -> None:
    """Mark shard `key`'s ok rows (every row, if `every`) failed with `reason`; none claims output."""
    for i, r in enumerate(timing_rows):
        if r["shard"] != key or (r["status"] != "ok" and not every):
            continue
        reason_i = reason if r["status"] == "ok" else f"{r['error']}; {reason}"
        r.update(status="error", error=reason_i, output=None, bytes=0)
        r.pop("baseline_output", None)
        status[i], error[i] = "error", reason_i


def _member_meta(row: dict[str, Any]) -> dict[str, Any]:
    """The JSON stored beside an image in a tar: what produced it."""
    keys = ("id", "source_id", "shard", "index", "backbone", "variant", "checkpoint", "height")
    keys += ("width",)
    return {k: row[k] for k in keys} | {
        "steps": row["steps"],
        "seed": row["seed"],
        "sigma": row["sigma"],
    }


COPY_BYTES = 1 << 20  # a tar member is copied through a buffer this size


def assemble_tar(job: JobConfig, key: str, attempts: int = 20) -> int:
    """Stream a shard's staged parts into new tars; how many members this call wrote.

    Parts are packed, in name order, into groups of at most images.tar_max_bytes. Each group
    is claimed (<out>/_tars/<key>/<n>.json, created only if absent) before tar n is written, so
    two finishers never put one part in two tars; tar n is created only if absent, never
    rewritten; a part is deleted only after the tar holding it exists. A claim whose tar is
    missing (its finisher died) is completed from its parts by the next finisher.
    Memory: one copy buffer and one upload chunk, whatever the shard's size.
    """
    out, cap = job.output, job.images.tar_max_bytes
    seen: set[str] = set()  # member names written by this call: a sample staged twice goes once
    written = 0
    for _ in range(attempts):
        claims = _claims(out, key)
        for n, parts in sorted(claims.items()):
            if not storage.exists(tar_uri(out, key, n)):
                written += _write_tar(out, key, n, parts, seen)
            _delete_parts(out, key, parts)
        claimed = {p for parts in claims.values() for p in parts}
        free = [e for e in _staged(out, key) if _part_of(e.uri) not in claimed]
        if not free:
            return written
        n = max(claims, default=-1) + 1
        for group in _pack(free, cap):
            names = [_part_of(e.uri) for e in group]
            if not storage.create_exclusive(claim_uri(out, key, n), json.dumps(names).encode()):
                break  # another finisher claimed n first: read the claims again
            written += _write_tar(out, key, n, names, seen)
            _delete_parts(out, key, names)
            n += 1
    raise RuntimeError(f"tars of shard {key!r} kept changing under {attempts} finishing attempts")


def _claims(out: str, key: str) -> dict[int, list[str]]:
    """tar number → the staged part names it holds, from <out>/_tars/<key>/."""
    root = storage.join(out, "_tars", key)
    try:
        uris = storage.list_files(root, suffixes=(".json",), recursive=False)
    except FileNotFoundError:
        return {}
    return {int(u.rsplit("/", 1)[1][: -len(".json")]): storage.read_json(u) for u in uris}


def _staged(out: str, key: str) -> list[storage.Entry]:
    try:
        return storage.list_entries(storage.join(out, "_staging", key), suffixes=(".tar",))
    except FileNotFoundError:
        return []


def _part_of(uri: str) -> str:
    return uri.rsplit("/", 1)[1][: -len(".tar")]


def _pack(entries: list[storage.Entry], cap: int) -> list[list[storage.Entry]]:
    """Consecutive groups of at most `cap` bytes (a part larger than cap is a group alone)."""
    groups: list[list[storage.Entry]] = []
    size = 0
    for e in entries:
        if not groups or size + e.size > cap:
            groups.append([])
            size = 0
        groups[-1].append(e)
        size += e.size
    return groups


class _PartGone(Exception):
    """A claimed part is no longer staged: its tar has been written by another finisher."""


def _write_tar(out: str, key: str, n: int, parts: list[str], seen: set[str]) -> int:
    """Create tar n from `parts`, member by member; 0 when a part is gone (a part is deleted
    only once the tar holding it exists, so another finisher has written tar n)."""
    dest = storage.NewObject(tar_uri(out, key, n))
    added: set[str] = set()
    try:
        with tarfile.open(
            fileobj=dest, mode="w|", format=tarfile.PAX_FORMAT, bufsize=COPY_BYTES
        ) as tar:
            tar.copybufsize = COPY_BYTES
            for part in parts:
                _copy_members(staging_uri(out, key, part), tar, seen, added)
        created = dest.commit()
    except _PartGone:
        dest.abort()
        return 0
    except BaseException:
        dest.abort()
        raise
    if not created:
        return 0  # another finisher created it first, from the same parts
    seen.update(added)
    return len(added)


def _copy_members(uri: str, tar: tarfile.TarFile, seen: set[str], added: set[str]) -> None:
    """Stream a staged part's members into `tar`, skipping names already written."""
    try:
        src = storage.open_input(uri)
    except FileNotFoundError:
        raise _PartGone(uri) from None
    with src, tarfile.open(fileobj=src, mode="r|", bufsize=COPY_BYTES) as staged:
        staged.copybufsize = COPY_BYTES
        for m in staged:
            if m.isfile() and m.name not in seen and m.name not in added:
                tar.addfile(m, staged.extractfile(m))
                added.add(m.name)


def _delete_parts(out: str, key: str, parts: list[str]) -> None:
    for part in parts:
        storage.delete(staging_uri(out, key, part))


def finish_shard(job: JobConfig, key: str, fingerprint: str, all_ok: bool) -> None:
    """A shard whose rows are all in: stream its staged images into tars (tar layout), compact
    its timing parts, then, when every sample is ok, its done marker for this content, last."""
    if job.images.layout == "tar":
        assemble_tar(job, key)
    timing.compact(job.output, key)
    if all_ok:
        mark_done(job.output, key, fingerprint)


def _ts(epoch_s: float) -> dt.datetime:
    """A UTC timestamp cell."""
    return dt.datetime.fromtimestamp(epoch_s, tz=dt.UTC)


def _timing_row(batch: Batch, i: int, job: JobConfig) -> dict[str, Any]:
    """Row i's timing-table row (timing.TIMING_SCHEMA) before its image is written; `batch` as
    rows.reaching_write gives it (every column present)."""

    def get(k):
        return batch[k][i]

    started = float(get("decode_started_at"))
    sigma = float(get("sigma"))
    tiles = int(get("tiles"))
    return {
        "id": str(get("id")),
        "shard": str(get("shard")),
        "index": int(get("index")),
        "backbone": str(get("backbone")),
        **timing.job_columns(job),
        "height": int(get("height")),
        "width": int(get("width")),
        "seed": int(get("seed")),
        "sigma": None if np.isnan(sigma) else sigma,
        "read_ms": float(get("read_ms")),
        "queue_ms": float(get("queue_ms")),
        "decode_ms": float(get("decode_ms")),
        "text_ms": float(get("text_ms")),
        "encode_ms": 0.0,
        "write_ms": 0.0,
        "bytes": 0,
        "node": cell_str(get("node")),
        "node_id": cell_str(get("node_id")) or None,  # "" on the rows: not known
        "accelerator": cell_str(get("accelerator")),
        "accelerator_class": cell_str(get("accelerator_class")) or None,
        "actor": cell_str(get("actor")),
        "micro_batch": int(get("micro_batch")),
        # NaN: the row never reached a decode call (a stand-in decode): when it was read.
        "started_at": _ts(float(get("read_done_at")) if np.isnan(started) else started),
        "output": None,
        "crop": cell_str(get("crop")),
        "resize": cell_str(get("resize")) or None,
        "tile_height": int(get("tile_height")) or None,
        "tile_width": int(get("tile_width")) or None,
        "tile_overlap": int(get("tile_overlap")) if tiles else None,
        "tiles": tiles or None,
        "vae_encode_ms": float(get("vae_encode_ms")),
        "baseline_ms": float(get("baseline_ms")) or None,
        "source_id": cell_str(get("source_id")) or None,
        "input_fingerprint": cell_str(get("fingerprint")),
    }
