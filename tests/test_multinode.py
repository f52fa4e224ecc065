"""One job over unlike nodes: per-accelerator micro-batch and fake latency from the job spec, the
node id and class on every timing row, and a multi-node Ray on this machine (CPU head, two "rtx"
nodes, one "gb200" node, logical GPUs) that loses a node and gains one mid-job."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pid_batch import codecs, storage, timing
from pid_batch.job import JobConfigError, ModelConfig, ResourceConfig, load_job
from pid_batch.stages import decode, reader, writer
from pid_batch.summary import summarize
from pid_batch.timing import read_timing, read_timing_parts

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    """benchmarks/multinode_bench.py: the cluster, the job and the timing-table audits."""
    spec = importlib.util.spec_from_file_location("multinode_bench", ROOT / "benchmarks" / "multinode_bench.py")  # fmt: skip
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


# -- the job spec -------------------------------------------------------------------------------


def test_micro_batch_and_fake_latency_per_accelerator_class(tmp_path):
    spec = {
        "input": str(tmp_path / "in"),
        "output": str(tmp_path / "out"),
        "model": {"preset": "tiny", "fake_latency_ms": {"rtx": 100, "GB200": 21.1}},
        "resources": {"micro_batch": {"rtx": 1, "GB200": 8}},
    }
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(spec))
    job = load_job(path)
    res, model = job.resources, job.model
    assert [res.micro_batch_on(c) for c in ("rtx", "GB200", "H100", None)] == [1, 8, 0, 0]
    assert [model.fake_latency_on(c) for c in ("rtx", "GB200", "H100")] == [100, 21.1, None]
    # One number still applies everywhere.
    assert ResourceConfig(micro_batch=4).micro_batch_on("rtx") == 4
    assert ModelConfig(preset="tiny", fake_latency_ms=5).fake_latency_on(None) == 5


@pytest.mark.parametrize(
    "res, match",
    [
        ({"micro_batch": {"rtx": 0.5}}, r"micro_batch\['rtx'\]=0.5 must be int"),
        ({"micro_batch": {"rtx": -1}}, r"must be int >= 0"),
        ({"micro_batch": {"rtx": True}}, r"micro_batch\['rtx'\]=True"),
        ({"micro_batch": {5090: 1}}, r"accelerator class 5090 must be a non-empty string"),
        ({"micro_batch": {}}, r"empty mapping"),
        ({"micro_batch": "8"}, r"micro_batch='8' must be int"),
    ],
)
def test_bad_per_class_settings_fail_before_any_work(tmp_path, res, match):
    path = tmp_path / "job.yaml"
    spec = {"input": str(tmp_path / "in"), "output": str(tmp_path / "out"), "resources": res}
    path.write_text(json.dumps({**spec, "model": {"preset": "tiny"}}).replace('"5090"', "5090"))
    with pytest.raises(JobConfigError, match=match):
        load_job(path)
    with pytest.raises(JobConfigError, match=r"fake_latency_ms\['gb200'\]=-1 must be"):
        ModelConfig(preset="tiny", fake_latency_ms={"gb200": -1})
    assert not (tmp_path / "out").exists()


def test_accelerator_class_from_node_labels():
    from pid_batch.pipeline import ACCELERATOR_LABELS, accelerator_class

    ours, rays = ACCELERATOR_LABELS
    assert accelerator_class({rays: "GB200", ours: "gb200"}) == "gb200"  # ours wins
    assert accelerator_class({rays: "GB200", "ray.io/node-id": "ab"}) == "GB200"
    assert accelerator_class({"ray.io/node-id": "ab"}) is None


def test_classes_no_node_has_are_named():
    from pid_batch.job import JobConfig
    from pid_batch.pipeline import unmatched_classes

    job = JobConfig(
        input="/in",
        output="/out",
        model=ModelConfig(preset="tiny", fake_latency_ms={"rtx": 1, "b200": 2}),
        resources=ResourceConfig(micro_batch={"rtx": 1, "gb2OO": 8}),
    )
    nodes = [{"ray.io/node-id": "a"}, {"pid-batch/accelerator": "rtx"}]
    assert unmatched_classes(job, nodes) == ["b200", "gb2OO"]
    plain = JobConfig(input="/in", output="/out", model=ModelConfig(preset="tiny"))
    assert unmatched_classes(plain, nodes) == []


def test_cluster_yaml_labels_each_gpu_node_type_with_its_class():
    import yaml

    from pid_batch.pipeline import ACCELERATOR_LABELS

    types = yaml.safe_load((ROOT / "cluster.yaml").read_text())["available_node_types"]
    for name in ("rtx", "gb200"):
        assert types[name]["labels"] == {ACCELERATOR_LABELS[0]: name}


# -- the decode actor's body, no Ray -----------------------------------------------------------


def _rows_through_stages(tmp_path, placement, **job_kw) -> pa.Table:
    """One shard through read → DecodeStage(placement) → encode/write; its timing rows."""
    from pid_batch.job import JobConfig, OutputConfig

    inp, out = tmp_path / "in", str(tmp_path / "out")
    lat = np.zeros((3, 16, 2, 3), np.float32)
    (inp).mkdir()
    (inp / "a.safetensors").write_bytes(codecs.write_safetensors_shard(lat, ["x", "y", "z"]))
    job = JobConfig(
        input=str(inp),
        output=out,
        model=ModelConfig(backbone="flux", ckpt_type="2k", preset="tiny", **job_kw.pop("model")),
        images=OutputConfig(image_format="jpeg"),
        resources=ResourceConfig(**job_kw),
    )
    batch = {
        "shard": np.array([str(inp / "a.safetensors")], dtype=object),
        "key": np.array(["a.safetensors"], dtype=object),
        "fingerprint": np.array(["f0"], dtype=object),
        "done_ids": np.array([None], dtype=object),
    }
    decoded = decode.DecodeStage(job, placement)(reader.read_shard(batch, job))
    writer.encode_write(decoded, job)
    return read_timing(out)


def test_each_row_carries_its_node_class_and_micro_batch(tmp_path):
    from pid_batch.stages.decode import Placement

    where = Placement(node_id="ab" * 28, host="host-1", accelerator_class="gb200")
    t = _rows_through_stages(
        tmp_path,
        where,
        model={"fake_latency_ms": {"gb200": 30.0, "rtx": 0.0}},
        micro_batch={"rtx": 1, "gb200": 8},
    )
    assert t.num_rows == 3 and set(t.column("status").to_pylist()) == {"ok"}
    assert set(t.column("node_id").to_pylist()) == {"ab" * 28}
    assert set(t.column("node").to_pylist()) == {"host-1"}
    assert set(t.column("accelerator_class").to_pylist()) == {"gb200"}
    assert set(t.column("micro_batch").to_pylist()) == {8}  # the gb200 micro-batch
    assert min(t.column("decode_ms").to_pylist()) >= 30.0 * 0.99  # the gb200 latency


def test_an_unlabelled_node_gets_the_defaults_and_null_columns(tmp_path):
    t = _rows_through_stages(tmp_path, None, model={"fake_latency_ms": {"rtx": 500.0}},
                             micro_batch={"rtx": 1})  # fmt: skip
    assert t.column("node_id").null_count == t.column("accelerator_class").null_count == 3
    assert set(t.column("micro_batch").to_pylist()) == {1}  # fake: nothing to size it from
    assert max(t.column("decode_ms").to_pylist()) < 500.0  # DEFAULT_LATENCY_MS, not rtx's


def _read_back_old_and_new(out: str, old, new):
    """Write an old-version and a new timing part of shard "s"; read the output's rows back."""
    for name, t in (("part-old.parquet", old), ("part-new.parquet", new)):
        timing.write_part(out, "s", name, t)
    return read_timing_parts(out)


def test_timing_parts_written_before_node_ids_still_read(tmp_path):
    """A version-1 part (no node_id / accelerator_class) next to a new one: one table, nulls."""
    out = str(tmp_path / "out")
    new = timing.timing_table([{"id": "b", "shard": "s", "index": 1, "status": "ok",
                                "node_id": "cd" * 28, "accelerator_class": "rtx"}])  # fmt: skip
    old = timing.timing_table([{"id": "a", "shard": "s", "index": 0, "status": "ok"}])
    old = old.drop_columns(["node_id", "accelerator_class"])
    raw = _read_back_old_and_new(out, old, new)
    timing.validate_timing_table(raw)
    by_id = dict(zip(raw.column("id").to_pylist(), raw.column("node_id").to_pylist()))
    assert by_id == {"a": None, "b": "cd" * 28}
    storage.delete(storage.join(out, "timing", "s", "part-new.parquet"))
    only_old = read_timing(out)  # every part old: the columns still exist
    assert only_old.column("accelerator_class").null_count == 1
    assert summarize(only_old)["ok"] == 1


# -- a multi-node Ray on this machine ----------------------------------------------------------

SCALE = 0.1  # × the paper's latencies: rtx 100 ms, gb200 21.1 ms per image
SAMPLES, PER_SHARD, BATCH = 384, 32, 16


def _ok_rows(out: str) -> pa.Table:
    t = read_timing(out)
    return t.filter(pc.equal(t.column("status"), "ok"))


@pytest.fixture(scope="module")
def lose_run(bench, tmp_path_factory):
    """One job on head + rtx + rtx + gb200, an rtx node removed once it has decoded a batch."""
    root = tmp_path_factory.mktemp("lose")
    report = bench.scenario("lose", str(root), SAMPLES, PER_SHARD, SCALE, BATCH)
    return report, root / "lose" / "out"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_decode_actors_on_both_node_types(bench, lose_run):
    r, out = lose_run
    nodes = {g["node_id"]: g for g in r["per_node"]}
    # Both node types decoded, never the head. Not "all three GPU nodes": under load a node's
    # actor can start after the others have drained the job (seen here once, load ~30).
    assert {g["kind"] for g in nodes.values()} == {"gb200", "rtx"}, r["per_node"]
    for g in nodes.values():
        assert g["class"] == g["kind"]  # the class the actor read from its node's label
        assert g["micro_batch"] == bench.MICRO_BATCH[g["kind"]]
    assert len({g["host"] for g in nodes.values()}) == 1  # one machine: the node id tells apart
    ok = _ok_rows(str(out))
    assert ok.column("node_id").null_count == 0 and ok.column("accelerator_class").null_count == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_node_lost_mid_job_loses_and_duplicates_nothing(lose_run):
    r, out = lose_run
    assert r["exit_code"] == 0
    a = r["audit"]
    assert (a["ok"], a["error"], a["lost"], a["duplicated"]) == (SAMPLES, 0, 0, 0)
    assert a["raw_rows"] == SAMPLES and a["images"] == SAMPLES
    (ev,) = r["events"]
    assert ev["action"] == "remove" and ev["samples_left"] > 0
    assert ev["rows_on_node"] >= BATCH  # it had decoded before it went
    ok = _ok_rows(str(out))
    on_victim = ok.filter(pc.equal(ok.column("node_id"), ev["node_id"]))
    started = on_victim.column("started_at").cast(pa.int64()).to_numpy() / 1000
    assert started.max() < ev["at"]  # nothing came from it after it was gone...
    # ...and the surviving nodes went on with the rest. Whether Ray restarts the lost actor
    # elsewhere or hands its batches to the survivors is Ray's choice (both were seen here), so
    # the test asserts only what the job owes: the samples left at the loss were decoded later,
    # off the lost node (their ok rows above are exactly once).
    after = ok.filter(pc.not_equal(ok.column("node_id"), ev["node_id"]))
    after_started = after.column("started_at").cast(pa.int64()).to_numpy() / 1000
    assert (after_started > ev["at"]).sum() > 0, r["per_node"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_node_added_mid_job_gets_decode_actors(bench, tmp_path):
    """Start on head + one rtx node (10 images/s here); a gb200 node joins once it decodes."""
    r = bench.scenario("grow", str(tmp_path), SAMPLES, PER_SHARD, SCALE, BATCH,
                       workers=("rtx",), joins="gb200")  # fmt: skip
    assert r["exit_code"] == 0
    a = r["audit"]
    assert (a["ok"], a["lost"], a["duplicated"]) == (SAMPLES, 0, 0)
    (ev,) = r["events"]
    assert ev["action"] == "add" and ev["samples_left"] > 0
    assert ev["rows_on_node"] > 0  # the pool grew onto the new node
    ok = _ok_rows(str(tmp_path / "grow" / "out"))
    on_new = ok.filter(pc.equal(ok.column("node_id"), ev["node_id"]))
    assert set(on_new.column("accelerator_class").to_pylist()) == {"gb200"}
    assert set(on_new.column("micro_batch").to_pylist()) == {bench.MICRO_BATCH["gb200"]}


def test_timing_column_batch_size_reads_back_as_micro_batch(tmp_path):
    """Version-1/2 parts call the micro-batch `batch_size`; read with a version-3 part, one column."""
    out = str(tmp_path / "out")
    new = timing.timing_table(
        [{"id": "b", "shard": "s", "index": 1, "status": "ok", "micro_batch": 8}]
    )
    old = timing.timing_table(
        [{"id": "a", "shard": "s", "index": 0, "status": "ok", "micro_batch": 4}]
    )
    old = old.rename_columns(["batch_size" if c == "micro_batch" else c for c in old.column_names])
    raw = _read_back_old_and_new(out, old, new)
    timing.validate_timing_table(raw)
    assert "batch_size" not in raw.column_names
    assert dict(zip(raw.column("id").to_pylist(), raw.column("micro_batch").to_pylist())) == {
        "a": 4,
        "b": 8,
    }
