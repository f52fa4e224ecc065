"""What a run still has to do: shards and done ids (resume), duplicate ids, lost samples.

Torch-free: the driver and Ray's id-listing tasks import it.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
import uuid
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pid_batch import codecs, storage
from pid_batch.job import IMAGE_SUFFIXES, JobConfig, JobConfigError
from pid_batch.layout import Batch, image_sample_id, objects, shard_key, timing_dir


def plan_shards(job: JobConfig) -> tuple[list[dict[str, Any]], int]:
    """Shards still to do (with their already-done ids) and the count of shards already done.

    Image inputs are grouped into pseudo-shards of `images_per_shard` files in sorted order,
    keyed by their first and last file, so a rerun over the same archive finds the same keys.
    """
    if job.input_kind == "images":
        files = storage.list_files(job.input, suffixes=IMAGE_SUFFIXES)
        step = job.images_per_shard
        shards = []
        for i in range(0, len(files), step):
            chunk = files[i : i + step]
            digest = hashlib.sha256(f"{chunk[0]}\n{chunk[-1]}".encode()).hexdigest()[:12]
            shards.append((f"images-{i // step:06d}-{digest}", chunk[0], chunk))
    else:
        files = storage.list_files(job.input, suffixes=(".safetensors", ".parquet"))
        shards = [(shard_key(job.input, uri), uri, None) for uri in files]
    if not shards:
        raise JobConfigError(
            f"no input {'images' if job.input_kind == 'images' else 'shards'} under {job.input!r}"
        )
    try:
        markers = storage.list_files(storage.join(job.output, "_done"), suffixes=(".json",))
    except FileNotFoundError:
        markers = []
    done_markers = {os.path.basename(u)[: -len(".json")] for u in markers}
    todo = [
        {"shard": uri, "key": key, "files": chunk, "done_ids": done_ids(job.output, key)}
        for key, uri, chunk in shards
        if key not in done_markers
    ]
    return todo, len(shards) - len(todo)


def done_ids(out: str, key: str) -> list[str]:
    """Ids of a shard whose ok timing row exists (so their image was written before it)."""
    ids: set[str] = set()
    try:
        parts = storage.list_files(timing_dir(out, key), suffixes=(".parquet",))
    except FileNotFoundError:
        return []
    for uri in parts:
        t = pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=["id", "status"])
        for sid, st in zip(t.column("id").to_pylist(), t.column("status").to_pylist()):
            if st == "ok":
                ids.add(sid)
    return sorted(ids)


def shard_ids(uri: str) -> list[str]:
    """A shard's sample ids without its latents: a safetensors header, a Parquet id column."""
    if uri.lower().endswith(".safetensors"):
        head = storage.read_range(uri, 0, codecs.SAFETENSORS_PREFIX_BYTES)
        end = codecs.safetensors_header_bytes(head, uri)
        data = head + storage.read_range(uri, len(head), end - len(head))
        return codecs.read_shard_ids(data, uri, size=storage.size(uri))
    return codecs.read_shard_ids(storage.read_bytes(uri), uri)


def list_ids(batch: Batch) -> Batch:
    """Shard rows (order, shard URI) → one (order, index, id) row per sample; unreadable shards
    give none (they become one error row when read)."""
    order, index, ids = [], [], []
    for o, uri in zip(batch["order"], batch["shard"]):
        try:
            found = shard_ids(str(uri))
        except Exception:
            continue
        order += [int(o)] * len(found)
        index += range(len(found))
        ids += found
    return {
        "order": np.asarray(order, np.int32),
        "index": np.asarray(index, np.int32),
        "id": objects(ids),
    }


def duplicates_in_parts(keys: list[str], *parts: Batch) -> dict[str, tuple[list[int], list[str]]]:
    """duplicate_reasons over list_ids' outputs (one Ray task combines them)."""
    import pyarrow as pa

    tables = [pa.table(dict(p)) for p in parts if len(p["id"])]
    return duplicate_reasons(pa.concat_tables(tables), keys) if tables else {}


def duplicate_reasons(table, keys: list[str]) -> dict[str, tuple[list[int], list[str]]]:
    """shard key → (indices, reasons) of each id's occurrences after its first in another shard.

    `table` has columns order (position in `keys`), index, id. First = lowest (order, index), so
    every run picks the same winner. Repeats inside one shard are codecs' to report.
    """
    import pyarrow.compute as pc

    if table.num_rows == 0:
        return {}
    counts = table.group_by("id").aggregate([("id", "count")])
    repeated = counts.filter(pc.greater(counts.column("id_count"), 1)).column("id")
    if len(repeated) == 0:
        return {}
    t = table.filter(pc.is_in(table.column("id"), value_set=repeated))
    t = t.sort_by([("order", "ascending"), ("index", "ascending")])
    first: dict[str, tuple[int, int]] = {}
    out: dict[str, tuple[list[int], list[str]]] = defaultdict(lambda: ([], []))
    cols = (
        t.column("id").to_pylist(),
        t.column("order").to_pylist(),
        t.column("index").to_pylist(),
    )
    for sid, o, i in zip(*cols):
        fo, fi = first.setdefault(sid, (o, i))
        if fo != o:
            out[keys[o]][0].append(i)
            out[keys[o]][1].append(f"duplicate id {sid!r}: first in shard {keys[fo]}[{fi}]")
    return dict(out)


LOST_REASON = (
    "lost in the pipeline: the stage that held this sample failed after its retries "
    "(e.g. a sample that kills the decoder on every try); rerun to retry it"
)


def record_lost(job: JobConfig, item: dict[str, Any], seen: set[str]) -> list[str]:
    """Error rows for a shard's samples that never came back this run; returns their ids."""
    if job.input_kind == "images":
        found = [(image_sample_id(job.input, u), i) for i, u in enumerate(item["files"])]
    else:
        try:
            found = [(sid, i) for i, sid in enumerate(shard_ids(item["shard"]))]
        except Exception:  # unreadable: one row stands for the shard, as in read_shard
            found = [(item["key"], -1)]
    done = set(item.get("done_ids") or ())
    lost = [(sid, i) for sid, i in found if sid not in done and sid not in seen]
    if lost:
        now = time.time()
        rows = [
            {
                "id": sid,
                "shard": item["key"],
                "index": i,
                "status": "error",
                "error": LOST_REASON,
                "backbone": job.model.spec.backbone,
                "variant": job.model.variant_label,
                "checkpoint": job.model.spec.experiment,
                "steps": job.sampling.steps,
                "started_at": now,
                "finished_at": now,
            }
            for sid, i in lost
        ]
        buf = io.BytesIO()
        pq.write_table(codecs.timing_table(rows), buf)
        name = f"part-lost-{uuid.uuid4().hex[:12]}.parquet"
        storage.write_bytes_atomic(
            storage.join(timing_dir(job.output, item["key"]), name), buf.getvalue()
        )
    return [sid for sid, _ in lost]
