"""URIs → filesystems, retried atomic IO and a per-node weight cache (pyarrow.fs); errors come out
redacted (pid_batch.redaction)."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import random
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

from pid_batch.redaction import redact, scrubbed

log = logging.getLogger(__name__)
T = TypeVar("T")

SUPPORTED_SCHEMES = ("s3://", "file://", "<plain local path>")
# pyarrow's own (per-request) retries; AWS "standard" mode backs off with jitter on 5xx/throttling.
S3_MAX_ATTEMPTS = 5
S3_CONNECT_TIMEOUT_S = 10.0
# Socket read timeout; pyarrow applies it on Windows/macOS only (AWS SDK limitation on Linux).
S3_REQUEST_TIMEOUT_S = 60.0
# Our outer retries wrap whole operations (a reset in the middle of a streamed body, 503 bursts).
RETRY_ATTEMPTS = 4
RETRY_BASE_DELAY_S = 0.5
RETRY_MAX_DELAY_S = 8.0
CHUNK_BYTES = 8 << 20
DIR_MARKER = ".pid-batch-complete.json"

# ---------------------------------------------------------------------------------------------
# Retries

# pyarrow reports S3 failures as OSError("... AWS Error <CODE> [(HTTP status NNN)] during <Op> ...").
_PERMANENT = re.compile(
    r"access.?denied|forbidden|no.?such.?(key|bucket)|invalid.?access.?key|signature.?does.?not|"
    r"expired.?token|invalid.?token|(http status|response code) 4(0[0-79]|1\d)"
)
_TRANSIENT = re.compile(
    r"slow.?down|throttl|\b(429|500|502|503|504)\b|service.?unavailable|internal.?(failure|error)|"
    r"request.?timeout|timed out|timeout|connection|network|\breset\b|broken pipe|temporar|"
    r"try again|curlcode|short read"
)


_PERMANENT_TYPES = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def is_transient(exc: BaseException) -> bool:
    """Whether an IO error is worth retrying (throttling, 5xx, resets, timeouts)."""
    if isinstance(exc, _PERMANENT_TYPES):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    if not isinstance(exc, OSError):
        return False
    msg = str(exc).lower()
    return not _PERMANENT.search(msg) and bool(_TRANSIENT.search(msg))


def retry(
    fn: Callable[[], T],
    attempts: int = RETRY_ATTEMPTS,
    base_delay: float = RETRY_BASE_DELAY_S,
    max_delay: float = RETRY_MAX_DELAY_S,
    what: str = "storage operation",
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call fn, retrying transient errors with exponential backoff + jitter; errors come out redacted."""
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt == attempts or not is_transient(exc):
                clean = scrubbed(exc)
                if clean is exc:
                    raise
                raise clean from None
            cap = min(max_delay, base_delay * 2 ** (attempt - 1))
            delay = cap / 2 + random.uniform(0, cap / 2)
            log.warning(
                "%s failed (attempt %d/%d), retrying in %.2fs: %s",
                what, attempt, attempts, delay, redact(str(exc)),
            )  # fmt: skip
            sleep(delay)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# URIs → filesystems

_FS_CACHE: dict[tuple[str, str | None, str | None], pafs.FileSystem] = {}
_FS_LOCK = threading.Lock()
_LOCAL = pafs.LocalFileSystem()


class _S3FileSystem(pafs.S3FileSystem):
    """S3FileSystem that unpickles through the per-process cache (keeps our retries and timeouts)."""

    def __reduce__(self):  # noqa: D105
        return _s3_filesystem, self._pid_batch_spec


def _s3_filesystem(scheme: str, endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    """The cached S3 filesystem for one (scheme, endpoint, region); credentials from the AWS chain."""
    key = (scheme, endpoint, region)
    with _FS_LOCK:
        fs = _FS_CACHE.get(key)
        if fs is None:
            fs = _S3FileSystem(
                scheme=scheme,
                endpoint_override=endpoint,
                region=region,
                connect_timeout=S3_CONNECT_TIMEOUT_S,
                request_timeout=S3_REQUEST_TIMEOUT_S,
                retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
                # Small objects (images, timing parts, markers) go up as one PutObject instead of
                # create + part + complete multipart requests: 1 request, not 3 (measured through
                # tests/faults.py's proxy, pyarrow 26); still all-or-nothing.
                allow_delayed_open=True,
            )
            fs._pid_batch_spec = key
            _FS_CACHE[key] = fs
    return fs


def _profile() -> dict[str, str]:
    """The active AWS profile's settings from the shared config file, as the AWS SDKs read them:
    AWS_CONFIG_FILE (default ~/.aws/config), section [default] or [profile AWS_PROFILE]; an
    `s3 =` sub-section's keys override the profile's own. {} when there is none."""
    path = os.path.expanduser(os.environ.get("AWS_CONFIG_FILE", "~/.aws/config"))
    name = os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE") or "default"
    try:
        stamp = os.stat(path).st_mtime_ns
    except OSError:
        return {}
    return dict(_read_profile(path, name, stamp))


@functools.lru_cache(maxsize=8)
def _read_profile(path: str, name: str, _stamp: int) -> tuple[tuple[str, str], ...]:
    """_profile's parse, cached per (file, profile, modification time): storage calls resolve
    the endpoint on every operation."""
    import configparser

    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(path)
    except configparser.Error:
        return ()
    section = "default" if name == "default" else f"profile {name}"
    if not parser.has_section(section):
        return ()
    out = {k: v.strip() for k, v in parser.items(section) if k != "s3"}
    for line in parser.get(section, "s3", fallback="").splitlines():  # "s3 =\n  key = value"
        key, sep, value = line.partition("=")
        if sep and key.strip() == "endpoint_url":
            out["s3_endpoint_url"] = value.strip()
    return tuple(out.items())


def s3_endpoint() -> tuple[str, str | None]:
    """(scheme, host[:port]) of the S3 endpoint, resolved as the AWS SDKs do: AWS_ENDPOINT_URL_S3,
    AWS_ENDPOINT_URL, then the active profile's `s3 = endpoint_url` and `endpoint_url`."""
    if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true":
        return "https", None
    url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not url:
        profile = _profile()
        url = profile.get("s3_endpoint_url") or profile.get("endpoint_url")
    if not url:
        return "https", None
    parsed = urlparse(url if "://" in url else f"https://{url}")
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(
            f"AWS endpoint URL must look like http(s)://host[:port], got {redact(url)!r}"
        )
    return parsed.scheme, parsed.netloc


def s3_settings_env() -> dict[str, str]:
    """The S3 endpoint and region this process resolved, as variables for workers on other
    nodes (which may lack the profile); never credentials."""
    scheme, endpoint = s3_endpoint()
    env = {"AWS_ENDPOINT_URL_S3": f"{scheme}://{endpoint}"} if endpoint else {}
    if region := _region():
        env["AWS_REGION"] = region
    return env


def _region() -> str | None:
    """AWS_REGION, AWS_DEFAULT_REGION, then the active profile's `region`."""
    return (
        os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or _profile().get("region")
        or None
    )


def _split(uri: str) -> tuple[str, str]:
    """('s3' | 'file' | 'path', filesystem path) for a URI; raises ValueError on others."""
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"expected a non-empty URI string, got {uri!r}")
    if uri.startswith("s3://"):
        path = uri[5:].strip("/")
        if not path or path.startswith("/") or len(path.split("/", 1)[0]) < 3:
            raise ValueError(f"S3 URI must be s3://bucket[/key], got {uri!r}")
        return "s3", path
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file URI must be file:///absolute/path, got {uri!r}")
        return "file", os.path.abspath(parsed.path or "/")
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", uri):
        raise ValueError(
            f"unsupported URI scheme in {uri!r}; supported: {', '.join(SUPPORTED_SCHEMES)}"
        )
    return "path", os.path.abspath(os.path.expanduser(uri))


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) for a local path, file:// or s3:// URI."""
    kind, path = _split(uri)
    if kind != "s3":
        return _LOCAL, path
    scheme, endpoint = s3_endpoint()
    return _s3_filesystem(scheme, endpoint, _region()), path


def is_local(uri: str) -> bool:
    """Whether the URI names the local filesystem."""
    return _split(uri)[0] != "s3"


def _to_uri(kind: str, path: str) -> str:
    return {"s3": "s3://", "file": "file://", "path": ""}[kind] + path


def join(uri: str, *parts: str) -> str:
    """uri/part1/part2...; refuses '..' segments so ids can never climb out of a prefix."""
    out = uri.rstrip("/") or "/"
    for part in parts:
        segs = [s for s in str(part).split("/") if s]
        if ".." in segs:
            raise ValueError(f"path part must not contain '..', got {part!r}")
        if segs:
            out = out.rstrip("/") + "/" + "/".join(segs)
    return out


# ---------------------------------------------------------------------------------------------
# Operations


class Entry(NamedTuple):
    """A listed file: its URI, size and modification time (S3: LastModified)."""

    uri: str
    size: int
    mtime_ns: int


def list_entries(
    uri: str, suffixes: tuple[str, ...] | list[str] | str | None = None, recursive: bool = True
) -> list[Entry]:
    """Files under uri (or uri itself if it is a file), sorted by URI; dotfiles are skipped.

    Local listings skip (with a warning naming the path, nothing of its content) any entry
    whose real path, symlinks resolved, lies outside the listed folder's real path: a shard
    linked to /etc/passwd, or a linked folder elsewhere, is not input. A file named directly
    as uri is taken as given.
    """
    kind, path = _split(uri)
    fs, _ = resolve(uri)
    if isinstance(suffixes, str):
        suffixes = (suffixes,)
    info = retry(lambda: fs.get_file_info(path), what=f"stat {uri}")
    if info.type == pafs.FileType.File:
        infos = [info]
    elif info.type == pafs.FileType.NotFound:
        return []
    else:
        sel = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
        infos = retry(lambda: fs.get_file_info(sel), what=f"list {uri}")
    out = []
    for fi in infos:
        if fi.type != pafs.FileType.File or fi.base_name.startswith("."):
            continue
        if suffixes and not fi.base_name.lower().endswith(tuple(s.lower() for s in suffixes)):
            continue
        if kind != "s3" and info.type != pafs.FileType.File and not _inside(fi.path, path):
            log.warning("skipping %s: a symlink that resolves outside %s", fi.path, path)
            continue
        out.append(Entry(_to_uri(kind, fi.path), int(fi.size or 0), int(fi.mtime_ns or 0)))
    return sorted(out)


def list_files(
    uri: str, suffixes: tuple[str, ...] | list[str] | str | None = None, recursive: bool = True
) -> list[str]:
    """Sorted full URIs of the files under uri (or [uri] if it is a file); dotfiles are skipped
    (and local entries resolving outside uri, see list_entries)."""
    return [e.uri for e in list_entries(uri, suffixes, recursive)]


def _inside(path: str, root: str) -> bool:
    """Whether path's real location (symlinks resolved) is root's real location or under it."""
    real, top = os.path.realpath(path), os.path.realpath(root)
    return real == top or real.startswith(top.rstrip("/") + "/")


def read_bytes(uri: str) -> bytes:
    """Whole object / file contents (retried)."""
    fs, path = resolve(uri)

    def _read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    return retry(_read, what=f"read {uri}")


def read_range(uri: str, offset: int, length: int) -> bytes:
    """`length` bytes from `offset` (fewer past the end), retried; a ranged GET on S3."""
    if offset < 0 or length < 0:
        raise ValueError(f"offset and length must be >= 0, got {offset}, {length}")
    fs, path = resolve(uri)

    def _read() -> bytes:
        with fs.open_input_file(path) as f:
            return f.read_at(length, offset)

    return retry(_read, what=f"read {uri}")


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_local_atomic(path: str, data: bytes | memoryview) -> None:
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(
        parent, f".{os.path.basename(path)}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    )
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, unlike mkstemp
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(parent)


_TEMP_NAME = re.compile(r"^\..+\.tmp-\d+-[0-9a-f]{8}$")


def remove_stale_temps(uri: str, older_than_s: float = 3600.0) -> int:
    """Delete temp files that killed writers left under a local prefix; how many went.

    Only names `_write_local_atomic` creates ('.<name>.tmp-<pid>-<hex>') older than
    `older_than_s` are touched (a live writer's temp file is younger). S3 has none: an object
    appears whole or not at all (abort incomplete multipart uploads with a lifecycle rule).
    """
    kind, path = _split(uri)
    if kind == "s3" or not os.path.isdir(path):
        return 0
    cutoff, n = time.time() - older_than_s, 0
    for parent, _, files in os.walk(path):
        for name in files:
            full = os.path.join(parent, name)
            with contextlib.suppress(FileNotFoundError):
                if _TEMP_NAME.match(name) and os.lstat(full).st_mtime < cutoff:
                    os.unlink(full)
                    n += 1
    return n


def write_bytes_atomic(uri: str, data: bytes | memoryview) -> None:
    """Write so readers see the old object or the whole new one, never a part.

    Local: temp file in the same directory, fsync, os.replace. S3: one PutObject (or, above
    pyarrow's part size, a multipart upload), which becomes visible only once complete.
    """
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        retry(lambda: _write_local_atomic(path, data), what=f"write {uri}")
        return

    def _put() -> None:
        with fs.open_output_stream(path) as f:
            f.write(data)

    retry(_put, what=f"write {uri}")


def write_json_atomic(uri: str, obj: Any) -> None:
    """Atomically write obj as sorted, indented JSON (NaN refused)."""
    data = json.dumps(obj, sort_keys=True, indent=2, allow_nan=False).encode() + b"\n"
    write_bytes_atomic(uri, data)


def read_json(uri: str) -> Any:
    """Parse a JSON object written by write_json_atomic (or anyone)."""
    return json.loads(read_bytes(uri))


def exists(uri: str) -> bool:
    """Whether a file, object or non-empty prefix exists at uri."""
    fs, path = resolve(uri)
    info = retry(lambda: fs.get_file_info(path), what=f"stat {uri}")
    return info.type != pafs.FileType.NotFound


def size(uri: str) -> int:
    """Size in bytes of a file/object; FileNotFoundError if absent."""
    fs, path = resolve(uri)
    info = retry(lambda: fs.get_file_info(path), what=f"stat {uri}")
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"no file at {uri}")
    return int(info.size)


def delete(uri: str, missing_ok: bool = True) -> None:
    """Delete one file/object.

    S3 takes a plain DeleteObject: pyarrow's delete_file puts a 0-byte '<parent>/' object in
    place of a parent prefix it leaves empty (tar runs left `_staging/<shard>/` behind).
    """
    kind, path = _split(uri)
    if kind == "s3":
        if not missing_ok and version(uri) is None:
            raise FileNotFoundError(f"no object at {uri}")
        bucket, key = _bucket_key(path)
        retry(lambda: _s3_client().delete_object(Bucket=bucket, Key=key), what=f"delete {uri}")
        return
    fs, path = resolve(uri)
    try:
        retry(lambda: fs.delete_file(path), what=f"delete {uri}")
    except FileNotFoundError:
        if not missing_ok:
            raise


# ---------------------------------------------------------------------------------------------
# Conditional writes (one winner among concurrent writers)

_S3_CLIENTS: dict[tuple[str, str | None, str | None], Any] = {}


def _s3_client() -> Any:
    """A cached boto3 S3 client for the configured endpoint (pyarrow has no conditional put)."""
    import boto3  # only the conditional-write path needs it

    scheme, endpoint = s3_endpoint()
    key = (scheme, endpoint, _region())
    with _FS_LOCK:
        client = _S3_CLIENTS.get(key)
        if client is None:
            url = f"{scheme}://{endpoint}" if endpoint else None
            client = boto3.client("s3", endpoint_url=url, region_name=_region())
            _S3_CLIENTS[key] = client
    return client


def _bucket_key(path: str) -> tuple[str, str]:
    bucket, _, key = path.partition("/")
    if not key:
        raise ValueError(f"conditional writes need s3://bucket/key, got bucket {bucket!r} alone")
    return bucket, key


def _s3_code(exc: BaseException) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _s3_lost(exc: BaseException) -> bool:
    """Whether a conditional PutObject lost: 412, 409 conflict, or If-Match on an absent key (404)."""
    return _s3_code(exc) in (
        "PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409", "404"
    )  # fmt: skip


def _local_version(path: str) -> str | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return f"{st.st_mtime_ns}-{st.st_size}-{st.st_ino}"


@contextlib.contextmanager
def _dir_locked(directory: str) -> Iterator[None]:
    """An exclusive flock on a directory itself: conditional writes of the files in it take
    turns, and no lock file is left beside the outputs (Linux allows flock on a directory fd)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def version(uri: str) -> str | None:
    """An opaque version token of the object at uri (S3 ETag; local mtime-size-inode); None if absent."""
    kind, path = _split(uri)
    if kind != "s3":
        return _local_version(path)
    bucket, key = _bucket_key(path)

    def _head() -> str | None:
        try:
            return str(_s3_client().head_object(Bucket=bucket, Key=key)["ETag"])
        except Exception as exc:
            if _s3_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    return retry(_head, what=f"stat {uri}")


def _put_if(uri: str, data: bytes, etag: str | None) -> bool:
    """S3 PutObject that only lands if the object is absent (etag None) or still has etag."""
    bucket, key = _bucket_key(_split(uri)[1])
    cond = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}

    def _put() -> bool:
        try:
            _s3_client().put_object(Bucket=bucket, Key=key, Body=bytes(data), **cond)
        except Exception as exc:
            if _s3_lost(exc):
                # A put whose answer was lost may have landed; its retry (ours, or botocore's
                # own) then finds the condition spent. It won if the object holds our bytes.
                return _holds(uri, data)
            raise
        return True

    return retry(_put, what=f"conditional write {uri}")


def _holds(uri: str, data: bytes) -> bool:
    """Whether the object exists and its bytes are exactly `data`."""
    try:
        return read_bytes(uri) == data
    except FileNotFoundError:
        return False


def create_exclusive(uri: str, data: bytes) -> bool:
    """Create the object atomically; False (nothing written) if it already exists.

    S3: PutObject with If-None-Match: *. Local: temp file, then os.link (fails if the name
    exists), under the same directory lock replace_if takes so the two never interleave.
    """
    kind, path = _split(uri)
    if kind == "s3":
        return _put_if(uri, data, None)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with _dir_locked(os.path.dirname(path)):
        if os.path.lexists(path):
            return False
        tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.tmp-{os.getpid()}-"
        tmp += secrets.token_hex(4)
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    _fsync_dir(os.path.dirname(path))
    return True


def replace_if(uri: str, data: bytes, version: str | None) -> bool:
    """Compare-and-swap: write only if the object's current version() equals `version`.

    `version=None` means the object must not exist. Returns False (nothing written) on a
    mismatch. S3: PutObject with If-Match: <etag> (If-None-Match: * for None). Local: an
    flock on the directory, compare, atomic rename, unlock.
    """
    kind, path = _split(uri)
    if kind == "s3":
        return _put_if(uri, data, version)
    if version is None:
        return create_exclusive(uri, data)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with _dir_locked(os.path.dirname(path)):
        if _local_version(path) != version:
            return False
        retry(lambda: _write_local_atomic(path, data), what=f"write {uri}")
    return True


class NewObject:
    """An object of any size written piece by piece, appearing whole and only if its name was
    free: commit() is True when it was created, False when the name existed (nothing written).

    Memory is one chunk. Local: a temp dot-file in the same folder, fsynced, then os.link (which
    fails if the name exists). S3: a multipart upload of `chunk_bytes` parts completed with
    If-None-Match: * (one conditional PutObject when it fits one chunk); abort() (or an error in
    commit) abandons the upload, so nothing partial is ever visible.
    """

    def __init__(self, uri: str, chunk_bytes: int = CHUNK_BYTES):
        self.uri, self.kind = uri, _split(uri)[0]
        path = _split(uri)[1]
        self.size = 0
        if self.kind == "s3":
            self.bucket, self.key = _bucket_key(path)
            self.chunk_bytes = max(chunk_bytes, 5 << 20)  # S3's smallest part but the last
            self.buf = bytearray()
            self.upload_id: str | None = None
            self.parts: list[dict[str, Any]] = []
        else:
            self.path = path
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self.tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.tmp-{os.getpid()}-"
            self.tmp += secrets.token_hex(4)
            self.file = open(self.tmp, "xb")  # noqa: SIM115 - closed in commit/abort

    def write(self, data: bytes | memoryview) -> int:
        """Append data (file-like, so tarfile can stream into it)."""
        self.size += len(data)
        if self.kind != "s3":
            return self.file.write(data)
        self.buf += data
        while len(self.buf) >= self.chunk_bytes:
            self._upload(bytes(self.buf[: self.chunk_bytes]))
            del self.buf[: self.chunk_bytes]
        return len(data)

    def _upload(self, body: bytes) -> None:
        client = _s3_client()
        if self.upload_id is None:
            self.upload_id = retry(
                lambda: client.create_multipart_upload(Bucket=self.bucket, Key=self.key),
                what=f"start upload {self.uri}",
            )["UploadId"]
        number = len(self.parts) + 1
        etag = retry(
            lambda: client.upload_part(
                Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                PartNumber=number, Body=body,
            ),
            what=f"upload part {number} of {self.uri}",
        )["ETag"]  # fmt: skip
        self.parts.append({"ETag": etag, "PartNumber": number})

    def commit(self) -> bool:
        """Make the object visible if its name is free; False (and nothing written) if not."""
        if self.kind != "s3":
            try:
                self.file.flush()
                os.fsync(self.file.fileno())
                self.file.close()
                try:
                    os.link(self.tmp, self.path)
                except FileExistsError:
                    return False
            finally:
                self.abort()
            _fsync_dir(os.path.dirname(self.path))
            return True
        if self.upload_id is None:
            return _put_if(self.uri, bytes(self.buf), None)
        try:
            if self.buf or not self.parts:
                self._upload(bytes(self.buf))
            client = _s3_client()
            done = {"Parts": self.parts}

            def _complete() -> bool:
                try:
                    client.complete_multipart_upload(
                        Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                        MultipartUpload=done, IfNoneMatch="*",
                    )  # fmt: skip
                except Exception as exc:
                    if _s3_lost(exc):
                        return False
                    raise
                return True

            created = retry(_complete, what=f"complete upload {self.uri}")
        except BaseException:
            self.abort()
            raise
        if not created:
            self.abort()
        return created

    def abort(self) -> None:
        """Abandon the write: remove the temp file or abort the multipart upload."""
        if self.kind != "s3":
            with contextlib.suppress(OSError):
                self.file.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp)
            return
        if self.upload_id is not None:
            with contextlib.suppress(Exception):
                _s3_client().abort_multipart_upload(
                    Bucket=self.bucket, Key=self.key, UploadId=self.upload_id
                )
            self.upload_id = None
        self.buf = bytearray()


def open_input(uri: str):
    """A readable, seekable file for uri (pyarrow; S3 reads are ranged GETs as you read)."""
    fs, path = resolve(uri)
    return retry(lambda: fs.open_input_file(path), what=f"open {uri}")


# ---------------------------------------------------------------------------------------------
# Per-node weight cache


def default_cache_dir() -> Path:
    """$PID_BATCH_CACHE or ~/.cache/pid-batch/weights."""
    env = os.environ.get("PID_BATCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pid-batch" / "weights"


def _cache_name(uri: str) -> str:
    """Stable cache entry name: hash of (endpoint, uri) + a readable, safe basename."""
    _, endpoint = s3_endpoint()
    digest = hashlib.sha256(f"{endpoint or ''}|{uri}".encode()).hexdigest()[:16]
    base = re.sub(r"[^A-Za-z0-9._-]", "_", uri.rstrip("/").rsplit("/", 1)[-1]).lstrip(".")[:80]
    return f"{digest}-{base or 'object'}"


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _check_sha256(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    if not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    return sha256.lower()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _download(fs: pafs.FileSystem, path: str, uri: str, dest: Path) -> tuple[int, str]:
    """Stream one object to dest (fsynced); returns (size, sha256); short reads are errors."""
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"no object at {uri}")
    h, n = hashlib.sha256(), 0
    try:
        with fs.open_input_stream(path) as src, open(dest, "wb") as out:
            while chunk := src.read(CHUNK_BYTES):
                h.update(chunk)
                out.write(chunk)
                n += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        if n != info.size:
            raise OSError(f"short read of {uri}: got {n} of {info.size} bytes")
    except BaseException:
        _remove(dest)
        raise
    return n, h.hexdigest()


def fetch_to_cache(
    uri: str, cache_dir: str | Path | None = None, sha256: str | None = None
) -> Path:
    """Local path of a weight file: local paths as is, s3:// downloaded once per node (locked, atomic).

    The cached copy is trusted when its size matches the size recorded at download time (and the
    recorded sha256 matches `sha256` if given): remote objects are treated as immutable.
    """
    want = _check_sha256(sha256)
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        local = Path(path)
        if not local.is_file():
            raise FileNotFoundError(f"weight file not found: {local}")
        if want and (got := _file_sha256(local)) != want:
            raise ValueError(f"sha256 mismatch for {local}: expected {want}, got {got}")
        return local
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    name = _cache_name(uri)
    target, meta = root / name, root / f".{name}.meta.json"
    with _locked(root / f".{name}.lock"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            rec = json.loads(meta.read_text())
            if (
                rec["uri"] == uri
                and target.stat().st_size == rec["size"]
                and (want is None or rec["sha256"] == want)
            ):
                return target
        for stale in [target, meta, *root.glob(f".{name}.tmp-*")]:
            _remove(stale)  # only a crashed holder of this lock can have left a temp file
        tmp = root / f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        n, got = retry(lambda: _download(fs, path, uri, tmp), what=f"download {uri}")
        if want and got != want:
            _remove(tmp)
            raise ValueError(f"sha256 mismatch for {uri}: expected {want}, got {got}")
        os.replace(tmp, target)
        _write_local_atomic(str(meta), json.dumps({"uri": uri, "size": n, "sha256": got}).encode())
    log.info("cached %s (%d bytes) at %s", uri, n, target)
    return target


def fetch_dir_to_cache(uri: str, cache_dir: str | Path | None = None) -> Path:
    """Local directory with every object under an s3:// prefix (local dirs as is); marker written last."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"directory not found: {path}")
        return Path(path)
    uri = uri.rstrip("/")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    name = _cache_name(uri)
    target = root / name
    with _locked(root / f".{name}.lock"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
            rec = json.loads((target / DIR_MARKER).read_text())
            if rec["uri"] == uri and all(
                (target / r).stat().st_size == n for r, n in rec["files"].items()
            ):
                return target
        for stale in [target, *root.glob(f".{name}.tmp-*")]:
            _remove(stale)
        prefix = path.rstrip("/") + "/"
        infos = retry(
            lambda: fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True)),
            what=f"list {uri}",
        )
        rels = sorted(fi.path[len(prefix) :] for fi in infos if fi.type == pafs.FileType.File)
        if not rels:
            raise FileNotFoundError(f"no objects under {uri}")
        tmp = root / f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        files: dict[str, int] = {}
        try:
            for rel in rels:
                if ".." in rel.split("/") or rel.startswith("/") or rel == DIR_MARKER:
                    raise ValueError(f"refusing object key {rel!r} under {uri}")
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                src = f"{prefix}{rel}"
                files[rel] = retry(
                    lambda s=src, d=dest: _download(fs, s, f"s3://{s}", d)[0],
                    what=f"download s3://{src}",
                )
            os.replace(tmp, target)
        except BaseException:
            _remove(tmp)
            raise
        _write_local_atomic(
            str(target / DIR_MARKER), json.dumps({"uri": uri, "files": files}).encode()
        )
    log.info("cached %s (%d files) at %s", uri, len(files), target)
    return target
