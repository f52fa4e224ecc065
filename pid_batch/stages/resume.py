"""What a run still has to do: shards and done ids (resume), duplicate ids, lost samples.

Torch-free: the driver and Ray's id-listing tasks import it.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pid_batch import codecs, storage, timing
from pid_batch.job import IMAGE_SUFFIXES, JobConfig, JobConfigError
from pid_batch.stages.layout import (
    image_sample_id,
    legacy_tar_uri,
    marked_fingerprint,
    marker_uri,
    objects,
    relative,
    shard_key,
    tar_uri,
)
from pid_batch.stages.rows import Batch


@dataclass
class Shard:
    """One input shard as planned: URI, output key, identity, and (image inputs) its files."""

    uri: str
    key: str
    fingerprint: str
    files: list[str] | None = None  # image inputs: the pseudo-shard's image files

    def task(self, done: list[str]) -> dict[str, Any]:
        """The row the read stage gets for this shard (done: ids with a current ok row)."""
        return {
            "shard": self.uri,
            "key": self.key,
            "files": self.files,
            "fingerprint": self.fingerprint,
            "done_ids": done,
        }


@dataclass
class Plan:
    """What a run has to do, decided from one listing of the input and of the output's markers."""

    shards: list[Shard]  # every current input shard, in listing order
    todo: list[dict[str, Any]]  # read-stage rows of the shards still to do (Shard.task)
    skipped: int  # shards already done with this content
    changed: list[Shard] = field(default_factory=list)  # done or begun with other content

    @property
    def current(self) -> dict[str, str]:
        """shard key → fingerprint of the input as listed now (summary keeps only these rows)."""
        return {s.key: s.fingerprint for s in self.shards}


def fingerprint(entries: list[storage.Entry], input_uri: str) -> str:
    """A shard's identity: its files' paths under the input, sizes and modification times.

    Replacing a shard's content changes it (S3: a new LastModified, 1 s resolution; local:
    nanoseconds). Cheap: it comes from the listing, no shard is read.
    """
    h = hashlib.sha256()
    for e in entries:
        h.update(f"{relative(input_uri, e.uri)}\0{e.size}\0{e.mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def list_shards(job: JobConfig) -> list[Shard]:
    """The job's input as shards, with keys checked to be unique; JobConfigError when empty.

    Image inputs are grouped into pseudo-shards of `images_per_shard` files in sorted order,
    keyed by their first and last file, so a rerun over the same archive finds the same keys.
    """
    if job.input_kind == "images":
        files = storage.list_entries(job.input, suffixes=IMAGE_SUFFIXES)
        _refuse_collisions((image_sample_id(job.input, e.uri), e.uri) for e in files)
        step = job.images_per_shard
        shards = []
        for i in range(0, len(files), step):
            chunk = files[i : i + step]
            digest = hashlib.sha256(f"{chunk[0].uri}\n{chunk[-1].uri}".encode()).hexdigest()[:12]
            shards.append(
                Shard(
                    uri=chunk[0].uri,
                    key=f"images-{i // step:06d}-{digest}",
                    fingerprint=fingerprint(chunk, job.input),
                    files=[e.uri for e in chunk],
                )
            )
    else:
        files = storage.list_entries(job.input, suffixes=codecs.SHARD_SUFFIXES)
        shards = [
            Shard(e.uri, shard_key(job.input, e.uri), fingerprint([e], job.input)) for e in files
        ]
        _refuse_collisions((s.key, s.uri) for s in shards)
    if not shards:
        raise JobConfigError(
            f"no input {'images' if job.input_kind == 'images' else 'shards'} under {job.input!r}"
        )
    return shards


def _refuse_collisions(names) -> None:
    """Two inputs that would share one output name: refuse before anything is written."""
    first: dict[str, str] = {}
    for name, uri in names:
        other = first.setdefault(name, uri)
        if other != uri:
            raise JobConfigError(
                f"inputs {other!r} and {uri!r} would both be written as {name!r}; "
                "rename one of them"
            )


PLAN_THREADS = 32  # objects read side by side while planning (each is a round trip)


def plan_shards(job: JobConfig) -> Plan:
    """Which shards to do, from one listing each of the input, `<out>/_done/` and
    `<out>/timing/` (the three side by side), then the markers and the unfinished shards' timing
    rows read in parallel: no step is sequential per shard.

    A shard is done when its marker records its current fingerprint (a marker written before
    fingerprints, with none, is trusted as it is). A shard whose marker or timing rows carry
    another fingerprint has changed: `job.changed_inputs` says whether it is decoded again
    (supersede() clears its marker and tars first) or the run is refused. Writes nothing.
    """
    with ThreadPoolExecutor(3) as pool:
        shards_f = pool.submit(list_shards, job)
        done_f = pool.submit(_listed_entries, storage.join(job.output, "_done"), (".json",))
        timing_f = pool.submit(timing.index, job.output)
        shards, done_listing, rows_index = shards_f.result(), done_f.result(), timing_f.result()
    marked = _markers(job.output, {s.key for s in shards}, done_listing)
    open_shards = [
        s for s in shards if not (s.key in marked and marked[s.key] in (None, s.fingerprint))
    ]

    def progress(s: Shard) -> tuple[list[str], bool]:
        if s.key in marked:  # marked with other content: changed, nothing of it counts
            return [], True
        if s.key not in rows_index:
            return [], False
        return done_ids(job.output, s.key, s.fingerprint, rows_index[s.key])

    todo, changed = [], []
    if open_shards:
        with ThreadPoolExecutor(min(PLAN_THREADS, len(open_shards))) as pool:
            for s, (ok_ids, other) in zip(open_shards, pool.map(progress, open_shards)):
                if other:
                    changed.append(s)
                    ok_ids = []
                todo.append(s.task(ok_ids))
    if changed and job.changed_inputs == "refuse":
        names = ", ".join(repr(s.uri) for s in changed[:5])
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        raise JobConfigError(
            f"{len(changed)} input shard(s) changed since they were decoded: {names}{more}; "
            "restore them, use a new output prefix, or set changed_inputs: redo"
        )
    return Plan(shards=shards, todo=todo, skipped=len(shards) - len(open_shards), changed=changed)


def supersede(job: JobConfig, changed: list[Shard]) -> None:
    """Before a changed shard is decoded again, remove what its old content produced: images
    (layout "files"), tars and their claims, staged parts, timing rows, and done markers last,
    so that a crash half-way leaves a marker or rows that still flag the shard as changed on the
    next plan. Shards side by side."""
    if not changed:
        return
    out = job.output

    def one(s: Shard) -> None:
        rows = timing.shard_rows(out, s.key)
        for col in ("output", "baseline_output"):
            if rows is None or col not in rows.column_names:
                continue
            for rel in rows.column(col).drop_null().to_pylist():
                if ":" not in rel:  # "shards/<key>-*.tar:<member>" goes with the tars
                    storage.delete(storage.join(out, rel))
        claims = _listed(storage.join(out, "_tars", s.key), suffixes=(".json",))
        for uri in claims:
            storage.delete(tar_uri(out, s.key, int(uri.rsplit("/", 1)[1][: -len(".json")])))
        storage.delete(legacy_tar_uri(out, s.key))
        parts = _listed(timing.timing_dir(out, s.key), suffixes=(".parquet",))
        for uri in _listed(storage.join(out, "_staging", s.key)) + claims + parts:
            storage.delete(uri)
        storage.delete(timing.timing_uri(out, s.key))
        storage.delete(marker_uri(out, s.key))

    with ThreadPoolExecutor(min(PLAN_THREADS, len(changed))) as pool:
        list(pool.map(one, changed))


def _listed(uri: str, suffixes: tuple[str, ...] | None = None) -> list[str]:
    try:
        return storage.list_files(uri, suffixes=suffixes)
    except FileNotFoundError:
        return []


def _listed_entries(uri: str, suffixes: tuple[str, ...]) -> list[storage.Entry]:
    try:
        return storage.list_entries(uri, suffixes=suffixes)
    except FileNotFoundError:
        return []


def _markers(
    out: str, keys: set[str], listing: list[storage.Entry] | None = None
) -> dict[str, str | None]:
    """shard key → the fingerprint its done marker records (None: a marker written before
    fingerprints), for the given keys; from one listing of <out>/_done/ (given, or made here),
    then the markers read side by side (each is a small object; the time is round trips)."""
    root = storage.join(out, "_done")
    if listing is None:
        listing = _listed_entries(root, (".json",))
    found = {}
    for e in listing:
        key = relative(root, e.uri)[: -len(".json")]
        if key in keys:
            found[key] = e.uri
    if not found:
        return {}
    with ThreadPoolExecutor(min(PLAN_THREADS, len(found))) as pool:
        return dict(zip(found, pool.map(marked_fingerprint, found.values()), strict=True))


def done_ids(
    out: str, key: str, fp: str | None = None, entries: list[storage.Entry] | None = None
) -> tuple[list[str], bool]:
    """Ids of a shard with an ok timing row (so their image was written before it), and whether
    any row was made from other content than `fp` (the shard changed; rows written before
    fingerprints existed count as this content). entries: the shard's timing.index() entry."""
    import pyarrow.compute as pc

    t = timing.shard_rows(out, key, entries)
    if t is None:
        return [], False
    f = t.column("input_fingerprint")
    if fp is not None:
        other = pc.fill_null(pc.not_equal(f, fp), False)
        if pc.any(other).as_py():
            return [], True
    ok = t.filter(pc.equal(t.column("status"), "ok")).column("id")
    return sorted(pc.unique(ok).to_pylist()), False


def shard_ids(uri: str, key: str | None = None) -> list[str]:
    """A shard's sample ids without its latents: a safetensors header, a Parquet id column.

    key: the shard's output key, whose stem prefixes the ids of samples without one (as the read
    stage names them); default the file name's."""
    stem = codecs.id_stem(key) if key else None
    if uri.lower().endswith(".safetensors"):
        head = storage.read_range(uri, 0, codecs.SAFETENSORS_PREFIX_BYTES)
        end = codecs.safetensors_header_bytes(head, uri)
        data = head + storage.read_range(uri, len(head), end - len(head))
        return codecs.read_shard_ids(data, uri, stem, size=storage.size(uri))
    return codecs.read_shard_ids(storage.read_bytes(uri), uri, stem)


def list_ids(batch: Batch) -> Batch:
    """Shard rows (order, shard URI, key) → one (order, index, id) row per sample; unreadable shards
    give none (they become one error row when read)."""
    order, index, ids = [], [], []
    for o, uri, key in zip(batch["order"], batch["shard"], batch["key"]):
        try:
            found = shard_ids(str(uri), str(key))
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
            found = [(sid, i) for i, sid in enumerate(shard_ids(item["shard"], item["key"]))]
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
                **timing.job_columns(job),
                "input_fingerprint": item["fingerprint"],
                "started_at": now,
                "finished_at": now,
            }
            for sid, i in lost
        ]
        name = f"part-lost-{uuid.uuid4().hex[:12]}.parquet"
        timing.write_part(job.output, item["key"], name, timing.timing_table(rows))
    return [sid for sid, _ in lost]
