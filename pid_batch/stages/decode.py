"""The actor bodies (no Ray here): VaeStage (image inputs) and DecodeStage (the warm Decoder).

The only stage module that uses torch, and only once a stage is built: the pipeline imports it
inside its actor classes, so Ray's CPU task workers (read, encode/write) never load torch. Each
stage returns rows.stage_output(): the columns it adds and drops are those rows.ROW_SCHEMA names.
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
from pid_batch.redaction import redact
from pid_batch.sample_checks import net_config_for
from pid_batch.stages import rows
from pid_batch.stages.checks import output_size
from pid_batch.stages.layout import cell_str, pack_image
from pid_batch.stages.rows import Batch
from pid_batch.tiles import TilePlan


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
        status = [str(v) for v in batch["status"]]
        error = [cell_str(v) for v in batch["error"]]
        latent, shape = list(batch["latent"]), [list(x) for x in batch["shape"]]
        height, width = list(batch["height"]), list(batch["width"])
        cells = rows.defaults("vae", n)
        for i in range(n):
            sid = str(batch["id"][i])
            if status[i] == "encode":
                try:
                    img = np.frombuffer(batch["pixels"][i], np.uint8).reshape(batch["pshape"][i])
                    if self.job.images.target_long_side:  # PiD's output lands on the target
                        img = resize_long_side(
                            img, self.job.images.target_long_side // self.spec.sr_scale
                        )
                        cells["resize"][i] = f"{img.shape[1]}x{img.shape[0]}"
                    ((z, box),) = self.codec.encode([img])
                    cells["vae_encode_ms"][i] = self.codec.last_encode_ms
                    sigma = float(batch["sigma"][i])
                    if sigma > 0:  # fp32 noise, sample's own seed (docs/model.md#degrade-sigma)
                        g = torch.Generator().manual_seed(int(batch["seed"][i]))
                        z = lat.noise_latent(z, sigma, self.spec.backbone, generator=g)
                    z = np.ascontiguousarray(z.numpy(), dtype=np.float32)
                    h, w = output_size(self.job, self.cfg, z.shape, sid)
                except Exception as e:
                    status[i], error[i] = (
                        "error",
                        f"sample {sid!r}: VAE encode failed: {redact(str(e))}",
                    )
                    continue
                latent[i], shape[i], height[i], width[i] = z.tobytes(), list(z.shape), h, w
                cells["crop"][i], status[i] = ",".join(map(str, box)), "pending"
            if self.job.images.baseline and status[i] == "pending":
                try:
                    z = np.frombuffer(latent[i], np.float32).reshape(shape[i])
                    (img,) = self.codec.decode([torch.from_numpy(z.copy())])
                    cells["baseline"][i] = pack_image(img)
                    cells["baseline_ms"][i] = self.codec.last_decode_ms
                except Exception as e:  # the PiD image can still be made: keep the row pending
                    error[i] = f"baseline decode failed: {redact(str(e))}"
        return rows.stage_output(
            batch,
            "vae",
            status=status,
            error=error,
            latent=latent,
            shape=shape,
            height=height,
            width=width,
            **cells,
        )


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
        status = [str(v) for v in batch["status"]]
        error = [cell_str(v) for v in batch["error"]]
        buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i in range(n):
            if status[i] == "pending" and fail:
                status[i], error[i] = "error", fail
            elif status[i] == "pending":
                buckets[(int(batch["height"][i]), int(batch["width"][i]))].append(i)
        cells = rows.defaults("decode", n)
        for idx in buckets.values():
            for i, res in zip(idx, self._decode_bucket(batch, idx)):
                if isinstance(res, str):
                    status[i], error[i] = "error", res
                    continue
                status[i] = "ok"
                for name, value in res.cells().items():
                    cells[name][i] = value
        self.last_call_end = time.time()
        read_done = rows.column(batch, "read_done_at").astype(np.float64)
        cells.update(
            queue_ms=np.maximum(0.0, (started - read_done) * 1000),
            decode_started_at=[started] * n,
            node=[self.node] * n,
            node_id=[self.placement.node_id or ""] * n,
            accelerator=[self.decoder.accelerator] * n,
            accelerator_class=[self.placement.accelerator_class or ""] * n,
            actor=[self.actor] * n,
        )
        return rows.stage_output(batch, "decode", status=status, error=error, **cells)

    def _decode_bucket(self, batch: Batch, idx: list[int]) -> list[Decoded | str]:
        """Decode rows `idx` (one output size) in one call; per row its result or why it failed.
        When the call fails, each row is decoded alone, so only the sample that broke it fails."""
        lat = [
            np.frombuffer(batch["latent"][i], np.float32).reshape(batch["shape"][i]) for i in idx
        ]
        t0 = time.perf_counter()
        try:
            res = self.decoder.decode(lat, **self._decode_args(batch, idx))
        except Exception:
            return [self._decode_one(batch, i, x) for i, x in zip(idx, lat)]
        finally:
            self.busy_s += time.perf_counter() - t0
        return [
            Decoded(img.tobytes(), res.decode_ms[j], res.text_ms[j], res.micro_batch, res.tiles)
            for j, img in enumerate(res.images)
        ]

    def _decode_one(self, batch: Batch, i: int, lat: np.ndarray) -> Decoded | str:
        try:
            res = self.decoder.decode([lat], **self._decode_args(batch, [i]))
        except Exception as e:
            return f"decode failed: {type(e).__name__}: {redact(str(e))}"[:2000]
        return Decoded(res.images[0].tobytes(), res.decode_ms[0], res.text_ms[0], 1, res.tiles)

    @staticmethod
    def _decode_args(batch: Batch, idx: list[int]) -> dict[str, list]:
        """Decoder.decode's per-sample arguments of rows `idx`."""
        return dict(
            sigmas=[float(batch["sigma"][i]) for i in idx],
            seeds=[int(batch["seed"][i]) for i in idx],
            captions=[str(batch["caption"][i]) for i in idx],
            ids=[str(batch["id"][i]) for i in idx],
        )


@dataclass(frozen=True)
class Decoded:
    """One row's decode: its raw image and what the decode call measured."""

    image: bytes  # raw uint8 HWC
    decode_ms: float
    text_ms: float
    micro_batch: int
    tiles: TilePlan | None  # None: decoded whole

    def cells(self) -> dict[str, object]:
        """The row's decode columns (rows.ROW_SCHEMA) this result sets."""
        plan = self.tiles
        return {
            "image": self.image,
            "decode_ms": self.decode_ms,
            "text_ms": self.text_ms,
            "micro_batch": self.micro_batch,
            "tile_height": 0 if plan is None else plan.tile_h,
            "tile_width": 0 if plan is None else plan.tile_w,
            "tile_overlap": 0 if plan is None else plan.overlap,
            "tiles": 0 if plan is None else plan.count,
        }


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
