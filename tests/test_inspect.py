"""Dataset inspection over safetensors + Parquet shards, a corrupt shard and bad samples."""

from __future__ import annotations

import numpy as np
import pytest

from pid_batch import codecs, storage
from pid_batch.inspect_data import format_inspect, inspect_dataset


def _write_dataset(root: str) -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (3, 16, 8, 8)).astype(np.float32)
    storage.write_bytes_atomic(
        storage.join(root, "a.safetensors"),
        codecs.write_safetensors_shard(
            a, ["a-0", "a-1", "a-2"], captions=["a cat", None, "a dog"],
            sigmas=[0.0, 0.1, 0.25], seeds=[1, 2, 3], backbone="flux", dtype="bfloat16",
        ),
    )  # fmt: skip
    bad = rng.normal(0, 1, (16, 8, 8)).astype(np.float32)
    bad[0, 0, :3] = np.nan
    storage.write_bytes_atomic(
        storage.join(root, "sub", "b.parquet"),
        codecs.write_parquet_shard(
            [
                {"id": "b-0", "latent": rng.normal(0, 1, (16, 4, 6)).astype(np.float32),
                 "caption": "x", "sigma": 0.5, "backbone": "sd3", "latent_format": "diffusers"},
                {"id": "b-1", "latent": bad, "caption": "y", "backbone": "sd3",
                 "latent_format": "diffusers"},
                {"id": "b-2", "latent": np.zeros((16, 8, 8), np.float16), "dtype": "float16",
                 "backbone": "sd3", "latent_format": "diffusers"},
            ]
        ),
    )  # fmt: skip
    good = codecs.write_safetensors_shard(np.zeros((2, 16, 8, 8), np.float32), ["c-0", "c-1"])
    storage.write_bytes_atomic(storage.join(root, "c.safetensors"), good[: len(good) // 2])
    storage.write_bytes_atomic(
        storage.join(root, "d.safetensors"),
        codecs.write_safetensors_shard(np.ones((1, 16, 8, 8), np.float32), ["a-1"]),
    )
    storage.write_bytes_atomic(storage.join(root, "README.txt"), b"not a shard")


def test_inspect_a_prefix(tmp_path):
    root = str(tmp_path / "data")
    _write_dataset(root)
    d = inspect_dataset(root)
    assert d["shards_found"] == d["shards_read"] == 4  # README.txt is not a shard
    assert [u["shard"].rsplit("/", 1)[-1] for u in d["shards_unreadable"]] == ["c.safetensors"]
    assert "truncated" in d["shards_unreadable"][0]["reason"]
    assert (d["samples"], d["ok"], d["error"]) == (7, 6, 1)
    assert d["shapes"] == {"16x8x8": 5, "16x4x6": 1}
    assert d["dtypes"] == {"bfloat16": 3, "float32": 3, "float16": 1}
    assert d["backbones"] == {"flux": 3, "sd3": 3, "unset": 1}
    assert d["latent_formats"] == {"pid": 4, "diffusers": 3}
    assert d["sigma"] == {"min": 0.0, "max": 0.5} and d["sigma_missing"] == 2
    assert d["captions"] == {"present": 4, "missing": 3}
    assert d["seeds"] == {"present": 3, "missing": 3}
    assert d["problems"]["latent has N NaN/Inf values"]["count"] == 1
    assert d["problems"]["latent has N NaN/Inf values"]["examples"][0].startswith(
        "b-1 (sub/b.parquet[1])"
    )
    dup = d["problems"]["id repeated across shards (outputs would overwrite each other)"]
    assert dup["count"] == 1 and dup["examples"] == ["a-1"] and "'a-1'" in dup["message"]
    v = d["latent_values"]
    assert v["max"] >= 1.0 and v["min"] < -1.0 and 0.5 < v["std"] < 1.5
    text = format_inspect(d)
    for needle in ("4 shards", "ok 6", "16x8x8 ×5", "c.safetensors", "NaN/Inf", "a-1", "0 .. 0.5"):
        assert needle in text, needle
    assert "latent has 3 NaN/Inf values" in text  # the real message, numbers kept


def test_inspect_cli_exit_code_says_whether_problems_were_found(tmp_path, capsys):
    from pid_batch.cli import main

    root = str(tmp_path / "data")
    _write_dataset(root)
    assert main(["inspect", root]) == 1
    assert "latent has 3 NaN/Inf values" in capsys.readouterr().out
    clean = str(tmp_path / "clean")
    storage.write_bytes_atomic(
        storage.join(clean, "a.safetensors"),
        codecs.write_safetensors_shard(np.zeros((1, 16, 8, 8), np.float32), ["x-0"]),
    )
    assert main(["inspect", clean]) == 0


def test_inspect_one_shard_and_limit(tmp_path):
    root = str(tmp_path / "data")
    _write_dataset(root)
    d = inspect_dataset(storage.join(root, "a.safetensors"))
    assert (d["shards_found"], d["samples"], d["ok"]) == (1, 3, 3)
    assert d["problems"] == {} and d["shards_unreadable"] == []
    # bf16 storage keeps ~3 significant digits of the values
    assert d["sigma"]["max"] == pytest.approx(0.25)
    assert "no problems found" in format_inspect(d)
    limited = inspect_dataset(root, limit=1)
    assert (limited["shards_found"], limited["shards_read"]) == (4, 1)
    assert "(1 inspected)" in format_inspect(limited)
    with pytest.raises(FileNotFoundError, match="no .safetensors / .parquet shards"):
        inspect_dataset(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="limit"):
        inspect_dataset(root, limit=0)


def test_inspect_on_s3(s3_bucket):
    root = f"s3://{s3_bucket}/latents"
    _write_dataset(root)
    d = inspect_dataset(root)
    assert (d["shards_found"], d["samples"], d["ok"]) == (4, 7, 6)
    assert d["shards_unreadable"][0]["shard"] == f"{root}/c.safetensors"
