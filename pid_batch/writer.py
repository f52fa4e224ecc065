"""Write side (CPU tasks): encode and write images, timing rows, tar parts, per-shard finish.

Layout "files": one object per image. Layout "tar": each encode task stages its images of a
shard as one tar part; finish_shard merges them into <out>/shards/<shard>.tar and then writes
the shard's done marker. Torch-free: Ray's encode/finish workers import only this.
"""

from __future__ import annotations

import datetime as dt
import io
import time
import uuid
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pid_batch import codecs, storage
from pid_batch.job import JobConfig
from pid_batch.layout import (
    Batch,
    cell_str,
    image_uri,
    marker_uri,
    objects,
    staging_uri,
    tar_uri,
    timing_dir,
    unpack_image,
)


def encode_write(batch: Batch, job: JobConfig) -> Batch:
    """Encode and write each ok image, then the batch's timing rows (rows last, after images).

    Layout "files": one object per image. Layout "tar": the batch's images of each shard go
    into one staged tar part, merged into <out>/shards/<shard>.tar when the shard completes.
    """
    out = job.output
    fmt, quality = job.images.image_format, job.images.quality
    ext = codecs.IMAGE_FORMATS[fmt]
    tar = job.images.layout == "tar"
    n = len(batch["id"])
    rows: list[dict[str, Any]] = []
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
                    output = f"shards/{key}.tar:{codecs.tar_key(sid)}.{ext}"
                else:
                    uri = image_uri(out, sid, fmt)
                    storage.write_bytes_atomic(uri, data)
                    output = uri[len(out.rstrip("/")) + 1 :]
                t2 = time.perf_counter()
            except Exception as e:
                status[i] = "error"
                error[i] = f"write failed: {type(e).__name__}: {storage.redact(str(e))}"
            else:
                row.update(
                    encode_ms=(t1 - t0) * 1000,
                    write_ms=(t2 - t1) * 1000,
                    bytes=len(data),
                    output=output,
                )
        if status[i] == "ok" and "baseline" in batch and len(batch["baseline"][i]):
            try:
                data = codecs.encode_image(unpack_image(batch["baseline"][i]), fmt, quality)
                if tar:
                    member = f"{codecs.tar_key(sid)}.baseline.{ext}"
                    staged[key].append((member, data))
                    row["baseline_output"] = f"shards/{key}.tar:{member}"
                else:
                    uri = storage.join(out, "baseline", f"{sid}.{ext}")
                    storage.write_bytes_atomic(uri, data)
                    row["baseline_output"] = uri[len(out.rstrip("/")) + 1 :]
                row["baseline_bytes"] = len(data)
            except Exception as e:  # the PiD image is written; report the missing baseline
                error[i] = f"baseline write failed: {storage.redact(str(e))}"
        row["status"], row["error"] = status[i], error[i]
        row["finished_at"] = _ts(time.time())
        rows.append(row)
    part = uuid.uuid4().hex[:16]
    for key, members in staged.items():  # staged tar parts first: rows must follow their images
        t0 = time.perf_counter()
        try:  # write_bytes_atomic retries transient errors; what is left is permanent
            storage.write_bytes_atomic(staging_uri(out, key, part), codecs.build_tar(members))
        except Exception as e:
            _fail(rows, status, error, key, f"write failed: {_reason(e)}")
            continue
        share = (time.perf_counter() - t0) * 1000 / max(1, len(members) // 2)
        for r in rows:
            if r["shard"] == key and r["status"] == "ok":
                r["write_ms"] = share
    by_shard: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_shard[r["shard"]].append(r)
    for key, part_rows in by_shard.items():
        buf = io.BytesIO()
        pq.write_table(codecs.timing_table(part_rows), buf)
        try:
            storage.write_bytes_atomic(
                storage.join(timing_dir(out, key), f"part-{part}.parquet"), buf.getvalue()
            )
        except Exception as e:  # no row on disk: the returned rows carry the reason instead
            _fail(rows, status, error, key, f"timing write failed: {_reason(e)}", every=True)
    return {
        "id": np.asarray(batch["id"], dtype=object),
        "shard": np.asarray(batch["shard"], dtype=object),
        "shard_pending": np.asarray(batch["shard_pending"], dtype=np.int64),
        "status": np.asarray(status, dtype=object),
        "error": objects(error),
        "decode_ms": np.asarray(batch.get("decode_ms", np.zeros(n)), dtype=np.float32),
        "decode_started_at": np.asarray(
            batch.get("decode_started_at", np.zeros(n)), dtype=np.float64
        ),
    }


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {storage.redact(str(exc))}"


def _fail(
    rows: list[dict], status: list[str], error: list, key: str, reason: str, every: bool = False
) -> None:
    """Mark shard `key`'s ok rows (every row, if `every`) failed with `reason`; none claims output."""
    for i, r in enumerate(rows):
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


def assemble_tar(job: JobConfig, key: str, attempts: int = 20) -> int:
    """Merge a shard's staged parts into <out>/shards/<shard>.tar; the number of members.

    The final tar is the union of what it held and the parts read now, written with a
    compare-and-swap on its version: a finisher that raced another re-reads and retries, so no
    member is dropped. Only the parts merged into a written tar are deleted, after the write; a
    crash in between merges them again (same names, kept once).
    """
    out = job.output
    final = tar_uri(out, key)
    for _ in range(attempts):
        before = storage.version(final)
        members: dict[str, bytes] = {}
        if before is not None:
            try:
                members.update(codecs.read_tar(storage.read_bytes(final)))
            except FileNotFoundError:
                continue  # replaced or removed since version(): read again
        parts = storage.list_files(storage.join(out, "_staging", key), suffixes=(".tar",))
        merged = []
        for uri in parts:
            try:
                data = storage.read_bytes(uri)
            except FileNotFoundError:
                continue  # another finisher merged and deleted it: it is in the tar it wrote
            for name, payload in codecs.read_tar(data).items():
                members.setdefault(name, payload)  # a retried task may have staged a sample twice
            merged.append(uri)
        if not merged:
            if storage.version(final) == before:
                return len(members)
            continue
        if storage.replace_if(final, codecs.build_tar(sorted(members.items())), before):
            for uri in merged:
                storage.delete(uri)
            return len(members)
    raise RuntimeError(f"tar for shard {key!r} kept changing under {attempts} merge attempts")


def finish_shard(job: JobConfig, key: str, fingerprint: str, all_ok: bool) -> None:
    """A shard whose rows are all in: merge its tar (tar layout), then, when every sample is
    ok, its done marker for this content of the input, last."""
    if job.images.layout == "tar":
        assemble_tar(job, key)
    if all_ok:
        storage.write_json_atomic(
            marker_uri(job.output, key), {"shard": key, "fingerprint": fingerprint}
        )


def _ts(epoch_s: float) -> dt.datetime:
    """A UTC timestamp cell."""
    return dt.datetime.fromtimestamp(epoch_s, tz=dt.UTC)


def _timing_row(batch: Batch, i: int, job: JobConfig) -> dict[str, Any]:
    def get(k, default=None):
        return batch[k][i] if k in batch else default

    started = get("decode_started_at")
    read_done = float(get("read_done_at"))
    return {
        "id": str(get("id")),
        "shard": str(get("shard")),
        "index": int(get("index")),
        "backbone": str(get("backbone")),
        "variant": job.model.variant_label,
        "checkpoint": job.model.spec.experiment,
        "height": int(get("height")),
        "width": int(get("width")),
        "steps": job.sampling.steps,
        "seed": int(get("seed")),
        "sigma": None if np.isnan(float(get("sigma"))) else float(get("sigma")),
        "read_ms": float(get("read_ms")),
        "queue_ms": float(get("queue_ms", 0.0)),
        "decode_ms": float(get("decode_ms", 0.0)),
        "text_ms": float(get("text_ms", 0.0)),
        "encode_ms": 0.0,
        "write_ms": 0.0,
        "bytes": 0,
        "node": cell_str(get("node")),
        "node_id": cell_str(get("node_id")) or None,  # "" on the rows: not known
        "accelerator": cell_str(get("accelerator")),
        "accelerator_class": cell_str(get("accelerator_class")) or None,
        "actor": cell_str(get("actor")),
        "batch_size": int(get("micro_batch", 0)),
        "started_at": _ts(float(started) if started is not None else read_done),
        "output": None,
        "crop": cell_str(get("crop")),
        "resize": cell_str(get("resize")) or None,
        "tile_height": int(get("tile_height", 0)) or None,
        "tile_width": int(get("tile_width", 0)) or None,
        "tile_overlap": int(get("tile_overlap", 0)) if int(get("tiles", 0)) else None,
        "tiles": int(get("tiles", 0)) or None,
        "vae_encode_ms": float(get("vae_encode_ms", 0.0)),
        "baseline_ms": float(get("baseline_ms", 0.0)) or None,
        "source_id": cell_str(get("source_id")) or None,
        "input_fingerprint": cell_str(get("fingerprint")),
    }
