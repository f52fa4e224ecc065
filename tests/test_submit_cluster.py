"""A `ray start --head` cluster on loopback: `pid-batch submit` from a folder that is not the
checkout, `ray job logs --follow`, and which Ray `pid-batch run` uses with and without an address.

The cluster runs under a private RAY_TMPDIR (its address file too, so no other Ray on the
machine can find it) and is stopped by killing exactly the processes that carry that variable.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from pid_batch import codecs, storage

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_with_env(marker: str) -> list[int]:
    """Processes of this user whose environment holds `marker` (the cluster's RAY_TMPDIR)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker.encode() in (d / "environ").read_bytes().split(b"\0"):
                    found.append(int(d.name))
            except OSError:
                continue
    return found


@pytest.fixture(scope="module")
def head():
    """`ray start --head` with the dashboard, all on 127.0.0.1; yields (env, dashboard URL, gcs)."""
    tmp = tempfile.mkdtemp(prefix="pbray", dir="/tmp")  # short: Ray's socket paths have a limit
    env = {
        **os.environ,
        "RAY_TMPDIR": tmp,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        # The nodes have pid_batch installed, as cluster.yaml's image does (this venv's own
        # editable install may be another checkout's).
        "PYTHONPATH": str(REPO),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("RAY_ADDRESS", None)
    gcs, dash = _free_port(), _free_port()
    cmd = [
        str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--node-ip-address=127.0.0.1",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
        "--num-cpus=2", "--object-store-memory=200000000", "--disable-usage-stats",
    ]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    try:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        yield env, f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}"
    finally:
        marker = f"RAY_TMPDIR={tmp}"
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _pids_with_env(marker):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(3)
        shutil.rmtree(tmp, ignore_errors=True)


def _shards(root: Path, shards: int = 2, per_shard: int = 2) -> list[str]:
    rng = np.random.default_rng(0)
    ids = []
    for s in range(shards):
        lat = rng.standard_normal((per_shard, 16, 2, 3)).astype(np.float32)
        sid = [f"s{s}-{i}" for i in range(per_shard)]
        data = codecs.write_safetensors_shard(lat, sid, backbone="flux")
        storage.write_bytes_atomic(str(root / f"shard-{s:03d}.safetensors"), data)
        ids += sid
    return ids


def _spec(path: Path, inp: Path, out: Path, **extra) -> Path:
    spec = {
        "input": str(inp),
        "output": str(out),
        "model": {"backbone": "flux", "ckpt_type": "2k", "preset": "tiny"},
        "resources": {"batch_size": 2, "cpus_per_actor": 0.5},
        **extra,
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def _pid_batch(args: list[str], env: dict, cwd: Path, timeout: float = 300):
    env = {**env, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "pid_batch.cli", *args],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _driver_pids(dashboard: str) -> set[int]:
    """Pids of the drivers that ever connected to the head cluster (its job table)."""
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(dashboard).list_jobs()
    return {int(j.driver_info.pid) for j in jobs if j.driver_info and j.driver_info.pid}


def _status(dashboard: str, job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(dashboard).get_job_status(job_id).value)


def test_run_uses_its_own_ray_unless_told_auto(head, tmp_path):
    env, dashboard, _ = head
    inp = tmp_path / "in"
    ids = _shards(inp)
    before = _driver_pids(dashboard)

    own = _spec(tmp_path / "own.yaml", inp, tmp_path / "own")
    p = subprocess.Popen(
        [sys.executable, "-m", "pid_batch.cli", "run", str(own)],
        env={**env, "PYTHONPATH": str(REPO)}, cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert f"samples {len(ids)}  ok {len(ids)}" in out
    assert "Started a local Ray instance" in err
    assert _driver_pids(dashboard) == before  # it never joined the cluster

    auto = _spec(tmp_path / "auto.yaml", inp, tmp_path / "auto", ray_address="auto")
    p = subprocess.Popen(
        [sys.executable, "-m", "pid_batch.cli", "run", str(auto)],
        env={**env, "PYTHONPATH": str(REPO)}, cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert "Connected to Ray cluster" in err and "Started a local Ray" not in err
    assert p.pid in _driver_pids(dashboard) - before


def test_submit_from_a_folder_outside_the_checkout(head, tmp_path):
    env, dashboard, _ = head
    work = tmp_path / "project"  # the user's folder: a spec and nothing of pid-batch
    work.mkdir()
    ids = _shards(tmp_path / "in", shards=2, per_shard=2)
    _spec(work / "spec.yaml", tmp_path / "in", tmp_path / "out")
    env = {**env, "PID_BATCH_PROGRESS_S": "1"}
    r = _pid_batch(["submit", "spec.yaml", "--address", dashboard, "--no-wait"], env, work)
    assert r.returncode == 0, r.stderr[-3000:]
    job_id = r.stdout.strip()
    assert re.fullmatch(r"raysubmit_\w+", job_id), r.stdout
    follow = f"ray job logs --follow --address {dashboard} {job_id}"
    assert follow in r.stderr

    logs = subprocess.run(
        [str(BIN / "ray"), "job", "logs", "--follow", "--address", dashboard, job_id],
        env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert re.search(r"\[pid-batch\] \d+ samples, \d+/2 shards", logs.stdout), logs.stdout[-3000:]
    assert f"samples {len(ids)}  ok {len(ids)}  error 0" in logs.stdout
    assert "throughput" in logs.stdout
    assert _status(dashboard, job_id) == "SUCCEEDED"
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["ok"] == len(ids)


def test_submit_refuses_a_broken_spec_locally(head, tmp_path):
    """A spec that cannot run never reaches the cluster: one line, exit 2, no job."""
    env, dashboard, _ = head
    work = tmp_path / "project"
    work.mkdir()
    _spec(work / "spec.yaml", tmp_path / "in", tmp_path / "out", sampling={"steps": 9})
    from ray.job_submission import JobSubmissionClient

    before = len(JobSubmissionClient(dashboard).list_jobs())
    r = _pid_batch(["submit", "spec.yaml", "--address", dashboard, "--no-wait"], env, work)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("pid-batch: error:") and "sampling.steps=9" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert len(JobSubmissionClient(dashboard).list_jobs()) == before


def test_submitted_job_that_fails_at_start_is_one_line_and_failed(head, tmp_path):
    """Valid YAML whose weights are missing on the cluster: the job fails with one line."""
    env, dashboard, _ = head
    work = tmp_path / "project"
    work.mkdir()
    _shards(tmp_path / "in")
    _spec(
        work / "spec.yaml",
        tmp_path / "in",
        tmp_path / "out",
        model={"backbone": "flux", "ckpt_type": "2k", "preset": "tiny",
               "checkpoint": str(tmp_path / "missing.safetensors")},
    )  # fmt: skip
    r = _pid_batch(["submit", "spec.yaml", "--address", dashboard], env, work, timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    errors = [line for line in r.stdout.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("pid-batch: error:")
    assert "missing.safetensors" in errors[0]
    assert "Traceback" not in r.stdout
    assert _status(dashboard, r.stdout.splitlines()[0]) == "FAILED"
