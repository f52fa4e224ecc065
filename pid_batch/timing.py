"""The timing table on storage: one listing of <out>/timing/, a shard's rows, compaction.

A shard's rows live in parts <out>/timing/<key>/part-*.parquet (one per encode batch) until the
shard finishes; then they are folded into <out>/timing/<key>.parquet, whose metadata names the
parts it absorbed, and the parts are deleted. A reader skips absorbed parts, so a crash between
the fold and the deletes reads as the same rows. Torch-free and Ray-free.
"""

from __future__ import annotations

import io
import json
from collections import defaultdict

import pyarrow as pa
import pyarrow.parquet as pq

from pid_batch import codecs, storage
from pid_batch.stages.layout import relative, timing_dir, timing_uri

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
        rel = relative(root, e.uri)
        head, sep, _ = rel.partition("/")
        found[head if sep else rel[: -len(".parquet")]].append(e)
    for entries in found.values():
        entries.sort(key=lambda e: "/" in relative(root, e.uri))  # the compacted table first
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
    return codecs.conform_timing_table(pa.concat_tables(tables, promote_options="default"))


def _listed(uri: str) -> list[str]:
    try:
        return storage.list_files(uri, suffixes=(".parquet",))
    except FileNotFoundError:
        return []


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
