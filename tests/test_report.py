"""The HTML run report: built from a fake output folder (local and S3), rendered in headless Chromium."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pid_batch import codecs, storage, timing
from pid_batch.report import write_report

T0 = 1_760_000_000.0
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Injected into a copy of the page (the report itself has no JS): counts images that failed.
_PROBE = (
    "<script>window.addEventListener('load',function(){var im=document.images,bad=0;"
    "for(var i=0;i<im.length;i++){if(!im[i].complete||im[i].naturalWidth===0)bad++;}"
    "document.body.setAttribute('data-broken',String(bad));"
    "document.body.setAttribute('data-images',String(im.length));});</script>"
)


def _image(i: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 / w, yy * 255 / h, np.full(xx.shape, (i * 40) % 256)], -1)
    return np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)


def _fake_output(out: str, n_ok: int = 8, n_err: int = 3, n_base: int = 2) -> None:
    """images/*.jpg, baseline/*.png (4x smaller), a timing part with ok and error rows, run.json."""
    rows = []
    h, w = 192, 256
    for i in range(n_ok):
        sid = f"img-{i:03d}"
        data = codecs.encode_image(_image(i, h, w), "jpeg")
        storage.write_bytes_atomic(storage.join(out, "images", f"{sid}.jpg"), data)
        if i < n_base:
            small = np.asarray(Image.fromarray(_image(i, h, w)).resize((w // 4, h // 4)))
            base = codecs.encode_image(small, "png")
            storage.write_bytes_atomic(storage.join(out, "baseline", f"{sid}.png"), base)
        rows.append(
            dict(id=sid, shard="a.safetensors", index=i, status="ok", height=h, width=w,
                 read_ms=2.0 + i, queue_ms=4.0 + i % 3, decode_ms=200.0 + 7 * i, encode_ms=3.0,
                 write_ms=1.0 + i % 2, bytes=len(data), accelerator="NVIDIA GB200",
                 started_at=T0 + 0.4 * i, finished_at=T0 + 0.4 * i + 0.25,
                 output=f"images/{sid}.jpg")
        )  # fmt: skip
    for i in range(n_err):
        rows.append(
            dict(id=f"bad-{i}", shard="b.safetensors", index=i, status="error",
                 error=f"b.safetensors[{i}] id='bad-{i}': latent has {i + 1} NaN/Inf values",
                 started_at=T0 + 1, finished_at=T0 + 1.5)
        )  # fmt: skip
    timing.write_part(out, "a", "part-0.parquet", timing.timing_table(rows))
    storage.write_json_atomic(storage.join(out, "run.json"), {"job": "test", "steps": 4})


def _srcs(page: str) -> list[str]:
    return re.findall(r'<img[^>]*\ssrc="([^"]+)"', page)


def test_report_contents_local(tmp_path):
    out = str(tmp_path / "run")
    _fake_output(out)
    index = write_report(out, max_images=5)
    assert index == str(tmp_path / "run" / "report" / "index.html")
    page = Path(index).read_text()
    srcs = _srcs(page)
    # 5 cards x (thumb + crop), 2 of them with baseline thumb + crop, plus 2 charts
    assert len(srcs) == 5 * 2 + 2 * 2 + 2
    for src in srcs:
        assert not src.startswith(("/", "http", "file:", "data:")), src
        assert (tmp_path / "run" / "report" / src).stat().st_size > 100, src
    assert "<script" not in page and "http://" not in page and "https://" not in page
    # the two baseline samples come first, then by id
    assert [m for m in re.findall(r"<figcaption>PiD (img-\d+)", page)] == [
        f"img-{i:03d}" for i in range(5)
    ]
    assert page.count("baseline (VAE) 64×48") == 2
    # errors: one reason with count 3, every failed id listed
    assert re.search(r'<td class="num">3</td><td>latent has N NaN/Inf values</td>', page)
    for i in range(3):
        assert f"bad-{i}" in page
    assert "samples</th><td>11" in page and "ok</th><td>8" in page
    assert ">nan<" not in page  # text_ms is null in these rows: no NaN percentiles shown
    # crops are nearest-upscaled centre crops: 256/8 = 32 px wide, zoom 8 → 256 px
    crop = Image.open(tmp_path / "run" / "report" / "img" / "000-pid-crop.png")
    assert crop.size == (256, 192)
    src = np.asarray(Image.open(tmp_path / "run" / "images" / "img-000.jpg").convert("RGB"))
    np.testing.assert_array_equal(np.asarray(crop)[::8, ::8], src[84:108, 112:144])


def test_report_without_timing_and_with_a_broken_image(tmp_path):
    out = tmp_path / "run"
    for i in range(3):
        data = codecs.encode_image(_image(i, 64, 64), "png")
        storage.write_bytes_atomic(str(out / "images" / f"s{i}.png"), data)
    (out / "images" / "s9.png").write_bytes(b"not an image")
    page = Path(write_report(str(out), dest=str(tmp_path / "rep"))).read_text()
    assert len(_srcs(page)) == 3 * 2  # no charts without a timing table
    assert "Unreadable images" in page and "s9.png" in page
    assert "No errors." in page


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None, reason="chromium binary not installed (apt-get install chromium)"
)
def test_report_renders_in_chromium(tmp_path):
    out = str(tmp_path / "run")
    _fake_output(out, n_ok=10)
    index = Path(write_report(out))
    probe = index.with_name("probe.html")  # a copy with the probe script; the report stays JS-free
    probe.write_text(index.read_text().replace("</body>", _PROBE + "</body>"))
    shot = tmp_path / "shot.png"
    common = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(
        [*common, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=60
    ).stdout
    body = re.search(r"<body[^>]*>", dom)
    assert body, dom[:500]
    assert 'data-broken="0"' in body.group(), body.group()
    assert f'data-images="{10 * 2 + 2 * 2 + 2}"' in body.group(), body.group()
    subprocess.run(
        [*common, f"--screenshot={shot}", "--window-size=1280,2000", index.as_uri()],
        capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    px = np.asarray(Image.open(shot).convert("RGB")).astype(np.float64)
    assert px.shape == (2000, 1280, 3)
    assert px.std() > 20, "screenshot looks blank"
    assert (px.min(axis=2) < 240).mean() > 0.1, "screenshot is mostly white"
    assert (px.max(axis=2) - px.min(axis=2) > 60).mean() > 0.01, (
        "no coloured content (charts/images)"
    )


def test_report_on_s3(s3_bucket):
    out = f"s3://{s3_bucket}/jobs/run1"
    _fake_output(out, n_ok=4, n_err=1, n_base=1)
    index = write_report(out)
    assert index == f"{out}/report/index.html"
    page = storage.read_bytes(index).decode()
    srcs = _srcs(page)
    assert len(srcs) == 4 * 2 + 1 * 2 + 2
    written = set(storage.list_files(f"{out}/report"))
    assert {f"{out}/report/{s}" for s in srcs} | {index} == written
    thumb_src = next(s for s in srcs if s.endswith("-pid.png"))
    thumb = Image.open(io.BytesIO(storage.read_bytes(f"{out}/report/{thumb_src}")))
    assert thumb.format == "PNG" and max(thumb.size) == 256
