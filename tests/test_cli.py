"""The `pid-batch` command line as a user meets it: a demo, then summary/report/inspect/plan."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pid_batch.cli import main

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "pid_batch.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory) -> Path:
    """The README's main job: bundled sample latents, bundled demo decoder."""
    out = tmp_path_factory.mktemp("demo")
    r = cli("demo", "--output", str(out), "--num-cpus", "2", timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "demo autoencoder" in r.stderr and "official checkpoint" in r.stderr
    assert "held-out quality" in r.stdout and "student" in r.stdout
    return out


SAMPLES = 6  # bundled: 3 held-out photos + 3 training photos


@pytest.mark.slow  # `pid-batch demo` starts Ray in a subprocess
@pytest.mark.timeout(450)
def test_demo_writes_images_baselines_timing_and_summary(demo_out):
    decoded = demo_out / "decoded"
    images = sorted((decoded / "images").glob("*.jpg"))
    assert len(images) == SAMPLES
    assert len(list((decoded / "baseline").glob("*.png"))) == SAMPLES
    assert list((decoded / "timing").rglob("*.parquet"))
    summary = json.loads((decoded / "summary.json").read_text())
    assert summary["ok"] == SAMPLES and summary["error"] == 0


@pytest.mark.slow  # `pid-batch demo` starts Ray in a subprocess
@pytest.mark.timeout(450)
def test_demo_images_are_recognisable_upscales_of_held_out_photos(demo_out):
    """Each held-out output matches its own photo: correlated with it, far closer than to the others."""
    np = pytest.importorskip("numpy")
    pytest.importorskip("skimage", reason="the train extra holds the ground-truth photos")
    from PIL import Image

    from pid_batch.train.data import HELD_OUT_IMAGES, centre_square, load_image
    from pid_batch.train.evaluate import psnr

    truths, outs = [], []
    for image in HELD_OUT_IMAGES:
        t = centre_square(load_image(image), 256)
        truths.append(((t + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy())
        with Image.open(demo_out / "decoded" / "images" / f"heldout-{image.name}.jpg") as im:
            outs.append(np.asarray(im.convert("RGB")))
    for i, (out, truth) in enumerate(zip(outs, truths)):
        assert out.shape == truth.shape == (256, 256, 3)
        name = HELD_OUT_IMAGES[i].name
        grey = out.astype(np.float64).mean(-1).ravel()
        corr = float(np.corrcoef(grey, truth.astype(np.float64).mean(-1).ravel())[0, 1])
        assert corr > 0.5, (name, corr)  # noise or a flat fill: ~0
        others = [psnr(out, t) for j, t in enumerate(truths) if j != i]
        assert psnr(out, truth) > max(others) + 3, name


@pytest.mark.slow
@pytest.mark.timeout(450)
def test_summary_report_inspect_on_demo_output(demo_out):
    decoded = str(demo_out / "decoded")
    r = cli("summary", decoded)
    assert r.returncode == 0 and f"samples {SAMPLES}  ok {SAMPLES}  error 0" in r.stdout
    r = cli("summary", decoded, "--json")
    assert json.loads(r.stdout)["ok"] == SAMPLES
    r = cli("report", decoded)
    assert r.returncode == 0, r.stderr[-2000:]
    index = Path(r.stdout.strip())
    html = index.read_text()
    assert index.name == "index.html" and "<img" in html and "baseline" in html
    r = cli("inspect", str(demo_out / "_demo_latents"), "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(r.stdout)
    assert d["samples"] == SAMPLES and d["shards_found"] == 1


@pytest.mark.slow  # reuses the demo's output (Ray started once, in the fixture)
@pytest.mark.timeout(400)
def test_demo_rerun_resumes_instead_of_redoing(demo_out):
    r = cli("demo", "--output", str(demo_out), "--num-cpus", "2", timeout=400)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "nothing to do" in r.stdout, r.stdout


def test_demo_inputs_are_not_rewritten_when_unchanged(tmp_path):
    """A rewritten input shard has a new fingerprint: the rerun would redo the whole output."""
    from pid_batch import demo

    for write in (demo.write_bundled_samples, demo.write_demo_shards):
        root = tmp_path / write.__name__
        (uri, *_) = write(str(root))
        os.utime(uri, (1, 1))
        write(str(root))
        assert os.stat(uri).st_mtime == 1


def test_report_on_a_path_no_run_wrote_writes_nothing(tmp_path):
    missing = tmp_path / "typo"
    assert main(["report", str(missing)]) == 2
    assert not missing.exists()


def test_demo_random_weights_job_is_the_tiny_preset(tmp_path):
    from pid_batch import demo

    assert demo.demo_job(str(tmp_path), random_weights=True).model.preset == "tiny"
    job = demo.demo_job(str(tmp_path))
    assert job.model.preset == "demo" and job.model.checkpoint.endswith(".safetensors")


def test_plan_prints_answer_and_assumptions(capsys):
    assert main(["plan", "1000", "2048x2048", "--gpus", "gb200=4"]) == 0
    text = capsys.readouterr().out
    assert "wall time" in text and "assumptions" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["plan", "10", "2048by2048", "--gpus", "gb200=1"], "WIDTHxHEIGHT"),
        (["inspect", "/nonexistent/latents"], "/nonexistent/latents"),
        (["summary", "/nonexistent/out"], "is not a pid-batch output"),
        (["report", "/nonexistent/out"], "is not a pid-batch output"),
    ],
)
def test_errors_are_one_line_without_traceback(argv, message, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("pid-batch: error:") and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_run_rejects_bad_spec_before_any_work(tmp_path, capsys):
    spec = tmp_path / "job.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "input": str(tmp_path / "in"),
                "output": str(tmp_path / "out"),
                "model": {"backbone": "flux", "presett": "tiny"},
            }
        )
    )
    assert main(["run", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "presett" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_run_override_and_unknown_backbone(tmp_path, capsys):
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"input": "in", "output": "out", "model": {"preset": "tiny"}}))
    assert main(["run", str(spec), "--set", "model.backbone=flux3"]) == 2
    assert "flux3" in capsys.readouterr().err


def test_every_subcommand_has_help():
    for sub in ("run", "submit", "demo", "summary", "report", "inspect", "plan"):
        r = cli(sub, "--help", timeout=60)
        assert r.returncode == 0 and "usage: pid-batch" in r.stdout


def test_submit_packages_the_working_directory(tmp_path, monkeypatch):
    """`submit` packages the user's folder (pid_batch travels as a py_module) and refuses a spec
    that lies outside it; the run itself is tested on a real cluster in test_submit_cluster."""
    from pid_batch import submit

    assert submit.runtime_env(tmp_path) == {
        "working_dir": str(tmp_path),
        "py_modules": [str(REPO / "pid_batch")],
    }
    assert submit.runtime_env(REPO) == {"working_dir": str(REPO)}  # a checkout brings its own
    assert submit.entrypoint("jobs/a b.yaml", ["model.compile=false"]) == (
        "python -m pid_batch.cli run 'jobs/a b.yaml' --set model.compile=false"
    )
    spec = tmp_path / "elsewhere" / "job.yaml"
    spec.parent.mkdir()
    spec.write_text(yaml.safe_dump({"input": "in", "output": "out", "model": {"preset": "tiny"}}))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert main(["submit", str(spec), "--address", "http://127.0.0.1:9"]) == 2
