"""The pipeline's stages under their old names (compatibility re-exports; no code here).

reader     shard URI → one row per pending sample (PiD-form latent, or an error row)     CPU
actors     VaeStage, DecodeStage: rows → rows with raw uint8 images (torch)              GPU
writer     encode_write: images encoded and written, timing parts, tar merge, finish    CPU
resume     plan_shards, done_ids, duplicate ids, lost samples
layout     output URIs, ids, keys, row helpers

Importing it loads no torch (actors imports torch only when a stage is built); the pipeline
imports the role modules directly.
"""

from __future__ import annotations

from pid_batch.actors import DecodeStage, VaeStage, _real_decoder, _text_encoder
from pid_batch.layout import (
    Batch,
    image_sample_id,
    image_uri,
    marker_uri,
    sample_seed,
    shard_key,
    staging_uri,
    tar_uri,
)
from pid_batch.layout import cell_str as _str
from pid_batch.layout import objects as _objects
from pid_batch.layout import pack_image as _pack_image
from pid_batch.layout import unpack_image as _unpack_image
from pid_batch.reader import ROW_COLUMNS, read_images, read_shard
from pid_batch.resume import (
    LOST_REASON,
    done_ids,
    duplicate_reasons,
    list_ids,
    plan_shards,
    record_lost,
    shard_ids,
)
from pid_batch.timing import timing_dir
from pid_batch.writer import assemble_tar, encode_write, finish_shard

__all__ = [
    "LOST_REASON",
    "ROW_COLUMNS",
    "Batch",
    "DecodeStage",
    "VaeStage",
    "_objects",
    "_pack_image",
    "_real_decoder",
    "_str",
    "_text_encoder",
    "_unpack_image",
    "assemble_tar",
    "done_ids",
    "duplicate_reasons",
    "encode_write",
    "finish_shard",
    "image_sample_id",
    "image_uri",
    "list_ids",
    "marker_uri",
    "plan_shards",
    "read_images",
    "read_shard",
    "record_lost",
    "sample_seed",
    "shard_ids",
    "shard_key",
    "staging_uri",
    "tar_uri",
    "timing_dir",
]
