"""Read a run's timing table back and summarise it: counts, errors, throughput, stage percentiles."""

from __future__ import annotations

import io
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pid_batch import storage

_PREFIX = re.compile(r"^\S+\[\d+\] id=(?:'[^']*'|\"[^\"]*\"): ")


def error_reason(message: str | None) -> str:
    """A sample's error message without its shard/id prefix and numbers, so alike errors group."""
    msg = _PREFIX.sub("", message or "unknown")
    msg = re.sub(r"sample (?:'[^']*'|\"[^\"]*\"): ", "", msg)  # decoder/latent errors
    msg = re.sub(r"\b(id=?\s?)('[^']*'|\"[^\"]*\")", r"\1…", msg)  # "duplicate id 'x'"
    msg = re.sub(r"\d+(\.\d+)?", "N", msg)
    return msg[:120]


STAGES = ("read_ms", "queue_ms", "text_ms", "decode_ms", "encode_ms", "write_ms")


READ_THREADS = 32


def read_timing(out: str) -> pa.Table:
    """All timing parts under `<out>/timing/`, one row per sample (see latest_per_id)."""
    return latest_per_id(read_timing_parts(out))


def read_timing_parts(out: str) -> pa.Table:
    """Every row of every timing part under `<out>/timing/`, as written (attempts repeat)."""
    from pid_batch.codecs import TIMING_SCHEMA, conform_timing_table

    try:
        parts = storage.list_files(storage.join(out, "timing"), suffixes=(".parquet",))
    except FileNotFoundError:
        parts = []
    if not parts:
        return TIMING_SCHEMA.empty_table()
    # One part per encode batch (~60,000 for a million samples): read them side by side, the
    # time is round trips (sequential: 2.3 s for 570 local parts on 2 cores, measured).
    with ThreadPoolExecutor(min(READ_THREADS, len(parts))) as pool:
        tables = list(pool.map(_read_part, parts))
    table = pa.concat_tables(tables, promote_options="default")
    return conform_timing_table(table)  # parts of older versions lack the newer columns


def _read_part(uri: str) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(uri)))


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
    order = rows[np.lexsort((fin[rows], ok[rows], index[rows], code[rows]))]
    last_of_group = np.r_[
        (code[order][1:] != code[order][:-1]) | (index[order][1:] != index[order][:-1]), True
    ]
    return table.take(pa.array(np.sort(order[last_of_group]), pa.int64()))


def _pct(values: np.ndarray) -> dict[str, float]:
    values = values[~np.isnan(values)]  # null cells (a stage a row never went through)
    if values.size == 0:
        return {}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {
        "p50": round(float(p50), 3),
        "p95": round(float(p95), 3),
        "p99": round(float(p99), 3),
        "mean": round(float(values.mean()), 3),
    }


def summarize(
    table: pa.Table, run: dict[str, Any] | None = None, orphans: dict[str, int] | None = None
) -> dict[str, Any]:
    """Job summary from a deduplicated timing table (see read_timing); `orphans`: rows left by
    inputs that no longer exist or changed, reported apart and not counted as samples."""
    n = table.num_rows
    status = np.array(table.column("status").to_pylist(), dtype=object) if n else np.array([])
    ok_mask = status == "ok"
    errors: dict[str, int] = {}
    for e in table.filter(pc.equal(table.column("status"), "error")).column("error").to_pylist():
        reason = (
            (e or "unknown").split(":")[0]
            if e and e.startswith(("decode failed", "write failed", "shard unreadable"))
            else (e or "unknown")
        )
        errors[reason] = errors.get(reason, 0) + 1
    summary: dict[str, Any] = {
        "samples": n,
        "ok": int(ok_mask.sum()),
        "error": int(n - ok_mask.sum()),
        "errors_by_reason": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:50]),
    }
    if n and ok_mask.any():
        okt = table.filter(pc.equal(table.column("status"), "ok"))
        started = okt.column("started_at").cast(pa.int64()).to_numpy(zero_copy_only=False)
        finished = okt.column("finished_at").cast(pa.int64()).to_numpy(zero_copy_only=False)
        span_s = max(1e-3, (finished.max() - started.min()) / 1000)
        summary["wall_s"] = round(span_s, 3)
        summary["images_per_s"] = round(okt.num_rows / span_s, 3)
        summary["output_bytes"] = int(pc.sum(okt.column("bytes")).as_py() or 0)
        summary["stages_ms"] = {
            s: _pct(okt.column(s).to_numpy(zero_copy_only=False).astype(np.float64))
            for s in STAGES
            if s in okt.column_names
        }
        per_acc: dict[str, Any] = {}
        for acc in sorted(set(okt.column("accelerator").to_pylist()) - {None}):
            sub = okt.filter(pc.equal(okt.column("accelerator"), acc))
            per_acc[acc] = {
                "ok": sub.num_rows,
                "decode_ms": _pct(
                    sub.column("decode_ms").to_numpy(zero_copy_only=False).astype(np.float64)
                ),
            }
        summary["per_accelerator"] = per_acc
        res = {}
        for h, w in zip(okt.column("height").to_pylist(), okt.column("width").to_pylist()):
            res[f"{w}x{h}"] = res.get(f"{w}x{h}", 0) + 1
        summary["resolutions"] = res
    if orphans and orphans.get("rows"):
        summary["orphaned"] = orphans
    if run:
        summary["run"] = run
    return summary


def format_summary(s: dict[str, Any]) -> str:
    """A short human-readable rendering of a summary dict: this run's wall time and throughput
    first (when the summary comes from a run), then the output's totals and stage latencies."""
    lines = [f"samples {s['samples']}  ok {s['ok']}  error {s['error']}"]
    this = s.get("run", {}).get("this_run", {})
    if this.get("nothing_to_do"):
        lines.append(
            f"this run: nothing to do: all {this['shards_skipped']} shards were already done; "
            f"nothing decoded or written ({this['wall_s']:.1f} s)"
        )
    elif this:
        ok = this["processed"] - this["errors"]
        wall = max(1e-3, this["wall_s"])
        lines.append(
            f"this run: {this['processed']} samples ({this['errors']} errors) from "
            f"{this['shards_todo']} shards, {this['shards_skipped']} shards already done"
        )
        line = f"throughput {ok / wall:.2f} images/s over {wall:.1f} s wall"
        if "decode_window_s" in this:
            window = max(1e-3, this["decode_window_s"])
            line += (
                f" (start-up {this['startup_s']:.1f} s before the first decode; "
                f"{ok / window:.2f} images/s over the {window:.1f} s decode window)"
            )
        lines.append(line)
    if "images_per_s" in s:
        lines.append(
            f"output: {s['output_bytes'] / 1e6:.1f} MB of images; all runs' decode span "
            f"{s['wall_s']:.1f} s ({s['images_per_s']:.2f} images/s, first decode to last write)"
        )
        for stage, p in s.get("stages_ms", {}).items():
            if p:
                lines.append(
                    f"  {stage:<10} p50 {p['p50']:9.1f}  p95 {p['p95']:9.1f}  p99 {p['p99']:9.1f} ms"
                )
    for reason, count in s.get("errors_by_reason", {}).items():
        lines.append(f"  error x{count}: {reason}")
    if this.get("errors"):
        lines.append(f"this run's errors ({this['errors']}):")
        for reason, count in this.get("errors_by_reason", {}).items():
            lines.append(f"  error x{count}: {reason}")
    if note := s.get("summary_not_written"):
        lines.append(f"summary.json not written: {note}")
    if o := s.get("orphaned"):
        lines.append(
            f"  not counted: {o['rows']} rows of {o['shards']} shards no longer in the input "
            "(deleted, or replaced by new content)"
        )
    return "\n".join(lines)
