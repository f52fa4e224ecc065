"""The timing table: its schema, building and checking rows, where it lives, writing a part,
reading it back (one row per sample), compaction, and grouping its errors by reason.

A shard's rows live in parts <out>/timing/<key>/part-*.parquet (one per encode batch) until the
shard finishes; then they are folded into <out>/timing/<key>.parquet, whose metadata names the
parts it absorbed, and the parts are deleted. A reader skips absorbed parts, so a crash between
the fold and the deletes reads as the same rows. Torch-free and Ray-free; depends on storage only.
"""

from __future__ import annotations

import io
import json
import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pid_batch import storage

# ---------------------------------------------------------------------------------------------
# Schema and rows

_REQUIRED = ("id", "shard", "index", "status")
_MS = pa.float32()
_TS = pa.timestamp("ms", tz="UTC")
TIMING_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("index", pa.int32(), nullable=False),  # position of the sample in its shard
        pa.field("status", pa.string(), nullable=False),  # "ok" | "error"
        pa.field("error", pa.string()),  # redacted message when status == "error"
        pa.field("backbone", pa.string()),
        pa.field("variant", pa.string()),
        pa.field("checkpoint", pa.string()),
        pa.field("height", pa.int32()),  # output pixels
        pa.field("width", pa.int32()),
        pa.field("steps", pa.int16()),
        pa.field("seed", pa.int64()),
        pa.field("sigma", pa.float32()),
        pa.field("read_ms", _MS),  # this sample's share of reading + parsing its shard
        pa.field("queue_ms", _MS),  # parsed → decoder start
        pa.field("decode_ms", _MS),  # this sample's share of its decoder batch
        pa.field("text_ms", _MS),  # this sample's share of caption encoding (text encoder)
        pa.field("encode_ms", _MS),
        pa.field("write_ms", _MS),
        pa.field("bytes", pa.int64()),  # encoded output size
        pa.field("node", pa.string()),  # host name of the decode actor's machine
        pa.field("accelerator", pa.string()),  # the device as the decoder names it
        pa.field("actor", pa.string()),
        pa.field("micro_batch", pa.int32()),  # the micro-batch the decoder ran this sample in
        pa.field("started_at", _TS),
        pa.field("finished_at", _TS),
        pa.field("output", pa.string()),  # object key or tar member
        pa.field("crop", pa.string()),  # for image inputs: the crop that was taken
        # image inputs with images.target_long_side: "WxH" the image was resized to before the
        # crop (the crop's coordinates are in the resized image); null: not resized
        pa.field("resize", pa.string()),
        # tiled decodes: tile size, minimum overlap (px) and tile count; null: decoded whole
        pa.field("tile_height", pa.int32()),
        pa.field("tile_width", pa.int32()),
        pa.field("tile_overlap", pa.int32()),
        pa.field("tiles", pa.int32()),
        pa.field("vae_encode_ms", _MS),  # image inputs: VAE encode share
        pa.field("baseline_ms", _MS),  # native VAE decode of the same latent
        pa.field("baseline_bytes", pa.int64()),
        pa.field("baseline_output", pa.string()),
        pa.field("source_id", pa.string()),  # id as the input gave it (null: none, or old parts)
        # The input shard's identity when this row was made (resume.fingerprint): rows of an
        # earlier content of the same shard are superseded. Null in tables written before it.
        pa.field("input_fingerprint", pa.string()),
        # Version 2: where the decode actor ran, for jobs over many nodes (several share a host).
        pa.field("node_id", pa.string()),  # the Ray node id (hex)
        # The node's accelerator class (its pid-batch/accelerator or ray.io/accelerator-type
        # label, e.g. "rtx", "GB200"), which keys per-class settings such as micro_batch.
        pa.field("accelerator_class", pa.string()),
    ],
    metadata={"pid_batch.timing_version": "3"},
)
# Columns renamed since version 1, old name → new (version 3: `batch_size` said "rows per call"
# to readers of the job's resources.batch_size; the column always held the micro-batch).
TIMING_RENAMED = {"batch_size": "micro_batch"}


def conform_timing_table(t: pa.Table) -> pa.Table:
    """A timing table read back in TIMING_SCHEMA's columns and order: renamed columns under
    their new names (old and new parts read together are merged), columns added since it was
    written filled with nulls (every column after `index`/`status` is nullable)."""
    for old, new in TIMING_RENAMED.items():
        if old in t.column_names:
            col = t.column(old).cast(TIMING_SCHEMA.field(new).type)
            if new in t.column_names:
                col = pc.coalesce(t.column(new), col)
                t = t.drop_columns([new])
            t = t.drop_columns([old]).append_column(TIMING_SCHEMA.field(new), col)
    missing = [f for f in TIMING_SCHEMA if f.name not in t.column_names]
    for f in missing:
        t = t.append_column(f, pa.nulls(t.num_rows, f.type))
    return t if t.column_names == TIMING_SCHEMA.names else t.select(TIMING_SCHEMA.names)


def timing_table(rows: list[dict]) -> pa.Table:
    """Timing rows → a table with TIMING_SCHEMA; absent nullable columns become null.

    Timestamps may be aware datetimes or epoch seconds (int/float).
    """
    known = set(TIMING_SCHEMA.names)
    norm = []
    for i, row in enumerate(rows):
        if extra := sorted(set(row) - known):
            raise ValueError(f"timing row {i} has unknown columns {extra}")
        if missing := [c for c in _REQUIRED if row.get(c) is None]:
            raise ValueError(f"timing row {i} lacks required columns {missing}: {row!r}")
        row = dict(row)
        for c in ("started_at", "finished_at"):
            if isinstance(row.get(c), (int, float, np.integer, np.floating)):
                row[c] = datetime.fromtimestamp(float(row[c]), tz=UTC)
        norm.append(row)
    table = pa.Table.from_pylist(norm, schema=TIMING_SCHEMA)
    validate_timing_table(table)
    return table


def validate_timing_table(t: pa.Table) -> None:
    """Raise ValueError unless t has exactly TIMING_SCHEMA's columns/types and valid status rows."""
    names = set(t.column_names)
    missing = [c for c in TIMING_SCHEMA.names if c not in names]
    extra = sorted(names - set(TIMING_SCHEMA.names))
    if missing or extra:
        raise ValueError(f"timing table columns differ: missing {missing}, unexpected {extra}")
    for field in TIMING_SCHEMA:
        got = t.schema.field(field.name).type
        if got != field.type:
            raise ValueError(f"timing column {field.name!r} has type {got}, expected {field.type}")
    for c in _REQUIRED:
        if t.column(c).null_count:
            raise ValueError(f"timing column {c!r} has {t.column(c).null_count} nulls")
    bad = set(pc.unique(t.column("status")).to_pylist()) - {"ok", "error"}
    if bad:
        raise ValueError(f"timing status must be 'ok' or 'error', got {sorted(bad)}")
    no_msg = pc.sum(
        pc.and_(pc.equal(t.column("status"), "error"), pc.is_null(t.column("error")))
    ).as_py()
    if no_msg:
        raise ValueError(f"{no_msg} timing rows have status 'error' but no error message")


def job_columns(job: Any) -> dict[str, Any]:
    """The columns every row of a job carries whatever befell the sample (job: a JobConfig)."""
    return {
        "variant": job.model.variant_label,
        "checkpoint": job.model.spec.experiment,
        "steps": job.sampling.steps,
    }


# ---------------------------------------------------------------------------------------------
# Where it lives, writing a part


def timing_dir(out: str, key: str) -> str:
    """<out>/timing/<shard key>/: the shard's timing parts (Parquet), one per encode batch."""
    return storage.join(out, "timing", key)


def timing_uri(out: str, key: str) -> str:
    """<out>/timing/<shard key>.parquet: the shard's parts compacted into one table once it
    finishes (compact); its metadata names the parts it absorbed."""
    return storage.join(out, "timing", f"{key}.parquet")


def write_part(out: str, key: str, name: str, table: pa.Table) -> None:
    """Write shard `key`'s rows (a timing_table) as its part <out>/timing/<key>/<name>: atomic,
    retried; the same name overwrites, so a retried task that names its part as the first try
    did leaves one part."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes_atomic(storage.join(timing_dir(out, key), name), buf.getvalue())


# ---------------------------------------------------------------------------------------------
# Reading back

READ_THREADS = 32  # shards of an output read side by side
ABSORBED = b"pid_batch.absorbed"  # metadata key of a compacted table: JSON list of part names


def absorbed_parts(table: pa.Table) -> set[str]:
    """Names of the parts a compacted table holds (empty for a part)."""
    raw = (table.schema.metadata or {}).get(ABSORBED)
    return set(json.loads(raw)) if raw else set()


def index(out: str) -> dict[str, list[storage.Entry]]:
    """shard key → its timing objects (compacted table first, then parts), from one paginated
    listing of <out>/timing/."""
    root = storage.join(out, "timing")
    found: dict[str, list[storage.Entry]] = defaultdict(list)
    for e in storage.list_entries(root, suffixes=(".parquet",)):
        rel = e.uri[len(root) + 1 :]
        head, sep, _ = rel.partition("/")
        found[head if sep else rel[: -len(".parquet")]].append(e)
    for entries in found.values():
        entries.sort(key=lambda e: "/" in e.uri[len(root) + 1 :])  # the compacted table first
    return dict(found)


def _read(uri: str) -> pa.Table | None:
    try:
        return pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    except FileNotFoundError:  # compacted (and deleted) since the listing
        return None


def shard_rows(out: str, key: str, entries: list[storage.Entry] | None = None) -> pa.Table | None:
    """Every row written for a shard (attempts repeat), from its compacted table and the parts
    it has not absorbed; None when it has none. entries: from index(), or listed here."""
    if entries is None:
        entries = [
            storage.Entry(u, 0, 0)
            for u in [timing_uri(out, key)] + _listed(timing_dir(out, key))
            if u != timing_uri(out, key) or storage.exists(u)
        ]
    tables: list[pa.Table] = []
    skip: set[str] = set()
    compacted = timing_uri(out, key)
    for e in entries:
        if e.uri == compacted:
            t = _read(e.uri)
            if t is None:  # replaced under us: read the shard again from scratch
                return shard_rows(out, key)
            skip = absorbed_parts(t)
        elif e.uri.rsplit("/", 1)[1] in skip:
            continue
        else:
            t = _read(e.uri)
            if t is None:  # folded into the compacted table since the listing
                return shard_rows(out, key)
        tables.append(t.replace_schema_metadata(None))
    if not tables:
        return None
    # Parts of older versions lack the newer columns.
    return conform_timing_table(pa.concat_tables(tables, promote_options="default"))


def _listed(uri: str) -> list[str]:
    try:
        return storage.list_files(uri, suffixes=(".parquet",))
    except FileNotFoundError:
        return []


def read_timing(out: str) -> pa.Table:
    """All timing rows under `<out>/timing/`, one row per sample (see latest_per_id)."""
    return latest_per_id(read_timing_parts(out))


def read_timing_parts(out: str) -> pa.Table:
    """Every row written under `<out>/timing/` (attempts repeat), compacted tables included."""
    idx = index(out)
    if not idx:
        return TIMING_SCHEMA.empty_table()
    with ThreadPoolExecutor(min(READ_THREADS, len(idx))) as pool:
        tables = [t for t in pool.map(lambda kv: shard_rows(out, *kv), idx.items()) if t]
    if not tables:
        return TIMING_SCHEMA.empty_table()
    return pa.concat_tables(tables, promote_options="default")


def _current_mask(table: pa.Table, current: dict[str, str]) -> pa.ChunkedArray:
    """Rows of a current input shard made from its current content (or before fingerprints)."""
    fp = table.column("input_fingerprint")
    pairs = pc.binary_join_element_wise(table.column("shard"), fp, "\x00")
    want = pa.array([f"{k}\x00{v}" for k, v in current.items()], pa.string())
    in_input = pc.is_in(table.column("shard"), value_set=pa.array(list(current), pa.string()))
    return pc.and_(in_input, pc.or_(pc.is_null(fp), pc.fill_null(pc.is_in(pairs, want), False)))


def orphans(raw: pa.Table, current: dict[str, str]) -> dict[str, int]:
    """Rows no current input accounts for: shards deleted from the input, or old content."""
    if raw.num_rows == 0:
        return {"rows": 0, "shards": 0}
    gone = raw.filter(pc.invert(_current_mask(raw, current)))
    return {"rows": gone.num_rows, "shards": len(pc.unique(gone.column("shard")))}


def latest_per_id(table: pa.Table, current: dict[str, str] | None = None) -> pa.Table:
    """One row per sample (shard, index): the latest attempt of the current content wins.

    - current (shard key → fingerprint, from the run's plan): rows of other shards or of other
      content are dropped. Without it, each shard's current content is that of its latest row.
    - A shard-level error row (index -1, "shard unreadable") is dropped once the shard was read
      (it has rows of its samples).
    - Of the rest, an ok row beats an error row, then the latest wins. Keyed by position, not
      id: a repeated id is a sample of its own whose error row must be counted.
    Vectorised (Arrow and numpy): no Python object per row.
    """
    if table.num_rows == 0:
        return table
    if "input_fingerprint" not in table.column_names:
        table = table.append_column("input_fingerprint", pa.nulls(table.num_rows, pa.string()))
    fin = table.column("finished_at").cast(pa.int64()).to_numpy(zero_copy_only=False)
    shard = pc.dictionary_encode(table.column("shard").combine_chunks())
    code = shard.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    if current is None:  # each shard's current content: that of its latest row
        fp = table.column("input_fingerprint").to_numpy(zero_copy_only=False)
        last = np.lexsort((fin, code))
        ends = np.r_[np.nonzero(np.diff(code[last]))[0], len(last) - 1]
        latest = np.empty(len(shard.dictionary), dtype=object)
        latest[code[last[ends]]] = fp[last[ends]]
        col = table.column("input_fingerprint")
        same = pc.fill_null(pc.equal(col, pa.array(latest[code], pa.string())), False)
        keep = pc.or_(pc.is_null(col), same)
    else:
        keep = _current_mask(table, current)
    keep = keep.to_numpy(zero_copy_only=False).astype(bool)
    index = table.column("index").to_numpy(zero_copy_only=False).astype(np.int64)
    read = np.zeros(len(shard.dictionary), dtype=bool)
    read[code[keep & (index >= 0)]] = True
    keep &= ~((index < 0) & read[code])
    ok = pc.equal(table.column("status"), "ok").to_numpy(zero_copy_only=False).astype(np.int8)
    rows = np.nonzero(keep)[0]
    if rows.size == 0:  # e.g. a shard no longer in the input
        return table.slice(0, 0)
    order = rows[np.lexsort((fin[rows], ok[rows], index[rows], code[rows]))]
    last_of_group = np.r_[
        (code[order][1:] != code[order][:-1]) | (index[order][1:] != index[order][:-1]), True
    ]
    return table.take(pa.array(np.sort(order[last_of_group]), pa.int64()))


# ---------------------------------------------------------------------------------------------
# Compaction


def compact(out: str, key: str, attempts: int = 20) -> int:
    """Fold a shard's parts into <out>/timing/<key>.parquet; how many parts it took.

    The table is replaced by compare-and-swap on its version (a racing finisher re-reads and
    tries again), its metadata lists the parts it absorbed, and the parts are deleted after.
    """
    dest = timing_uri(out, key)
    for _ in range(attempts):
        before = storage.version(dest)
        tables, skip = [], set()
        if before is not None:
            t = _read(dest)
            if t is None:
                continue
            tables.append(t)
            skip = absorbed_parts(t)
        absorbed = []
        for uri in _listed(timing_dir(out, key)):
            name = uri.rsplit("/", 1)[1]
            if name not in skip:  # absorbed ones: in the table already (a crash before delete)
                t = _read(uri)
                if t is None:
                    continue  # folded by another finisher since the listing
                tables.append(t.replace_schema_metadata(None))
            absorbed.append(name)
        if not absorbed:
            return 0
        table = pa.concat_tables(tables, promote_options="default")
        meta = {**(tables[0].schema.metadata or {}), ABSORBED: json.dumps(absorbed).encode()}
        buf = io.BytesIO()
        pq.write_table(table.replace_schema_metadata(meta), buf)
        if storage.replace_if(dest, buf.getvalue(), before):
            for name in absorbed:
                storage.delete(storage.join(timing_dir(out, key), name))
            return len(absorbed)
    raise RuntimeError(f"timing of shard {key!r} kept changing under {attempts} attempts")


# ---------------------------------------------------------------------------------------------
# Errors by reason

_PREFIX = re.compile(r"^\S+\[\d+\] id=(?:'[^']*'|\"[^\"]*\"): ")


REASON_CHARS = 240  # a group's key, also what the summary prints: one line of a wide terminal


def error_reason(message: str | None) -> str:
    """The reason of an error message, for grouping: without its shard/id prefix, quoted ids,
    an unreadable shard's name, and numbers, so alike errors group. The one grouping of
    summary.json, `pid-batch summary`, `inspect`, the report and a run's own error counts."""
    msg = _PREFIX.sub("", message or "unknown")
    msg = re.sub(r"sample (?:'[^']*'|\"[^\"]*\"): ", "", msg)  # decoder/latent errors
    msg = re.sub(r"\b(id=?\s?)('[^']*'|\"[^\"]*\")", r"\1…", msg)  # "duplicate id 'x'"
    msg = re.sub(r"^(shard unreadable: shard )\S+: ", r"\1…: ", msg)  # codecs.ShardError
    msg = re.sub(r"\b\d+(\.\d+)?\b", "N", msg)  # counts and sizes; not names (sd3, 4step)
    return msg[:REASON_CHARS]


def errors_by_reason(table: pa.Table) -> dict[str, tuple[int, str]]:
    """A timing table's error rows grouped by error_reason: reason → (rows, an example id), the
    most frequent first. Counted in Arrow per distinct message: Python sees each message once."""
    errs = table.filter(pc.equal(table.column("status"), "error")) if table.num_rows else table
    if not errs.num_rows:
        return {}
    per_msg = errs.group_by("error", use_threads=False).aggregate(
        [("id", "count"), ("id", "first")]
    )
    counts: dict[str, list] = {}
    for msg, n, example in zip(*(per_msg.column(c).to_pylist() for c in per_msg.column_names)):
        entry = counts.setdefault(error_reason(msg), [0, example])
        entry[0] += n
    return {r: (n, ex) for r, (n, ex) in sorted(counts.items(), key=lambda kv: -kv[1][0])}
