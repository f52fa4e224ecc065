"""The sleeping stand-in decoder: Decoder-shaped outputs, its latency, and a pipeline run with it."""

from __future__ import annotations

import time

import numpy as np
import pytest

from pid_batch import codecs, pipeline, storage
from pid_batch.fake import SleepDecoder
from pid_batch.job import JobConfig, ModelConfig, OutputConfig, ResourceConfig
from pid_batch.sample_checks import DecodeOutput, SampleError
from pid_batch.timing import read_timing


def flux_tiny() -> ModelConfig:
    return ModelConfig(backbone="flux", ckpt_type="2k", preset="tiny")


def test_sleep_decoder_shapes_and_latency():
    dec = SleepDecoder(flux_tiny().spec, "tiny", latency_ms=20)
    assert dec.cfg.lq_latent_channels == 16 and dec.accelerator == "fake"
    assert dec.text_encoder is None and dec.device == "cpu"
    assert dec.micro_batch_for(64, 96) == 1
    lat = [np.zeros((16, 2, 3), np.float32)] * 3
    t0 = time.perf_counter()
    out = dec.decode(lat, [0.0] * 3, [1, 2, 3], captions=["a"] * 3, ids=["a", "b", "c"])
    elapsed = time.perf_counter() - t0
    assert isinstance(out, DecodeOutput)
    assert out.images.shape == (3, 64, 96, 3) and out.images.dtype == np.uint8
    assert len(out.decode_ms) == len(out.text_ms) == 3 and out.micro_batch == 1
    assert elapsed >= 3 * 0.020
    assert min(out.decode_ms) >= 20.0 * 0.99


def test_sleep_decoder_rejects_what_the_real_decoder_rejects():
    dec = SleepDecoder(flux_tiny().spec, "tiny", latency_ms=0)
    with pytest.raises(SampleError, match="16 channels"):
        dec.decode([np.zeros((4, 2, 2), np.float32)], [0.0], [0], ids=["x"])
    with pytest.raises(ValueError, match="one shape"):
        dec.decode(
            [np.zeros((16, 2, 2), np.float32), np.zeros((16, 2, 3), np.float32)], [0.0] * 2, [0, 1]
        )
    with pytest.raises(ValueError, match="2 sigmas"):
        dec.decode([np.zeros((16, 2, 2), np.float32)], [0.0, 0.0], [0])
    with pytest.raises(ValueError, match="latency_ms"):
        SleepDecoder(flux_tiny().spec, "tiny", latency_ms=-1)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_pipeline_runs_with_the_fake_decoder(shared_ray, tmp_path):
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    rng = np.random.default_rng(0)
    ids = []
    for s in range(2):
        sid = [f"f{s}-{i}" for i in range(3)]
        lat = rng.standard_normal((3, 16, 2, 3)).astype(np.float32)
        data = codecs.write_safetensors_shard(lat, sid, backbone="flux")
        storage.write_bytes_atomic(storage.join(inp, f"shard-{s}.safetensors"), data)
        ids += sid
    job = JobConfig(
        input=inp,
        output=out,
        model=ModelConfig(backbone="flux", ckpt_type="2k", preset="tiny", fake_latency_ms=1.0),
        images=OutputConfig(image_format="png"),
        resources=ResourceConfig(batch_size=4, cpus_per_actor=0.5, encode_cpus=0.5),
    )
    result = pipeline.run(job, log=None)
    assert result.exit_code == 0 and result.processed == len(ids)
    table = read_timing(out)
    assert sorted(table.column("id").to_pylist()) == sorted(ids)
    assert set(table.column("accelerator").to_pylist()) == {"fake"}
    assert min(table.column("decode_ms").to_pylist()) >= 1.0 * 0.99
    assert len(storage.list_files(storage.join(out, "images"))) == len(ids)
