"""The safetensors container, parsed here (the numpy API of safetensors has no bfloat16): dtype
tables, bfloat16 bits, the header, zero-copy tensor views, and serialising tensors back."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from pid_batch.codecs.samples import ShardError

ST_DTYPES = {
    "F64": ("<f8", 8), "F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2),
    "I64": ("<i8", 8), "I32": ("<i4", 4), "I16": ("<i2", 2), "I8": ("i1", 1),
    "U64": ("<u8", 8), "U32": ("<u4", 4), "U16": ("<u2", 2), "U8": ("u1", 1),
}  # fmt: skip
NP_TO_ST = {"float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32"}
# What a latent shard may store (README's input tables list them; tests/test_docs.py compares).
ST_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")  # safetensors `latents` and `sigmas`
ST_SEED_DTYPES = ("I64", "I32", "I16", "I8", "U32", "U16", "U8")  # `seeds`: all fit int64
ST_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


SAFETENSORS_PREFIX_BYTES = 8  # little-endian u64 header length, then the JSON header
# safetensors' own reader refuses headers above 100 MB; ids + captions of a big shard fit.
MAX_HEADER_BYTES = 100_000_000


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns → float32 (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 → uint16 bfloat16 bit patterns, round-to-nearest-even, NaN kept NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


@dataclass(frozen=True)
class TensorView:
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    raw: memoryview

    def to_numpy(self) -> np.ndarray:
        """A new float32 (float tensors) or int64 array."""
        arr = np.frombuffer(self.raw, dtype=ST_DTYPES[self.dtype][0]).reshape(self.shape)
        if self.dtype == "BF16":
            return bf16_to_float32(arr)
        return arr.astype(np.float32) if self.dtype in ST_FLOAT_DTYPES else arr.astype(np.int64)


def parse_safetensors(data: bytes, name: str) -> tuple[dict[str, TensorView], dict[str, str]]:
    """Tensors (zero-copy views) and string metadata of a safetensors file; ShardError if malformed."""
    header, meta, end = safetensors_header(data, name)
    body = memoryview(data)[end:]
    tensors = {}
    for key, spec in header.items():
        if not entry_fits(spec, len(body)):
            raise ShardError(name, f"tensor {key!r} has a bad or truncated entry {spec!r}")
        lo, hi = spec["data_offsets"]
        tensors[key] = TensorView(spec["dtype"], tuple(spec["shape"]), body[lo:hi])
    return tensors, meta


def entry_fits(spec: object, body_len: int) -> bool:
    """Whether a safetensors header entry is well-formed and its bytes lie in a body_len body."""
    try:
        dtype, shape, (lo, hi) = spec["dtype"], tuple(spec["shape"]), spec["data_offsets"]
        return (
            dtype in ST_DTYPES
            and all(isinstance(d, int) and d >= 0 for d in shape)
            and isinstance(lo, int)
            and isinstance(hi, int)
            and 0 <= lo <= hi <= body_len
            and hi - lo == math.prod(shape) * ST_DTYPES[dtype][1]
        )
    except (KeyError, TypeError, ValueError):
        return False


def safetensors_bytes(
    tensors: dict[str, tuple[str, np.ndarray]], metadata: dict[str, str]
) -> bytes:
    """Serialise {name: (safetensors dtype, array)} with metadata (8-byte aligned header)."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    blobs, offset = [], 0
    for key, (dtype, arr) in tensors.items():
        blob = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()
        header[key] = {
            "dtype": dtype,
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + b"".join(blobs)


def safetensors_header_bytes(prefix: bytes, name: str = "<shard>") -> int:
    """How many bytes (prefix included) hold a safetensors file's header, from its first 8."""
    if len(prefix) < SAFETENSORS_PREFIX_BYTES:
        raise ShardError(name, f"truncated: {len(prefix)} bytes, not a safetensors file")
    n = int.from_bytes(prefix[:SAFETENSORS_PREFIX_BYTES], "little")
    if not 2 <= n <= MAX_HEADER_BYTES:  # the length is file bytes: never quoted
        raise ShardError(name, f"invalid header length: does not fit [2, {MAX_HEADER_BYTES}] bytes")
    return SAFETENSORS_PREFIX_BYTES + n


def safetensors_header(
    data: bytes, name: str = "<shard>", file_size: int | None = None
) -> tuple[dict, dict[str, str], int]:
    """(tensor entries, string metadata, body offset) of a safetensors file; ShardError if malformed.

    `data` is the whole file, or at least its header when `file_size` says how long the file is.
    """
    end = safetensors_header_bytes(data, name)
    size = len(data) if file_size is None else file_size
    if end > size:
        raise ShardError(name, f"invalid header length: does not fit a {size}-byte file")
    if len(data) < end:
        raise ShardError(name, f"truncated header: {len(data)} of {end} bytes")
    try:
        header = json.loads(bytes(data[SAFETENSORS_PREFIX_BYTES:end]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardError(name, f"unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ShardError(name, "safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ShardError(name, "__metadata__ must map strings to strings")
    return header, meta, end
