"""What `pid-batch run` prints, as a user meets it: stdout is exactly the summary, stderr holds
progress lines and no warning, the throughput line matches the wall clock, a rerun with nothing
to do starts no Ray, and a decode actor that cannot start is one line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from pid_batch import codecs, storage
from pid_batch.summary import format_summary

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parent.parent


def _run(spec: Path, env: dict) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.time()
    r = subprocess.run(
        [sys.executable, "-m", "pid_batch.cli", "run", str(spec)],
        env=env, capture_output=True, text=True, timeout=500,
    )  # fmt: skip
    return r, time.time() - t0


@pytest.fixture
def job(tmp_path):
    """Two shards of tiny FLUX latents, a spec, and an environment with a private Ray temp dir
    (so a test can tell whether a Ray was started)."""
    rng = np.random.default_rng(0)
    for s in range(2):
        lat = rng.standard_normal((3, 16, 2, 3)).astype(np.float32)
        data = codecs.write_safetensors_shard(lat, [f"s{s}-{i}" for i in range(3)], backbone="flux")
        storage.write_bytes_atomic(str(tmp_path / "in" / f"shard-{s}.safetensors"), data)
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "input": str(tmp_path / "in"),
                "output": str(tmp_path / "out"),
                "model": {"backbone": "flux", "ckpt_type": "2k", "preset": "tiny"},
                "resources": {"batch_size": 3},
            }
        )
    )
    ray_tmp = tempfile.mkdtemp(prefix="pbrun", dir="/tmp")
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "RAY_TMPDIR": ray_tmp,
        "PID_BATCH_PROGRESS_S": "1",
    }
    env.pop("RAY_ADDRESS", None)
    return spec, tmp_path / "out", env, Path(ray_tmp)


def test_stdout_is_the_summary_stderr_has_progress_and_no_warning(job):
    spec, out, env, ray_tmp = job
    r, wall = _run(spec, env)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    # Exactly the summary (summary.json keeps its keys sorted: compare the lines as a set).
    assert r.stdout.endswith("\n")
    assert sorted(r.stdout.splitlines()) == sorted(format_summary(summary).splitlines())
    assert "warning" not in r.stderr.lower() and "Traceback" not in r.stderr, r.stderr
    assert re.search(
        r"^\[pid-batch\] 6 samples, 2/2 shards, [\d.]+ images/s, 0 errors", r.stderr, re.M
    )
    # The throughput line is this run's wall clock (start-up included), within 5 %.
    m = re.search(
        r"^throughput ([\d.]+) images/s over ([\d.]+) s wall \(start-up ([\d.]+) s", r.stdout, re.M
    )
    assert m, r.stdout
    rate, said, startup = map(float, m.groups())
    assert abs(said - wall) <= 0.05 * wall, (said, wall)
    assert rate * said == pytest.approx(6, rel=0.05)
    assert 0 < startup < said
    assert summary["run"]["this_run"]["decode_window_s"] < said


def test_rerun_with_nothing_to_do_starts_no_ray(job):
    spec, out, env, ray_tmp = job
    assert _run(spec, env)[0].returncode == 0
    sessions = sorted((ray_tmp / "ray").glob("session_2*"))
    before = (out / "summary.json").read_bytes()
    r, wall = _run(spec, env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "nothing to do: all 2 shards were already done" in r.stdout
    assert r.stdout.startswith("samples 6  ok 6  error 0")
    assert sorted((ray_tmp / "ray").glob("session_2*")) == sessions  # no Ray started
    assert "Ray" not in r.stderr
    assert (out / "summary.json").read_bytes() == before  # nothing written


def test_decode_actor_that_cannot_start_is_one_line_exit_2(job, tmp_path):
    """A text encoder folder that passes the driver's check but does not load in the actor."""
    spec, out, env, _ = job
    gemma = tmp_path / "gemma"
    gemma.mkdir()
    (gemma / "config.json").write_text('{"model_type": "not-a-model"}')
    d = yaml.safe_load(spec.read_text())
    d["model"]["text_encoder"] = str(gemma)
    spec.write_text(yaml.safe_dump(d))
    r, _ = _run(spec, env)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    (line,) = [x for x in r.stderr.splitlines() if "error:" in x]
    assert line.startswith("pid-batch: error: a decode actor could not start: ValueError:")
    assert "not-a-model" in line
    assert not (out / "images").exists()
