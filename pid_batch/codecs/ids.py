"""Sample ids: key-safe ids, the id stem of a shard's own samples, WebDataset tar keys."""

from __future__ import annotations

import hashlib
import re

MAX_ID_CHARS = 128


def _digest(raw: str) -> str:
    """The suffix that keeps changed ids distinct: 12 hex of sha256(raw)."""
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def sanitize_id(raw: str) -> str:
    """Id safe as an object key / file stem: [A-Za-z0-9._-], no '..' or leading dot, ≤128 chars.

    Unchanged ids never contain '--'; changed ones end in '--' + 12 hex of sha256(raw), so distinct
    raw ids stay distinct.
    """
    if not isinstance(raw, str):
        raise ValueError(f"id must be a string, got {type(raw).__name__} {raw!r}")
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", raw)
    safe = re.sub(r"\.{2,}", lambda m: "_" * len(m.group()), safe)
    if safe.startswith("."):
        safe = "_" + safe[1:]
    if safe == raw and raw and "--" not in raw and len(raw) <= MAX_ID_CHARS:
        return raw
    return f"{safe[: MAX_ID_CHARS - 14] or '_'}--{_digest(raw)}"


def id_stem(name: str) -> str:
    """A shard's file name without its suffix, key-safe: the prefix of ids it has to invent."""
    return sanitize_id(
        re.sub(r"(?i)\.(safetensors|parquet)$", "", name.rstrip("/").rsplit("/", 1)[-1])
    )


def tar_key(sample_id: str) -> str:
    """The WebDataset key of a sample in our tars: the id with no '.', distinct ids kept distinct.

    WebDataset splits a member name at the first '.' of its basename ('<key>.<suffix>'), so a
    dotted id would merge samples ('img.001', 'img.002' → 'img'). Dot-free ids stay as they
    are; others get '.' → '_' plus '--' and 12 hex of sha256(id), as sanitize_id does.
    """
    if "." not in sample_id:
        return sample_id
    return f"{sample_id.replace('.', '_')[: MAX_ID_CHARS - 14]}--{_digest(sample_id)}"
