"""A static HTML report of a run: contact sheet (PiD beside baseline), stage latencies, throughput, errors.

The report is one `index.html` plus PNG files referenced relatively, so it can be opened from
local disk or served from any static host (S3 included). No JavaScript, no external assets.
"""

from __future__ import annotations

import fnmatch
import functools
import html
import io
import json
import math
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from pid_batch import storage, timing
from pid_batch.redaction import redact
from pid_batch.summary import summarize

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
HIST_STAGES = ("read_ms", "queue_ms", "text_ms", "decode_ms", "encode_ms", "write_ms")
THUMB_PX = 256  # longest side of a contact-sheet thumbnail
CROP_FRACTION = 8  # centre crop is 1/8 of each side: the same scene region for PiD and baseline
CROP_DISPLAY_PX = 256  # crops are nearest-upscaled by an integer factor to at least this size
MAX_ERROR_ROWS = 200


@dataclass(frozen=True)
class _Sample:
    """One contact-sheet entry: where its images are and what to print under them."""

    id: str
    image: str  # URI of the PiD output
    baseline: str | None  # URI of the native VAE decode, if written
    decode_ms: float | None
    nbytes: int | None


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=6)
    return buf.getvalue()


def _thumb_and_crop(data: bytes) -> tuple[bytes, bytes, tuple[int, int], int]:
    """(thumbnail PNG, zoomed centre-crop PNG, (width, height), zoom factor) of an encoded image."""
    with Image.open(io.BytesIO(data)) as im:
        img = im.convert("RGB")
    w, h = img.size
    cw, ch = max(1, w // CROP_FRACTION), max(1, h // CROP_FRACTION)
    left, top = (w - cw) // 2, (h - ch) // 2
    crop = img.crop((left, top, left + cw, top + ch))
    zoom = max(1, math.ceil(CROP_DISPLAY_PX / max(cw, ch)))
    crop = crop.resize((cw * zoom, ch * zoom), Image.Resampling.NEAREST)
    scale = THUMB_PX / max(w, h)  # up or down: PiD and its (smaller) baseline show alike
    thumb = img.resize(
        (max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS
    )
    return _png(thumb), _png(crop), (w, h), zoom


def _by_stem(uris: list[str]) -> dict[str, str]:
    """{file stem: URI} of image files (the stem is the sample id)."""
    out = {}
    for u in uris:
        name = u.rsplit("/", 1)[-1]
        if name.lower().endswith(IMAGE_SUFFIXES):
            out[name.rsplit(".", 1)[0]] = u
    return out


def _pick_samples(out: str, table: pa.Table, max_images: int) -> list[_Sample]:
    """Up to max_images ok samples (those with a baseline first, then by id)."""
    baselines = _by_stem(storage.list_files(storage.join(out, "baseline"), IMAGE_SUFFIXES))
    rows: list[_Sample] = []
    if table.num_rows:
        ok = table.filter(
            pc.and_(pc.equal(table.column("status"), "ok"), pc.is_valid(table.column("output")))
        )
        has_base = pc.or_(
            pc.is_valid(ok.column("baseline_output")),
            pc.is_in(ok.column("id"), value_set=pa.array(list(baselines), pa.string())),
        )
        ok = ok.append_column("no_base", pc.invert(has_base))
        first = ok.sort_by([("no_base", "ascending"), ("id", "ascending")])[: max(0, max_images)]
        for r in first.select(
            ["id", "output", "baseline_output", "decode_ms", "bytes"]
        ).to_pylist():
            if r["output"]:
                base = r["baseline_output"]
                rows.append(
                    _Sample(
                        r["id"],
                        storage.join(out, r["output"]),
                        storage.join(out, base) if base else baselines.get(r["id"]),
                        r["decode_ms"],
                        r["bytes"],
                    )
                )
    else:  # no timing table: show whatever images exist
        images = _by_stem(storage.list_files(storage.join(out, "images"), IMAGE_SUFFIXES))
        rows = [_Sample(i, u, baselines.get(i), None, None) for i, u in images.items()]
    rows.sort(key=lambda s: (s.baseline is None, s.id))
    return rows[: max(0, max_images)]


def _figure(width_in: float, height_in: float):
    from matplotlib.figure import Figure  # the OO API needs no pyplot backend state (Agg)

    return Figure(figsize=(width_in, height_in), dpi=100)


def _fig_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _stage_histograms(ok: pa.Table) -> bytes | None:
    """One histogram per stage with data (ms, with p50/p95 marks), as a PNG."""
    series = {}
    for stage in HIST_STAGES:
        if stage in ok.column_names:
            v = ok.column(stage).to_numpy(zero_copy_only=False).astype(np.float64)
            v = v[np.isfinite(v)]
            if v.size and np.any(v > 0):
                series[stage] = v
    if not series:
        return None
    cols = min(3, len(series))
    rows = math.ceil(len(series) / cols)
    fig = _figure(4.2 * cols, 2.8 * rows)
    for k, (stage, v) in enumerate(series.items()):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.hist(v, bins=min(40, max(5, v.size // 2)), color="#4c72b0")
        p50, p95 = np.percentile(v, [50, 95])
        ax.axvline(p50, color="#dd8452", label=f"p50 {p50:.1f}")
        ax.axvline(p95, color="#c44e52", linestyle="--", label=f"p95 {p95:.1f}")
        ax.set_title(stage.removesuffix("_ms"))
        ax.set_xlabel("ms per image")
        ax.set_ylabel("images")
        ax.legend(fontsize=8, loc="upper right")
    fig.subplots_adjust(left=0.06, right=0.98, top=0.93, bottom=0.1, hspace=0.55, wspace=0.25)
    return _fig_png(fig)


def _nice_bucket_s(span_s: float) -> float:
    """A round bucket width giving roughly 40 buckets over span_s."""
    for b in (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600):
        if span_s / b <= 40:
            return float(b)
    return 3600.0 * math.ceil(span_s / 3600 / 40)


def _throughput(table: pa.Table) -> tuple[bytes, float] | None:
    """Images finished per second in time buckets (ok and error stacked), as (PNG, bucket s)."""
    fin = table.column("finished_at").cast(pa.int64()).to_numpy(zero_copy_only=False)
    ok = pc.equal(table.column("status"), "ok").to_numpy(zero_copy_only=False).astype(bool)
    if fin.size == 0:
        return None
    t = (fin - fin.min()) / 1000.0
    bucket = _nice_bucket_s(float(t.max()))
    edges = np.arange(0.0, t.max() + bucket, bucket)
    if edges.size < 2:
        edges = np.array([0.0, bucket])
    n_ok, _ = np.histogram(t[ok], bins=edges)
    n_err, _ = np.histogram(t[~ok], bins=edges)
    fig = _figure(10, 3)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(edges[:-1], n_ok / bucket, width=bucket, align="edge", color="#55a868", label="ok")
    if n_err.any():
        ax.bar(
            edges[:-1], n_err / bucket, width=bucket, align="edge", bottom=n_ok / bucket,
            color="#c44e52", label="error",
        )  # fmt: skip
    ax.set_xlabel(f"seconds since first finished sample (bucket {bucket:g} s)")
    ax.set_ylabel("images / s")
    ax.legend(fontsize=8, loc="upper right")
    fig.subplots_adjust(left=0.07, right=0.98, top=0.95, bottom=0.17)
    return _fig_png(fig), bucket


def _esc(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _kv_table(items: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in items)
    return f'<table class="kv">{body}</table>'


def _summary_html(s: dict[str, Any]) -> str:
    items: list[tuple[str, Any]] = [
        ("samples", s["samples"]),
        ("ok", s["ok"]),
        ("error", s["error"]),
    ]
    if "images_per_s" in s:
        items += [
            ("wall time", f"{s['wall_s']:.1f} s"),
            ("throughput", f"{s['images_per_s']:.3f} images/s"),
            ("output", f"{s['output_bytes'] / 1e6:.1f} MB"),
            ("resolutions", ", ".join(f"{k} ×{v}" for k, v in s.get("resolutions", {}).items())),
        ]
    for acc, a in s.get("per_accelerator", {}).items():
        p = a.get("decode_ms") or {}
        items.append(
            (f"decode on {acc}", f"{a['ok']} images, p50 {p.get('p50', float('nan')):.1f} ms")
        )
    parts = [_kv_table(items)]
    stages = {  # a stage absent from the rows (null column) has NaN percentiles: leave it out
        k: v for k, v in s.get("stages_ms", {}).items() if v and math.isfinite(v["p50"])
    }
    if stages:
        head = "<tr><th>stage</th><th>p50</th><th>p95</th><th>p99</th><th>mean</th></tr>"
        body = "".join(
            f"<tr><td>{_esc(k)}</td>"
            + "".join(f'<td class="num">{v[q]:.1f}</td>' for q in ("p50", "p95", "p99", "mean"))
            + "</tr>"
            for k, v in stages.items()
        )
        parts.append(f"<table><caption>stage latency, ms per image</caption>{head}{body}</table>")
    return "\n".join(parts)


def _errors_html(table: pa.Table) -> tuple[str, str]:
    """(errors-by-reason table, failed-samples table) as HTML."""
    counts = timing.errors_by_reason(table)
    if not counts:
        return "<p>No errors.</p>", ""
    errs = table.filter(pc.equal(table.column("status"), "error"))
    rows = errs.select(["id", "shard", "error"])[:MAX_ERROR_ROWS].to_pylist()
    by_reason = "".join(
        f'<tr><td class="num">{n}</td><td>{_esc(reason)}</td><td>{_esc(example)}</td></tr>'
        for reason, (n, example) in counts.items()
    )
    detail = "".join(
        f"<tr><td>{_esc(r['id'])}</td><td>{_esc(r['shard'])}</td>"
        f'<td class="err">{_esc((r["error"] or "")[:400])}</td></tr>'
        for r in rows[:MAX_ERROR_ROWS]
    )
    more = errs.num_rows - MAX_ERROR_ROWS
    more_html = f"<p>… and {more} more (see the timing table).</p>" if more > 0 else ""
    return (
        f'<table id="error-reasons"><caption>errors by reason ({errs.num_rows} samples)</caption>'
        f"<tr><th>count</th><th>reason</th><th>example id</th></tr>{by_reason}</table>",
        f'<h2>Failed samples</h2><table id="error-rows">'
        f"<tr><th>id</th><th>shard</th><th>error</th></tr>{detail}</table>{more_html}",
    )


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:8px 0 16px;background:#fff}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
caption{text-align:left;font-weight:600;padding:4px 0}
td.num{text-align:right;font-variant-numeric:tabular-nums}td.err{font-family:monospace;font-size:12px}
.sheet{display:flex;flex-wrap:wrap;gap:16px}
.card{background:#fff;border:1px solid #ddd;padding:8px;border-radius:4px}
.pair{display:flex;gap:6px;align-items:flex-start}
figure{margin:0}figcaption{font-size:12px;color:#555;max-width:256px;overflow-wrap:anywhere}
img.crop{image-rendering:pixelated;width:256px;height:auto}
img.chart{max-width:100%;background:#fff}
"""


def _card(i: int, s: _Sample, pid: tuple, base: tuple | None) -> tuple[str, dict[str, bytes]]:
    """HTML of one contact-sheet card and the PNG files it references."""
    files = {f"img/{i:03d}-pid.png": pid[0], f"img/{i:03d}-pid-crop.png": pid[1]}
    (w, h), zoom = pid[2], pid[3]
    cap = f"{s.id} · {w}×{h}"
    if s.decode_ms is not None:
        cap += f" · decode {s.decode_ms:.0f} ms"
    if s.nbytes:
        cap += f" · {s.nbytes / 1024:.0f} KiB"
    figs = [
        f'<figure><img src="img/{i:03d}-pid.png" alt="PiD {_esc(s.id)}">'
        f"<figcaption>PiD {_esc(cap)}</figcaption></figure>",
        f'<figure><img class="crop" src="img/{i:03d}-pid-crop.png" alt="PiD crop {_esc(s.id)}">'
        f"<figcaption>centre 1/{CROP_FRACTION} crop, nearest ×{zoom}</figcaption></figure>",
    ]
    if base is not None:
        files[f"img/{i:03d}-base.png"], files[f"img/{i:03d}-base-crop.png"] = base[0], base[1]
        (bw, bh), bzoom = base[2], base[3]
        figs += [
            f'<figure><img src="img/{i:03d}-base.png" alt="baseline {_esc(s.id)}">'
            f"<figcaption>baseline (VAE) {bw}×{bh}</figcaption></figure>",
            f'<figure><img class="crop" src="img/{i:03d}-base-crop.png" alt="baseline crop">'
            f"<figcaption>same region, nearest ×{bzoom}</figcaption></figure>",
        ]
    return f'<div class="card"><div class="pair">{"".join(figs)}</div></div>', files


@functools.lru_cache(maxsize=64)
def _tar_index(uri: str) -> dict[str, tuple[int, int]]:
    """member → (offset, size) of a tar's files, from its headers alone (seeks over data)."""
    with storage.open_input(uri) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        return {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}


@functools.lru_cache(maxsize=64)
def _tars_matching(pattern: str) -> tuple[str, ...]:
    """The tars a row's output names: '<...>/shards/<key>-*.tar' (one of the shard's tars)."""
    folder, name = pattern.rsplit("/", 1)
    return tuple(
        u
        for u in storage.list_files(folder, (".tar",))
        if fnmatch.fnmatchcase(u.rsplit("/", 1)[1], name)
    )


def _read_output(uri: str) -> bytes:
    """An output's bytes: an object, or a member of a shard's tars ('<tars>.tar:<member>')."""
    if ".tar:" in uri:
        tars, member = uri.rsplit(".tar:", 1)
        for tar in _tars_matching(tars + ".tar"):
            if (at := _tar_index(tar).get(member)) is not None:
                return storage.read_range(tar, *at)
        raise FileNotFoundError(f"no member {member!r} in {tars}.tar")
    return storage.read_bytes(uri)


def _load(uri: str | None) -> tuple | str | None:
    """Thumbnail/crop of the image at uri, or a one-line reason it could not be read."""
    if uri is None:
        return None
    try:
        return _thumb_and_crop(_read_output(uri))
    except Exception as e:  # a broken output should not stop the report
        return f"{uri}: {type(e).__name__}: {redact(str(e))}"


def write_report(out: str, dest: str | None = None, max_images: int = 24) -> str:
    """Write `<dest>/index.html` + PNGs (dest defaults to `<out>/report`); returns the index URI."""
    dest = dest or storage.join(out, "report")
    table = timing.read_timing(out)
    run = storage.read_json(storage.join(out, "run.json")) if storage.exists(
        storage.join(out, "run.json")
    ) else None  # fmt: skip
    summary = summarize(table)
    samples = _pick_samples(out, table, max_images)
    with ThreadPoolExecutor(max_workers=8) as pool:
        pids = list(pool.map(_load, [s.image for s in samples]))
        bases = list(pool.map(_load, [s.baseline for s in samples]))

    files: dict[str, bytes] = {}
    cards, unreadable = [], []
    for i, (s, pid, base) in enumerate(zip(samples, pids, bases, strict=True)):
        if isinstance(pid, str) or pid is None:
            unreadable.append(pid or s.image)
            continue
        if isinstance(base, str):
            unreadable.append(base)
            base = None
        card, card_files = _card(i, s, pid, base)
        cards.append(card)
        files.update(card_files)

    ok = table.filter(pc.equal(table.column("status"), "ok")) if table.num_rows else table
    charts = []
    if ok.num_rows and (hist := _stage_histograms(ok)) is not None:
        files["stages.png"] = hist
        charts.append('<h2>Latency per stage</h2><img class="chart" src="stages.png" alt="stages">')
    if table.num_rows and (tp := _throughput(table)) is not None:
        files["throughput.png"] = tp[0]
        charts.append(
            '<h2>Throughput</h2><img class="chart" src="throughput.png" alt="throughput">'
        )

    reasons_html, failed_html = _errors_html(table)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    sheet = f'<div class="sheet">{"".join(cards)}</div>' if cards else "<p>No images to show.</p>"
    if unreadable:
        sheet += "<p>Unreadable images:</p><ul>" + "".join(
            f"<li>{_esc(u)}</li>" for u in unreadable
        ) + "</ul>"  # fmt: skip
    run_html = ""
    if isinstance(run, dict):
        items = [
            (k, v if isinstance(v, (str, int, float)) else json.dumps(v)[:300])
            for k, v in run.items()
        ]
        run_html = f"<h2>Run</h2>{_kv_table(items)}"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>pid-batch report</title>
<style>{_CSS}</style></head><body>
<h1>pid-batch report</h1>
<p>Output <code>{_esc(out)}</code> · generated {when}</p>
<h2>Summary</h2>{_summary_html(summary)}
<h2>Errors</h2>{reasons_html}
{"".join(charts)}
<h2>Samples ({len(cards)} of {summary["ok"] or len(samples)} ok)</h2>
<p>Each card: the PiD output, its centre crop at native pixels (nearest zoom), and when written
the baseline VAE decode of the same latent with the same region.</p>
{sheet}
{failed_html}
{run_html}
</body></html>
"""
    for name, data in files.items():
        storage.write_bytes_atomic(storage.join(dest, name), data)
    index = storage.join(dest, "index.html")
    storage.write_bytes_atomic(index, page.encode("utf-8"))  # last: the report is complete
    return index
