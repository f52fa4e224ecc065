"""One driver per output prefix: a lease object at <out>/_lease.json.

The lease names its holder (host, pid, a random token) and an expiry that a heartbeat thread
pushes forward. A second driver meets it and is refused in one line that names the holder. A
driver that died leaves a lease that is taken over once it has expired, at once when its holder
is a process on this machine that no longer runs, or on request (`--force-takeover`). Every
change is a conditional write (storage.create_exclusive / replace_if: S3 If-None-Match and
If-Match, a lock and an atomic rename locally), so two drivers never both believe they hold it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from pid_batch import storage
from pid_batch.job import JobConfigError

TTL_S = 120.0  # a holder that stops heart-beating loses the lease after this long
HEARTBEAT_S = 20.0


class LeaseLost(RuntimeError):
    """Another driver took this driver's lease over (after expiry or by force)."""


def _boot_id() -> str:
    """This machine's boot id: with the host name it tells whether a pid can be checked here."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """A held lease; `renew()` pushes its expiry, `release()` deletes it if still ours."""

    def __init__(self, out: str, ttl_s: float = TTL_S):
        self.uri = storage.join(out, "_lease.json")
        self.ttl_s = ttl_s
        self.token = uuid.uuid4().hex
        self.version: str | None = None
        self.lost = threading.Event()

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps(
            {
                "token": self.token,
                "host": socket.gethostname(),
                "boot_id": _boot_id(),
                "pid": os.getpid(),
                "heartbeat_at": now,
                "expires_at": now + self.ttl_s,
            },
            sort_keys=True,
        ).encode()

    def acquire(self, force: bool = False) -> None:
        """Take the lease or raise JobConfigError naming the live holder."""
        for _ in range(5):
            if storage.create_exclusive(self.uri, self._body()):
                self.version = storage.version(self.uri)
                return
            have = storage.version(self.uri)
            if have is None:
                continue  # released between our two calls
            try:
                holder = json.loads(storage.read_bytes(self.uri))
            except (FileNotFoundError, ValueError):
                holder = {}
            if holder.get("token") == self.token:  # ours: a retried create whose first try
                self.version = have  # landed but whose answer was lost (flaky S3)
                return
            if not force and not _gone(holder):
                raise JobConfigError(
                    f"output is being written by another driver: pid {holder.get('pid')} on "
                    f"{holder.get('host')!r} (lease {self.uri}, expires in "
                    f"{max(0.0, float(holder.get('expires_at', 0)) - time.time()):.0f} s); wait "
                    "for it, or pass --force-takeover if that driver is gone"
                )
            if storage.replace_if(self.uri, self._body(), have):
                self.version = storage.version(self.uri)
                return
        raise JobConfigError(f"could not take the lease {self.uri}: it keeps changing")

    def renew(self) -> None:
        """Push the expiry forward; sets `lost` if another driver took the lease."""
        if not storage.replace_if(self.uri, self._body(), self.version):
            self.lost.set()
            return
        self.version = storage.version(self.uri)

    def release(self) -> None:
        """Delete the lease if it is still ours (a takeover's lease is left alone)."""
        if not self.lost.is_set() and storage.version(self.uri) == self.version:
            storage.delete(self.uri)


def _gone(holder: dict) -> bool:
    """Whether a lease's holder can no longer be writing: expired, or a dead local process."""
    if float(holder.get("expires_at", 0)) < time.time():
        return True
    local = holder.get("host") == socket.gethostname() and holder.get("boot_id") == _boot_id()
    return local and not _pid_alive(int(holder.get("pid", 0)))


@contextlib.contextmanager
def hold(out: str, force: bool = False, ttl_s: float = TTL_S) -> Iterator[Lease]:
    """Hold the output's lease for the duration of the block, heart-beating in a thread."""
    lease = Lease(out, ttl_s)
    lease.acquire(force=force)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(min(HEARTBEAT_S, ttl_s / 3)):
            try:
                lease.renew()
            except Exception:  # a failed renewal is retried at the next beat
                continue
            if lease.lost.is_set():
                return

    thread = threading.Thread(target=beat, name="pid-batch-lease", daemon=True)
    thread.start()
    try:
        yield lease
    finally:
        stop.set()
        thread.join(timeout=5)
        with contextlib.suppress(Exception):
            lease.release()
