"""A run's timing table summarised: counts, errors by reason, throughput, stage percentiles."""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pid_batch import timing

STAGES = ("read_ms", "queue_ms", "text_ms", "decode_ms", "encode_ms", "write_ms")
MAX_REASONS = 1000  # distinct error reasons counted one by one; the rest under OTHER_REASONS
OTHER_REASONS = "(other reasons)"


def summarize_output(
    out: str, current: dict[str, str] | None = None, run: dict[str, Any] | None = None
) -> dict[str, Any]:
    """summarize(timing.latest_per_id(...)) of a whole output, one shard at a time: shards are read
    side by side and each reduced to counts and its ok rows' stage times (float32) at once, so
    memory is ~28 bytes per sample, never the table. `current` as in timing.latest_per_id."""
    idx = timing.index(out)
    keys = sorted(idx)
    total, gone_rows, gone_shards = _Totals(), 0, 0

    def one(key: str) -> tuple[_Totals, int, bool]:
        raw = timing.shard_rows(out, key, idx[key])
        if raw is None:
            return _Totals(), 0, False
        table = timing.latest_per_id(raw, current)
        gone = 0 if current is None else timing.orphans(raw, current)["rows"]
        return _Totals.of(table), gone, gone > 0

    if keys:
        with ThreadPoolExecutor(min(timing.READ_THREADS, len(keys))) as pool:
            for part, gone, any_gone in pool.map(one, keys):
                total.merge(part)
                gone_rows += gone
                gone_shards += any_gone
    return total.render(run, {"rows": gone_rows, "shards": gone_shards})


def _pct(values: np.ndarray) -> dict[str, float]:
    values = values[~np.isnan(values)]  # null cells (a stage a row never went through)
    if values.size == 0:
        return {}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {
        "p50": round(float(p50), 3),
        "p95": round(float(p95), 3),
        "p99": round(float(p99), 3),
        "mean": round(float(values.mean(dtype=np.float64)), 3),
    }


def _floats(col: pa.ChunkedArray) -> np.ndarray:
    """A numeric column as float32, nulls as NaN."""
    return pc.fill_null(col.cast(pa.float32()), float("nan")).to_numpy()


def _counts(values: pa.ChunkedArray | pa.Array) -> dict[Any, int]:
    """value → count, counted in Arrow (Python sees each distinct value once)."""
    vc = pc.value_counts(values)
    return dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()))


class _Totals:
    """What a summary needs of deduplicated timing rows, mergeable across shards: counts, error
    reasons (at most MAX_REASONS distinct), time span, bytes, ok rows' stage times (float32)."""

    def __init__(self) -> None:
        self.samples = self.ok = self.bytes = 0
        self.errors: dict[str, int] = {}
        self.first: int | None = None  # started_at of the earliest ok row, ms
        self.last: int | None = None  # finished_at of the latest ok row, ms
        self.stages: dict[str, list[np.ndarray]] = defaultdict(list)
        self.decode_by_acc: dict[str, list[np.ndarray]] = defaultdict(list)
        self.resolutions: dict[str, int] = defaultdict(int)

    @classmethod
    def of(cls, table: pa.Table) -> _Totals:
        t = cls()
        t.samples = table.num_rows
        if not t.samples:
            return t
        t._add_errors({r: n for r, (n, _) in timing.errors_by_reason(table).items()})
        status = table.column("status")
        okt = table.filter(pc.equal(status, "ok"))
        t.ok = okt.num_rows
        if not t.ok:
            return t
        t.first = pc.min(okt.column("started_at").cast(pa.int64())).as_py()
        t.last = pc.max(okt.column("finished_at").cast(pa.int64())).as_py()
        t.bytes = int(pc.sum(okt.column("bytes")).as_py() or 0)
        for s in STAGES:
            if s in okt.column_names:
                t.stages[s].append(_floats(okt.column(s)))
        acc = okt.column("accelerator")
        for a in pc.unique(acc.drop_null()).to_pylist():
            t.decode_by_acc[a].append(_floats(okt.filter(pc.equal(acc, a)).column("decode_ms")))
        wh = pc.binary_join_element_wise(
            okt.column("width").cast(pa.string()), okt.column("height").cast(pa.string()), "x"
        )
        for k, v in _counts(wh).items():
            t.resolutions[k] += v
        return t

    def _add_errors(self, counts: dict[str, int]) -> None:
        for reason, n in counts.items():
            if reason not in self.errors and len(self.errors) >= MAX_REASONS:
                reason = OTHER_REASONS
            self.errors[reason] = self.errors.get(reason, 0) + n

    def merge(self, o: _Totals) -> None:
        self.samples += o.samples
        self.ok += o.ok
        self.bytes += o.bytes
        self._add_errors(o.errors)
        if o.first is not None:
            self.first = o.first if self.first is None else min(self.first, o.first)
            self.last = o.last if self.last is None else max(self.last, o.last)
        for k, v in o.stages.items():
            self.stages[k] += v
        for k, v in o.decode_by_acc.items():
            self.decode_by_acc[k] += v
        for k, v in o.resolutions.items():
            self.resolutions[k] += v

    def render(
        self, run: dict[str, Any] | None = None, orphans: dict[str, int] | None = None
    ) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "samples": self.samples,
            "ok": self.ok,
            "error": self.samples - self.ok,
            "errors_by_reason": dict(sorted(self.errors.items(), key=lambda kv: -kv[1])[:50]),
        }
        if self.ok:
            if self.first is not None and self.last is not None:  # rows without times: none
                span_s = max(1e-3, (self.last - self.first) / 1000)
                summary["wall_s"] = round(span_s, 3)
                summary["images_per_s"] = round(self.ok / span_s, 3)
            summary["output_bytes"] = self.bytes
            summary["stages_ms"] = {s: _pct(np.concatenate(v)) for s, v in self.stages.items()}
            summary["per_accelerator"] = {
                a: {"ok": int(sum(len(x) for x in v)), "decode_ms": _pct(np.concatenate(v))}
                for a, v in sorted(self.decode_by_acc.items())
            }
            summary["resolutions"] = dict(self.resolutions)
        if orphans and orphans.get("rows"):
            summary["orphaned"] = orphans
        if run:
            summary["run"] = run
        return summary


def summarize(
    table: pa.Table, run: dict[str, Any] | None = None, orphans: dict[str, int] | None = None
) -> dict[str, Any]:
    """Job summary from a deduplicated timing table (see timing.read_timing); `orphans`: rows left by
    inputs that no longer exist or changed, reported apart and not counted as samples.
    Aggregated in Arrow: no Python object per row."""
    return _Totals.of(table).render(run, orphans)


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
    if this.get("errors") or this.get("shards_unfinished"):
        line = f"this run's errors ({this['errors']})"
        if this.get("shards_unfinished"):
            line += f"; {this['shards_unfinished']} shards not finished (rerun to finish them)"
        lines.append(line + ":")
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
