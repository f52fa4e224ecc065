"""Latent shards, .safetensors and .parquet: writing them, and reading them into LatentSamples
(per-sample problems become error samples; a shard unreadable as a whole raises ShardError)."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pid_batch.backbones import LATENT_FORMATS
from pid_batch.codecs.ids import id_stem, sanitize_id
from pid_batch.codecs.safetensors_file import (
    NP_TO_ST,
    ST_DTYPES,
    ST_FLOAT_DTYPES,
    ST_NAMES,
    ST_SEED_DTYPES,
    TensorView,
    entry_fits,
    float32_to_bf16,
    parse_safetensors,
    safetensors_bytes,
    safetensors_header,
)
from pid_batch.codecs.samples import SHARD_SUFFIXES, LatentSample, ShardError, ShardLimits

PARQUET_SHARD_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("latent", pa.binary()),  # raw little-endian bytes
        pa.field("shape", pa.list_(pa.int32())),
        pa.field("dtype", pa.string()),  # a key of PARQUET_LATENT_DTYPES
        pa.field("caption", pa.string()),
        pa.field("sigma", pa.float32()),
        pa.field("seed", pa.int64()),
        pa.field("backbone", pa.string()),
        pa.field("latent_format", pa.string()),
    ]
)
PARQUET_REQUIRED = ("latent", "shape", "dtype")  # a shard without one of these is unreadable
# The `dtype` names a Parquet row may give its latent → the safetensors dtype of its bytes.
PARQUET_LATENT_DTYPES = {ST_NAMES[k]: k for k in ("F32", "F16", "BF16")}


def write_safetensors_shard(
    latents: np.ndarray,
    ids: list[str],
    captions: list[str | None] | None = None,
    sigmas: np.ndarray | list[float] | None = None,
    seeds: np.ndarray | list[int] | None = None,
    backbone: str | None = None,
    latent_format: str | None = "pid",
    dtype: str | None = None,
) -> bytes:
    """A safetensors latent shard: `latents` [N, ...] (dtype None keeps float32/16; or 'bfloat16')."""
    n = len(latents)
    if latents.ndim < 2 or len(ids) != n or (captions is not None and len(captions) != n):
        raise ValueError(
            f"latents {latents.shape}, {len(ids)} ids, captions {captions and len(captions)} disagree"
        )
    if dtype == "bfloat16":
        tensors = {"latents": ("BF16", float32_to_bf16(latents.astype(np.float32)))}
    elif (dtype or latents.dtype.name) in ("float32", "float16", "float64"):
        arr = latents.astype(dtype or latents.dtype)
        tensors = {"latents": (NP_TO_ST[arr.dtype.name], arr)}
    else:
        raise ValueError(
            f"dtype must be float32, float16, float64 or bfloat16, got {dtype or latents.dtype}"
        )
    if sigmas is not None:
        tensors["sigmas"] = ("F32", np.asarray(sigmas, dtype=np.float32).reshape(n))
    if seeds is not None:
        tensors["seeds"] = ("I64", np.asarray(seeds, dtype=np.int64).reshape(n))
    meta = {"ids": json.dumps(list(ids))}
    if captions is not None:
        meta["captions"] = json.dumps(list(captions))
    if backbone is not None:
        meta["backbone"] = backbone
    if latent_format is not None:
        meta["latent_format"] = latent_format
    return safetensors_bytes(tensors, meta)


def write_parquet_shard(samples: list[dict]) -> bytes:
    """A Parquet latent shard, one row per sample dict (id, latent, caption, sigma, seed, ..., dtype)."""
    rows = []
    for sample in samples:
        lat = np.asarray(sample["latent"])
        dtype = sample.get("dtype") or lat.dtype.name
        if dtype not in PARQUET_LATENT_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(PARQUET_LATENT_DTYPES)}, got {dtype!r}")
        if dtype == "bfloat16":
            raw = float32_to_bf16(lat.astype(np.float32))
        else:
            raw = lat.astype(np.dtype(dtype).newbyteorder("<"))
        row = {k: sample.get(k) for k in PARQUET_SHARD_SCHEMA.names}
        rows.append({**row, "latent": raw.tobytes(), "shape": list(lat.shape), "dtype": dtype})
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=PARQUET_SHARD_SCHEMA), sink)
    return sink.getvalue().to_pybytes()


def _latents_count(spec: object, name: str, file_len: int, body_len: float = math.inf) -> int:
    """N of a well-formed float 'latents' entry [N, ...] whose bytes fit a body_len body.

    Each declared sample must account for at least one byte of the file (its latent, or its id
    in the header), so N ≤ file_len and all per-sample work is bounded by the input's size.
    """
    if not entry_fits(spec, body_len) or spec["dtype"] not in ST_FLOAT_DTYPES or not spec["shape"]:
        raise ShardError(name, "needs a float tensor 'latents' [N, ...] that fits the file")
    n = int(spec["shape"][0])
    if n == 0:
        raise ShardError(name, "shard has no samples")
    if n > file_len:
        raise ShardError(
            name, f"'latents' declares {n} samples, more than a {file_len}-byte file holds"
        )
    return n


_FIELDS = ("id", "caption", "sigma", "seed", "backbone", "latent_format")


def _field_errors(f: dict, limits: ShardLimits) -> list[str]:
    """Problems with one sample's scalar fields (id, caption, sigma, seed, backbone, format)."""
    errs = []
    if f["id"] is not None and not isinstance(f["id"], str):
        errs.append(f"id must be a string, got {type(f['id']).__name__} {f['id']!r}")
    if f["caption"] is not None and not isinstance(f["caption"], str):
        errs.append(f"caption must be a string or null, got {type(f['caption']).__name__}")
    sigma, seed = f["sigma"], f["seed"]
    if sigma is not None and not (isinstance(sigma, (int, float)) and 0.0 <= sigma <= 1.0):
        errs.append(f"sigma must be a number in [0, 1], got {sigma!r}")
    if seed is not None and not (type(seed) is int and -(2**63) <= seed < 2**63):
        errs.append(f"seed must be an integer in int64 range, got {seed!r}")
    if f["backbone"] is not None and not isinstance(f["backbone"], str):
        errs.append(f"backbone must be a string, got {f['backbone']!r}")
    if f["latent_format"] not in (None, *LATENT_FORMATS):
        errs.append(f"latent_format must be one of {LATENT_FORMATS}, got {f['latent_format']!r}")
    return errs


def _shape_errors(shape: tuple[int, ...], limits: ShardLimits) -> list[str]:
    """Problems with one sample's latent shape ([C, h, w] or packed [seq, ch])."""
    if len(shape) not in (2, 3):
        return [f"latent must be [C, h, w] or packed [seq, ch], got shape {list(shape)}"]
    if math.prod(shape) == 0:
        return [f"latent is empty, shape {list(shape)}"]
    ch = shape[0] if len(shape) == 3 else shape[1]
    if ch > limits.max_channels or math.prod(shape) > limits.max_elements:
        return [
            f"latent shape {list(shape)} exceeds limits "
            f"({limits.max_channels} channels, {limits.max_elements} elements)"
        ]
    return []


def _sample_id(raw: object, stem: str, index: int) -> str:
    """The id a sample gets: its own, sanitised, or '<shard stem>-<index>' when it has none."""
    return sanitize_id(raw) if isinstance(raw, str) else f"{stem}-{index:06d}"


def _samples(
    name: str,
    cols: dict[str, list],
    latents: list[TensorView | str],
    limits: ShardLimits,
    stem: str | None,
) -> list[LatentSample]:
    """LatentSamples from per-sample fields and [1, ...] latent views (or why a latent is bad)."""
    stem = stem or id_stem(name)
    seen: dict[str, int] = {}
    out = []
    for i, src in enumerate(latents):
        f = {k: cols[k][i] for k in _FIELDS}
        errs = _field_errors(f, limits)
        sid = _sample_id(f["id"], stem, i)
        if sid in seen:
            errs.append(f"duplicate id {sid!r} (first at index {seen[sid]})")
        seen.setdefault(sid, i)
        errs += [src] if isinstance(src, str) else _shape_errors(src.shape[1:], limits)
        latent = None
        if not errs:
            latent = src.to_numpy()[0]  # [C, h, w] | [seq, ch] float32, a fresh array
            if bad := int(latent.size - np.isfinite(latent).sum()):
                errs.append(f"latent has {bad} NaN/Inf values")
        caption = f["caption"] if isinstance(f["caption"], str) else None
        ok = not errs
        out.append(
            LatentSample(
                id=sid,
                latent=latent if ok else None,
                caption=caption[: limits.max_caption_chars] if caption is not None else None,
                sigma=float(f["sigma"]) if ok and f["sigma"] is not None else None,
                seed=int(f["seed"]) if ok and f["seed"] is not None else None,
                backbone=f["backbone"] if isinstance(f["backbone"], str) else None,
                latent_format=f["latent_format"] if f["latent_format"] in LATENT_FORMATS else None,
                shard=name,
                index=i,
                error=None if ok else f"{name}[{i}] id={sid!r}: " + "; ".join(errs),
                source_id=f["id"] if isinstance(f["id"], str) else None,
            )
        )
    return out


def _json_list(meta: dict[str, str], key: str, n: int, name: str) -> list:
    """A length-n JSON list from safetensors metadata ([None] * n when absent)."""
    if meta.get(key) in (None, "null"):
        return [None] * n
    try:
        value = json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise ShardError(name, f"metadata {key!r} is not JSON ({e})") from None
    if not isinstance(value, list) or len(value) != n:
        raise ShardError(name, f"metadata {key!r} must be a JSON list of {n} entries")
    return value


def _vector(
    tensors: dict[str, TensorView], key: str, dtypes: tuple[str, ...], n: int, name: str, kind: str
) -> list | None:
    """A [n] tensor of `kind` ('integers': dtypes) as a Python list, None when absent."""
    t = tensors.get(key)
    if t is None:
        return None
    if t.dtype not in dtypes or t.shape != (n,):
        raise ShardError(
            name,
            f"{key} must be {kind}: tensor {key!r} must be [{n}] of {', '.join(dtypes)}, "
            f"got {t.dtype} {list(t.shape)}",
        )
    return t.to_numpy().tolist()


def _read_safetensors(
    data: bytes, name: str, limits: ShardLimits, stem: str | None
) -> list[LatentSample]:
    tensors, meta = parse_safetensors(data, name)
    lat = tensors.get("latents")
    if lat is None:
        raise ShardError(name, f"needs a float tensor 'latents' [N, ...], has {sorted(tensors)}")
    spec = {"dtype": lat.dtype, "shape": list(lat.shape), "data_offsets": [0, len(lat.raw)]}
    n = _latents_count(spec, name, len(data), len(lat.raw))
    if meta.get("latent_format") not in (None, *LATENT_FORMATS):
        raise ShardError(
            name, f"latent_format must be one of {LATENT_FORMATS}, got {meta['latent_format']!r}"
        )
    seeds = _vector(tensors, "seeds", ST_SEED_DTYPES, n, name, "integers")
    cols = {
        "id": _json_list(meta, "ids", n, name),
        "caption": _json_list(meta, "captions", n, name),
        "sigma": _vector(tensors, "sigmas", ST_FLOAT_DTYPES, n, name, "floats") or [None] * n,
        "seed": seeds or _json_list(meta, "seeds", n, name),
        "backbone": [meta.get("backbone")] * n,
        "latent_format": [meta.get("latent_format")] * n,
    }
    per = len(lat.raw) // n
    views = [
        TensorView(lat.dtype, (1, *lat.shape[1:]), lat.raw[i * per : (i + 1) * per])
        for i in range(n)
    ]
    return _samples(name, cols, views, limits, stem)


def _read_parquet(
    data: bytes, name: str, limits: ShardLimits, stem: str | None
) -> list[LatentSample]:
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as e:
        raise ShardError(name, f"unreadable Parquet ({e})") from None
    missing = [c for c in PARQUET_REQUIRED if c not in table.column_names]
    if missing:
        raise ShardError(name, f"missing columns {missing}; has {table.column_names}")
    if table.num_rows == 0:
        raise ShardError(name, "shard has no samples")
    cols = {
        c: table.column(c).to_pylist() if c in table.column_names else [None] * table.num_rows
        for c in PARQUET_SHARD_SCHEMA.names
    }
    views = [
        _row_latent(*row) for row in zip(cols["latent"], cols["shape"], cols["dtype"], strict=True)
    ]
    return _samples(name, cols, views, limits, stem)


def _row_latent(raw: object, shape: object, dtype: object) -> TensorView | str:
    """A Parquet row's latent as a [1, ...] view, or why it cannot be decoded."""
    if dtype not in PARQUET_LATENT_DTYPES:
        return f"dtype must be one of {sorted(PARQUET_LATENT_DTYPES)}, got {dtype!r}"
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        return f"shape must be a list of non-negative ints, got {shape!r}"
    need = math.prod(shape) * ST_DTYPES[PARQUET_LATENT_DTYPES[dtype]][1]
    if not isinstance(raw, bytes) or len(raw) != need:
        got = len(raw) if isinstance(raw, bytes) else "no"
        return f"latent has {got} bytes, shape {shape} {dtype} needs {need}"
    return TensorView(PARQUET_LATENT_DTYPES[dtype], (1, *shape), memoryview(raw))


def stored_dtype(data: bytes, name: str) -> str:
    """The dtype name ('bfloat16', 'float32', ...) a safetensors shard stores its latents in."""
    entry = safetensors_header(data, name)[0].get("latents")
    dtype = entry.get("dtype") if isinstance(entry, dict) else None
    return ST_NAMES.get(dtype, str(dtype))


def read_shard_ids(
    data: bytes, name: str, stem: str | None = None, size: int | None = None
) -> list[str]:
    """Sample ids as read_shard assigns them, cheaply: a safetensors shard needs only its header
    (see safetensors_header_bytes; `size` = the whole file's bytes when `data` is the header
    alone), a Parquet shard only its `id` column is decoded. A declared sample count that
    cannot fit the file is refused before anything per sample is allocated."""
    stem = stem or id_stem(name)
    if name.lower().endswith(".safetensors"):
        header, meta, end = safetensors_header(data, name, size)
        if "latents" not in header:
            raise ShardError(name, "no 'latents' tensor in the header")
        if size is None:  # header alone: the entry's offsets cannot be checked against the body
            n = _latents_count(header["latents"], name, len(data))
        else:
            n = _latents_count(header["latents"], name, size, size - end)
        raw = _json_list(meta, "ids", n, name)
    elif name.lower().endswith(".parquet"):
        try:
            pf = pq.ParquetFile(pa.BufferReader(data))
            has_id = "id" in pf.schema_arrow.names
            raw = (
                pf.read(columns=["id"]).column("id").to_pylist()
                if has_id
                else [None] * pf.metadata.num_rows
            )
        except (pa.ArrowException, OSError) as e:
            raise ShardError(name, f"unreadable Parquet ({e})") from None
    else:
        raise ShardError(name, f"unknown shard type; expected one of {SHARD_SUFFIXES}")
    return [_sample_id(r, stem, i) for i, r in enumerate(raw)]


def read_shard(
    data: bytes, name: str, limits: ShardLimits | None = None, stem: str | None = None
) -> list[LatentSample]:
    """Samples of a .safetensors or .parquet latent shard; ShardError if the shard is unreadable.

    stem: the prefix of the ids given to samples without one ('<stem>-000000', ...); default
    the file name without its suffix (the pipeline passes one derived from the shard key, which
    is unique per input path).
    """
    limits = limits or ShardLimits()
    lower = name.lower()
    if lower.endswith(".safetensors"):
        return _read_safetensors(data, name, limits, stem)
    if lower.endswith(".parquet"):
        return _read_parquet(data, name, limits, stem)
    raise ShardError(name, f"unknown shard type; expected one of {SHARD_SUFFIXES}")
