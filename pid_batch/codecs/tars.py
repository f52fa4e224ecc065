"""WebDataset tars: a sample's members, deterministic tars, reading them back."""

from __future__ import annotations

import io
import json
import tarfile

from pid_batch.codecs.ids import tar_key


def sample_members(sample_id: str, ext: str, payload: bytes, meta: dict) -> list[tuple[str, bytes]]:
    """The two tar members of one sample: '<key>.<ext>' and '<key>.json' (key = tar_key(id))."""
    key = tar_key(sample_id)
    return [
        (f"{key}.{ext}", payload),
        (f"{key}.json", json.dumps(meta, sort_keys=True).encode()),
    ]


def build_tar(members: list[tuple[str, bytes]]) -> bytes:
    """A deterministic tar (mtime 0, uid/gid 0, mode 0644, given order); flat, unique names only."""
    buf, seen = io.BytesIO(), set()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            if (
                not name
                or "/" in name
                or "\\" in name
                or name.startswith(".")
                or ".." in name
                or name in seen
            ):
                raise ValueError(
                    f"tar member name must be flat, unique and not start with '.', got {name!r}"
                )
            seen.add(name)
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def read_tar(data: bytes) -> dict[str, bytes]:
    """Regular-file members of a tar by name; ValueError if unreadable or names repeat."""
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                if m.name in out:
                    raise ValueError(f"tar has member {m.name!r} twice")
                out[m.name] = tar.extractfile(m).read()
    except tarfile.TarError as e:
        raise ValueError(f"unreadable tar ({e})") from None
    return out
