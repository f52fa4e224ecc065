"""Fault injection for the reliability tests: a faulty S3 proxy, decoder faults, output checks.

FaultProxy     a threaded HTTP proxy on 127.0.0.1 in front of the moto server that answers a
               chosen fraction of requests with 503 SlowDown, drops the connection mid-body, or
               adds latency; `deny` rules answer matching requests with a fixed S3 error.
decode_faults  a Ray `worker_process_setup_hook` that wraps Decoder.decode in every worker: it
               raises for poisoned sample ids and os._exit()s once after N calls, both steered by
               a JSON control file (so one Ray session serves several tests).
"""

from __future__ import annotations

import http.client
import io
import json
import os
import random
import re
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
}


def s3_error_xml(code: str, message: str, extra: dict[str, str] | None = None) -> bytes:
    """An S3 error document as the service sends it."""
    fields = "".join(f"<{k}>{v}</{k}>" for k, v in (extra or {}).items())
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>{fields}"
        f"<RequestId>{uuid.uuid4().hex[:16].upper()}</RequestId>"
        f"<HostId>{uuid.uuid4().hex}</HostId></Error>"
    ).encode()


@dataclass
class Request:
    """What a deny rule sees of one request."""

    method: str
    key: str  # "bucket/key" (URL-decoded, no query)
    query: str
    headers: dict[str, str]


@dataclass
class DenyRule:
    """Answer requests whose method matches and whose bucket/key matches `pattern` with an error."""

    pattern: str
    methods: tuple[str, ...] = ("GET", "PUT", "HEAD")
    status: int = 403
    # "SignatureDoesNotMatch" echoes the request's key id and signature, as real S3 does.
    code: str = "SignatureDoesNotMatch"

    def matches(self, req: Request) -> bool:
        return req.method in self.methods and re.search(self.pattern, req.key) is not None


@dataclass
class FaultPlan:
    """Fractions of requests to fault (drawn independently per request, seeded)."""

    slowdown: float = 0.0  # 503 SlowDown with an S3 XML body
    drop: float = 0.0  # response cut mid-body (or connection closed before any response)
    latency: float = 0.0  # forwarded after `latency_s`
    latency_s: float = 0.2
    seed: int = 0
    deny: list[DenyRule] = field(default_factory=list)


class FaultProxy:
    """HTTP proxy on 127.0.0.1 in front of an S3 endpoint, injecting faults per FaultPlan."""

    def __init__(self, upstream: str, plan: FaultPlan | None = None):
        up = urlparse(upstream)
        if up.hostname not in ("127.0.0.1", "localhost"):
            raise ValueError(f"upstream must be on loopback, got {upstream!r}")
        self.upstream = (up.hostname, up.port or 80)
        self.stats: Counter[str] = Counter()
        self.seen_auth: list[str] = []  # Authorization headers seen (to prove what a leak would be)
        self._lock = threading.Lock()
        self.set_plan(plan or FaultPlan())
        handler = type("Handler", (_ProxyHandler,), {"proxy": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def set_plan(self, plan: FaultPlan) -> None:
        with self._lock:
            self.plan = plan
            self._rng = random.Random(plan.seed)

    def reset_stats(self) -> None:
        with self._lock:
            self.stats.clear()
            self.seen_auth.clear()

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def faulted_fraction(self) -> float:
        faults = sum(self.stats[k] for k in ("slowdown", "drop", "latency"))
        return faults / max(1, self.stats["requests"])

    def _decide(self, req: Request) -> str | DenyRule:
        with self._lock:
            self.stats["requests"] += 1
            self.stats[f"method:{req.method}"] += 1
            if auth := req.headers.get("authorization"):
                self.seen_auth.append(auth)
            for rule in self.plan.deny:
                if rule.matches(req):
                    self.stats["deny"] += 1
                    return rule
            u, p = self._rng.random(), self.plan
            for kind, frac in (("slowdown", p.slowdown), ("drop", p.drop), ("latency", p.latency)):
                if u < frac:
                    self.stats[kind] += 1
                    return kind
                u -= frac
            return "forward"


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    proxy: FaultProxy

    def setup(self) -> None:
        super().setup()
        # Without this, Nagle + delayed ACKs add ~40 ms per response (headers, body sent apart).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format, *args) -> None:  # noqa: A002 - quiet
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            out = io.BytesIO()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out.getvalue()
                out.write(self.rfile.read(size))
                self.rfile.readline()
        n = int(self.headers.get("content-length") or 0)
        return self.rfile.read(n) if n else b""

    def _handle(self) -> None:
        body = self._read_body()
        parsed = urlparse(self.path)
        headers = {k.lower(): v for k, v in self.headers.items()}
        req = Request(self.command, unquote(parsed.path.lstrip("/")), parsed.query, headers)
        action = self.proxy._decide(req)
        if isinstance(action, DenyRule):
            self._send_error(action.status, action.code, req)
            return
        if action == "slowdown":
            self._send_error(503, "SlowDown", req)
            return
        if action == "latency":
            time.sleep(self.proxy.plan.latency_s)
        status, reason, resp_headers, resp_body = self._forward(body)
        if action == "drop":
            self._drop(status, reason, resp_headers, resp_body)
            return
        self.send_response_only(status, reason)
        for k, v in resp_headers:
            if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                self.send_header(k, v)
        length = dict((k.lower(), v) for k, v in resp_headers).get("content-length")
        self.send_header(
            "Content-Length", length if self.command == "HEAD" else str(len(resp_body))
        )
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(resp_body)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self.proxy.upstream, timeout=60)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for k, v in self.headers.items():
                if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                    conn.putheader(k, v)
            if body or self.command in ("PUT", "POST"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.reason, resp.getheaders(), data
        finally:
            conn.close()

    def _drop(self, status, reason, headers, body: bytes) -> None:
        """Send the headers and half the body, then cut the connection (or cut it at once)."""
        self.close_connection = True
        if len(body) > 1 and self.command != "HEAD":
            self.send_response_only(status, reason)
            for k, v in headers:
                if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _send_error(self, status: int, code: str, req: Request) -> None:
        extra = {}
        if code == "SignatureDoesNotMatch":
            auth = req.headers.get("authorization", "")
            akid = re.search(r"Credential=([^/,\s]+)", auth)
            sig = re.search(r"Signature=([0-9a-f]+)", auth)
            extra = {
                "AWSAccessKeyId": akid.group(1) if akid else "",
                "SignatureProvided": sig.group(1) if sig else "",
                "StringToSign": f"AWS4-HMAC-SHA256 {auth[-40:]}",
            }
        messages = {
            "SlowDown": "Please reduce your request rate.",
            "SignatureDoesNotMatch": "The request signature we calculated does not match the "
            "signature you provided. Check your key and signing method.",
            "AccessDenied": "Access Denied",
            "InternalError": "We encountered an internal error. Please try again.",
        }
        data = s3_error_xml(code, messages.get(code, code), extra)
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", "0" if req.method == "HEAD" else str(len(data)))
        self.end_headers()
        if req.method != "HEAD":
            self.wfile.write(data)


# ---------------------------------------------------------------------------------------------
# Decoder faults inside Ray workers

CONTROL_ENV = "PID_BATCH_TEST_FAULTS"


def write_control(
    path: Path,
    poison: list[str] = (),
    kill_after_calls: int | None = None,
    crash: list[str] = (),
) -> None:
    """Steer decode_faults: ids whose decode raises (poison) or kills the worker every time
    (crash, like a segfault or an OOM kill); kill one worker once after N decode calls."""
    token = path.with_suffix(".kill-token")
    if kill_after_calls is not None:
        token.write_text("armed")
    elif token.exists():
        token.unlink()
    tmp = path.with_suffix(".tmp")
    ctl = {"poison": list(poison), "kill_after_calls": kill_after_calls, "crash": list(crash)}
    tmp.write_text(json.dumps(ctl))
    os.replace(tmp, path)


def crash_count(path: Path) -> int:
    """How many times a `crash` id killed a worker so far."""
    log = path.with_suffix(".crashes")
    return len(log.read_text().split()) if log.exists() else 0


def kill_token_used(path: Path) -> bool:
    """Whether a worker claimed the kill token (i.e. it really died)."""
    return path.with_suffix(".kill-token.used").exists()


def decode_faults() -> None:
    """worker_process_setup_hook: wrap Decoder.decode with poison / kill faults from the control file."""
    control = os.environ.get(CONTROL_ENV)
    if not control:
        return
    from pid_batch import decoder

    original = decoder.Decoder.decode
    calls = {"n": 0}

    def decode(self, latents, sigmas, seeds, captions=None, caption_embs=None, ids=None):
        try:
            ctl = json.loads(Path(control).read_text())
        except (OSError, ValueError):
            ctl = {}
        calls["n"] += 1
        kill_after = ctl.get("kill_after_calls")
        if kill_after is not None and calls["n"] > kill_after:
            token = Path(control).with_suffix(".kill-token")
            try:  # exactly one worker wins the rename, and dies once
                os.rename(token, token.with_suffix(".kill-token.used"))
            except FileNotFoundError:
                pass
            else:
                os._exit(1)
        if set(ids or ()) & set(ctl.get("crash", ())):
            with open(Path(control).with_suffix(".crashes"), "a") as f:
                f.write(f"{os.getpid()}\n")
            os._exit(1)
        poisoned = sorted(set(ids or ()) & set(ctl.get("poison", ())))
        if poisoned:
            raise RuntimeError(f"poisoned sample(s) {poisoned} (test fault)")
        return original(self, latents, sigmas, seeds, captions, caption_embs, ids)

    decoder.Decoder.decode = decode


# ---------------------------------------------------------------------------------------------
# Inputs and output checks

LATENT_HW = (2, 3)  # FLUX latent → a 64×96 image (8× VAE, 4× PiD)


def flux_latents(n: int, seed: int = 0, hw: tuple[int, int] = LATENT_HW) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 16, *hw)).astype(np.float32)


def write_flux_shards(root: str, shards: int, per_shard: int, prefix: str = "s") -> list[str]:
    """FLUX-shaped PiD latents in `shards` safetensors files; returns all sample ids."""
    from pid_batch import codecs, storage

    ids = []
    for s in range(shards):
        sid = [f"{prefix}{s}-{i}" for i in range(per_shard)]
        data = codecs.write_safetensors_shard(
            flux_latents(per_shard, seed=s), sid, captions=["a cat"] * per_shard, backbone="flux"
        )
        storage.write_bytes_atomic(storage.join(root, f"shard-{s:03d}.safetensors"), data)
        ids += sid
    return ids


def tiny_job(inp: str, out: str, **res):
    from pid_batch.job import JobConfig, ModelConfig, OutputConfig, ResourceConfig

    return JobConfig(
        input=inp,
        output=out,
        model=ModelConfig(backbone="flux", ckpt_type="2k", preset="tiny"),
        images=OutputConfig(image_format="png"),
        resources=ResourceConfig(**{"batch_size": 4, "encode_batch_size": 4, **res}),
    )


def image_ids(out: str) -> list[str]:
    """Ids of the visible image objects under <out>/images (sorted, with repeats if any)."""
    from pid_batch import storage

    uris = storage.list_files(storage.join(out, "images"))
    return sorted(u.rsplit("/", 1)[1].rsplit(".", 1)[0] for u in uris)


def raw_timing_rows(out: str) -> list[dict]:
    """Every timing row of every part (no de-duplication)."""
    import pyarrow.parquet as pq

    from pid_batch import storage

    rows = []
    for uri in storage.list_files(storage.join(out, "timing"), suffixes=(".parquet",)):
        rows += pq.read_table(io.BytesIO(storage.read_bytes(uri))).to_pylist()
    return rows


def check_images_valid(out: str, size: tuple[int, int] = (96, 64)) -> None:
    """Every visible image decodes as a whole PNG/JPEG of the expected size."""
    from PIL import Image

    from pid_batch import storage

    for uri in storage.list_files(storage.join(out, "images")):
        with Image.open(io.BytesIO(storage.read_bytes(uri))) as im:
            im.load()  # raises on a truncated file
            assert im.size == size, (uri, im.size)


def assert_exactly_once(out: str, ids: list[str], ok: list[str] | None = None) -> dict:
    """Each id has one row in the summary's table, each ok id one ok row and one whole image.

    Error rows may repeat across runs (each rerun retries them; the latest is kept); an ok row
    never does, because an ok sample is never decoded again.
    """
    from pid_batch import storage
    from pid_batch.timing import read_timing

    ok = sorted(ids if ok is None else ok)
    rows = raw_timing_rows(out)
    ok_rows = Counter(r["id"] for r in rows if r["status"] == "ok")
    dup = {k: v for k, v in ok_rows.items() if v > 1}
    assert not dup, f"duplicated ok rows: {dup}"
    assert sorted(ok_rows) == ok, "lost or unexpected ok rows"
    assert sorted(read_timing(out).column("id").to_pylist()) == sorted(ids)
    assert image_ids(out) == ok
    check_images_valid(out)
    summary = storage.read_json(storage.join(out, "summary.json"))
    assert (summary["samples"], summary["ok"]) == (len(ids), len(ok)), summary
    return summary


def wait_for(cond: Callable[[], bool], timeout_s: float, every_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(every_s)
    return cond()
