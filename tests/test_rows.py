"""The row protocol (stages/rows.py): each stage's batch holds exactly the declared columns with
their declared types, and a missing column is an error unless its stage may be skipped."""

from __future__ import annotations

import numpy as np
import pytest

from pid_batch import codecs, storage
from pid_batch.job import JobConfig, ModelConfig, OutputConfig, ResourceConfig
from pid_batch.stages import decode, reader, resume, rows, writer


def _job(tmp_path) -> JobConfig:
    return JobConfig(
        input=str(tmp_path / "in"),
        output=str(tmp_path / "out"),
        model=ModelConfig(backbone="flux", ckpt_type="2k", preset="tiny", fake_latency_ms=1),
        images=OutputConfig(image_format="png"),
        resources=ResourceConfig(batch_size=4, encode_batch_size=4),
    )


def _read(tmp_path, ids=("a", "b", "c")) -> tuple[JobConfig, rows.Batch]:
    job = _job(tmp_path)
    lat = np.random.default_rng(0).standard_normal((len(ids), 16, 2, 3)).astype(np.float32)
    data = codecs.write_safetensors_shard(lat, list(ids), backbone="flux")
    storage.write_bytes_atomic(storage.join(job.input, "s.safetensors"), data)
    (todo,) = resume.plan_shards(job).todo
    batch = {k: np.asarray([v], dtype=object) for k, v in todo.items()}
    return job, reader.read_shard(batch, job)


def _declared(batch: rows.Batch) -> None:
    for name, arr in batch.items():
        col = rows.COLUMNS[name]
        assert arr.dtype == np.dtype(col.dtype), name
        assert arr.shape == ((len(batch["id"]), col.width) if col.width else (len(batch["id"]),))


def test_the_schema_is_one_table_of_known_stages():
    assert len(rows.COLUMNS) == len(rows.ROW_SCHEMA)
    assert {c.added_by for c in rows.ROW_SCHEMA} == set(rows.STAGES)
    assert {c.dropped_by for c in rows.ROW_SCHEMA} <= {None, *rows.STAGES}
    assert set(rows.DRIVER_COLUMNS) <= set(rows.COLUMNS)


def test_each_stage_passes_exactly_the_declared_columns(tmp_path):
    job, read = _read(tmp_path)
    assert set(read) == set(rows.added_by("read"))
    _declared(read)
    decoded = decode.DecodeStage(job)(read)
    want = {c.name for c in rows.ROW_SCHEMA if c.added_by in ("read", "decode")}
    assert set(decoded) == want - {"latent", "shape"}  # consumed by the decode stage
    _declared(decoded)
    assert list(decoded["status"]) == ["ok"] * 3
    out = writer.encode_write(decoded, job)  # no VAE stage ran: its columns are defaults
    assert set(out) == set(rows.DRIVER_COLUMNS)
    _declared(out)
    assert list(out["status"]) == ["ok"] * 3


def test_a_missing_column_without_a_skippable_stage_is_an_error(tmp_path):
    job, read = _read(tmp_path)
    decoded = decode.DecodeStage(job)(read)
    del decoded["text_ms"]
    with pytest.raises(KeyError, match="text_ms.*decode stage"):
        writer.encode_write(decoded, job)
    with pytest.raises(KeyError, match="decode stage did not set"):
        rows.stage_output(read, "decode", image=[b""] * 3)
    with pytest.raises(KeyError, match="'id' has no default"):
        rows.add_row(rows.new_rows(), shard="k", status="error")
    with pytest.raises(KeyError, match="not read-stage"):
        rows.add_row(rows.new_rows(), image=b"")


class _Poisoned:
    """A decoder that fails any call holding sample 'b' (and decodes the rest to zeros)."""

    accelerator = "cpu"

    def decode(self, latents, sigmas, seeds, captions=None, ids=None):
        from pid_batch.sample_checks import DecodeOutput

        if "b" in ids:
            raise RuntimeError("poisoned")
        n, (_, h, w) = len(latents), latents[0].shape
        images = np.zeros((n, h * 16, w * 16, 3), np.uint8)
        return DecodeOutput(images, [1.0] * n, [2.0] * n, 0.0, n)


def test_a_failing_bucket_fails_only_the_sample_that_broke_it(tmp_path):
    job, read = _read(tmp_path)
    stage = decode.DecodeStage(job)
    stage.decoder = _Poisoned()
    out = stage(read)
    assert list(out["status"]) == ["ok", "error", "ok"]
    assert out["error"][1].startswith("decode failed: RuntimeError: poisoned")
    assert list(out["micro_batch"]) == [1, 0, 1]  # decoded one by one after the batch failed
    assert [len(x) for x in out["image"]] == [32 * 48 * 3, 0, 32 * 48 * 3]
