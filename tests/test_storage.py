"""storage: one code path over local disk and a loopback S3 (moto); retries, redaction, weight cache."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import pickle
from pathlib import Path

import boto3
import pyarrow.fs as pafs
import pytest

from pid_batch import storage
from pid_batch.redaction import redact


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """A writable base URI on each backend."""
    if request.param == "local":
        return str(tmp_path / "root")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/root"


@pytest.fixture
def s3_root(s3_bucket) -> str:
    return f"s3://{s3_bucket}/w"


def _put(endpoint: str, uri: str, data: bytes) -> None:
    bucket, key = uri[5:].split("/", 1)
    boto3.client("s3", endpoint_url=endpoint).put_object(Bucket=bucket, Key=key, Body=data)


# --- URIs ------------------------------------------------------------------------------------


def test_resolve_kinds(tmp_path, s3_server):
    fs, path = storage.resolve(str(tmp_path / "a.bin"))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "a.bin")
    fs, path = storage.resolve(f"file://{tmp_path}/x/../b.bin")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "b.bin")
    fs, path = storage.resolve("s3://bucket/k/v.bin")
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/k/v.bin"
    assert storage.resolve("s3://bucket/other")[0] is fs  # cached per (scheme, endpoint, region)
    for bad in ["gs://b/k", "s3://", "s3:///k", "file://host/x", ""]:
        with pytest.raises(ValueError):
            storage.resolve(bad)


def test_s3_endpoint_from_env(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    assert storage.s3_endpoint() == ("http", "127.0.0.1:9000")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://127.0.0.1:9443/")
    assert storage.s3_endpoint() == ("https", "127.0.0.1:9443")
    monkeypatch.setenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true")
    assert storage.s3_endpoint() == ("https", None)


def test_s3_filesystem_pickles_without_credentials(s3_server):
    fs, _ = storage.resolve("s3://bucket/x")
    blob = pickle.dumps(fs)
    assert b"testing" not in blob  # the fake secret from conftest never travels
    assert pickle.loads(blob) is fs  # same process: comes back through the cache


def _read_in_fresh_process(blob: bytes, path: str) -> bytes:
    os.environ.pop("AWS_ENDPOINT_URL", None)  # the endpoint must travel inside the pickle
    return pickle.loads(blob).open_input_stream(path).read()


def test_s3_filesystem_unpickles_in_another_process(s3_root):
    uri = storage.join(s3_root, "p.bin")
    storage.write_bytes_atomic(uri, b"payload")
    fs, path = storage.resolve(uri)
    with mp.get_context("spawn").Pool(1) as pool:
        assert pool.apply(_read_in_fresh_process, (pickle.dumps(fs), path)) == b"payload"


def test_join():
    assert storage.join("s3://b/x/", "y", "/z.png") == "s3://b/x/y/z.png"
    assert storage.join("/tmp/a", "b/c") == "/tmp/a/b/c"
    with pytest.raises(ValueError, match=r"\.\."):
        storage.join("s3://b/x", "../y")


# --- operations on both backends --------------------------------------------------------------


def test_write_read_list_exists_delete(root):
    a, b, c = (storage.join(root, p) for p in ("s/a.safetensors", "s/sub/b.parquet", "s/c.txt"))
    for uri, data in [(a, b"A" * 10), (b, b"BB"), (c, b"")]:
        storage.write_bytes_atomic(uri, data)
    assert storage.read_bytes(a) == b"A" * 10 and storage.read_bytes(c) == b""
    assert storage.size(a) == 10
    assert storage.exists(a) and storage.exists(storage.join(root, "s"))
    assert not storage.exists(storage.join(root, "s/nope"))
    assert storage.list_files(storage.join(root, "s")) == sorted([a, b, c])
    assert storage.list_files(storage.join(root, "s"), suffixes=(".safetensors", ".parquet")) == [
        a,
        b,
    ]
    assert storage.list_files(storage.join(root, "s"), recursive=False) == sorted([a, c])
    assert storage.list_files(a) == [a]
    assert storage.list_files(storage.join(root, "missing")) == []
    storage.write_json_atomic(storage.join(root, "m.json"), {"b": 1, "a": [1.5, None]})
    assert storage.read_json(storage.join(root, "m.json")) == {"a": [1.5, None], "b": 1}
    storage.write_bytes_atomic(a, b"new")  # overwrite
    assert storage.read_bytes(a) == b"new"
    storage.delete(a)
    assert not storage.exists(a)
    storage.delete(a)  # missing_ok
    with pytest.raises(FileNotFoundError):
        storage.delete(a, missing_ok=False)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(a)
    with pytest.raises(FileNotFoundError):
        storage.size(a)


def test_s3_delete_leaves_no_directory_marker(s3_server, s3_bucket):
    """Deleting the last object under a prefix leaves nothing: pyarrow's delete_file would put a
    0-byte '<prefix>/' marker in its place (seen as `_staging/<shard>/` after tar runs)."""
    root = f"s3://{s3_bucket}/out"
    part, other = (storage.join(root, p) for p in ("_staging/k/p0.tar", "keep.json"))
    storage.write_bytes_atomic(part, b"tar")
    storage.write_bytes_atomic(other, b"{}")
    storage.delete(part)
    listed = boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket=s3_bucket)
    assert [o["Key"] for o in listed.get("Contents", [])] == ["out/keep.json"]
    assert not storage.exists(storage.join(root, "_staging"))


def test_list_files_returns_uris_in_input_style(tmp_path):
    storage.write_bytes_atomic(str(tmp_path / "d" / "x.bin"), b"1")
    storage.write_bytes_atomic(str(tmp_path / "d" / ".hidden"), b"1")
    assert storage.list_files(f"file://{tmp_path}/d") == [f"file://{tmp_path}/d/x.bin"]
    assert storage.list_files(str(tmp_path / "d")) == [str(tmp_path / "d" / "x.bin")]


def test_local_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out" / "img.png"
    storage.write_bytes_atomic(str(target), b"old")

    def boom(*a, **k):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        storage.write_bytes_atomic(str(target), b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["img.png"]  # no temp left
    with pytest.raises(OSError):
        monkeypatch.setattr(os, "fsync", boom)
        storage.write_bytes_atomic(str(tmp_path / "out" / "fresh.png"), b"x")
    assert sorted(p.name for p in target.parent.iterdir()) == ["img.png"]


def test_s3_object_only_visible_when_complete(s3_root):
    """The property write_bytes_atomic relies on, incl. a multipart-sized body."""
    fs, path = storage.resolve(storage.join(s3_root, "big.bin"))
    chunk = os.urandom(6 << 20)
    with fs.open_output_stream(path) as f:
        f.write(chunk)
        f.write(chunk)  # > pyarrow's 10 MiB part: a part upload is in flight
        assert not storage.exists(storage.join(s3_root, "big.bin"))
    assert storage.read_bytes(storage.join(s3_root, "big.bin")) == chunk + chunk


# --- retries and redaction --------------------------------------------------------------------


class _Flaky:
    def __init__(self, errors: list[BaseException]):
        self.errors, self.calls = list(errors), 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


@pytest.mark.parametrize(
    "err",
    [
        OSError("AWS Error SLOW_DOWN during PutObject operation: Please reduce your request rate."),
        OSError("AWS Error UNKNOWN (HTTP status 503) during GetObject operation"),
        OSError("AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 56"),
        ConnectionResetError("Connection reset by peer"),
        TimeoutError("timed out"),
    ],
)
def test_retry_retries_transient(err):
    fn, sleeps = _Flaky([err, err]), []
    assert storage.retry(fn, attempts=3, base_delay=0.1, sleep=sleeps.append) == "ok"
    assert fn.calls == 3 and len(sleeps) == 2
    assert 0.05 <= sleeps[0] <= 0.1 and 0.1 <= sleeps[1] <= 0.2  # exponential, jittered


@pytest.mark.parametrize(
    "err",
    [
        FileNotFoundError("Path does not exist 'b/k'"),
        PermissionError("nope"),
        OSError("AWS Error ACCESS_DENIED during GetObject operation: Access Denied"),
        OSError("AWS Error UNKNOWN (HTTP status 403) during HeadObject operation"),
        ValueError("bad"),
    ],
)
def test_retry_does_not_retry_permanent(err):
    fn, sleeps = _Flaky([err]), []
    with pytest.raises(type(err)):
        storage.retry(fn, attempts=5, sleep=sleeps.append)
    assert fn.calls == 1 and sleeps == []


def test_retry_gives_up_and_redacts():
    err = OSError(
        "503 SlowDown on https://b.s3.amazonaws.com/k?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE"
    )
    fn = _Flaky([err] * 3)
    with pytest.raises(OSError) as info:
        storage.retry(fn, attempts=3, base_delay=0, sleep=lambda s: None)
    assert fn.calls == 3
    assert "deadbeef" not in str(info.value) and "AKIA" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.parametrize(
    "text, secret",
    [
        ("key id AKIAIOSFODNN7EXAMPLE in use", "AKIAIOSFODNN7EXAMPLE"),
        ("temp ASIAY34FZKBOKMUTVV7A expired", "ASIAY34FZKBOKMUTVV7A"),
        ("aws_secret_access_key=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMI"),
        ('{"aws_secret_access_key": "abc123secretvalue"}', "abc123secretvalue"),
        ("secret is wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY here", "wJalrXUtnFEMI"),
        ("AWS_SESSION_TOKEN=IQoJb3JpZ2luX2VjEJr short", "IQoJb3JpZ2luX2VjEJr"),
        ("tok " + "FwoGZXIvYXdzEBYaDH" * 10, "FwoGZXIvYXdzEBYaDH"),
        (
            "GET https://b.s3.amazonaws.com/w.pth?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature=abcdef0123 failed",
            "abcdef0123",
        ),
        ("Authorization: AWS4-HMAC-SHA256 Credential=AKIAX/2026, Signature=ffff0000", "ffff0000"),
    ],
)
def test_redact_removes_secrets(text, secret):
    out = redact(text)
    assert secret not in out and "REDACTED" in out


def test_redact_keeps_ordinary_text():
    text = (
        "shard s3://bucket/lat/shard-000001.safetensors sample 17: NaN in latent; sha256 "
        + "ab" * 32
    )
    assert redact(text) == text
    url = "https://b.s3.amazonaws.com/w.pth?X-Amz-Signature=abc"
    assert redact(url).startswith("https://b.s3.amazonaws.com/w.pth?")


# --- weight cache -----------------------------------------------------------------------------


def test_fetch_to_cache_downloads_once(s3_server, s3_root, tmp_path):
    uri, data = storage.join(s3_root, "ckpt/model_ema_bf16.pth"), os.urandom(300_000)
    _put(s3_server, uri, data)
    cache = tmp_path / "cache"
    p = storage.fetch_to_cache(uri, cache, sha256=hashlib.sha256(data).hexdigest())
    assert p.read_bytes() == data and p.name.endswith("model_ema_bf16.pth") and p.parent == cache
    storage.delete(uri)  # the second call must not need S3 at all
    assert storage.fetch_to_cache(uri, cache) == p
    assert storage.fetch_to_cache(uri, cache, sha256=hashlib.sha256(data).hexdigest()) == p
    assert [x.name for x in cache.iterdir() if not x.name.startswith(".")] == [p.name]
    assert not list(cache.glob("*tmp*"))


def test_fetch_to_cache_redownloads_bad_size(s3_server, s3_root, tmp_path, monkeypatch):
    uri, data = storage.join(s3_root, "w.bin"), os.urandom(50_000)
    _put(s3_server, uri, data)
    monkeypatch.setenv("PID_BATCH_CACHE", str(tmp_path / "c"))
    p = storage.fetch_to_cache(uri)
    assert p.parent == tmp_path / "c"
    p.write_bytes(data[:100])  # a truncated cached copy is never used
    assert storage.fetch_to_cache(uri).read_bytes() == data


def test_fetch_to_cache_sha_mismatch(s3_server, s3_root, tmp_path):
    uri = storage.join(s3_root, "w.bin")
    _put(s3_server, uri, b"weights")
    with pytest.raises(ValueError, match="sha256 mismatch"):
        storage.fetch_to_cache(uri, tmp_path, sha256="0" * 64)
    assert [x for x in tmp_path.iterdir() if not x.name.endswith(".lock")] == []
    with pytest.raises(ValueError, match="64 hex"):
        storage.fetch_to_cache(uri, tmp_path, sha256="abc")
    with pytest.raises(FileNotFoundError):
        storage.fetch_to_cache(storage.join(s3_root, "absent.bin"), tmp_path)


def test_fetch_to_cache_local_path(tmp_path):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"abc")
    assert storage.fetch_to_cache(str(f)) == f
    assert storage.fetch_to_cache(f"file://{f}", sha256=hashlib.sha256(b"abc").hexdigest()) == f
    with pytest.raises(ValueError, match="sha256 mismatch"):
        storage.fetch_to_cache(str(f), sha256="1" * 64)
    assert f.read_bytes() == b"abc"  # a user's own file is never deleted


def test_fetch_to_cache_concurrent_processes(s3_server, s3_root, tmp_path):
    uri, data = storage.join(s3_root, "big.pth"), os.urandom(12 << 20)
    _put(s3_server, uri, data)
    cache = tmp_path / "cache"
    with mp.get_context("spawn").Pool(2) as pool:
        paths = pool.starmap(storage.fetch_to_cache, [(uri, str(cache))] * 2)
    assert paths[0] == paths[1]
    assert hashlib.sha256(paths[0].read_bytes()).digest() == hashlib.sha256(data).digest()
    assert [x.name for x in cache.iterdir() if not x.name.startswith(".")] == [paths[0].name]
    assert not list(cache.glob("*tmp*"))


def test_fetch_dir_to_cache(s3_server, s3_root, tmp_path):
    prefix = storage.join(s3_root, "text_encoder")
    files = {"config.json": b"{}", "model.safetensors": os.urandom(1000), "sub/tok.json": b"[1]"}
    for rel, data in files.items():
        _put(s3_server, storage.join(prefix, rel), data)
    d = storage.fetch_dir_to_cache(prefix, tmp_path)
    assert {
        str(p.relative_to(d)): p.read_bytes()
        for p in d.rglob("*")
        if p.is_file() and p.name != storage.DIR_MARKER
    } == files
    assert (d / storage.DIR_MARKER).is_file()
    for rel in files:
        storage.delete(storage.join(prefix, rel))
    assert storage.fetch_dir_to_cache(prefix + "/", tmp_path) == d  # served from cache
    (d / "config.json").write_bytes(b"{broken")  # size changed → refetch, and S3 is now empty
    with pytest.raises(FileNotFoundError):
        storage.fetch_dir_to_cache(prefix, tmp_path)
    assert not d.exists() and not list(Path(tmp_path).glob("*tmp*"))
    assert storage.fetch_dir_to_cache(str(tmp_path)) == tmp_path


def test_endpoint_and_region_from_an_aws_profile_reach_loopback_s3(
    s3_server, s3_bucket, tmp_path, monkeypatch
):
    """An awscli-style config file is the only place that names the endpoint (as the SDKs read
    it: AWS_PROFILE's section, its `s3 = endpoint_url` sub-section first)."""
    config = tmp_path / "config"
    config.write_text(
        "[default]\nregion = eu-west-3\n\n"
        f"[profile loop]\nregion = us-east-1\ns3 =\n  endpoint_url = {s3_server}\n"
    )
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_PROFILE", "loop")
    uri = f"s3://{s3_bucket}/p/x.bin"
    storage.write_bytes_atomic(uri, b"hello")
    assert storage.read_bytes(uri) == b"hello"
    env = storage.s3_settings_env()
    assert env == {"AWS_ENDPOINT_URL_S3": s3_server, "AWS_REGION": "us-east-1"}
    monkeypatch.setenv("AWS_PROFILE", "default")
    assert storage.s3_endpoint() == ("https", None) and storage.s3_settings_env() == {
        "AWS_REGION": "eu-west-3"
    }
