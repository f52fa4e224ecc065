"""Ray's CPU tasks (read, encode/write, finish) run without torch: their modules never import it."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from pid_batch import codecs, storage
from pid_batch.job import JobConfig, ModelConfig, OutputConfig, ResourceConfig

# What a read / encode / finish / id-listing worker imports, and the driver's graph module.
TORCH_FREE = (
    "pid_batch.stages.reader",
    "pid_batch.stages.writer",
    "pid_batch.stages.resume",
    "pid_batch.stages.layout",
    "pid_batch.stages.checks",
    "pid_batch.stages.rows",
    "pid_batch.backbones.arrays",
    "pid_batch.sample_checks",
    "pid_batch.stages",
    "pid_batch.pipeline",
    "pid_batch.fake",  # simulated actors (benchmarks/sim_scale.py) start like light workers
)


def _loads_torch(module: str) -> bool:
    """Import `module` in a fresh interpreter; whether torch ended up in sys.modules."""
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip() == "True"


@pytest.mark.parametrize("module", TORCH_FREE)
def test_cpu_task_modules_import_no_torch(module):
    assert not _loads_torch(module)


def test_the_check_sees_torch_where_it_is_imported():
    assert _loads_torch("pid_batch.decoder")  # control: the probe can fail


@pytest.fixture(scope="module")
def fresh_ray():
    """A local Ray of its own: its task workers have run nothing else (no torch from elsewhere)."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=200 * 2**20,
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()


def _job(inp: str, out: str) -> JobConfig:
    return JobConfig(
        input=inp,
        output=out,
        model=ModelConfig(backbone="flux", ckpt_type="2k", preset="tiny", fake_latency_ms=1),
        images=OutputConfig(image_format="png"),
        resources=ResourceConfig(batch_size=4, encode_batch_size=4),
    )


def _write_shard(root: str, n: int) -> list[str]:
    ids = [f"a-{i}" for i in range(n)]
    lat = np.random.default_rng(0).standard_normal((n, 16, 2, 3)).astype(np.float32)
    data = codecs.write_safetensors_shard(lat, ids, captions=["a cat"] * n, backbone="flux")
    storage.write_bytes_atomic(storage.join(root, "shard-000.safetensors"), data)
    return ids


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_graph_tasks_come_from_torch_free_modules(fresh_ray, tmp_path, monkeypatch):
    """build_dataset hands Ray functions of torch-free modules; actors import torch lazily."""
    from pid_batch import pipeline
    from pid_batch.stages import resume

    job = _job(str(tmp_path / "in"), str(tmp_path / "out"))
    _write_shard(job.input, 2)
    seen = []
    real = fresh_ray.data.Dataset.map_batches

    def record(self, fn, *args, **kwargs):
        seen.append(fn)
        return real(self, fn, *args, **kwargs)

    monkeypatch.setattr(fresh_ray.data.Dataset, "map_batches", record)
    pipeline.build_dataset(job, resume.plan_shards(job).todo)  # lazy: builds, runs nothing
    tasks = {f.__module__ for f in seen if not isinstance(f, type)}
    actors = {f.__module__ for f in seen if isinstance(f, type)}
    assert tasks == {"pid_batch.stages.reader", "pid_batch.stages.writer"}, tasks
    assert actors == {"pid_batch.pipeline"}, actors


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_read_and_write_run_in_a_ray_task_without_torch(fresh_ray, tmp_path):
    """read_shard → (stand-in decode) → encode_write in one Ray Data task: torch never loads."""
    from pid_batch.stages import resume

    job = _job(str(tmp_path / "in"), str(tmp_path / "out"))
    ids = _write_shard(job.input, 3)
    todo = resume.plan_shards(job).todo

    def read_decode_write(batch, job):  # pickled by value: the worker imports only what it uses
        import sys as worker_sys

        from pid_batch.stages import reader, writer
        from pid_batch.stages import rows as row_schema

        rows = reader.read_shard(batch, job)
        n = len(rows["id"])
        decoded = row_schema.defaults("decode", n)  # blank images
        decoded["image"] = [
            bytes(int(h) * int(w) * 3) for h, w in zip(rows["height"], rows["width"])
        ]
        status = np.where(rows["status"] == "pending", "ok", rows["status"])
        rows = row_schema.stage_output(rows, "decode", status=status, **decoded)
        out = writer.encode_write(rows, job)
        out["torch_loaded"] = np.full(n, "torch" in worker_sys.modules)
        return out

    ds = fresh_ray.data.from_items(todo).map_batches(
        read_decode_write, batch_size=1, fn_kwargs={"job": job}, num_cpus=0.5
    )
    rows = ds.take_all()
    assert sorted(r["id"] for r in rows) == ids
    assert [r["status"] for r in rows] == ["ok"] * len(ids)
    assert not any(r["torch_loaded"] for r in rows)
    written = storage.list_files(storage.join(job.output, "images"))
    assert sorted(u.rsplit("/", 1)[1] for u in written) == [f"{i}.png" for i in ids]
