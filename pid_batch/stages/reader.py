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
from pid_batch.backbones.arrays import to_pid_array
from pid_batch.job import JobConfig
from pid_batch.redaction import redact
from pid_batch.sample_checks import net_config_for
from pid_batch.stages import rows
from pid_batch.stages.checks import check_backbone, output_size
from pid_batch.stages.layout import image_sample_id, sample_seed
from pid_batch.stages.rows import Batch
from pid_batch.stages.writer import finish_shard

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
    out = rows.new_rows()
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
                out,
                job,
                key,
                fp,
                id=f"{key}",
                index=-1,
                status="error",
                error=f"shard unreadable: {redact(str(e))}",
                read_ms=(time.perf_counter() - t0) * 1000,
            )
            _finish_shard(out, 1)
            continue
        read_ms = (time.perf_counter() - t0) * 1000 / max(1, len(samples))
        # Bad samples are re-emitted every run (no decode): their error rows stay current and
        # the shard never gets a done marker while one of its samples is wrong.
        pending = [s for s in samples if s.id not in done or s.error or s.index in dups]
        if not pending:  # every sample has an ok row: a crash came before the marker
            finish_shard(job, key, fp, all_ok=True)
            continue
        n0 = len(out["id"])
        for s in pending:
            cells = dict(id=s.id, index=s.index, source_id=s.source_id or "", read_ms=read_ms)
            if s.error or s.index in dups:
                _add(out, job, key, fp, status="error", error=s.error or dups[s.index], **cells)
                continue
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
                _add(out, job, key, fp, status="error", error=redact(str(e)), **cells)
            else:
                _add(
                    out,
                    job,
                    key,
                    fp,
                    status="pending",
                    backbone=backbone,
                    caption=s.caption if s.caption is not None else job.sampling.caption,
                    sigma=float(sigma),
                    seed=int(s.seed)
                    if s.seed is not None
                    else sample_seed(job.sampling.seed, s.id),
                    height=h,
                    width=w,
                    latent=lq.tobytes(),
                    shape=list(lq.shape),
                    **cells,
                )
        _finish_shard(out, len(out["id"]) - n0)
    return rows.to_batch(out)


def _add(out: dict[str, list], job: JobConfig, key: str, fp: str, **cells: Any) -> None:
    """One row of shard `key` (fingerprint fp): the given cells, the job's backbone, read now."""
    cells.setdefault("backbone", job.model.spec.backbone)
    rows.add_row(out, shard=key, fingerprint=fp, read_done_at=time.time(), **cells)


def _finish_shard(out: dict[str, list], count: int) -> None:
    """Every row of a shard carries how many rows the shard sent, so the driver knows its end."""
    for i in range(len(out["id"]) - count, len(out["id"])):
        out["shard_pending"][i] = count


def read_images(batch: Batch, job: JobConfig) -> Batch:
    """Read pseudo-shards of image files (archived generations) into rows for the VAE stage."""
    from PIL import Image

    out = rows.new_rows()
    for key, files, fp, done in zip(
        batch["key"], batch["files"], batch["fingerprint"], batch["done_ids"]
    ):
        done = set(done) if done is not None else set()
        n0 = len(out["id"])
        for index, uri in enumerate(files):
            sample_id = image_sample_id(job.input, uri)
            if sample_id in done:
                continue
            t0 = time.perf_counter()
            try:
                with Image.open(io.BytesIO(storage.read_bytes(uri))) as im:
                    pixels = np.asarray(im.convert("RGB"), dtype=np.uint8)
            except Exception as e:
                cells = {
                    "status": "error",
                    "error": f"sample {sample_id!r}: unreadable image: {redact(str(e))}",
                }
            else:
                cells = {
                    "status": "encode",
                    "caption": job.sampling.caption,
                    "sigma": float(job.sampling.sigma),
                    "seed": sample_seed(job.sampling.seed, sample_id),
                    "pixels": pixels.tobytes(),
                    "pshape": list(pixels.shape),
                }
            read_ms = (time.perf_counter() - t0) * 1000
            _add(out, job, key, fp, id=sample_id, index=index, read_ms=read_ms, **cells)
        if len(out["id"]) == n0:  # every image has an ok row: a crash came before the marker
            finish_shard(job, key, fp, all_ok=True)
        _finish_shard(out, len(out["id"]) - n0)
    return rows.to_batch(out)
