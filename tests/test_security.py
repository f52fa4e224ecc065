"""Security: weights_only checkpoints, sha256 pins, key-safe ids, and no credential or signature
in any log, error, summary or timing row — with recognisable credentials and real S3 errors."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
from pathlib import Path

import pytest
import torch
from faults import DenyRule, FaultPlan, FaultProxy, flux_latents, tiny_job, write_flux_shards

from pid_batch import codecs, pipeline, storage
from pid_batch.checkpoint import save_checkpoint
from pid_batch.job import JobConfig, ModelConfig, OutputConfig, ResourceConfig
from pid_batch.model import PidNet
from pid_batch.sample_checks import net_config_for
from pid_batch.stages import decode, layout
from pid_batch.timing import read_timing

# Recognisable credentials: AWS-shaped (so a leak would look like a real one), unique strings.
LEAK_KEY_ID = "AKIAPIDBATCHLEAK7777"
LEAK_SECRET = "pidBatchLeakTest/Secret+Key0123456789abc"
LEAK_TOKEN = "PIDBATCHLEAKSESSIONTOKEN" + "x" * 40


class _Payload:
    """Unpickling this writes a marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _job(checkpoint: str, sha256: str | None = None) -> JobConfig:
    return JobConfig(
        input="/nonexistent/in",
        output="/nonexistent/out",
        model=ModelConfig(
            backbone="flux",
            ckpt_type="2k",
            preset="tiny",
            checkpoint=checkpoint,
            checkpoint_sha256=sha256,
        ),
        images=OutputConfig(image_format="png"),
        resources=ResourceConfig(batch_size=2),
    )


@pytest.fixture(scope="module")
def tiny_state():
    spec = ModelConfig(backbone="flux", ckpt_type="2k", preset="tiny").spec
    torch.manual_seed(0)
    return PidNet(net_config_for(spec, "tiny")).eval()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PID_BATCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# -- checkpoints ------------------------------------------------------------------------------


def test_pickled_checkpoint_from_s3_is_refused_by_the_decode_stage(
    s3_server, s3_bucket, tmp_path, cache, tiny_state
):
    """The actor's body (DecodeStage) fetches an s3:// .pth with a payload: refused, not run."""
    marker = tmp_path / "executed.txt"
    state = {f"net.{k}": v.to(torch.bfloat16) for k, v in tiny_state.state_dict().items()}
    state["net.extra"] = _Payload(marker)
    local = tmp_path / "evil.pth"
    torch.save(state, local)
    uri = f"s3://{s3_bucket}/weights/model_ema_bf16.pth"
    storage.write_bytes_atomic(uri, local.read_bytes())
    with pytest.raises(ValueError, match="refusing to unpickle"):
        decode.DecodeStage(_job(uri))
    assert not marker.exists()
    torch.load(local, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.read_text() == "pwned"


def test_checkpoint_sha256_pin(s3_server, s3_bucket, tmp_path, cache, tiny_state):
    local = tmp_path / "model_ema_bf16.pth"
    save_checkpoint(tiny_state, local)
    digest = hashlib.sha256(local.read_bytes()).hexdigest()
    uri = f"s3://{s3_bucket}/weights/model_ema_bf16.pth"
    storage.write_bytes_atomic(uri, local.read_bytes())
    with pytest.raises(ValueError, match="sha256 mismatch"):
        decode.DecodeStage(_job(uri, sha256="0" * 64))
    assert not [p for p in cache.rglob("*") if p.is_file() and p.stat().st_size > 1000]
    stage = decode.DecodeStage(_job(uri, sha256=digest))  # the right pin loads and decodes
    res = stage.decoder.decode([flux_latents(1)[0]], sigmas=[0.0], seeds=[1], captions=[""])
    assert res.images.shape == (1, 64, 96, 3)
    # A local checkpoint is pinned too; so is the run manifest.
    with pytest.raises(ValueError, match="sha256 mismatch"):
        decode.DecodeStage(_job(str(local), sha256="f" * 64))
    assert _job(str(local), sha256=digest).manifest()["checkpoint_sha256"] == digest


# -- ids --------------------------------------------------------------------------------------

HOSTILE_IDS = [
    "../../../etc/passwd",
    "/abs/path",
    "a/../../b",
    "..",
    ".hidden",
    "",
    "nul\x00byte",
    "back\\slash",
    "x" * 5000,
    "s3://other-bucket/key",
    "ümlaut-✓",
    "with--dashes",
]


@pytest.mark.parametrize("raw", HOSTILE_IDS)
def test_hostile_ids_stay_inside_the_image_prefix(raw):
    sid = codecs.sanitize_id(raw)
    assert re.fullmatch(r"[A-Za-z0-9._-]{1,128}", sid) and not sid.startswith(".")
    assert ".." not in sid
    uri = layout.image_uri("s3://bucket/out", sid, "png")
    assert uri.rsplit("/", 1)[0] == "s3://bucket/out/images"
    assert sid == raw or codecs.sanitize_id(raw + "!") != sid  # changed ids carry a hash


def test_join_refuses_to_climb_even_if_an_id_slips_through():
    for bad in ("../x", "a/../../x", "../../../etc/cron.d/x"):
        with pytest.raises(ValueError, match=r"\.\."):
            layout.image_uri("/out", bad, "png")


# -- credentials and signatures never leak ----------------------------------------------------


@pytest.fixture(scope="module")
def leaky_s3(s3_server):
    """Recognisable credentials in the environment; S3 behind a proxy that can deny requests
    with SignatureDoesNotMatch (whose body echoes the key id and signature, as S3's does)."""
    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL")
    old = {k: os.environ.get(k) for k in keys}
    with FaultProxy(s3_server) as proxy:
        os.environ.update(
            AWS_ACCESS_KEY_ID=LEAK_KEY_ID,
            AWS_SECRET_ACCESS_KEY=LEAK_SECRET,
            AWS_SESSION_TOKEN=LEAK_TOKEN,
            AWS_ENDPOINT_URL=proxy.endpoint,
        )
        storage._FS_CACHE.clear()  # filesystems built with the old credentials
        yield proxy
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    storage._FS_CACHE.clear()


@pytest.fixture(scope="module")
def leaky_ray(leaky_s3):
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=300 * 2**20,
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()


def _ray_log_files() -> list[Path]:
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    return [p for p in logs.rglob("*") if p.is_file()]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_no_credentials_in_logs_errors_summary_or_timing(leaky_ray, leaky_s3, s3_bucket, capfd):
    proxy = leaky_s3
    inp, out = f"s3://{s3_bucket}/in", f"s3://{s3_bucket}/out"
    write_flux_shards(inp, shards=3, per_shard=2)
    proxy.reset_stats()
    proxy.set_plan(
        FaultPlan(
            slowdown=0.05,
            seed=2,
            deny=[
                DenyRule(r"/in/shard-001\.safetensors$", methods=("GET",)),
                DenyRule(r"/out/images/s2-1\.png$", methods=("PUT", "POST")),
            ],
        )
    )
    log = io.StringIO()
    try:
        result = pipeline.run(tiny_job(inp, out), log=log)
    finally:
        proxy.set_plan(FaultPlan())
    assert proxy.stats["deny"] >= 2
    # The leak vector is real: requests carried our key id, and errors echoed it back.
    assert any(LEAK_KEY_ID in a for a in proxy.seen_auth)
    signatures = {m for a in proxy.seen_auth for m in re.findall(r"Signature=([0-9a-f]{64})", a)}
    assert signatures

    table = read_timing(out)
    errors = {r["id"]: r["error"] for r in table.to_pylist() if r["status"] == "error"}
    assert set(errors) == {"shard-001.safetensors", "s2-1"}, errors
    assert re.search(
        r"shard unreadable: .*SIGNATURE_DOES_NOT_MATCH", errors["shard-001.safetensors"]
    )
    assert re.search(r"write failed: .*SIGNATURE_DOES_NOT_MATCH", errors["s2-1"])
    assert result.exit_code == 1

    secrets_ = [LEAK_KEY_ID, LEAK_SECRET, LEAK_TOKEN, *signatures]
    captured = capfd.readouterr()
    haystacks = {"pipeline log": log.getvalue(), "stdout": captured.out, "stderr": captured.err}
    for uri in storage.list_files(out):
        haystacks[uri] = storage.read_bytes(uri).decode("latin-1")
    for p in _ray_log_files():  # driver, raylet and every worker's log
        with contextlib.suppress(OSError):
            haystacks[str(p)] = p.read_bytes().decode("latin-1")
    # The S3 error messages themselves are in what we search (timing parts, the summary).
    assert sum("SIGNATURE_DOES_NOT_MATCH" in h for h in haystacks.values()) >= 2
    leaks = {name: s[:12] for name, h in haystacks.items() for s in secrets_ if s in h}
    assert not leaks, f"credentials/signatures found in: {leaks}"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_pickled_checkpoint_fails_the_job_without_running(
    leaky_ray, s3_bucket, tmp_path, tiny_state
):
    """Through Ray: the actor refuses the file; the job fails with that reason, nothing ran."""
    marker = tmp_path / "executed.txt"
    state = {f"net.{k}": v.to(torch.bfloat16) for k, v in tiny_state.state_dict().items()}
    state["net.extra"] = _Payload(marker)
    local = tmp_path / "evil.pth"
    torch.save(state, local)
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    write_flux_shards(inp, shards=1, per_shard=1)
    job = tiny_job(inp, out)
    job = JobConfig(
        input=inp,
        output=out,
        model=ModelConfig(backbone="flux", ckpt_type="2k", preset="tiny", checkpoint=str(local)),
        images=job.images,
        resources=job.resources,
    )
    with pytest.raises(Exception, match="refusing to unpickle"):
        pipeline.run(job, log=None)
    assert not marker.exists()
    assert not (Path(out) / "images").exists()
