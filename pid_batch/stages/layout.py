"""Where a job's outputs live (URIs, keys, ids, done markers) and the small cell helpers every
stage shares.

Torch-free: Ray's CPU tasks (read, encode/write, finish) import it.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from pid_batch import codecs, storage


def sample_seed(job_seed: int, sample_id: str) -> int:
    """Default per-sample seed: a stable hash of (job seed, id), so retries reproduce images."""
    digest = hashlib.sha256(f"{job_seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def relative(input_uri: str, uri: str) -> str:
    """uri's path below the input prefix (the whole uri if it is not below it)."""
    base = input_uri.rstrip("/")
    if uri == base:  # the input is this one file
        return uri.rsplit("/", 1)[-1]
    return uri[len(base) + 1 :] if uri.startswith(base + "/") else uri


def shard_key(input_uri: str, shard_uri: str) -> str:
    """A shard's name under the output prefix, injective over input paths.

    A file directly under the input keeps its sanitised name (codecs.sanitize_id: unchanged
    names never contain '--', changed ones end in '--' + a hash of the name). A file in a
    sub-folder becomes '<folders__name>--<12 hex of sha256(relative path)><suffix>': the hash
    tells `k/c.safetensors` from a file named `k__c.safetensors`, and the suffix stays last so
    ids derived from the key read like the file's. resume.plan_shards still refuses any two
    shards whose keys coincide.
    """
    rel = relative(input_uri, shard_uri)
    if "/" not in rel:
        return codecs.sanitize_id(rel)
    root, ext = os.path.splitext(rel)
    if ext.lower() not in codecs.SHARD_SUFFIXES:
        root, ext = rel, ""
    digest = hashlib.sha256(rel.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    flat = codecs.sanitize_id(root.replace("/", "__"))
    return f"{flat[: codecs.MAX_ID_CHARS - 14 - len(ext)]}--{digest}{ext}"


def image_sample_id(input_uri: str, uri: str) -> str:
    """An image input's id: its path under the input prefix, without extension, key-safe."""
    return codecs.sanitize_id(os.path.splitext(relative(input_uri, uri))[0].replace("/", "__"))


def image_uri(out: str, sample_id: str, fmt: str) -> str:
    """<out>/images/<id>.<ext>: one image object (layout "files")."""
    return storage.join(out, "images", f"{sample_id}.{codecs.IMAGE_FORMATS[fmt]}")


def marker_uri(out: str, key: str) -> str:
    """<out>/_done/<shard key>.json: written last, once every sample of the shard has an ok row
    (mark_done, called by writer.finish_shard)."""
    return storage.join(out, "_done", f"{key}.json")


def mark_done(out: str, key: str, fingerprint: str | None) -> None:
    """Write a shard's done marker: its key and the input fingerprint it was decoded from (None:
    not known). The only writer of markers; marked_fingerprint reads them back."""
    storage.write_json_atomic(marker_uri(out, key), {"shard": key, "fingerprint": fingerprint})


def marked_fingerprint(uri: str) -> str | None:
    """The fingerprint a done marker records; None for a marker written before fingerprints (or
    one gone or unreadable since it was listed)."""
    try:
        return storage.read_json(uri).get("fingerprint")
    except (FileNotFoundError, ValueError, AttributeError):
        return None


def staging_uri(out: str, key: str, part: str) -> str:
    """<out>/_staging/<shard key>/<part>.tar: one encode task's images of a shard (layout "tar")."""
    return storage.join(out, "_staging", key, f"{part}.tar")


def tar_uri(out: str, key: str, n: int) -> str:
    """<out>/shards/<shard key>-<n:06d>.tar: the n-th tar of a shard's images (layout "tar");
    written once, never rewritten; a shard has as many as its images need at the size cap."""
    return storage.join(out, "shards", f"{key}-{n:06d}.tar")


def claim_uri(out: str, key: str, n: int) -> str:
    """<out>/_tars/<shard key>/<n:06d>.json: which staged parts make tar n, created (exclusively)
    before the tar, so concurrent or crashed finishers agree on what each tar holds."""
    return storage.join(out, "_tars", key, f"{n:06d}.json")


def legacy_tar_uri(out: str, key: str) -> str:
    """<out>/shards/<shard key>.tar: the one tar per shard of outputs written before tars were
    cut at a size cap; kept as it is (never rewritten), new images go to numbered tars."""
    return storage.join(out, "shards", f"{key}.tar")


def objects(values: list) -> np.ndarray:
    """A 1-D object array of `values` (bytes/str/None cells that numpy must not reshape)."""
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


def cell_str(v) -> str | None:
    """A string cell back from Arrow/numpy: None/NaN (an all-null column) → None."""
    return v if isinstance(v, str) else None


def pack_image(img: np.ndarray) -> bytes:
    """An HWC uint8 image as bytes with a 8-byte (h, w) header, so rows carry their own size."""
    h, w = img.shape[:2]
    return np.asarray([h, w], dtype=np.int32).tobytes() + np.ascontiguousarray(img).tobytes()


def unpack_image(data: bytes) -> np.ndarray:
    """Inverse of pack_image: bytes → HWC uint8 image."""
    h, w = np.frombuffer(data[:8], np.int32)
    return np.frombuffer(data[8:], np.uint8).reshape(int(h), int(w), 3)
