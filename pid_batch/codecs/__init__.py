"""Byte formats, numpy and PIL only: latent shards in (safetensors, Parquet), images and
WebDataset tars out, and the sample ids that name them. `pid_batch.codecs.X` is the API the
rest of the package uses; each name is defined in one module:

ids               key-safe sample ids, a shard's id stem, tar keys
samples           LatentSample, ShardLimits, ShardError: what a shard reader yields
safetensors_file  the safetensors container: dtypes, bfloat16, header, tensor views
shards            latent shards (.safetensors, .parquet): write, read, read ids only
images            png / jpeg / webp encoders at measured settings
tars              a sample's tar members, deterministic tars, reading them back
"""

from pid_batch.codecs.ids import MAX_ID_CHARS, id_stem, sanitize_id, tar_key
from pid_batch.codecs.images import (
    IMAGE_FORMATS,
    JPEG_QUALITY,
    JPEG_SUBSAMPLING,
    PNG_COMPRESS_LEVEL,
    WEBP_QUALITY,
    encode_image,
    image_format,
)
from pid_batch.codecs.safetensors_file import (
    SAFETENSORS_PREFIX_BYTES,
    ST_FLOAT_DTYPES,
    ST_SEED_DTYPES,
    bf16_to_float32,
    float32_to_bf16,
    safetensors_header,
    safetensors_header_bytes,
)
from pid_batch.codecs.samples import SHARD_SUFFIXES, LatentSample, ShardError, ShardLimits
from pid_batch.codecs.shards import (
    PARQUET_LATENT_DTYPES,
    PARQUET_REQUIRED,
    PARQUET_SHARD_SCHEMA,
    read_shard,
    read_shard_ids,
    stored_dtype,
    write_parquet_shard,
    write_safetensors_shard,
)
from pid_batch.codecs.tars import build_tar, read_tar, sample_members

__all__ = [
    "IMAGE_FORMATS",
    "JPEG_QUALITY",
    "JPEG_SUBSAMPLING",
    "MAX_ID_CHARS",
    "PARQUET_LATENT_DTYPES",
    "PARQUET_REQUIRED",
    "PARQUET_SHARD_SCHEMA",
    "PNG_COMPRESS_LEVEL",
    "SAFETENSORS_PREFIX_BYTES",
    "SHARD_SUFFIXES",
    "ST_FLOAT_DTYPES",
    "ST_SEED_DTYPES",
    "WEBP_QUALITY",
    "LatentSample",
    "ShardError",
    "ShardLimits",
    "bf16_to_float32",
    "build_tar",
    "encode_image",
    "float32_to_bf16",
    "id_stem",
    "image_format",
    "read_shard",
    "read_shard_ids",
    "read_tar",
    "safetensors_header",
    "safetensors_header_bytes",
    "sample_members",
    "sanitize_id",
    "stored_dtype",
    "tar_key",
    "write_parquet_shard",
    "write_safetensors_shard",
]
