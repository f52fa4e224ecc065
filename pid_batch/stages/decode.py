"""The actor bodies (no Ray here): VaeStage (image inputs) and DecodeStage (the warm Decoder).

The only stage module that uses torch: the pipeline imports it inside its actor classes, so
Ray's CPU task workers (read, encode/write) never load torch.
"""

from __future__ import annotations

import os
import socket
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pid_batch import storage
from pid_batch.job import JobConfig
from pid_batch.sample_checks import net_config_for
from pid_batch.stages.checks import output_size
from pid_batch.stages.layout import Batch, cell_str, objects, pack_image


class VaeStage:
    """Holds the backbone's VAE: image rows → PiD latents; optionally the baseline decode."""

    def __init__(self, job: JobConfig):
        import torch

        from pid_batch.backbones.vae import VaeCodec

        self.job = job
        self.spec = job.model.spec
        self.cfg = net_config_for(self.spec, job.model.preset)
        device = "cuda" if job.resources.gpus_per_actor and torch.cuda.is_available() else "cpu"
        path = storage.fetch_dir_to_cache(job.model.vae)
        self.codec = VaeCodec.from_path(path, self.spec.backbone, device=device)

    def __call__(self, batch: Batch) -> Batch:
        import torch

        from pid_batch.backbones import tensors as lat
        from pid_batch.backbones.vae import resize_long_side

        n = len(batch["id"])
        out = {k: v for k, v in batch.items() if k not in ("pixels", "pshape")}
        status = [str(v) for v in batch["status"]]
        error = [cell_str(v) for v in batch["error"]]
        latent, shape = list(batch["latent"]), [list(x) for x in batch["shape"]]
        height, width = list(batch["height"]), list(batch["width"])
        crop, vae_ms = [cell_str(v) for v in batch["crop"]], [0.0] * n
        baseline, baseline_ms = [b""] * n, [0.0] * n
        resize = [""] * n  # "WxH" an image was resized to before encoding ("": not resized)
        for i in range(n):
            sid = str(batch["id"][i])
            if status[i] == "encode":
                try:
                    img = np.frombuffer(batch["pixels"][i], np.uint8).reshape(batch["pshape"][i])
                    if self.job.images.target_long_side:  # PiD's output lands on the target
                        img = resize_long_side(
                            img, self.job.images.target_long_side // self.spec.sr_scale
                        )
                        resize[i] = f"{img.shape[1]}x{img.shape[0]}"
                    ((z, box),) = self.codec.encode([img])
                    vae_ms[i] = self.codec.last_encode_ms
                    sigma = float(batch["sigma"][i])
                    if sigma > 0:  # fp32 noise, sample's own seed (docs/model.md#degrade-sigma)
                        g = torch.Generator().manual_seed(int(batch["seed"][i]))
                        z = lat.noise_latent(z, sigma, self.spec.backbone, generator=g)
                    z = np.ascontiguousarray(z.numpy(), dtype=np.float32)
                    h, w = output_size(self.job, self.cfg, z.shape, sid)
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
                    baseline[i], baseline_ms[i] = pack_image(img), self.codec.last_decode_ms
                except Exception as e:  # the PiD image can still be made: keep the row pending
                    error[i] = f"baseline decode failed: {storage.redact(str(e))}"
        out.update(
            status=np.asarray(status, dtype=object),
            error=objects(error),
            latent=objects(latent),
            shape=np.asarray(shape, dtype=np.int64).reshape(n, 3),
            height=np.asarray(height, dtype=np.int64),
            width=np.asarray(width, dtype=np.int64),
            crop=objects(crop),
            resize=np.asarray(resize, dtype=object),
            vae_encode_ms=np.asarray(vae_ms, dtype=np.float32),
            baseline=objects(baseline),
            baseline_ms=np.asarray(baseline_ms, dtype=np.float32),
        )
        return out


@dataclass(frozen=True)
class Placement:
    """Where a decode actor runs (the pipeline reads it from Ray; None where Ray does not say)."""

    node_id: str | None = None  # the Ray node id
    host: str = field(default_factory=socket.gethostname)
    accelerator_class: str | None = None  # keys the job's per-class settings (job.ResourceConfig)


class DecodeStage:
    """Holds one warm Decoder; maps read rows to rows with raw images (the actor's body)."""

    def __init__(self, job: JobConfig, placement: Placement | None = None):
        self.job = job
        self.placement = placement or Placement()
        cls = self.placement.accelerator_class
        micro_batch = job.resources.micro_batch_on(cls)
        t0 = time.perf_counter()
        if job.model.fake_latency_ms is not None:
            from pid_batch.fake import DEFAULT_LATENCY_MS, SleepDecoder

            latency = job.model.fake_latency_on(cls)
            self.decoder = SleepDecoder(
                job.model.spec,
                job.model.preset,
                DEFAULT_LATENCY_MS if latency is None else latency,
                micro_batch=micro_batch or 1,  # the fake has no memory to size it from
                tiling=job.sampling.tiling,
                max_output_megapixels=job.sampling.max_output_megapixels,
            )
        else:
            self.decoder = _real_decoder(job, micro_batch)
        self.startup_s = time.perf_counter() - t0
        self.node = self.placement.host
        self.actor = f"{self.node}:{os.getpid()}"
        self.busy_s = 0.0  # time inside Decoder.decode, for the device-busy fraction
        self.first_call_at: float | None = None
        self.last_call_end: float | None = None

    def __call__(self, batch: Batch, fail: str | None = None) -> Batch:
        """Decode the batch's pending rows; with `fail`, make them error rows with that reason."""
        n = len(batch["id"])
        started = time.time()
        self.first_call_at = self.first_call_at or started
        out = {k: v for k, v in batch.items() if k not in ("latent", "shape")}
        status = np.array([str(v) for v in batch["status"]], dtype=object)
        error = np.array([cell_str(v) for v in batch["error"]], dtype=object)
        images = np.empty(n, dtype=object)
        images[:] = [b""] * n
        decode_ms = np.zeros(n, np.float32)
        text_ms = np.zeros(n, np.float32)
        micro = np.zeros(n, np.int32)
        tiles = np.zeros((n, 4), np.int32)  # tile height, width, overlap, count (0: whole)
        queue_ms = np.maximum(0.0, (started - batch["read_done_at"].astype(np.float64)) * 1000)
        buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i in range(n):
            if status[i] == "pending" and fail:
                status[i], error[i] = "error", fail
            elif status[i] == "pending":
                buckets[(int(batch["height"][i]), int(batch["width"][i]))].append(i)
        for idx in buckets.values():
            self._decode_bucket(batch, idx, status, error, images, decode_ms, text_ms, micro, tiles)
        self.last_call_end = time.time()
        out.update(
            status=status,
            error=error,
            image=images,
            decode_ms=decode_ms,
            text_ms=text_ms,
            micro_batch=micro,
            tile_height=tiles[:, 0],
            tile_width=tiles[:, 1],
            tile_overlap=tiles[:, 2],
            tiles=tiles[:, 3],
            queue_ms=queue_ms.astype(np.float32),
            decode_started_at=np.full(n, started),
            node=np.full(n, self.node, dtype=object),
            node_id=np.full(n, self.placement.node_id or "", dtype=object),
            accelerator=np.full(n, self.decoder.accelerator, dtype=object),
            accelerator_class=np.full(n, self.placement.accelerator_class or "", dtype=object),
            actor=np.full(n, self.actor, dtype=object),
        )
        return out

    def _decode_bucket(self, batch, idx, status, error, images, decode_ms, text_ms, micro, tiles):
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
                    batch, i, lat[j], status, error, images, decode_ms, text_ms, micro, tiles
                )
            return
        finally:
            self.busy_s += time.perf_counter() - t0
        for j, i in enumerate(idx):
            images[i] = res.images[j].tobytes()
            decode_ms[i] = res.decode_ms[j]
            text_ms[i] = res.text_ms[j]
            micro[i] = res.micro_batch
            tiles[i] = _tile_cells(res.tiles)
            status[i] = "ok"

    def _decode_bucket_one(
        self, batch, i, lat, status, error, images, decode_ms, text_ms, micro, tiles
    ):
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
        tiles[i] = _tile_cells(res.tiles)
        status[i] = "ok"


def _tile_cells(plan) -> tuple[int, int, int, int]:
    """(tile height, width, overlap, count) of a decode's TilePlan; zeros when decoded whole."""
    return (0, 0, 0, 0) if plan is None else (plan.tile_h, plan.tile_w, plan.overlap, plan.count)


def _real_decoder(job: JobConfig, micro_batch: int | None = None):
    """The warm Decoder for this job, weights fetched once per node from wherever they live
    (micro_batch: this actor's, 0 to size it from free memory; None: the job's class-less one)."""
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
        compile_mode=job.model.compile_mode,
        micro_batch=job.resources.micro_batch_on(None) if micro_batch is None else micro_batch,
        tiling=job.sampling.tiling,
        tile_overlap=job.sampling.tile_overlap,
        tile_size=job.sampling.tile_hw,
        max_output_megapixels=job.sampling.max_output_megapixels,
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
