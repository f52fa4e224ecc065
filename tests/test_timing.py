"""timing: the table's schema and rows, and the one grouping of errors by reason."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pytest

from pid_batch import codecs, inspect_data, pipeline, report, summary, timing
from pid_batch.timing import error_reason

# --- schema and rows ----------------------------------------------------------------------------


def _row(**kw) -> dict:
    return {"id": "a", "shard": "s.safetensors", "index": 0, "status": "ok", **kw}


def test_timing_table_fills_nulls_and_types():
    t0 = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    t = timing.timing_table(
        [
            _row(
                decode_ms=12.5,
                text_ms=3.0,
                height=1024,
                started_at=t0,
                finished_at=np.float64(t0.timestamp() + 1.5),
            ),
            _row(id="b", index=1, status="error", error="boom"),
        ]
    )
    assert t.schema.equals(timing.TIMING_SCHEMA, check_metadata=True)
    assert t.num_rows == 2 and t.column("width").null_count == 2
    assert t.column("finished_at")[0].as_py() == datetime(2026, 1, 2, 3, 4, 7, 178000, tzinfo=UTC)
    assert t.column("decode_ms").type == pa.float32() and t.column("seed").type == pa.int64()
    assert timing.timing_table([]).num_rows == 0


def test_timing_table_rejects_bad_rows():
    with pytest.raises(ValueError, match=r"lacks required columns \['id'\]"):
        timing.timing_table([{k: v for k, v in _row().items() if k != "id"}])
    with pytest.raises(ValueError, match="unknown columns"):
        timing.timing_table([_row(decode_msec=1.0)])
    with pytest.raises(ValueError, match="'ok' or 'error'"):
        timing.timing_table([_row(status="fine")])
    with pytest.raises(ValueError, match="no error message"):
        timing.timing_table([_row(status="error")])


def test_validate_timing_table():
    good = timing.timing_table([_row()])
    timing.validate_timing_table(good)
    with pytest.raises(ValueError, match=r"missing \['id'\]"):
        timing.validate_timing_table(good.drop_columns(["id"]))
    with pytest.raises(ValueError, match="unexpected"):
        timing.validate_timing_table(good.append_column("x", pa.array([1])))
    i = good.schema.get_field_index("index")
    with pytest.raises(ValueError, match="'index' has type int64"):
        timing.validate_timing_table(good.set_column(i, "index", pa.array([0], pa.int64())))


# --- errors by reason -------------------------------------------------------------------------


def test_error_reason_groups_alike_messages():
    a = error_reason("s.safetensors[3] id='x': latent has 12 NaN/Inf values")
    b = error_reason("t.parquet[40] id='y-z': latent has 7 NaN/Inf values")
    assert a == b == "latent has N NaN/Inf values"
    assert error_reason(None) == "unknown"
    # Numbers inside names stay (the summary prints the reason as the message), counts go.
    wrong = "backbone 'flux' is not this job's backbone 'sd3' (checkpoint PiD_res2k_sr4x_sd3_4step)"
    assert error_reason(wrong) == wrong
    oom = "decode failed: OutOfMemoryError: tried to allocate {} MiB on device 0"
    assert error_reason(oom.format(512)) == error_reason(oom.format(1024.5))
    assert error_reason("decode failed: RuntimeError: boom") == "decode failed: RuntimeError: boom"
    shard_a = error_reason("shard unreadable: shard in/a.safetensors: truncated: 7 bytes")
    shard_b = error_reason("shard unreadable: shard in/b.safetensors: truncated: 3 bytes")
    assert shard_a == shard_b == "shard unreadable: shard …: truncated: N bytes"


def test_summary_report_and_inspect_group_errors_alike(tmp_path):
    """summary.json (the output's and this run's counts), `pid-batch summary`, the report and
    `inspect` count the same reasons."""
    msgs = [
        "decode failed: RuntimeError: boom",
        "decode failed: RuntimeError: boom",
        "decode failed: OutOfMemoryError: 2 GiB",
        "s.safetensors[4] id='x': latent has 3 NaN/Inf values",
        "shard unreadable: shard in/a.safetensors: truncated: 7 bytes",
    ]
    rows = [_row(id=f"e{i}", index=i, status="error", error=m) for i, m in enumerate(msgs)]
    table = timing.timing_table([*rows, _row(id="ok", index=9)])
    want = {
        "decode failed: RuntimeError: boom": 2,
        "decode failed: OutOfMemoryError: N GiB": 1,
        "latent has N NaN/Inf values": 1,
        "shard unreadable: shard …: truncated: N bytes": 1,
    }
    s = summary.summarize(table)
    assert s["errors_by_reason"] == want
    for reason, n in want.items():
        assert f"error x{n}: {reason}" in summary.format_summary(s)
    this_run = pipeline.RunResult(summary={})
    for m in msgs:
        this_run.note_reason(m)
    assert this_run.reasons == want
    html, _ = report._errors_html(table)
    for reason, n in want.items():
        assert f'<td class="num">{n}</td><td>{reason}</td>' in html

    lat = np.zeros((2, 4, 2, 2), np.float32)
    lat[0, 0, 0, 0] = lat[1, 0, 0, 0] = np.nan
    (tmp_path / "s.safetensors").write_bytes(codecs.write_safetensors_shard(lat, ["a", "b"]))
    problems = inspect_data.inspect_dataset(str(tmp_path))["problems"]
    assert problems["latent has N NaN/Inf values"]["count"] == 2
