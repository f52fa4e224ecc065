"""Capacity planning: scaling laws of the estimate, cluster.yaml parsing, tables learnt from summaries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pid_batch import codecs, timing
from pid_batch.config import VARIANTS
from pid_batch.model.flops import count_condition_flops, count_flops
from pid_batch.plan import (
    BYTES_PER_PIXEL,
    PAPER_LATENCY_MS,
    cluster_accelerators,
    decode_flops,
    format_plan,
    latency_table_from_summary,
    load_latency_table,
    plan,
    time_scale,
)
from pid_batch.summary import summarize

CLUSTER_YAML = str(Path(__file__).resolve().parents[1] / "cluster.yaml")


def test_time_scales_with_n_and_gpus():
    base = plan(10_000, 2048, 2048, "v1p5_sr4x_c16", {"gb200": 4})
    double_n = plan(20_000, 2048, 2048, "v1p5_sr4x_c16", {"gb200": 4})
    double_gpus = plan(10_000, 2048, 2048, "v1p5_sr4x_c16", {"gb200": 8})
    assert double_n["wall_s"] == pytest.approx(2 * base["wall_s"], rel=1e-3)
    assert double_n["gpu_hours"] == pytest.approx(2 * base["gpu_hours"], rel=1e-2)
    assert double_n["output_bytes"]["high"] == 2 * base["output_bytes"]["high"]
    assert double_gpus["wall_s"] == pytest.approx(base["wall_s"] / 2, rel=1e-3)
    assert double_gpus["gpu_hours"] == pytest.approx(base["gpu_hours"], rel=1e-2)
    # at the reference point the paper's 211 ms is used as is, 95 % busy
    assert base["accelerators"]["gb200"]["ms_per_image"] == pytest.approx(211.0)
    assert base["wall_s"] == pytest.approx(10_000 * 0.211 / 4 / 0.95, rel=1e-3)


def test_mixed_cluster_splits_work_by_speed():
    p = plan(12_110, 2048, 2048, "flux", {"rtx": 10, "gb200": 2})  # a backbone name works too
    assert p["variant"] == "v1p5_sr4x_c16"
    rates = {"rtx": 10 / 1.0, "gb200": 2 / 0.211}
    total = sum(rates.values())
    assert p["images_per_s"] == pytest.approx(total * 0.95, rel=1e-3)
    for acc, r in rates.items():
        assert p["accelerators"][acc]["images"] == pytest.approx(12_110 * r / total, abs=1)


def test_unknown_accelerator_and_bad_inputs():
    with pytest.raises(ValueError, match=r"h100.*known: \['gb200', 'rtx'\]"):
        plan(10, 2048, 2048, "v1p5_sr4x_c16", {"h100": 1})
    with pytest.raises(ValueError, match="unknown variant 'nope'.*v1p5_sr4x_c16"):
        plan(10, 2048, 2048, "nope", {"gb200": 1})
    with pytest.raises(ValueError, match="multiples of 16"):
        plan(10, 2000, 2047, "v1p5_sr4x_c16", {"gb200": 1})
    assert set(BYTES_PER_PIXEL) == set(codecs.IMAGE_FORMATS)  # a size for every format written
    assert plan(10, 2048, 2048, "v1p5_sr4x_c16", {"gb200": 1}, image_format="JPG")
    with pytest.raises(ValueError, match="image format"):
        plan(10, 2048, 2048, "v1p5_sr4x_c16", {"gb200": 1}, image_format="tiff")
    # a user table adds accelerators and overrides the paper's figures
    p = plan(100, 2048, 2048, "v1p5_sr4x_c16", {"h100": 2, "gb200": 1}, {"H100": 400, "GB200": 150})
    assert p["accelerators"]["h100"]["ms_per_image"] == 400
    assert p["accelerators"]["gb200"]["source"] == "user table"
    assert p["accelerators"]["gb200"]["ms_per_image"] == 150
    with pytest.raises(ValueError, match="positive ms"):
        plan(1, 2048, 2048, "v1p5_sr4x_c16", {"gb200": 1}, {"gb200": 0})
    assert PAPER_LATENCY_MS["gb200"] == 211.0  # not mutated


def test_resolution_scaling_is_linear_plus_quadratic():
    cfg = VARIANTS["v1p5_sr4x_c16"]
    lin2, att2 = decode_flops(cfg, 2048, 2048)
    lin4, att4 = decode_flops(cfg, 4096, 4096)
    # attention: 14 patch blocks over 16384 image + 300 text tokens (the last block's text
    # queries are skipped: its text output is unused), 2 PiT blocks over 16384; 4 steps
    tokens, joint = 128 * 128, 128 * 128 + 300
    patch = 13 * 4 * joint**2 * 1536 + 4 * tokens * joint * 1536
    expect = 4 * (patch + 2 * 4 * tokens**2 * 1152)
    assert att2 == expect
    assert 3.95 < lin4 / lin2 <= 4.0  # ∝ pixels, plus a fixed text-token share
    assert 15.5 < att4 / att2 < 16.0  # ∝ (tokens + 300 text tokens)²
    assert time_scale("v1p5_sr4x_c16", 2048, 2048) == pytest.approx(1.0)
    assert 8 < time_scale("v1p5_sr4x_c16", 4096, 4096) < 12  # not 4x: attention dominates
    # 8 steps: twice the per-step work, the conditioning (LQ convs, caption) still counted once
    fwd, cond = count_flops(cfg, 2048, 2048, 300), count_condition_flops(cfg, 2048, 2048, 300)
    eight = (8 * fwd.total - 7 * cond.total) / (4 * fwd.total - 3 * cond.total)
    assert time_scale("v1p5_sr4x_c16", 2048, 2048, steps=8) == pytest.approx(eight)
    assert 1.95 < eight < 2.0  # a bit under 2x: the conditioning is not doubled
    assert sum(decode_flops(cfg, 2048, 2048)) == 4 * fwd.total - 3 * cond.total
    p = plan(1000, 4096, 4096, "v1p5_sr4x_c16", {"gb200": 1}, tiling="never")
    assert p["tiling"] is None
    assert p["accelerators"]["gb200"]["ms_per_image"] == pytest.approx(
        211 * time_scale("v1p5_sr4x_c16", 4096, 4096), abs=0.1
    )
    assert p["output_bytes"]["low"] == round(1000 * 4096 * 4096 * 0.70e6 / 2048**2 * 1.3)


def test_tiled_sizes_cost_every_tile_overlaps_included():
    """An SDXL portrait archive at 4x (3328x4864) fits no trained size: the plan costs its tiles."""
    cfg = VARIANTS["v1_sr4x_c4_sdxl"]
    p = plan(1000, 3328, 4864, "sdxl", {"gb200": 1})
    t = p["tiling"]
    assert t is not None and t["tiles"] > 1 and t["overlap"] == 512
    lin, att = decode_flops(cfg, t["tile_height"], t["tile_width"])
    tiled = t["tiles"] * (lin + att)
    assert p["tflops_per_image"] == pytest.approx(tiled / 1e12, abs=0.05)
    assert t["pixel_factor"] == pytest.approx(
        t["tiles"] * t["tile_width"] * t["tile_height"] / (3328 * 4864), abs=1e-3
    )
    assert t["pixel_factor"] > 1  # the overlaps are decoded twice
    assert t["flops_vs_whole"] == pytest.approx(
        tiled / sum(decode_flops(cfg, 4864, 3328)), abs=1e-3
    )
    whole = plan(1000, 3328, 4864, "sdxl", {"gb200": 1}, tiling="never")
    assert whole["tiling"] is None
    assert p["wall_s"] / whole["wall_s"] == pytest.approx(t["flops_vs_whole"], rel=1e-2)
    assert "tiles" in format_plan(p) and "overlap" in format_plan(p)
    # a trained size is decoded whole
    assert plan(10, 2048, 2048, "flux", {"gb200": 1})["tiling"] is None


def test_cluster_yaml_of_the_repo():
    assert cluster_accelerators(CLUSTER_YAML) == {"rtx": 16 * 1, "gb200": 16 * 4}
    assert cluster_accelerators(CLUSTER_YAML, {"rtx": 8, "gb200": 2}) == {"rtx": 8, "gb200": 8}
    assert cluster_accelerators(CLUSTER_YAML, {"rtx": 3, "gb200": 0}) == {"rtx": 3}
    with pytest.raises(ValueError, match=r"unknown node types \['h100'\].*'gb200', 'head', 'rtx'"):
        cluster_accelerators(CLUSTER_YAML, {"h100": 1})
    with pytest.raises(ValueError, match="'rtx'.*max_workers"):
        cluster_accelerators(CLUSTER_YAML, {"rtx": 17})
    p = plan(1000, 2048, 2048, "v1p5_sr4x_c16", CLUSTER_YAML, nodes={"gb200": 2})
    assert p["accelerators"]["gb200"]["gpus"] == 8 and "rtx" not in p["accelerators"]


def test_cluster_total_max_workers(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text(
        "max_workers: 3\navailable_node_types:\n"
        "  a: {resources: {accel_rtx: 2}, max_workers: 4}\n  b: {resources: {}, max_workers: 4}\n"
    )
    assert cluster_accelerators(str(y), {"a": 2, "b": 1}) == {"rtx": 4}
    with pytest.raises(ValueError, match="exceed the cluster's max_workers=3"):
        cluster_accelerators(str(y), {"a": 2, "b": 2})


def _summary(rows_per_acc: dict[str, list[float]], hw=(1024, 1024), variant="v1p5_sr4x_c16"):
    rows, i = [], 0
    for acc, values in rows_per_acc.items():
        for v in values:
            rows.append(
                dict(id=f"s{i}", shard="x", index=i, status="ok", height=hw[1], width=hw[0],
                     decode_ms=v, accelerator=acc, bytes=1, started_at=1000.0 + i,
                     finished_at=1000.5 + i)
            )  # fmt: skip
            i += 1
    return summarize(timing.timing_table(rows), run={"variant": variant, "steps": 4})


def test_latency_table_from_a_real_summary(tmp_path):
    s = _summary({"NVIDIA GB200": [30.0, 32.0, 34.0], "NVIDIA L40S": [100.0, 110.0, 120.0]})
    scale = time_scale("v1p5_sr4x_c16", 1024, 1024)
    t = latency_table_from_summary(s)
    assert t == {
        "gb200": pytest.approx(32.0 / scale, abs=1e-3),
        "nvidia_l40s": pytest.approx(110.0 / scale, abs=1e-3),
    }
    assert set(latency_table_from_summary(s, names={"NVIDIA L40S": "rtx"})) == {"gb200", "rtx"}
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(s))
    loaded = load_latency_table(str(path))
    p = plan(100, 1024, 1024, "v1p5_sr4x_c16", {"nvidia_l40s": 2}, loaded)
    assert p["accelerators"]["nvidia_l40s"]["ms_per_image"] == pytest.approx(110.0, abs=0.1)
    plain = tmp_path / "table.yaml"
    plain.write_text("gb200: 180\nrtx: 700\n")
    assert load_latency_table(str(plain)) == {"gb200": 180.0, "rtx": 700.0}
    plain.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="expected"):
        load_latency_table(str(plain))


def test_latency_table_refuses_ambiguous_summaries():
    s = _summary({"NVIDIA GB200": [30.0]})
    s["resolutions"] = {"1024x1024": 1, "2048x2048": 1}
    with pytest.raises(ValueError, match="pass resolution"):
        latency_table_from_summary(s)
    assert latency_table_from_summary(s, resolution=(2048, 2048)) == {"gb200": 30.0}
    with pytest.raises(ValueError, match="tiny"):
        latency_table_from_summary(_summary({"cpu": [5.0]}, variant="tiny:v1p5_sr4x_c16"))


def test_format_plan_states_answer_and_assumptions():
    p = plan(1_000_000, 2048, 2048, "v1p5_sr4x_c16", {"gb200": 64, "rtx": 16}, image_format="webp")
    text = format_plan(p)
    assert "wall time" in text and "GPU-hours" in text and "GB" in text
    assert "assumptions:" in text
    for a in p["assumptions"]:
        assert a in text
    assert any("upper bound" in a for a in p["assumptions"])  # the RTX figure's caveat
    assert any("tokens²" in a for a in p["assumptions"])
