"""The pipeline's three stages as plain functions over numpy batch dicts (no Ray here).

read_shard     shard URI → one row per pending sample (PiD-form latent, or an error row)   CPU
DecodeStage    rows → rows with raw uint8 images; holds the warm Decoder                  GPU
encode_write   rows → images encoded and written, timing part written, small rows back     CPU

A row's `status` is "pending" until decoded, then "ok" or "error"; error rows ride along every
stage untouched so the timing table has one row per input sample whatever went wrong.
"""

from __future__ import annotations

import hashlib
import io
import os
import socket
import time
import uuid
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pid_batch import codecs, latents, storage
from pid_batch.config import CheckpointSpec, resolve_checkpoint
from pid_batch.decoder import SampleError, net_config_for, validate_latent_shape
from pid_batch.job import IMAGE_SUFFIXES, JobConfig, JobConfigError

Batch = dict[str, np.ndarray]

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
)


def sample_seed(job_seed: int, sample_id: str) -> int:
    """Default per-sample seed: a stable hash of (job seed, id), so retries reproduce images."""
    digest = hashlib.sha256(f"{job_seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def shard_key(input_uri: str, shard_uri: str) -> str:
    """A shard's name under the output prefix: its path relative to the input, made key-safe."""
    rel = (
        shard_uri[len(input_uri.rstrip("/")) + 1 :]
        if shard_uri.startswith(input_uri)
        else shard_uri
    )
    return codecs.sanitize_id(rel.replace("/", "__"))


def image_uri(out: str, sample_id: str, fmt: str) -> str:
    return storage.join(out, "images", f"{sample_id}.{codecs.IMAGE_FORMATS[fmt]}")


def timing_dir(out: str, key: str) -> str:
    return storage.join(out, "timing", key)


def marker_uri(out: str, key: str) -> str:
    return storage.join(out, "_done", f"{key}.json")


_BYTES_COLUMNS = ("latent", "pixels")  # raw float32 latent / uint8 HWC image of an image input
_SHAPE_COLUMNS = ("shape", "pshape")
_STR_COLUMNS = {"id", "shard", "status", "error", "backbone", "caption", "crop"}


def _empty_rows() -> dict[str, list]:
    return {c: [] for c in (*ROW_COLUMNS, "crop", *_BYTES_COLUMNS, *_SHAPE_COLUMNS)}


def _objects(values: list) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


def _columns(rows: dict[str, list]) -> Batch:
    out: Batch = {}
    for k, v in rows.items():
        if k in _BYTES_COLUMNS:
            out[k] = _objects(v)
        elif k in _SHAPE_COLUMNS:
            out[k] = np.asarray(v, dtype=np.int64).reshape(len(v), 3)
        else:
            out[k] = np.asarray(v, dtype=object if k in _STR_COLUMNS else None)
    return out


def read_shard(batch: Batch, job: JobConfig) -> Batch:
    """Read shards (rows of shard URI, key, done ids) into one row per sample still to do."""
    spec = job.model.spec
    cfg = net_config_for(spec, job.model.preset)
    trained_sizes_only = job.model.preset == "full"
    rows = _empty_rows()
    n = len(batch["shard"])
    dup_index = batch.get("dup_index", [None] * n)
    dup_reason = batch.get("dup_reason", [None] * n)
    for uri, key, done, d_index, d_reason in zip(
        batch["shard"], batch["key"], batch["done_ids"], dup_index, dup_reason
    ):
        done = set(done) if done is not None else set()
        dups = dict(zip(d_index, d_reason)) if d_index is not None else {}
        t0 = time.perf_counter()
        try:
            samples = codecs.read_shard(storage.read_bytes(uri), uri)
        except Exception as e:  # whole shard unreadable: one error row stands for it
            _add(
                rows,
                key,
                f"{key}",
                -1,
                "error",
                f"shard unreadable: {storage.redact(str(e))}",
                spec,
            )
            rows["read_ms"][-1] = (time.perf_counter() - t0) * 1000
            _finish_shard(rows, 1)
            continue
        read_ms = (time.perf_counter() - t0) * 1000 / max(1, len(samples))
        # Bad samples are re-emitted every run (no decode): their error rows stay current and
        # the shard never gets a done marker while one of its samples is wrong.
        pending = [s for s in samples if s.id not in done or s.error or s.index in dups]
        if not pending:
            storage.write_json_atomic(
                marker_uri(job.output, key),
                {"shard": uri, "samples": len(samples), "ok": len(samples)},
            )
            continue
        n0 = len(rows["id"])
        for s in pending:
            if s.error or s.index in dups:
                _add(rows, key, s.id, s.index, "error", s.error or dups[s.index], spec)
            else:
                try:
                    backbone = s.backbone or spec.backbone
                    if resolve_checkpoint(backbone, spec.ckpt_type).experiment != spec.experiment:
                        raise SampleError(
                            s.id,
                            f"backbone {backbone!r} needs another checkpoint than this job's "
                            f"{spec.experiment!r}",
                        )
                    lq, sigma = latents.to_pid(
                        s.latent,
                        backbone,
                        s.latent_format or job.sampling.latent_format,
                        s.sigma if s.sigma is not None else job.sampling.sigma,
                        sample_id=s.id,
                    )
                    lq = np.ascontiguousarray(np.asarray(lq, dtype=np.float32))
                    h, w = validate_latent_shape(spec, cfg, lq.shape, s.id, trained_sizes_only)
                except (ValueError, TypeError) as e:
                    _add(rows, key, s.id, s.index, "error", storage.redact(str(e)), spec)
                else:
                    _add(rows, key, s.id, s.index, "pending", None, spec)
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


def _add(rows, key, sample_id, index, status, error, spec: CheckpointSpec) -> None:
    rows["id"].append(sample_id)
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
    for key, files, done in zip(batch["key"], batch["files"], batch["done_ids"]):
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
                )
            else:
                _add(rows, key, sample_id, index, "encode", None, spec)
                rows["caption"][-1] = job.sampling.caption
                rows["sigma"][-1] = float(job.sampling.sigma)
                rows["seed"][-1] = sample_seed(job.sampling.seed, sample_id)
                rows["pixels"][-1] = pixels.tobytes()
                rows["pshape"][-1] = list(pixels.shape)
            rows["read_ms"][-1] = (time.perf_counter() - t0) * 1000
        if len(rows["id"]) == n0:
            _mark_shard_done(job, key, len(files))
        _finish_shard(rows, len(rows["id"]) - n0)
    return _columns(rows)


def image_sample_id(input_uri: str, uri: str) -> str:
    """An image input's id: its path under the input prefix, without extension, key-safe."""
    rel = uri[len(input_uri.rstrip("/")) + 1 :] if uri.startswith(input_uri) else uri
    return codecs.sanitize_id(os.path.splitext(rel)[0].replace("/", "__"))


def _mark_shard_done(job: JobConfig, key: str, samples: int) -> None:
    """Every sample of the shard already has an ok row (a crash came before its marker)."""
    finish_shard(job, key, all_ok=True)


# -- VAE: encode image inputs, native-decode baseline --------------------------------------------


class VaeStage:
    """Holds the backbone's VAE: image rows → PiD latents; optionally the baseline decode."""

    def __init__(self, job: JobConfig):
        import torch

        from pid_batch.vae import VaeCodec

        self.job = job
        self.spec = job.model.spec
        self.cfg = net_config_for(self.spec, job.model.preset)
        device = "cuda" if job.resources.gpus_per_actor and torch.cuda.is_available() else "cpu"
        path = storage.fetch_dir_to_cache(job.model.vae)
        self.codec = VaeCodec.from_path(path, self.spec.backbone, device=device)

    def __call__(self, batch: Batch) -> Batch:
        import torch

        from pid_batch import latents as lat

        n = len(batch["id"])
        out = {k: v for k, v in batch.items() if k not in ("pixels", "pshape")}
        status = [str(v) for v in batch["status"]]
        error = [_str(v) for v in batch["error"]]
        latent, shape = list(batch["latent"]), [list(x) for x in batch["shape"]]
        height, width = list(batch["height"]), list(batch["width"])
        crop, vae_ms = [_str(v) for v in batch["crop"]], [0.0] * n
        baseline, baseline_ms = [b""] * n, [0.0] * n
        for i in range(n):
            sid = str(batch["id"][i])
            if status[i] == "encode":
                try:
                    img = np.frombuffer(batch["pixels"][i], np.uint8).reshape(batch["pshape"][i])
                    ((z, box),) = self.codec.encode([img])
                    vae_ms[i] = self.codec.last_encode_ms
                    sigma = float(batch["sigma"][i])
                    if sigma > 0:  # SPEC §6.1: noise added in fp32 from the sample's own seed
                        g = torch.Generator().manual_seed(int(batch["seed"][i]))
                        z = lat.noise_latent(z, sigma, self.spec.backbone, generator=g)
                    z = np.ascontiguousarray(z.numpy(), dtype=np.float32)
                    h, w = validate_latent_shape(
                        self.spec, self.cfg, z.shape, sid, self.job.model.preset == "full"
                    )
                except Exception as e:
                    status[i], error[i] = (
                        "error",
                        f"sample {sid!r}: VAE encode failed: {storage.redact(str(e))}",
                    )
                    continue
                latent[i], shape[i], height[i], width[i] = z.tobytes(), list(z.shape), h, w
                crop[i], status[i] = ",".join(map(str, box)), "pending"
            if self.job.images.baseline and status[i] == "pending":
                try:
                    z = np.frombuffer(latent[i], np.float32).reshape(shape[i])
                    (img,) = self.codec.decode([torch.from_numpy(z.copy())])
                    baseline[i], baseline_ms[i] = _pack_image(img), self.codec.last_decode_ms
                except Exception as e:  # the PiD image can still be made: keep the row pending
                    error[i] = f"baseline decode failed: {storage.redact(str(e))}"
        out.update(
            status=np.asarray(status, dtype=object),
            error=_objects(error),
            latent=_objects(latent),
            shape=np.asarray(shape, dtype=np.int64).reshape(n, 3),
            height=np.asarray(height, dtype=np.int64),
            width=np.asarray(width, dtype=np.int64),
            crop=_objects(crop),
            vae_encode_ms=np.asarray(vae_ms, dtype=np.float32),
            baseline=_objects(baseline),
            baseline_ms=np.asarray(baseline_ms, dtype=np.float32),
        )
        return out


def _pack_image(img: np.ndarray) -> bytes:
    """An HWC uint8 image as bytes with a 8-byte (h, w) header, so rows carry their own size."""
    h, w = img.shape[:2]
    return np.asarray([h, w], dtype=np.int32).tobytes() + np.ascontiguousarray(img).tobytes()


def _unpack_image(data: bytes) -> np.ndarray:
    h, w = np.frombuffer(data[:8], np.int32)
    return np.frombuffer(data[8:], np.uint8).reshape(int(h), int(w), 3)


# -- decode -----------------------------------------------------------------------------------


class DecodeStage:
    """Holds one warm Decoder; maps read rows to rows with raw images (the actor's body)."""

    def __init__(self, job: JobConfig):
        self.job = job
        t0 = time.perf_counter()
        if job.model.fake_latency_ms is not None:
            from pid_batch.fake import SleepDecoder

            self.decoder = SleepDecoder(job.model.spec, job.model.preset, job.model.fake_latency_ms)
        else:
            self.decoder = _real_decoder(job)
        self.startup_s = time.perf_counter() - t0
        self.node = socket.gethostname()
        self.actor = f"{self.node}:{os.getpid()}"
        self.busy_s = 0.0  # time inside Decoder.decode, for the device-busy fraction
        self.first_call_at: float | None = None
        self.last_call_end: float | None = None

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["id"])
        started = time.time()
        self.first_call_at = self.first_call_at or started
        out = {k: v for k, v in batch.items() if k not in ("latent", "shape")}
        status = np.array([str(v) for v in batch["status"]], dtype=object)
        error = np.array([_str(v) for v in batch["error"]], dtype=object)
        images = np.empty(n, dtype=object)
        images[:] = [b""] * n
        decode_ms = np.zeros(n, np.float32)
        text_ms = np.zeros(n, np.float32)
        micro = np.zeros(n, np.int32)
        queue_ms = np.maximum(0.0, (started - batch["read_done_at"].astype(np.float64)) * 1000)
        buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i in range(n):
            if status[i] == "pending":
                buckets[(int(batch["height"][i]), int(batch["width"][i]))].append(i)
        for idx in buckets.values():
            self._decode_bucket(batch, idx, status, error, images, decode_ms, text_ms, micro)
        self.last_call_end = time.time()
        out.update(
            status=status,
            error=error,
            image=images,
            decode_ms=decode_ms,
            text_ms=text_ms,
            micro_batch=micro,
            queue_ms=queue_ms.astype(np.float32),
            decode_started_at=np.full(n, started),
            node=np.full(n, self.node, dtype=object),
            accelerator=np.full(n, self.decoder.accelerator, dtype=object),
            actor=np.full(n, self.actor, dtype=object),
        )
        return out

    def _decode_bucket(self, batch, idx, status, error, images, decode_ms, text_ms, micro):
        lat = [
            np.frombuffer(batch["latent"][i], np.float32).reshape(batch["shape"][i]) for i in idx
        ]
        args = dict(
            sigmas=[float(batch["sigma"][i]) for i in idx],
            seeds=[int(batch["seed"][i]) for i in idx],
            captions=[str(batch["caption"][i]) for i in idx],
            ids=[str(batch["id"][i]) for i in idx],
        )
        t0 = time.perf_counter()
        try:
            res = self.decoder.decode(lat, **args)
        except Exception:
            # Isolate the sample that broke the batch: decode each alone, fail only that one.
            for j, i in enumerate(idx):
                self._decode_bucket_one(
                    batch, i, lat[j], status, error, images, decode_ms, text_ms, micro
                )
            return
        finally:
            self.busy_s += time.perf_counter() - t0
        for j, i in enumerate(idx):
            images[i] = res.images[j].tobytes()
            decode_ms[i] = res.decode_ms[j]
            text_ms[i] = res.text_ms[j]
            micro[i] = res.micro_batch
            status[i] = "ok"

    def _decode_bucket_one(self, batch, i, lat, status, error, images, decode_ms, text_ms, micro):
        try:
            res = self.decoder.decode(
                [lat],
                sigmas=[float(batch["sigma"][i])],
                seeds=[int(batch["seed"][i])],
                captions=[str(batch["caption"][i])],
                ids=[str(batch["id"][i])],
            )
        except Exception as e:
            status[i] = "error"
            error[i] = f"decode failed: {type(e).__name__}: {storage.redact(str(e))}"[:2000]
            return
        images[i] = res.images[0].tobytes()
        decode_ms[i] = res.decode_ms[0]
        text_ms[i] = res.text_ms[0]
        micro[i] = 1
        status[i] = "ok"


def _real_decoder(job: JobConfig):
    """The warm Decoder for this job, weights fetched once per node from wherever they live."""
    import torch

    from pid_batch.decoder import Decoder

    checkpoint = None
    if job.model.checkpoint:
        checkpoint = storage.fetch_to_cache(
            job.model.checkpoint, sha256=job.model.checkpoint_sha256
        )
    device = None
    if job.resources.gpus_per_actor == 0 or not torch.cuda.is_available():
        device = "cpu"
    decoder = Decoder(
        job.model.spec,
        preset=job.model.preset,
        checkpoint=checkpoint,
        steps=job.sampling.steps,
        device=device,
        dtype=job.model.dtype,
        compile=job.model.compile,
        micro_batch=job.resources.micro_batch,
    )
    decoder.text_encoder = _text_encoder(job, decoder)
    return decoder


def _text_encoder(job: JobConfig, decoder) -> Any:
    from pid_batch.model import text

    cfg = decoder.cfg
    if job.model.text_encoder is None:
        return text.NullTextEncoder(dim=cfg.txt_embed_dim, max_length=cfg.txt_max_length)
    path = storage.fetch_dir_to_cache(job.model.text_encoder)
    dtype = decoder.autocast_dtype or decoder.weight_dtype
    return text.TextEncoder.from_pretrained(
        str(path), device=decoder.device, dtype=dtype, max_length=cfg.txt_max_length
    )


# -- encode + write ---------------------------------------------------------------------------


def encode_write(batch: Batch, job: JobConfig) -> Batch:
    """Encode and write each ok image, then the batch's timing rows (rows last, after images).

    Layout "files": one object per image. Layout "tar": the batch's images of each shard go
    into one staged tar part, merged into <out>/shards/<shard>.tar when the shard completes.
    """
    out = job.output
    fmt, quality = job.images.image_format, job.images.quality
    ext = codecs.IMAGE_FORMATS[fmt]
    tar = job.images.layout == "tar"
    n = len(batch["id"])
    rows: list[dict[str, Any]] = []
    staged: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
    status = [str(v) for v in batch["status"]]
    error = [_str(v) for v in batch["error"]]
    for i in range(n):
        row = _timing_row(batch, i, job)
        sid, key = str(batch["id"][i]), str(batch["shard"][i])
        if status[i] == "ok":
            h, w = int(batch["height"][i]), int(batch["width"][i])
            try:
                t0 = time.perf_counter()
                img = np.frombuffer(batch["image"][i], np.uint8).reshape(h, w, 3)
                data = codecs.encode_image(img, fmt, quality)
                t1 = time.perf_counter()
                if tar:
                    staged[key] += codecs.sample_members(sid, ext, data, _member_meta(row))
                    output = f"shards/{key}.tar:{sid}.{ext}"
                else:
                    uri = image_uri(out, sid, fmt)
                    storage.write_bytes_atomic(uri, data)
                    output = uri[len(out.rstrip("/")) + 1 :]
                t2 = time.perf_counter()
            except Exception as e:
                status[i] = "error"
                error[i] = f"write failed: {type(e).__name__}: {storage.redact(str(e))}"
            else:
                row.update(
                    encode_ms=(t1 - t0) * 1000,
                    write_ms=(t2 - t1) * 1000,
                    bytes=len(data),
                    output=output,
                )
        if status[i] == "ok" and "baseline" in batch and len(batch["baseline"][i]):
            try:
                data = codecs.encode_image(_unpack_image(batch["baseline"][i]), fmt, quality)
                if tar:
                    staged[key].append((f"{sid}.baseline.{ext}", data))
                    row["baseline_output"] = f"shards/{key}.tar:{sid}.baseline.{ext}"
                else:
                    uri = storage.join(out, "baseline", f"{sid}.{ext}")
                    storage.write_bytes_atomic(uri, data)
                    row["baseline_output"] = uri[len(out.rstrip("/")) + 1 :]
                row["baseline_bytes"] = len(data)
            except Exception as e:  # the PiD image is written; report the missing baseline
                error[i] = f"baseline write failed: {storage.redact(str(e))}"
        row["status"], row["error"] = status[i], error[i]
        row["finished_at"] = _ts(time.time())
        rows.append(row)
    part = uuid.uuid4().hex[:16]
    for key, members in staged.items():  # staged tar parts first: rows must follow their images
        t0 = time.perf_counter()
        storage.write_bytes_atomic(staging_uri(out, key, part), codecs.build_tar(members))
        share = (time.perf_counter() - t0) * 1000 / max(1, len(members) // 2)
        for r in rows:
            if r["shard"] == key and r["status"] == "ok":
                r["write_ms"] = share
    by_shard: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_shard[r["shard"]].append(r)
    for key, part_rows in by_shard.items():
        buf = io.BytesIO()
        pq.write_table(codecs.timing_table(part_rows), buf)
        storage.write_bytes_atomic(
            storage.join(timing_dir(out, key), f"part-{part}.parquet"), buf.getvalue()
        )
    return {
        "id": np.asarray(batch["id"], dtype=object),
        "shard": np.asarray(batch["shard"], dtype=object),
        "shard_pending": np.asarray(batch["shard_pending"], dtype=np.int64),
        "status": np.asarray(status, dtype=object),
        "error": _objects(error),
        "decode_ms": np.asarray(batch.get("decode_ms", np.zeros(n)), dtype=np.float32),
    }


def _member_meta(row: dict[str, Any]) -> dict[str, Any]:
    """The JSON stored beside an image in a tar: what produced it."""
    keys = ("id", "shard", "index", "backbone", "variant", "checkpoint", "height", "width")
    return {k: row[k] for k in keys} | {
        "steps": row["steps"],
        "seed": row["seed"],
        "sigma": row["sigma"],
    }


def staging_uri(out: str, key: str, part: str) -> str:
    return storage.join(out, "_staging", key, f"{part}.tar")


def tar_uri(out: str, key: str) -> str:
    return storage.join(out, "shards", f"{key}.tar")


def assemble_tar(job: JobConfig, key: str) -> int:
    """Merge a shard's staged parts (and its existing tar, from earlier runs) into one tar.

    The tar is written atomically, then the staged parts are deleted; a rerun after a crash
    between the two merges the same members again. Returns the number of members.
    """
    out = job.output
    members: dict[str, bytes] = {}
    final = tar_uri(out, key)
    if storage.exists(final):
        members.update(codecs.read_tar(storage.read_bytes(final)))
    try:
        parts = storage.list_files(storage.join(out, "_staging", key), suffixes=(".tar",))
    except FileNotFoundError:
        parts = []
    for uri in parts:
        for name, data in codecs.read_tar(storage.read_bytes(uri)).items():
            members.setdefault(name, data)  # a retried task may have staged a sample twice
    if parts:
        storage.write_bytes_atomic(final, codecs.build_tar(sorted(members.items())))
        for uri in parts:
            storage.delete(uri)
    return len(members)


def finish_shard(job: JobConfig, key: str, all_ok: bool) -> None:
    """A shard whose rows are all in: merge its tar (tar layout), then its done marker, last."""
    if job.images.layout == "tar":
        assemble_tar(job, key)
    if all_ok:
        storage.write_json_atomic(marker_uri(job.output, key), {"shard": key})


def _str(v) -> str | None:
    """A string cell back from Arrow/numpy: None/NaN (an all-null column) → None."""
    return v if isinstance(v, str) else None


def _ts(epoch_s: float):
    import datetime as dt

    return dt.datetime.fromtimestamp(epoch_s, tz=dt.UTC)


def _timing_row(batch: Batch, i: int, job: JobConfig) -> dict[str, Any]:
    def get(k, default=None):
        return batch[k][i] if k in batch else default

    started = get("decode_started_at")
    read_done = float(get("read_done_at"))
    return {
        "id": str(get("id")),
        "shard": str(get("shard")),
        "index": int(get("index")),
        "backbone": str(get("backbone")),
        "variant": job.model.variant_label,
        "checkpoint": job.model.spec.experiment,
        "height": int(get("height")),
        "width": int(get("width")),
        "steps": job.sampling.steps,
        "seed": int(get("seed")),
        "sigma": None if np.isnan(float(get("sigma"))) else float(get("sigma")),
        "read_ms": float(get("read_ms")),
        "queue_ms": float(get("queue_ms", 0.0)),
        "decode_ms": float(get("decode_ms", 0.0)),
        "text_ms": float(get("text_ms", 0.0)),
        "encode_ms": 0.0,
        "write_ms": 0.0,
        "bytes": 0,
        "node": _str(get("node")),
        "accelerator": _str(get("accelerator")),
        "actor": _str(get("actor")),
        "batch_size": int(get("micro_batch", 0)),
        "started_at": _ts(float(started) if started is not None else read_done),
        "output": None,
        "crop": _str(get("crop")),
        "vae_encode_ms": float(get("vae_encode_ms", 0.0)),
        "baseline_ms": float(get("baseline_ms", 0.0)) or None,
    }


def shard_ids(uri: str) -> list[str]:
    """A shard's sample ids without its latents: a safetensors header, a Parquet id column."""
    if uri.lower().endswith(".safetensors"):
        head = storage.read_range(uri, 0, codecs.SAFETENSORS_PREFIX_BYTES)
        end = codecs.safetensors_header_bytes(head, uri)
        return codecs.read_shard_ids(
            head + storage.read_range(uri, len(head), end - len(head)), uri
        )
    return codecs.read_shard_ids(storage.read_bytes(uri), uri)


def list_ids(batch: Batch) -> Batch:
    """Shard rows (order, shard URI) → one (order, index, id) row per sample; unreadable shards
    give none (they become one error row when read)."""
    order, index, ids = [], [], []
    for o, uri in zip(batch["order"], batch["shard"]):
        try:
            found = shard_ids(str(uri))
        except Exception:
            continue
        order += [int(o)] * len(found)
        index += range(len(found))
        ids += found
    return {
        "order": np.asarray(order, np.int32),
        "index": np.asarray(index, np.int32),
        "id": _objects(ids),
    }


def duplicate_reasons(table, keys: list[str]) -> dict[str, tuple[list[int], list[str]]]:
    """shard key → (indices, reasons) of each id's occurrences after its first in another shard.

    `table` has columns order (position in `keys`), index, id. First = lowest (order, index), so
    every run picks the same winner. Repeats inside one shard are codecs' to report.
    """
    import pyarrow.compute as pc

    if table.num_rows == 0:
        return {}
    counts = table.group_by("id").aggregate([("id", "count")])
    repeated = counts.filter(pc.greater(counts.column("id_count"), 1)).column("id")
    if len(repeated) == 0:
        return {}
    t = table.filter(pc.is_in(table.column("id"), value_set=repeated))
    t = t.sort_by([("order", "ascending"), ("index", "ascending")])
    first: dict[str, tuple[int, int]] = {}
    out: dict[str, tuple[list[int], list[str]]] = defaultdict(lambda: ([], []))
    cols = (
        t.column("id").to_pylist(),
        t.column("order").to_pylist(),
        t.column("index").to_pylist(),
    )
    for sid, o, i in zip(*cols):
        fo, fi = first.setdefault(sid, (o, i))
        if fo != o:
            out[keys[o]][0].append(i)
            out[keys[o]][1].append(f"duplicate id {sid!r}: first in shard {keys[fo]}[{fi}]")
    return dict(out)


LOST_REASON = (
    "lost in the pipeline: the stage that held this sample failed after its retries "
    "(e.g. a sample that kills the decoder on every try); rerun to retry it"
)


def record_lost(job: JobConfig, item: dict[str, Any], seen: set[str]) -> list[str]:
    """Error rows for a shard's samples that never came back this run; returns their ids."""
    if job.input_kind == "images":
        found = [(image_sample_id(job.input, u), i) for i, u in enumerate(item["files"])]
    else:
        try:
            found = [(sid, i) for i, sid in enumerate(shard_ids(item["shard"]))]
        except Exception:  # unreadable: one row stands for the shard, as in read_shard
            found = [(item["key"], -1)]
    done = set(item.get("done_ids") or ())
    lost = [(sid, i) for sid, i in found if sid not in done and sid not in seen]
    if lost:
        now = time.time()
        rows = [
            {
                "id": sid,
                "shard": item["key"],
                "index": i,
                "status": "error",
                "error": LOST_REASON,
                "backbone": job.model.spec.backbone,
                "variant": job.model.variant_label,
                "checkpoint": job.model.spec.experiment,
                "steps": job.sampling.steps,
                "started_at": now,
                "finished_at": now,
            }
            for sid, i in lost
        ]
        buf = io.BytesIO()
        pq.write_table(codecs.timing_table(rows), buf)
        name = f"part-lost-{uuid.uuid4().hex[:12]}.parquet"
        storage.write_bytes_atomic(
            storage.join(timing_dir(job.output, item["key"]), name), buf.getvalue()
        )
    return [sid for sid, _ in lost]


def done_ids(out: str, key: str) -> list[str]:
    """Ids of a shard whose ok timing row exists (so their image was written before it)."""
    ids: set[str] = set()
    try:
        parts = storage.list_files(timing_dir(out, key), suffixes=(".parquet",))
    except FileNotFoundError:
        return []
    for uri in parts:
        t = pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=["id", "status"])
        for sid, st in zip(t.column("id").to_pylist(), t.column("status").to_pylist()):
            if st == "ok":
                ids.add(sid)
    return sorted(ids)


def plan_shards(job: JobConfig) -> tuple[list[dict[str, Any]], int]:
    """Shards still to do (with their already-done ids) and the count of shards already done.

    Image inputs are grouped into pseudo-shards of `images_per_shard` files in sorted order,
    keyed by their first and last file, so a rerun over the same archive finds the same keys.
    """
    if job.input_kind == "images":
        files = storage.list_files(job.input, suffixes=IMAGE_SUFFIXES)
        step = job.images_per_shard
        shards = []
        for i in range(0, len(files), step):
            chunk = files[i : i + step]
            digest = hashlib.sha256(f"{chunk[0]}\n{chunk[-1]}".encode()).hexdigest()[:12]
            shards.append((f"images-{i // step:06d}-{digest}", chunk[0], chunk))
    else:
        files = storage.list_files(job.input, suffixes=(".safetensors", ".parquet"))
        shards = [(shard_key(job.input, uri), uri, None) for uri in files]
    if not shards:
        raise JobConfigError(
            f"no input {'images' if job.input_kind == 'images' else 'shards'} under {job.input!r}"
        )
    try:
        markers = storage.list_files(storage.join(job.output, "_done"), suffixes=(".json",))
    except FileNotFoundError:
        markers = []
    done_markers = {os.path.basename(u)[: -len(".json")] for u in markers}
    todo = [
        {"shard": uri, "key": key, "files": chunk, "done_ids": done_ids(job.output, key)}
        for key, uri, chunk in shards
        if key not in done_markers
    ]
    return todo, len(shards) - len(todo)
