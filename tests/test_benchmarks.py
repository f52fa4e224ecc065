"""benchmarks/gpu_pipeline.py: defaults, the null-text full-size config, and a --smoke run end to end."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_pipeline.py"


@pytest.fixture(scope="module")
def gp():
    spec = importlib.util.spec_from_file_location("gpu_pipeline", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_defaults_and_smoke_defaults(gp):
    a = gp.parse_args([])
    assert (a.size, a.images, a.batch_size, a.compile, a.max_seconds) == (2048, 96, 16, True, 540)
    assert gp.latent_hw(a) == (64, 64)  # flux: 2048 / 32
    s = gp.parse_args(["--smoke"])
    assert (s.size, s.compile) == (128, False)
    assert gp.latent_hw(s) == (4, 4)
    with pytest.raises(ValueError, match="multiple of 32"):
        gp.latent_hw(gp.parse_args(["--size", "2000"]))


def test_full_preset_without_text_encoder_uses_null_text(gp, tmp_path):
    from pid_batch.job import JobConfigError, ModelConfig

    with pytest.raises(JobConfigError, match="text_encoder"):  # the job spec route still refuses
        ModelConfig(backbone="flux", checkpoint="x.pth", preset="full")
    m = gp.model_config(gp.parse_args([]), str(tmp_path / "x.pth"))
    assert (m.preset, m.text_encoder, m.null_text, m.compile) == ("full", None, True, True)
    assert m.variant_label == "v1p5_sr4x_c16"
    job = gp.job_config(gp.parse_args([]), m, str(tmp_path / "in"), str(tmp_path / "out"))
    assert job.resources.gpus_per_actor == 1.0 and job.model.text_encoder is None


@pytest.mark.slow
def test_without_cuda_the_full_run_refuses(tmp_path):
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out)], capture_output=True,
                       text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert r.returncode == 2, r.stderr[-2000:]
    assert "--smoke" in r.stderr and not out.exists()


@pytest.mark.slow
def test_smoke_end_to_end(tmp_path):
    out = tmp_path / "smoke.json"
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--json", str(out), "--tmp-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=400, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    for key in ("machine", "args", "checkpoint", "variant", "a", "b", "ratio_b_over_a", "card",
                "output_hw", "total_s", "ray_init_s"):  # fmt: skip
        assert key in rep, key
    ratio = rep["ratio_b_over_a"]
    assert isinstance(ratio, float) and math.isfinite(ratio) and ratio > 0
    assert rep["card"] == "cpu" and rep["variant"] == "tiny:v1p5_sr4x_c16"
    assert rep["checkpoint"]["params"] > 0 and rep["checkpoint"]["file_gib"] > 0
    a, b = rep["a"], rep["b"]
    for mode in (a, b):
        for key in ("images", "img_per_s", "ms_per_image", "busy", "peak_gpu_mem_gib", "device"):
            assert key in mode, key
        assert mode["img_per_s"] > 0 and 0 < mode["busy"] <= 1.0
    assert b["images_total"] == 12  # every latent went through the real pipeline
    assert 0 < b["busy_probe"] <= 1.0 and 0 < b["busy_whole"] <= 1.0
    assert a["images"] == 8  # 12 latents, first batch of 4 is the warm-up
    assert "b/a steady throughput" in r.stdout
    assert not any(p.name.startswith("pid-gpu-pipeline-") for p in tmp_path.iterdir())  # cleaned


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_check_smoke(tmp_path):
    """benchmarks/gpu_check.py --smoke: eager and compiled tiny decodes, identical images."""
    import subprocess
    import sys as _sys

    out = tmp_path / "check.json"
    script = ROOT / "benchmarks" / "gpu_check.py"
    subprocess.run(
        [_sys.executable, str(script), "--smoke", "--json", str(out)], check=True, timeout=880
    )
    report = json.loads(out.read_text())
    assert report["card"] == "cpu" and len(report["rows"]) == 4
    compiled = [r for r in report["rows"] if r["mode"] == "compiled"]
    assert [r["max_abs_diff_vs_eager"] for r in compiled] == [0, 0]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_scale_bench_smoke(tmp_path):
    """benchmarks/scale_bench.py --smoke: every part runs, small, and reports what it measured."""
    out = tmp_path / "scale.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "scale_bench.py"), "--smoke", "--json",
         str(out), "--work-dir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=580, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert {(c["backend"], c["samples"]) for c in rep["control"]} == {
        (b, n) for b in ("local", "s3") for n in (1000, 4000)
    }
    for c in rep["control"]:
        assert c["summary_rows"] == c["samples"] and c["plan_resume_todo"] == c["shards"] // 10
        assert c["plan_fresh_s"] > 0 and c["summary_peak_rss_mb"] > 0
    (tar,) = rep["tar"]
    assert tar["members"] == 2 * 32 * tar["parts"] and tar["peak_rss_mb"] <= tar["target_mb"]
    run = rep["run"]
    assert run["ok"] == run["samples"] == 2000 and run["spilled_bytes"] == 0
    assert run["driver_rss_end_mb"] > 0 and run["driver_rss_early_mb"] > 0
    assert "plan fresh" in r.stdout  # the side-by-side table
