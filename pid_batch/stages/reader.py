"""Read stage (CPU tasks): shards of latents or image files → one row per sample still to do.

A row's `status` is "pending" until decoded ("encode" while an image input awaits the VAE),
then "ok" or "error"; error rows ride along every stage untouched so the timing table has one
row per input sample whatever went wrong. Torch-free: Ray's read workers import only this.
"""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np

from pid_batch import codecs, storage
from pid_batch.backbones import CheckpointSpec
from pid_batch.backbones.arrays import to_pid_array
from pid_batch.job import JobConfig
from pid_batch.sample_checks import net_config_for
from pid_batch.stages.checks import check_backbone, output_size
from pid_batch.stages.layout import Batch, image_sample_id, objects, sample_seed
from pid_batch.stages.writer import finish_shard

# Columns every stage passes on; the read stage fills them.
ROW_COLUMNS = (
    "id",
    "shard",
    "index",
    "shard_pending",
    "status",
    "error",
    "backbone",
    "caption",
    "sigma",
    "seed",
    "height",
    "width",
    "read_ms",
    "read_done_at",
    "fingerprint",
)

_BYTES_COLUMNS = ("latent", "pixels")  # raw float32 latent / uint8 HWC image of an image input
_SHAPE_COLUMNS = ("shape", "pshape")
_STR_COLUMNS = {
    "id",
    "shard",
    "status",
    "error",
    "backbone",
    "caption",
    "crop",
    "fingerprint",
    "source_id",
}


def _empty_rows() -> dict[str, list]:
    """Column lists of a batch being built, one list per column."""
    return {c: [] for c in (*ROW_COLUMNS, "crop", "source_id", *_BYTES_COLUMNS, *_SHAPE_COLUMNS)}


def _columns(rows: dict[str, list]) -> Batch:
    """Column lists → the numpy batch Ray Data carries (bytes as objects, shapes as [n, 3])."""
    out: Batch = {}
    for k, v in rows.items():
        if k in _BYTES_COLUMNS:
            out[k] = objects(v)
        elif k in _SHAPE_COLUMNS:
            out[k] = np.asarray(v, dtype=np.int64).reshape(len(v), 3)
        else:
            out[k] = np.asarray(v, dtype=object if k in _STR_COLUMNS else None)
    return out


_DUPLICATES: dict[bytes, dict] = {}  # per read worker: the job's duplicate table, fetched once


def _duplicate_table(ref: Any) -> dict[str, tuple[list[int], list[str]]]:
    """pipeline.start_duplicate_scan's result (waits for the scan); {} without one."""
    if ref is None or isinstance(ref, dict):
        return ref or {}
    if ref.binary() not in _DUPLICATES:
        import ray

        _DUPLICATES.clear()
        _DUPLICATES[ref.binary()] = ray.get(ref)
    return _DUPLICATES[ref.binary()]


def read_shard(batch: Batch, job: JobConfig, duplicates: Any = None) -> Batch:
    """Read shards (rows of shard URI, key, done ids) into one row per sample still to do.

    duplicates: {shard key: (indices, reasons)} of samples to report as duplicates, or a Ray
    ref to it (pipeline.start_duplicate_scan).
    """
    spec = job.model.spec
    cfg = net_config_for(spec, job.model.preset)
    rows = _empty_rows()
    dup_table = _duplicate_table(duplicates)
    for uri, key, fp, done in zip(
        batch["shard"], batch["key"], batch["fingerprint"], batch["done_ids"]
    ):
        done = set(done) if done is not None else set()
        dups = dict(zip(*dup_table.get(str(key), ([], []))))
        t0 = time.perf_counter()
        try:
            samples = codecs.read_shard(storage.read_bytes(uri), uri, stem=codecs.id_stem(key))
        except Exception as e:  # whole shard unreadable: one error row stands for it
            _add(
                rows,
                key,
                f"{key}",
                -1,
                "error",
                f"shard unreadable: {storage.redact(str(e))}",
                spec,
                fp,
            )
            rows["read_ms"][-1] = (time.perf_counter() - t0) * 1000
            _finish_shard(rows, 1)
            continue
        read_ms = (time.perf_counter() - t0) * 1000 / max(1, len(samples))
        # Bad samples are re-emitted every run (no decode): their error rows stay current and
        # the shard never gets a done marker while one of its samples is wrong.
        pending = [s for s in samples if s.id not in done or s.error or s.index in dups]
        if not pending:  # every sample has an ok row: a crash came before the marker
            finish_shard(job, key, fp, all_ok=True)
            continue
        n0 = len(rows["id"])
        for s in pending:
            if s.error or s.index in dups:
                _add(rows, key, s.id, s.index, "error", s.error or dups[s.index], spec, fp)
                rows["source_id"][-1] = s.source_id or ""
            else:
                try:
                    backbone = check_backbone(spec, s.backbone, s.id)
                    lq, sigma = to_pid_array(  # a fresh C-contiguous float32 array
                        s.latent,
                        backbone,
                        s.latent_format or job.sampling.latent_format,
                        s.sigma if s.sigma is not None else job.sampling.sigma,
                        sample_id=s.id,
                    )
                    h, w = output_size(job, cfg, lq.shape, s.id)
                except (ValueError, TypeError) as e:
                    _add(rows, key, s.id, s.index, "error", storage.redact(str(e)), spec, fp)
                    rows["source_id"][-1] = s.source_id or ""
                else:
                    _add(rows, key, s.id, s.index, "pending", None, spec, fp)
                    rows["source_id"][-1] = s.source_id or ""
                    rows["backbone"][-1] = backbone
                    rows["caption"][-1] = (
                        s.caption if s.caption is not None else job.sampling.caption
                    )
                    rows["sigma"][-1] = float(sigma)
                    rows["seed"][-1] = (
                        int(s.seed) if s.seed is not None else sample_seed(job.sampling.seed, s.id)
                    )
                    rows["height"][-1], rows["width"][-1] = h, w
                    rows["latent"][-1] = lq.tobytes()
                    rows["shape"][-1] = list(lq.shape)
            rows["read_ms"][-1] = read_ms
        _finish_shard(rows, len(rows["id"]) - n0)
    return _columns(rows)


def _add(rows, key, sample_id, index, status, error, spec: CheckpointSpec, fp: str) -> None:
    rows["id"].append(sample_id)
    rows["fingerprint"].append(fp)
    rows["source_id"].append("")  # "" = none: an all-None column would not be a string column
    rows["shard"].append(key)
    rows["index"].append(int(index))
    rows["shard_pending"].append(0)
    rows["status"].append(status)
    rows["error"].append(error)
    rows["backbone"].append(spec.backbone)
    rows["caption"].append("")
    rows["sigma"].append(np.nan)
    rows["seed"].append(-1)
    rows["height"].append(0)
    rows["width"].append(0)
    rows["read_ms"].append(0.0)
    rows["read_done_at"].append(time.time())
    rows["crop"].append(None)
    for c in _BYTES_COLUMNS:
        rows[c].append(b"")
    for c in _SHAPE_COLUMNS:
        rows[c].append([0, 0, 0])


def _finish_shard(rows, count: int) -> None:
    """Every row of a shard carries how many rows the shard sent, so the driver knows its end."""
    for i in range(len(rows["id"]) - count, len(rows["id"])):
        rows["shard_pending"][i] = count


def read_images(batch: Batch, job: JobConfig) -> Batch:
    """Read pseudo-shards of image files (archived generations) into rows for the VAE stage."""
    from PIL import Image

    spec = job.model.spec
    rows = _empty_rows()
    for key, files, fp, done in zip(
        batch["key"], batch["files"], batch["fingerprint"], batch["done_ids"]
    ):
        done = set(done) if done is not None else set()
        n0 = len(rows["id"])
        for index, uri in enumerate(files):
            sample_id = image_sample_id(job.input, uri)
            if sample_id in done:
                continue
            t0 = time.perf_counter()
            try:
                with Image.open(io.BytesIO(storage.read_bytes(uri))) as im:
                    pixels = np.asarray(im.convert("RGB"), dtype=np.uint8)
            except Exception as e:
                _add(
                    rows,
                    key,
                    sample_id,
                    index,
                    "error",
                    f"sample {sample_id!r}: unreadable image: {storage.redact(str(e))}",
                    spec,
                    fp,
                )
            else:
                _add(rows, key, sample_id, index, "encode", None, spec, fp)
                rows["caption"][-1] = job.sampling.caption
                rows["sigma"][-1] = float(job.sampling.sigma)
                rows["seed"][-1] = sample_seed(job.sampling.seed, sample_id)
                rows["pixels"][-1] = pixels.tobytes()
                rows["pshape"][-1] = list(pixels.shape)
            rows["read_ms"][-1] = (time.perf_counter() - t0) * 1000
        if len(rows["id"]) == n0:  # every image has an ok row: a crash came before the marker
            finish_shard(job, key, fp, all_ok=True)
        _finish_shard(rows, len(rows["id"]) - n0)
    return _columns(rows)
