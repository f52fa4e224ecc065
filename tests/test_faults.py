"""Faults during a run: a flaky S3 (503s, cut connections, latency), a decoder actor that dies,
a sample whose decode raises, a sample that kills its actor every time. Every input id must end
exactly once, images whole. Decoder faults come from tests/faults.py's Ray setup hook; no
production code carries a test hook."""

from __future__ import annotations

import os
import threading

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ResponseStreamingError
from faults import (
    CONTROL_ENV,
    DenyRule,
    FaultPlan,
    FaultProxy,
    assert_exactly_once,
    crash_count,
    decode_faults,
    kill_token_used,
    tiny_job,
    wait_for,
    write_control,
    write_flux_shards,
)

from pid_batch import pipeline, storage
from pid_batch.timing import read_timing

# 5 % 503 SlowDown + 6 % cut connections + 4 % added latency = 15 % of requests faulted; seed 7
# gives >= 17 % faulted, every kind >= 2x, whatever the request count between 30 and 150.
FLAKY = FaultPlan(slowdown=0.05, drop=0.06, latency=0.04, latency_s=0.1, seed=7)


@pytest.fixture(scope="module")
def proxy(s3_server):
    """The fault proxy in front of moto; AWS_ENDPOINT_URL points at it for the whole module."""
    with FaultProxy(s3_server) as p:
        old = os.environ["AWS_ENDPOINT_URL"]
        os.environ["AWS_ENDPOINT_URL"] = p.endpoint
        yield p
        os.environ["AWS_ENDPOINT_URL"] = old


@pytest.fixture(scope="module")
def control(tmp_path_factory):
    return tmp_path_factory.mktemp("faults") / "control.json"


@pytest.fixture(scope="module")
def fault_ray(proxy, control):
    """Local Ray whose workers talk to S3 through the proxy and run the decoder fault hook."""
    import faults
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(faults)  # workers need not import tests/
    write_control(control)
    os.environ[CONTROL_ENV] = str(control)
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=300 * 2**20,
        log_to_driver=False,
        runtime_env={"worker_process_setup_hook": decode_faults},
    )
    yield ray
    ray.shutdown()
    os.environ.pop(CONTROL_ENV, None)


@pytest.fixture
def flaky(proxy):
    proxy.set_plan(FaultPlan())
    proxy.reset_stats()
    yield proxy
    proxy.set_plan(FaultPlan())


# -- the proxy itself (no Ray) ----------------------------------------------------------------


@pytest.mark.timeout(120)
def test_proxy_faults_storage_and_boto3_survive(flaky, s3_bucket):
    """pyarrow (storage.*) and boto3 both go through the proxy and retry its faults."""
    flaky.set_plan(FaultPlan(slowdown=0.1, drop=0.1, latency=0.05, latency_s=0.05, seed=3))
    s3 = boto3.client(
        "s3",
        endpoint_url=flaky.endpoint,
        config=Config(retries={"mode": "standard", "max_attempts": 10}),
    )
    for i in range(6):
        blob = os.urandom(5000 + i)
        uri = f"s3://{s3_bucket}/p/{i}.bin"
        storage.write_bytes_atomic(uri, blob)
        assert storage.read_bytes(uri) == blob
        assert storage.read_range(uri, 100, 50) == blob[100:150]
        s3.put_object(Bucket=s3_bucket, Key=f"b/{i}", Body=blob)
        assert _boto3_get(s3, s3_bucket, f"b/{i}") == blob
    assert len(storage.list_files(f"s3://{s3_bucket}/p")) == 6
    assert flaky.stats["slowdown"] and flaky.stats["drop"] and flaky.stats["latency"]
    assert flaky.faulted_fraction >= 0.10


@pytest.mark.timeout(60)
def test_permanent_s3_error_is_not_retried_forever(flaky, s3_bucket):
    uri = f"s3://{s3_bucket}/denied/x.bin"
    # Larger than the error document: pyarrow reads an object into a buffer of the object's size,
    # and an error body that overflows it surfaces as a (transient) INTERNAL_FAILURE instead.
    storage.write_bytes_atomic(uri, b"x" * 4096)
    flaky.set_plan(FaultPlan(deny=[DenyRule(r"/denied/", methods=("GET",), code="AccessDenied")]))
    with pytest.raises(OSError, match="(?i)access.?denied"):
        storage.read_bytes(uri)
    assert flaky.stats["deny"] <= 2  # one request (plus at most one SDK re-try), no backoff loop


def _boto3_get(s3, bucket: str, key: str) -> bytes:
    """boto3 retries requests, not a body cut mid-stream: the caller re-reads (as storage does)."""
    for attempt in range(5):
        try:
            return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        except ResponseStreamingError:
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


# -- the pipeline under faults ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_pipeline_survives_flaky_s3(fault_ray, flaky, s3_bucket):
    inp, out = f"s3://{s3_bucket}/latents", f"s3://{s3_bucket}/out/flaky"
    ids = write_flux_shards(inp, shards=3, per_shard=4)
    flaky.reset_stats()
    flaky.set_plan(FLAKY)
    result = pipeline.run(tiny_job(inp, out), log=None)
    flaky.set_plan(FaultPlan())
    assert flaky.stats["requests"] >= 30
    assert flaky.faulted_fraction >= 0.10, dict(flaky.stats)
    assert all(flaky.stats[k] for k in ("slowdown", "drop", "latency")), dict(flaky.stats)
    assert result.exit_code == 0, result.summary
    summary = assert_exactly_once(out, ids)
    assert summary["error"] == 0
    assert len(storage.list_files(f"{out}/_done")) == 3


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_decoder_actor_killed_mid_run(fault_ray, control, tmp_path):
    """The actor dies (os._exit) on its 3rd decode call; Ray Data restarts it, retries the batch."""
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    ids = write_flux_shards(inp, shards=4, per_shard=4)
    write_control(control, kill_after_calls=2)
    try:
        result = pipeline.run(tiny_job(inp, out, batch_size=2), log=None)
    finally:
        used = kill_token_used(control)
        write_control(control)
    assert used, "no decoder actor was killed; the test proved nothing"
    assert result.exit_code == 0, result.summary
    assert result.processed == len(ids)
    assert_exactly_once(out, ids)
    assert len(storage.list_files(f"{out}/_done")) == 4


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_poisoned_sample_is_one_error_row(fault_ray, control, tmp_path):
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    ids = write_flux_shards(inp, shards=2, per_shard=4)
    write_control(control, poison=["s1-2"])
    try:
        result = pipeline.run(tiny_job(inp, out), log=None)
    finally:
        write_control(control)
    assert result.exit_code == 1 and result.error_ids == ["s1-2"]
    assert_exactly_once(out, ids, ok=[i for i in ids if i != "s1-2"])
    (err,) = [r for r in read_timing(out).to_pylist() if r["status"] == "error"]
    assert err["id"] == "s1-2" and "decode failed: RuntimeError: poisoned" in err["error"]
    # The shard with the poisoned sample stays open (no marker); the other one is done.
    assert [u.rsplit("/", 1)[1] for u in storage.list_files(f"{out}/_done")] == [
        "shard-000.safetensors.json"
    ]


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_sample_that_crashes_the_actor_every_time_does_not_hang_the_job(
    fault_ray, control, tmp_path
):
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    write_flux_shards(inp, shards=2, per_shard=2)
    write_control(control, crash=["s1-1"])
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["result"] = pipeline.run(tiny_job(inp, out, batch_size=1), log=None)
        except Exception as e:  # the minimal fix: the run fails loudly instead of hanging
            outcome["error"] = e

    runner = threading.Thread(target=target, daemon=True)
    runner.start()
    wait_for(lambda: not runner.is_alive() or crash_count(control) > 3, 150, every_s=0.5)
    crashes = crash_count(control)
    write_control(control)  # disarm: a run that is still retrying can now finish
    runner.join(120)
    control.with_suffix(".crashes").unlink(missing_ok=True)
    assert not runner.is_alive()
    assert crashes <= 3, f"one sample crashed the decoder {crashes} times and was retried again"
    # The batch that held it is given up after 3 deaths; its sample (and any batch that was queued
    # on the same dying actor each time) becomes an error row, and the rest of the job completes.
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert "s1-1" in result.error_ids and result.exit_code == 1
    rows = read_timing(out).to_pylist()
    assert sorted(r["id"] for r in rows) == ["s0-0", "s0-1", "s1-0", "s1-1"]  # each exactly once
    assert all("lost" in r["error"] for r in rows if r["status"] == "error")
    # The shard with the lost samples has no done marker, so a rerun retries exactly them.
    assert not (tmp_path / "out" / "_done" / "shard-001.safetensors.json").exists()
