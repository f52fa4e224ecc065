"""kill -9 of a running `pid-batch run` (driver + the local Ray it started), then the same command
again: every id exactly once, and nothing visible is ever a partial object."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from faults import assert_exactly_once, check_images_valid, wait_for, write_flux_shards

REPO = Path(__file__).resolve().parents[1]
# What storage's local atomic writes leave behind when killed between write and rename.
TEMP_NAME = re.compile(r"^\..+\.tmp-\d+-[0-9a-f]{8}$")


def _descendants(root: int) -> dict[int, str]:
    """pid → start time of every live descendant of `root` (from /proc)."""
    parent: dict[int, int] = {}
    start: dict[int, str] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        parent[int(d.name)], start[int(d.name)] = int(fields[1]), fields[19]
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        for child, ppid in parent.items():
            if ppid == pid and child not in out:
                out[child] = start[child]
                todo.append(child)
    return out


_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def _alive(pid: int, started: str) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[19] == started and fields[0] != "Z"


def _visible_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")]


def test_remove_stale_temps_only_touches_old_temp_files(tmp_path):
    from pid_batch import storage

    (tmp_path / "images").mkdir()
    old_tmp = tmp_path / "images" / ".a.png.tmp-123-0123abcd"
    new_tmp = tmp_path / "images" / ".b.png.tmp-124-0123abce"
    keep = [tmp_path / "images" / "a.png", tmp_path / ".hidden", tmp_path / ".x.tmp-1-zz"]
    for p in (old_tmp, new_tmp, *keep):
        p.write_bytes(b"x")
    os.utime(old_tmp, (time.time() - 7200, time.time() - 7200))
    assert storage.remove_stale_temps(str(tmp_path), older_than_s=3600) == 1
    assert not old_tmp.exists() and new_tmp.exists() and all(p.exists() for p in keep)
    assert storage.remove_stale_temps("s3://bucket/prefix") == 0


def _cmd(job: Path) -> list[str]:
    return [sys.executable, "-m", "pid_batch.cli", "run", str(job)]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kill_9_mid_run_then_rerun(tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    ids = write_flux_shards(str(inp), shards=4, per_shard=6)
    job = tmp_path / "job.yaml"
    job.write_text(
        json.dumps(
            {
                "input": str(inp),
                "output": str(out),
                "model": {"backbone": "flux", "ckpt_type": "2k", "preset": "tiny"},
                "images": {"image_format": "png"},
                "resources": {"batch_size": 2, "encode_batch_size": 2},
            }
        )
    )
    env = {
        **os.environ,
        "RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION": "0.02",  # ~0.5 GB on this box
        "PYTHONPATH": str(REPO),
    }
    log1 = (tmp_path / "run1.log").open("wb")
    driver = subprocess.Popen(_cmd(job), cwd=REPO, env=env, stdout=log1, stderr=log1)
    images = out / "images"

    def some_images() -> bool:
        return images.is_dir() and len([p for p in images.iterdir() if p.suffix == ".png"]) >= 3

    try:
        assert wait_for(lambda: some_images() or driver.poll() is not None, 180, every_s=0.02)
        assert driver.poll() is None, "run finished before it could be killed"
        tree = _descendants(driver.pid)
        names = {p: _cmdline(p) for p in tree}
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(10)
    finally:
        if driver.poll() is None:
            driver.kill()
        log1.close()
    # Ray's processes share the driver's fate (PR_SET_PDEATHSIG); every worker (anything that
    # could still write outputs) must be gone. Ray 2.60's DashboardAgent and RuntimeEnvAgent are
    # re-parented to init and linger; they never touch outputs, so we only clean them up.
    writers = {p: s for p, s in tree.items() if not names[p].startswith(_AGENTS)}
    gone = wait_for(lambda: not any(_alive(p, s) for p, s in writers.items()), 30, every_s=0.2)
    stragglers = [p for p, s in tree.items() if _alive(p, s)]
    for p in stragglers:
        os.kill(p, signal.SIGKILL)
    assert gone, f"workers outlived the killed driver: {[names[p] for p in stragglers]}"

    # After the kill: only whole objects are visible; temp files are dot-files, never listed.
    done_before = sorted(p.stem for p in images.glob("*.png"))
    assert 3 <= len(done_before) < len(ids)
    check_images_valid(str(out))
    ok_before = set()
    for p in _visible_files(out / "timing"):
        t = pq.read_table(io.BytesIO(p.read_bytes())).to_pylist()
        ok_before |= {r["id"] for r in t if r["status"] == "ok"}
    assert ok_before <= set(done_before)  # a row is written only after its image
    leftovers = [p.name for p in out.rglob(".*") if p.is_file()]
    assert all(TEMP_NAME.match(n) for n in leftovers), leftovers
    assert not (out / "summary.json").exists()

    t0 = time.time()
    rerun = subprocess.run(_cmd(job), cwd=REPO, env=env, capture_output=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr.decode()[-3000:]
    summary = assert_exactly_once(str(out), ids)
    assert summary["error"] == 0
    # Resumed, not redone: exactly the samples without an ok row were decoded again.
    assert summary["run"]["this_run"]["processed"] == len(ids) - len(ok_before)
    assert len(list((out / "_done").glob("*.json"))) == 4
    assert time.time() - t0 < 240
